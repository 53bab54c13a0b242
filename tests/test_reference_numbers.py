"""A job of its own (a pack of one) against numbers recorded from the solo path (Lightning's loop
with actlab.model.MLPClassifier) before the one-engine change.

Packed-vs-solo tests compare two paths run now; these compare with numbers written down before
(tests/reference/solo.json), so that the two paths cannot drift apart together. Each case is a
short run on the synthetic data; a case's fingerprint is its metrics and, per tensor of the best
checkpoint, the sum and the sum of absolute values (float64).

`python tests/test_reference_numbers.py --record` rewrites the file: only when a change to the
numbers is meant, and say why in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import CPU, SMALL_DATA, run_train

from actlab.results import read_results

REFERENCE = Path(__file__).parent / "reference" / "solo.json"
# No progress bar or model summary, as the numbers were recorded (tests/conftest.py QUICK then).
BASE = [
    *SMALL_DATA,
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    *CPU,
    "logger=csv",
    "trainer.max_epochs=3",
    "model.net.hidden_sizes=[32]",
]
CASES = {
    "relu_sgd": ["model.act=relu"],
    "leaky_adam": ["model.act=leaky", "model.act.negative_slope=0.1", "optimizer=adam"],
    "none_sgd_seed1": ["model.act=none", "seed=1"],
    "tanh_step_scheduler": [
        "model.act=tanh",
        "scheduler=step",
        "scheduler.step_size=1",
        "scheduler.gamma=0.5",
    ],
    "prelu_sgd_wd": ["model.act=prelu", "optimizer.weight_decay=0.001"],
    "regression": [
        "experiment=leaky_regression",
        "data=regression",
        "model.net.hidden_sizes=[10,10]",
    ],
}
METRICS = ("val/acc_best", "test/acc", "val/r2_best", "test/r2", "train/loss_epoch")
# The same arithmetic on this CPU gives the same bits; the margin is for another BLAS or build.
RTOL = 1e-4
METRIC_ATOL = 1e-3


def fingerprint(case: str, folder: Path) -> dict:
    base = (
        BASE if "data=regression" not in CASES[case] else [a for a in BASE if a != "data=synthetic"]
    )
    proc = run_train(*base, *CASES[case], f"hydra.run.dir={folder}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_results(folder)
    assert record["pack"]["size"] == 1  # a pack of one, not Lightning's loop
    state = torch.load(record["best_checkpoint"], weights_only=True)["state_dict"]
    return {
        "epochs": record["epochs"],
        "best_checkpoint": Path(record["best_checkpoint"]).name,
        "metrics": {k: record["metrics"][k] for k in METRICS if k in record["metrics"]},
        "tensors": {
            k: [v.double().sum().item(), v.double().abs().sum().item()]
            for k, v in state.items()
            if k.startswith("net.")
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_job_of_its_own_gives_the_solo_paths_recorded_numbers(case: str, tmp_path: Path) -> None:
    expected = json.loads(REFERENCE.read_text())[case]
    got = fingerprint(case, tmp_path)
    assert got["epochs"] == expected["epochs"]
    assert got["best_checkpoint"] == expected["best_checkpoint"]
    assert got["metrics"].keys() == expected["metrics"].keys()
    for key, value in expected["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, abs=METRIC_ATOL), key
    assert got["tensors"].keys() == expected["tensors"].keys()
    for key, sums in expected["tensors"].items():
        assert got["tensors"][key] == pytest.approx(sums, rel=RTOL, abs=1e-6), key


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    with tempfile.TemporaryDirectory() as tmp:
        numbers = {case: fingerprint(case, Path(tmp) / case) for case in sorted(CASES)}
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}")
