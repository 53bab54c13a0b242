"""SIGTERM and SIGINT stop a run, a pack and a parallel sweep as Ctrl-C does; exit statuses.

Each run is held at a known point (tests/probes.py) before the signal comes: it cannot end first,
however fast the machine, nor be stopped before its first epoch's checkpoint exists, however slow.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    QUICK,
    TESTS,
    here_exit,
    hold_at,
    results,
    run_train,
    start_held,
    wait_for,
    wandb_inspect,
)
from omegaconf import OmegaConf

from actlab import ROOT, report

# A pack honours no trainer flag (actlab.packing.TRAINER_KEYS): without the bar's, it stays a pack.
PACK = [a for a in QUICK if not a.startswith("++trainer.")]
EPOCHS = ["trainer.max_epochs=3"]  # held at the start of epoch 1: epoch 0 is checkpointed


def job_folders(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/.hydra"))


def assert_interrupted(folder: Path, sig: signal.Signals, output: str) -> None:
    record = results(folder)
    last = folder / "checkpoints" / "last.ckpt"
    assert record["status"] == "interrupted", record.get("error")
    assert record["error"] == sig.name
    assert record["last_checkpoint"] == str(last)
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    assert f"interrupted; to resume: python train.py ckpt_path={last}" in output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "logger"), [(signal.SIGTERM, "wandb"), (signal.SIGINT, "csv")], ids=["TERM", "INT"]
)
def test_a_signal_stops_a_run_as_ctrl_c_does(
    tmp_path: Path, sig: signal.Signals, logger: str
) -> None:
    hold = tmp_path / "hold"
    args = [*QUICK, *EPOCHS, f"logger={logger}", f"paths.log_dir={tmp_path}/logs"]
    proc = start_held([ROOT / "train.py", *args, *hold_at(1, hold)], [hold], cwd=tmp_path)
    proc.send_signal(sig)
    output = wait_for(proc)
    assert proc.returncode == 128 + sig, output[-3000:]
    (folder,) = (tmp_path / "logs" / "runs").iterdir()
    assert_interrupted(folder, sig, output)
    if logger == "wandb":
        (run_dir,) = (folder / "wandb").glob("offline-run-*")
        run = wandb_inspect(run_dir)
        assert run["exit_code"] != 0
        assert run["summary"]["status"] == "interrupted"


@pytest.mark.slow
def test_a_signal_stops_a_pack_and_records_each_member(tmp_path: Path) -> None:
    hold, sweep = tmp_path / "hold", tmp_path / "sweep"
    grid = ["hydra/sweeper=packed", "model.act=relu,leaky"]
    args = ["-m", *PACK, *EPOCHS, "logger=csv", *grid, f"hydra.sweep.dir={sweep}"]
    proc = start_held([TESTS / "held_pack_train.py", 1, hold, *args], [hold], cwd=tmp_path)
    proc.send_signal(signal.SIGTERM)
    output = wait_for(proc)
    assert proc.returncode == 143, output[-3000:]
    folders = job_folders(sweep)
    assert len(folders) == 2
    for folder in folders:
        assert results(folder)["pack"]["size"] == 2
        assert_interrupted(folder, signal.SIGTERM, output)


@pytest.mark.slow
def test_a_signal_to_a_parallel_sweep_reaches_every_running_job(tmp_path: Path) -> None:
    """Both jobs are held, each on its own file; the signal goes to the sweep's process only."""
    sweep = tmp_path / "sweep"
    holds = [tmp_path / "torch.nn.ReLU", tmp_path / "torch.nn.LeakyReLU"]
    args = [
        ROOT / "train.py",
        "-m",
        "hydra/sweeper=basic",  # a process per job
        "hydra/launcher=parallel",
        "launch.cpus=2",  # two slots: both jobs run at once
        "model.act=relu,leaky",
        *QUICK,
        *EPOCHS,
        "logger=csv",
        "trainer=cpu",
        *hold_at(1, f"{tmp_path}/${{model.act._target_}}"),
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",  # a path in the overrides makes no folder name
    ]
    proc = start_held(args, holds, cwd=tmp_path)
    proc.send_signal(signal.SIGTERM)
    output = wait_for(proc)
    assert proc.returncode == 143, output[-3000:]
    folders = job_folders(sweep)
    assert len(folders) == 2
    for folder in folders:
        assert_interrupted(folder, signal.SIGTERM, output)


# ---------------------------------------------------------------------------------------------
# Exit statuses


def test_a_sweep_in_which_a_job_did_not_finish_prints_its_table_and_exits_1(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    grid = ["model.act=none", "optimizer.lr=0.05,-1"]  # -1 is refused: that job fails
    status, stdout, _ = here_exit(
        "-m", *QUICK, "logger=csv", "trainer.max_epochs=1", *grid, f"hydra.sweep.dir={sweep}"
    )
    assert status == 1
    assert f"Sweep {sweep} (2 jobs" in stdout
    assert "1 job(s) did not finish: " in stdout
    assert sorted(results(f)["status"] for f in job_folders(sweep)) == ["failed", "finished"]


def test_a_refused_config_exits_2_and_a_command_line_mistake_as_hydra_does(
    tmp_path: Path,
) -> None:
    status, _, err = here_exit("data=synthetic", "logger=csv", "data.batch_size=0")
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: invalid config: data.batch_size=0 must be an integer >= 1"
    )
    status, _, err = here_exit("model.act=swish", f"paths.log_dir={tmp_path}")
    assert status == 1  # Hydra's own exit status for an unknown option
    assert err.strip().splitlines()[-1].startswith("error: Could not find 'model.act/swish'")


OPTUNA = "hydra_plugins.actlab_optuna.PackedOptunaSweeper"


@pytest.mark.parametrize(
    ("sweeper", "status"),
    [
        ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", 1),
        ("hydra_plugins.actlab_packed.PackedSweeper", 1),
        (OPTUNA, None),
    ],
    ids=["basic", "packed", "optuna"],
)
def test_a_search_that_ran_to_its_end_exits_0_however_many_trials_failed(
    tmp_path: Path, sweeper: str, status: int | None
) -> None:
    """A grid with a failed job exits 1; a search with a failed trial does not: that is a result."""
    for name, outcome in (("0", "finished"), ("1", "failed")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(f'{{"status": "{outcome}"}}')
    config = OmegaConf.create(
        {"hydra": {"sweeper": {"_target_": sweeper}, "sweep": {"dir": str(tmp_path)}}}
    )
    try:
        report.SweepExitStatus().on_multirun_end(config)
    except SystemExit as e:
        assert e.code == status
    else:
        assert status is None


@pytest.mark.slow
def test_an_optuna_search_with_a_failed_trial_exits_0(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "checkpoints").write_text("in the way")  # trial 0 fails mid-training
    proc = run_train(
        "-m",
        "hparams_search=slope_optuna",
        *QUICK,
        "logger=csv",
        "trainer.max_epochs=1",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(results(f)["status"] for f in job_folders(sweep)) == ["failed", "finished"]
