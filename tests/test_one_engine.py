"""A job of its own trains on the packs' engine, as a pack of one (actlab.pack.train_one), and is
written as a solo job; a job a pack cannot take trains under Lightning's loop and says why."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from conftest import (
    FAST,
    LIGHTNING_LOOP,
    metric_rows,
    net_weights,
    results,
    run_command,
    run_train,
)

from actlab import ROOT

RUN = [*FAST, "logger=csv", "trainer.max_epochs=2"]


def test_a_run_is_a_pack_of_one_written_as_a_solo_job(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_train(*RUN, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = results(run)
    assert record["status"] == "finished" and record["epochs"] == 2
    assert record["pack"]["size"] == 1 and record["pack"]["id"] is None
    assert {"val/acc_best", "test/acc", "dead/layer1"} <= set(record["metrics"])
    # Hydra's own log is the member's: each line once, the summary before training.
    log = (run / "train.log").read_text()
    assert log.count("run: trains as a pack of one on cpu") == 1
    assert log.count("model (each member's):") == 1 and "Trainable params" in log
    assert log.count("run: test/acc=") == 1
    assert [r["epoch"] for r in metric_rows(run) if r["val/acc"]] == ["0", "1"]
    best = Path(record["best_checkpoint"])
    assert best.parent == run / "checkpoints" and (run / "checkpoints" / "last.ckpt").is_file()
    evaluated = run_command([sys.executable, ROOT / "eval.py", f"ckpt_path={best}"])
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert f"{record['metrics']['test/acc']:.4f}" in evaluated.stdout + evaluated.stderr


def test_a_run_continued_or_started_from_a_checkpoint_is_a_pack_of_one(tmp_path: Path) -> None:
    """`ckpt_path=` in its run folder continues that run there; a checkpoint from elsewhere gives
    only its weights to a new run from epoch 0. Both train on the packs' engine."""
    run = tmp_path / "run"
    proc = run_train(*RUN, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = run / "checkpoints" / "last.ckpt"
    proc = run_train(f"ckpt_path={last}", "trainer.max_epochs=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run: trains as a pack of one on cpu" in proc.stdout + proc.stderr
    record = results(run)
    assert record["status"] == "finished" and record["epochs"] == 3
    assert record["pack"]["size"] == 1 and record["resumed_from"] == str(last)
    assert [r["epoch"] for r in metric_rows(run) if r["val/acc"]] == ["0", "1", "2"]
    assert [p.name for p in (run / "attempts").iterdir()] == ["1-finished"]

    weights = tmp_path / "elsewhere" / "weights.ckpt"
    weights.parent.mkdir()
    shutil.copy(last, weights)
    new = tmp_path / "new"
    # A learning rate far below any weight's rounding step: the weights stay the checkpoint's.
    overrides = [*RUN, "optimizer.lr=1e-30", f"ckpt_path={weights}", f"hydra.run.dir={new}"]
    proc = run_train(*overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "new: trains as a pack of one on cpu" in proc.stdout + proc.stderr
    record = results(new)
    assert record["status"] == "finished" and record["epochs"] == 2
    assert record["pack"]["size"] == 1 and record["initialized_from"] == str(weights)
    given, trained = net_weights(weights), net_weights(new / "checkpoints" / "last.ckpt")
    assert given.keys() == trained.keys()
    assert all(torch.equal(trained[k], given[k]) for k in given)


def test_a_job_a_pack_cannot_take_trains_under_lightnings_loop_and_says_why(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    proc = run_train(*RUN, LIGHTNING_LOOP, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pack" not in results(run) and results(run)["status"] == "finished"
    assert (
        "run: trains under Lightning's loop alone, not as a pack of one: "
        "trainer.num_sanity_val_steps is set"
    ) in (run / "train.log").read_text()


def test_a_pack_of_one_that_diverges_ends_as_a_solo_job_does(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_train(*RUN, "optimizer.lr=1e6", f"hydra.run.dir={run}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the training loss became nan by step"), last
    assert "Traceback" not in proc.stderr
    record = results(run)
    assert record["status"] == "diverged" and record["pack"]["size"] == 1
    assert record["error"] == "Diverged: " + last.removeprefix("error: ")


def test_packs_of_one_share_idle_cores_under_the_parallel_launcher(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        *RUN,
        "hydra/sweeper=basic",
        "hydra/launcher=parallel",
        "launch.cpus=2",
        "launch.cpus_per_job=1",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job in sweep.glob("*/results.json"):
        record = results(job.parent)
        assert record["pack"]["size"] == 1
        # A thread count per epoch, each within the cores (how many depends on the other job).
        threads = record["launch"]["threads_per_epoch"]
        assert len(threads) == 2 and set(threads) <= {1, 2}, threads
