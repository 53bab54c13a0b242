"""The regression mode of the MLP on `data=regression`, through the real entry point."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CPU, run_command

from actlab.data import RegressionSource
from actlab.results import read_results


def test_regression_targets_depend_on_the_inputs_non_linearly() -> None:
    x, y, x_test, y_test = RegressionSource(n_train=2000, n_test=10).load("unused")
    assert x.shape == (2000, 2) and y.shape == (2000, 2) and y.dtype == np.float32
    # The best linear fit leaves most of the variance: a linear model cannot do the task.
    design = np.c_[x, np.ones(len(x))]
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    assert (residual.var(0) / y.var(0)).min() > 0.3


@pytest.mark.slow
def test_leaky_regression_fits_a_linear_net_does_not_and_diagnostics_are_logged(
    tmp_path: Path,
) -> None:
    """One real sweep (2 short jobs) checks the regression mode against a linear net, and the
    DeadUnitMonitor end to end: dead/* once per validation epoch (never for the sanity check),
    in the CSV and results.json, grad norms only on the logging steps."""
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=leaky_regression",
        "model.act=leaky,none",
        "logger=csv",
        "trainer.max_epochs=10",
        "trainer.log_every_n_steps=20",
        "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
        *CPU,
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = run_command(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {a: next((tmp_path / "sweep").glob(f"*model.act={a},*")) for a in ("leaky", "none")}
    res = {a: read_results(job) for a, job in jobs.items()}
    for r in res.values():
        assert r["status"] == "finished"
        assert {"test/loss", "test/r2", "val/r2_best", "dead/mean"} <= set(r["metrics"])
        assert "train/acc_epoch" not in r["metrics"]
    assert res["leaky"]["metrics"]["test/r2"] > 0.9
    assert res["none"]["metrics"]["test/r2"] < 0.6
    assert res["leaky"]["metrics"]["test/loss"] < res["none"]["metrics"]["test/loss"] / 3

    for key in ("dead/layer1", "dead/layer2", "dead/mean", "rare/layer1", "rare/layer2"):
        assert 0.0 <= res["leaky"]["metrics"][key] <= 1.0
    df = pd.read_csv(jobs["leaky"] / "csv" / "metrics.csv")
    assert df["dead/layer2"].notna().sum() == 10  # one per epoch, no sanity-check row
    per_epoch = -(-(4000 - 500) // 64)  # data=regression: 4000 samples, 500 for validation
    steps = df.loc[df["grad_norm/layer1"].notna(), "step"].tolist()
    assert steps == [s for s in range(10 * per_epoch) if (s + 1) % 20 == 0]
    assert {"grad_norm/layer2", "grad_norm/output", "act_mean/layer1"} <= set(df.columns)
