"""`data.steps_per_batch`: several minibatches per Lightning batch, one optimizer step each.

A grouped run must be the run it replaces: the same optimizer steps in the same order, the same
metrics at the same logging steps, the same divergence step and the same checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, LIGHTNING_LOOP, here, here_exit, metric_rows, net_weights, results

# 1800 training rows of 64: 29 minibatches an epoch. Groups of 4 end mid-epoch and the
# epoch's last group is short; logging every 3 steps falls inside groups and at their ends.
GROUPED = "+data.steps_per_batch=4"
RUN = [
    *FAST,
    "logger=csv",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=3",
    "scheduler=step",
    "model.gradient_clip_val=0.5",
    LIGHTNING_LOOP,  # whose batches the option groups (a pack of one groups its own steps)
]


def _run(folder: Path, *extra: str) -> dict:
    here(*RUN, *extra, f"hydra.run.dir={folder}")
    return results(folder)


def _rows(folder: Path) -> list[dict[str, float | None]]:
    return [{k: float(v) if v else None for k, v in r.items()} for r in metric_rows(folder)]


def _steps(folder: Path) -> list[float | None]:
    """The logging step of each row of the run's metrics.csv."""
    return [r["step"] for r in _rows(folder)]


def test_a_grouped_run_is_the_run_it_replaces(tmp_path: Path) -> None:
    one, grouped = _run(tmp_path / "one"), _run(tmp_path / "grouped", GROUPED)
    assert one["status"] == grouped["status"] == "finished"
    assert "pack" not in one and "pack" not in grouped  # both under Lightning's loop
    assert grouped["composed_config"]["data"]["steps_per_batch"] == 4
    assert grouped["metrics"].keys() == one["metrics"].keys()
    for key, value in one["metrics"].items():
        assert grouped["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    rows, grouped_rows = _rows(tmp_path / "one"), _rows(tmp_path / "grouped")
    # Step metrics (train/loss, grad_norm/*) every 3 optimizer steps, epoch metrics at the
    # epochs' last steps: the same rows at the same steps.
    assert _steps(tmp_path / "grouped") == _steps(tmp_path / "one")
    assert any(r["grad_norm/output"] is not None for r in rows)
    for a, b in zip(rows, grouped_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] is None) == (b[key] is None), (a["step"], key)
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    last = [f / "checkpoints" / "last.ckpt" for f in (tmp_path / "one", tmp_path / "grouped")]
    states = [torch.load(c, map_location="cpu", weights_only=False) for c in last]
    assert states[0]["global_step"] == states[1]["global_step"] == 2 * 29
    loops = [s["loops"]["fit_loop"] for s in states]
    # Lightning saw 2 x 8 batches of the grouped run (7 groups of 4 and 1 of 1 an epoch)...
    batches = [loop["epoch_loop.batch_progress"]["total"]["completed"] for loop in loops]
    assert batches == [2 * 29, 2 * 8]
    # ...and its logging step still counts optimizer steps.
    stepped = [loop["epoch_loop.state_dict"]["_batches_that_stepped"] for loop in loops]
    assert stepped == [2 * 29, 2 * 29]
    a, b = (net_weights(c) for c in last)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)


def test_a_grouped_run_resumed_from_its_checkpoint_continues_as_one_run(tmp_path: Path) -> None:
    straight = _run(tmp_path / "straight", GROUPED)
    here(*RUN, GROUPED, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'resumed'}")
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    resumed = _run(tmp_path / "resumed", GROUPED, f"ckpt_path={ckpt}")
    assert resumed["metrics"] == straight["metrics"]
    assert _steps(tmp_path / "resumed") == _steps(tmp_path / "straight")


def test_a_grouped_run_diverges_at_the_step_the_ungrouped_one_does(tmp_path: Path) -> None:
    diverging = ["optimizer.lr=1e5", "model.gradient_clip_val=null"]
    for name, extra in (("one", []), ("grouped", [GROUPED])):
        code, _, _ = here_exit(*RUN, *diverging, *extra, f"hydra.run.dir={tmp_path / name}")
        assert code not in (0, None)
    one, grouped = results(tmp_path / "one"), results(tmp_path / "grouped")
    assert one["status"] == grouped["status"] == "diverged"
    # "by step N": the check inside a group runs at the same steps as on plain batches.
    assert grouped["error"] == one["error"]
    step = int(one["error"].split("by step ")[1].split()[0])
    assert step % 4, "the premise: the loss turned NaN inside a group of 4, not at its end"


@pytest.mark.parametrize("value", ["0", "2.5"])
def test_a_bad_steps_per_batch_is_refused_in_one_line(tmp_path: Path, value: str) -> None:
    code, out, err = here_exit(*FAST, f"+data.steps_per_batch={value}", f"hydra.run.dir={tmp_path}")
    assert code not in (0, None)
    assert f"data.steps_per_batch={value}" in out + err
    assert "Traceback" not in out + err


def test_a_grouped_run_stops_at_max_steps_inside_a_group(tmp_path: Path) -> None:
    for name, extra in (("one", []), ("grouped", [GROUPED])):
        _run(tmp_path / name, "+trainer.max_steps=10", *extra)
    states = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)
        for name in ("one", "grouped")
    ]
    assert [s["global_step"] for s in states] == [10, 10]  # 10: inside the third group of 4
    assert _steps(tmp_path / "grouped") == _steps(tmp_path / "one")


@pytest.mark.parametrize("grouped", [[], [GROUPED]], ids=["one", "grouped"])
def test_backward_hooks_run_each_step_where_someone_listens(tmp_path: Path, grouped) -> None:
    """The module calls loss.backward() itself only where Lightning's manual_backward would do
    nothing more; a callback that overrides a backward hook turns that off, and is called on
    every optimizer step."""
    seen = {}
    for name, probe, extra in (
        ("quiet", "PlainBackward", []),
        ("listening", "BackwardCalls", []),
        ("profiled", "PlainBackward", ["debug=profiler"]),
    ):
        out = tmp_path / f"{name}.json"
        _run(
            tmp_path / name,
            f"+callbacks.backward._target_=probes.{probe}",
            f"+callbacks.backward.path={out}",
            *extra,
            *grouped,
        )
        seen[name] = json.loads(out.read_text())
    assert [seen[n]["plain"] for n in ("quiet", "listening", "profiled")] == [True, False, False]
    listening = seen["listening"]
    assert listening["before"] == listening["after"] == listening["steps"] == 2 * 29
    # loss.backward() itself or Lightning's manual_backward: the same run.
    quiet, loud = results(tmp_path / "quiet"), results(tmp_path / "listening")
    assert quiet["metrics"] == loud["metrics"]
