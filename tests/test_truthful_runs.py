"""Records that tell the truth (issue 10): resume, `+resume=true`, W&B status, gradient norms,
the epochs rule, the parallel launcher's threads and the sweep table."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from actlab import report
from actlab.errors import UserError
from actlab.launch import DeviceSlots
from actlab.train import CONFIG_DIR
from actlab.train import main as train_main
from actlab.validation import validate

QUICK = [
    "data=synthetic",
    "data.source.n_train=600",
    "data.source.n_test=100",
    "data.val_size=100",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "++trainer.enable_progress_bar=false",
]


def here(*args: str) -> str:
    """`python train.py ARGS` in this process; returns what it printed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train.py", *args])
        out = io.StringIO()
        mp.setattr(sys, "stdout", out)
        try:
            train_main()
        finally:
            GlobalHydra.instance().clear()
    return out.getvalue()


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def metric_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def wandb_inspect(run_dir: Path) -> dict:
    """What W&B's own reader says about an offline run (state, exit code, summary)."""
    wandb = Path(sys.executable).with_name("wandb")
    proc = subprocess.run(
        [str(wandb), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


# --- 3. What W&B and the tables say ----------------------------------------------------------


@pytest.mark.parametrize("epochs", [-1, 0])
def test_max_epochs_below_one_is_refused(epochs: int) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer.max_epochs={epochs}"])
    with pytest.raises(UserError, match=f"trainer.max_epochs={epochs} must be an integer >= 1"):
        validate(cfg)


def test_grad_norms_are_logged_before_clipping(tmp_path: Path) -> None:
    clip = 1e-6  # clipped, every layer's norm would be at most this
    here(
        *QUICK,
        "logger=csv",
        f"model.gradient_clip_val={clip}",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={tmp_path}/run",
    )
    rows = metric_rows(tmp_path / "run")
    norms = [float(r["grad_norm/output"]) for r in rows if r.get("grad_norm/output")]
    assert len(norms) > 5
    assert min(norms) > 1000 * clip


def test_wandb_run_of_a_job_that_did_not_finish_says_so(tmp_path: Path) -> None:
    here(
        "-m",
        *QUICK,
        "logger=wandb",
        "model.act=none",
        "optimizer.lr=1000,0.05",  # diverges on this data; converges
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    seen = {}
    for job in (tmp_path / "sweep").iterdir():
        if job.is_dir():
            (run_dir,) = (job / "wandb").glob("offline-run-*")
            seen[results(job)["status"]] = wandb_inspect(run_dir)
    assert set(seen) == {"diverged", "finished"}
    assert seen["diverged"]["exit_code"] != 0
    assert seen["diverged"]["state"] != "finished"
    assert seen["diverged"]["summary"]["status"] == "diverged"
    assert seen["finished"]["exit_code"] == 0
    assert seen["finished"]["summary"]["status"] == "finished"


def test_sweep_tables_format_each_column_evenly_and_show_r2(tmp_path: Path) -> None:
    for slope, seconds, r2 in ((0, 1.8, 0.91), (0.01, 0.18, 0.93)):
        job = tmp_path / f"model.act.negative_slope={slope}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model.act.negative_slope={slope}\n")
        record = {
            "status": "finished",
            "config": {"act": "leaky", "negative_slope": slope, "seed": 0},
            "metrics": {"test/r2": r2, "val/r2_best": r2, "train/loss_epoch": 0.1},
            "seconds": seconds,
            "seconds_per_epoch": seconds,
            "epochs": 3,
        }
        (job / "results.json").write_text(json.dumps(record))
    table = report.format_table(report.collect(tmp_path)).splitlines()
    header = table[0].split()
    assert "test/r2" in header and "val/r2_best" in header
    cells = [dict(zip(header, line.split(), strict=True)) for line in table[2:]]
    assert [c["slope"] for c in cells] == ["0.00", "0.01"]
    assert [c["seconds"] for c in cells] == ["1.80", "0.18"]
    assert [c["test/r2"] for c in cells] == ["0.9100", "0.9300"]
    md = report.write_report(tmp_path)
    assert "| leaky | 0.00 | 0.9100 |" in md and "| leaky | 0.01 | 0.9300 |" in md
    assert "| 1.80 |" in md and "| 0.18 |" in md
