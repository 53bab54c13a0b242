"""The whole path, as a researcher runs it: `python train.py -m model.act=relu,leaky,none`."""

from __future__ import annotations

import csv
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import CPU, FAST, run_command, run_train, wandb_inspect
from hydra.utils import instantiate
from omegaconf import OmegaConf


def best_checkpoint_test_acc(job: Path, checkpoint: str) -> float:
    """The test accuracy of a checkpoint, computed here from the job's saved config."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    model = instantiate(cfg.model)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
    x, y = datamodule.test
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def val_acc_by_epoch(job: Path) -> dict[int, float]:
    with open(job / "csv" / "metrics.csv", newline="") as f:
        return {int(r["epoch"]): float(r["val/acc"]) for r in csv.DictReader(f) if r["val/acc"]}


def test_verbatim_multirun_gives_three_jobs_results_and_wandb_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m", "model.act=relu,leaky,none", *FAST, "trainer.max_epochs=3", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())  # not the summary wandb/
    assert [j.name.split("model.act=")[1].split(",")[0] for j in jobs] == ["leaky", "none", "relu"]
    assert (sweep / "multirun.yaml").exists()
    for job in jobs:
        act = job.name.split("model.act=")[1].split(",")[0]
        res = json.loads((job / "results.json").read_text())
        assert res["status"] == "finished"
        assert res["config"]["act"] == act
        # val/acc_best is the best epoch's, and test/acc that epoch's checkpoint's.
        val = val_acc_by_epoch(job)
        assert sorted(val) == [0, 1, 2]
        assert res["metrics"]["val/acc_best"] == pytest.approx(max(val.values()))
        best = res["best_checkpoint"]
        assert Path(best).name == f"best-epoch{max(val, key=val.get):03d}.ckpt"
        assert res["metrics"]["test/acc"] == pytest.approx(best_checkpoint_test_acc(job, best))
        assert (job / "checkpoints" / "last.ckpt").exists()
        metrics_csv = (job / "csv" / "metrics.csv").read_text()
        assert "val/acc" in metrics_csv.splitlines()[0]

        (run_dir,) = (job / "wandb").glob("offline-run-*")
        run = wandb_inspect(run_dir)
        assert run["state"] == "finished"
        assert run["name"] == job.name
        assert run["config"]["act"] == act
        assert run["summary"]["test/acc"] == pytest.approx(res["metrics"]["test/acc"])
        # The packages, as W&B's own per-run scan (turned off) would list them.
        requirements = (run_dir / "files" / "requirements.txt").read_text().splitlines()
        assert f"torch=={metadata.version('torch')}" in requirements

    # The sweep ends with its table: one line per job.
    table = proc.stdout[proc.stdout.index("Sweep ") :]
    assert all(f"model.act={a}" in table for a in ("relu", "leaky", "none"))
    assert table.count("finished") == 3


def test_single_run_reports_offline_wandb_and_writes_results(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_train(
        *FAST, "model.act=leaky", "model.act.negative_slope=0.2", f"hydra.run.dir={run}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B offline run" in proc.stdout and "make sync" in proc.stdout
    res = json.loads((run / "results.json").read_text())
    assert res["config"]["negative_slope"] == 0.2
    assert res["config"]["seed"] == 0
    assert res["git_commit"] and res["versions"]["torch"]


@pytest.mark.mnist
@pytest.mark.slow
def test_one_epoch_on_real_mnist_reaches_95_percent(tmp_path: Path) -> None:
    proc = run_command([sys.executable, "-m", "actlab.data"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    proc = run_train(
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        *CPU,
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["metrics"]["test/acc"] >= 0.95
