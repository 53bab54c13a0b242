"""The researcher's daily loop, run as a user runs it: interrupt, resume, evaluate, sweep, debug.

Ctrl-C and the resumed W&B run need processes of their own; the other commands run in this
process through the same entry points (`main()` with sys.argv), to pay Lightning's import once.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    COMMAND_TIMEOUT,
    QUICK,
    here,
    here_exit,
    metric_rows,
    recorded_with,
    results,
    run_command,
    run_folder_with_checkpoint,
    script_env,
)
from hydra.core.global_hydra import GlobalHydra

from actlab import ROOT
from actlab.eval import main as eval_main
from actlab.runs import resume_args
from actlab.train import main as train_main

# A linear model whose learning rate triples every epoch: val/acc peaks at epoch 1 and falls
# after, so the best checkpoint is not the last one and the scheduler's state matters.
LINEAR = [
    "model.net.hidden_sizes=[]",
    "scheduler=step",
    "scheduler.step_size=1",
    "scheduler.gamma=3",
    "optimizer.lr=0.05",
]
EPOCHS = 5
LOG_EVERY = 5
HELD_AT = 2  # the epoch the interrupted run is held at, its epochs 0 and 1 checkpointed


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = run_command([sys.executable, ROOT / script, *args], cwd=cwd, env=script_env(home=cwd))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run stopped with Ctrl-C (SIGINT) in a later epoch, logging to W&B offline.

    The run is held at the start of epoch HELD_AT (tests/probes.py) until the signal comes: it
    cannot finish first, however fast the machine, nor be stopped before its checkpoints exist,
    however slow. Its model is linear (`model.net.hidden_sizes=[]`): that must train, stop and
    resume too.
    """
    tmp = tmp_path_factory.mktemp("interrupted")
    hold = tmp / "hold"
    hold.touch()
    args = [
        *QUICK,
        *LINEAR,
        "logger=wandb",
        f"trainer.max_epochs={EPOCHS}",
        f"paths.log_dir={tmp}/logs",
        "+callbacks.hold._target_=probes.HoldAtEpoch",
        f"+callbacks.hold.epoch={HELD_AT}",
        f"+callbacks.hold.hold={hold}",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp,
        env=script_env(home=tmp),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A background job of a non-interactive shell starts with SIGINT ignored, and Python
        # then never turns it into KeyboardInterrupt: the run must take Ctrl-C wherever the
        # tests run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while not Path(f"{hold}.reached").exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before epoch {HELD_AT}:\n{proc.stdout.read()}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=COMMAND_TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    hold.unlink()  # resuming re-applies the run's overrides: the probe must not hold it again
    (folder,) = (tmp / "logs" / "runs").iterdir()
    ckpt = folder / "checkpoints" / "last.ckpt"
    return {
        "tmp": tmp,
        "folder": folder,
        "returncode": proc.returncode,
        "output": output,
        "record": results(folder),
        "rows": metric_rows(folder),
        "ckpt_epoch": torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"],
    }


def test_ctrl_c_leaves_an_interrupted_record_and_a_usable_checkpoint(interrupted: dict) -> None:
    assert interrupted["returncode"] != 0
    record = interrupted["record"]
    assert record["status"] == "interrupted"
    assert record["last_checkpoint"] == str(interrupted["folder"] / "checkpoints" / "last.ckpt")
    assert interrupted["ckpt_epoch"] == HELD_AT - 1  # the end of the last whole epoch
    assert "resume: python train.py ckpt_path=" in interrupted["output"]


@pytest.fixture(scope="module")
def resumed(interrupted: dict) -> dict:
    """The interrupted run continued from its last.ckpt to EPOCHS epochs."""
    folder = interrupted["folder"]
    run(
        "train.py",
        f"ckpt_path={folder}/checkpoints/last.ckpt",
        f"trainer.max_epochs={EPOCHS}",
        cwd=interrupted["tmp"],
    )
    return {"record": results(folder), "rows": metric_rows(folder)}


def test_resume_continues_the_run_in_its_folder(interrupted: dict, resumed: dict) -> None:
    folder = interrupted["folder"]
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no new run folder
    record = resumed["record"]
    assert record["status"] == "finished"
    assert record["epochs"] == EPOCHS
    assert record["resumed_from"] == str(folder / "checkpoints" / "last.ckpt")
    assert record["config"]["data"] == "synthetic"  # the run's own overrides, not the defaults
    # metrics.csv keeps the rows logged before the interrupt and gains the new epochs.
    epochs = [int(r["epoch"]) for r in resumed["rows"] if r["val/acc"]]
    assert epochs == list(range(EPOCHS))
    assert len(resumed["rows"]) > len(interrupted["rows"])


def test_resume_continues_the_same_wandb_run(interrupted: dict, resumed: dict) -> None:
    wandb_dir = interrupted["folder"] / "wandb"
    run_id = (wandb_dir / "run_id").read_text().strip()
    offline_runs = sorted(wandb_dir.glob("offline-run-*"))
    assert len(offline_runs) == 2  # one per attempt, synced by `make sync` into one W&B run
    # The run id in each attempt's log file, which `make sync` reads (W&B adds `-1` to the
    # folder's name when two attempts start within one second).
    assert all((p / f"run-{run_id}.wandb").is_file() for p in offline_runs)


def test_resumed_run_equals_an_uninterrupted_one(interrupted: dict, resumed: dict) -> None:
    """Same epochs, optimizer and scheduler state, best so far, batches: the same record.

    The best epoch (1) comes before the interrupt and the learning rate grows each epoch, so a
    resume that lost the scheduler's state, val/acc_best or the best checkpoint differs here.
    The uninterrupted run is profiled (debug=profiler): profiling must not change the numbers.
    """
    tmp = interrupted["tmp"]
    here(
        *QUICK,
        *LINEAR,
        "logger=csv",
        "debug=profiler",
        f"trainer.max_epochs={EPOCHS}",
        f"hydra.run.dir={tmp}/straight",
    )
    straight, again = results(tmp / "straight"), resumed["record"]
    rows = metric_rows(tmp / "straight")
    val = {int(r["epoch"]): float(r["val/acc"]) for r in rows if r["val/acc"]}
    best_epoch = max(val, key=val.get)
    assert best_epoch < HELD_AT and val[EPOCHS - 1] < val[best_epoch]  # the premise above
    assert again["metrics"] == straight["metrics"]
    assert again["metrics"]["val/acc_best"] == pytest.approx(val[best_epoch])
    for record in (again, straight):
        assert Path(record["best_checkpoint"]).name == f"best-epoch{best_epoch:03d}.ckpt"
    assert straight["config"]["hidden_sizes"] == []
    assert "run_training_epoch" in (tmp / "straight" / "fit-profile.txt").read_text()


def test_eval_tests_a_checkpoint_with_its_run_config(interrupted: dict, resumed: dict) -> None:
    folder = interrupted["folder"]
    best = Path(resumed["record"]["best_checkpoint"])
    here(f"ckpt_path={best}", main=eval_main)
    saved = json.loads((folder / f"eval_{best.stem}.json").read_text())
    assert saved["checkpoint"] == str(best)
    # train.py tested the same best checkpoint after fitting.
    assert saved["metrics"]["test/acc"] == resumed["record"]["metrics"]["test/acc"]
    assert saved["metrics"]["test/loss"] == resumed["record"]["metrics"]["test/loss"]
    assert (folder / ".hydra" / "config.yaml").is_file()  # eval leaves the training config


def test_eval_of_a_gpu_run_on_a_machine_without_one_says_what_to_add(
    interrupted: dict, resumed: dict, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the run's accelerator is there")
    folder = shutil.copytree(interrupted["folder"], tmp_path / "gpu_run")
    recorded_with(folder, accelerator="gpu")
    best = folder / "checkpoints" / Path(resumed["record"]["best_checkpoint"]).name
    status, _, err = here_exit(f"ckpt_path={best}", main=eval_main)
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: gpu_run trained with trainer.accelerator=gpu and no GPU is visible here: "
        "add accelerator=cpu to test it on the CPU."
    )
    here(f"ckpt_path={best}", "accelerator=cpu", main=eval_main)
    saved = json.loads((folder / f"eval_{best.stem}.json").read_text())
    assert saved["metrics"]["test/acc"] == resumed["record"]["metrics"]["test/acc"]


def test_resume_args_put_the_run_overrides_first(tmp_path: Path) -> None:
    folder = tmp_path / "model.act=leaky,optimizer.lr=0.1"
    overrides = [
        "model.act=leaky",
        "optimizer.lr=0.1",
        "trainer.max_epochs=3",
        "ckpt_path=old.ckpt",
    ]
    ckpt = run_folder_with_checkpoint(folder, overrides)
    args = resume_args([f"ckpt_path={ckpt}", "trainer.max_epochs=5"])
    assert args == [
        "model.act=leaky",
        "optimizer.lr=0.1",
        "trainer.max_epochs=5",
        f"ckpt_path='{ckpt}'",
        f"hydra.run.dir='{folder}'",
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A diverging learning rate next to a sane one, each twice with the same seed.

    Small batches make an epoch many logging intervals long, and a probe writes down the step
    of the first non-finite loss: how soon the run stopped after it is then a measured fact.
    """
    tmp = tmp_path_factory.mktemp("sweep")
    status, stdout, _ = here_exit(
        "-m",
        "hydra/sweeper=basic",  # solo jobs: Lightning's loop stops each
        *QUICK,
        "logger=csv",
        "model.act=none",
        "optimizer.lr=1000,0.05",  # on MNIST lr=10 is enough; this tiny data needs more
        "trainer.max_epochs=2",
        "data.batch_size=8",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "+callbacks.nan._target_=probes.FirstNonFiniteLoss",
        "+callbacks.nan.path=${paths.output_dir}/first_nan.json",
        "+repeat=1,2",
        f"hydra.sweep.dir={tmp}/sweep",
        "hydra.sweep.subdir=${hydra.job.num}",  # the overrides above make too long a name
    )
    assert status == 1  # jobs diverged: the sweep says so in its exit status
    jobs, dirs = {}, {}
    for folder in (tmp / "sweep").iterdir():
        if folder.is_dir():
            record = results(folder)
            given = dict(o.lstrip("+").split("=", 1) for o in record["job"]["overrides"])
            jobs[given["optimizer.lr"], given["repeat"]] = record
            dirs[given["optimizer.lr"], given["repeat"]] = folder
    return {"stdout": stdout, "jobs": jobs, "dirs": dirs}


def test_divergence_stops_the_job_and_the_sweep_goes_on(sweep: dict) -> None:
    status = {job: r["status"] for job, r in sweep["jobs"].items()}
    assert status == {
        ("1000", "1"): "diverged",
        ("1000", "2"): "diverged",
        ("0.05", "1"): "finished",
        ("0.05", "2"): "finished",
    }
    diverged = sweep["jobs"]["1000", "1"]
    assert "the training loss became nan" in diverged["error"]
    stopped = int(re.search(r"by step (\d+) \(epoch 0\)", diverged["error"]).group(1))
    first = json.loads((sweep["dirs"]["1000", "1"] / "first_nan.json").read_text())
    steps_per_epoch = -(-500 // 8)  # 600 images less 100 for validation, in batches of 8
    # Found within one logging interval, long before the epoch's end would have shown it.
    assert first["global_step"] <= stopped < first["global_step"] + LOG_EVERY
    assert stopped + LOG_EVERY < steps_per_epoch
    lines = sweep["stdout"].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Sweep ")) + 3
    rows = [line.split() for line in lines[start : start + 4]]  # after the header and its rule
    assert sorted(row[1] for row in rows) == ["diverged", "diverged", "finished", "finished"]


def test_same_seed_same_config_same_metrics(sweep: dict) -> None:
    first, second = sweep["jobs"]["0.05", "1"], sweep["jobs"]["0.05", "2"]
    assert first["metrics"] == second["metrics"]
    assert len(first["metrics"]) >= 6


def test_results_record_seed_versions_and_git_state(sweep: dict) -> None:
    record = sweep["jobs"]["0.05", "1"]
    assert record["config"]["seed"] == 0
    assert record["versions"]["torch"] == torch.__version__
    assert all(record["versions"][k] for k in ("lightning", "hydra-core", "torchmetrics"))
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(  # untracked files count, but not runs' outputs and data
        [*git, "status", "--porcelain", "--", ".", ":(exclude)logs", ":(exclude)data"],
        capture_output=True,
        text=True,
    ).stdout
    assert record["git_commit"] == head.strip()
    assert record["git_dirty"] is bool(dirty.strip())


def test_overfit_one_batch_reaches_full_train_accuracy(tmp_path: Path) -> None:
    # Noise-only images: no rule generalises, so only memorising one fixed batch scores 100%.
    here(
        *QUICK,
        "logger=csv",
        "debug=overfit",
        "+data.source.noise=10000",
        "data.source.n_train=5000",
        "trainer.max_epochs=20",
        f"hydra.run.dir={tmp_path}/run",
    )
    rows = [r for r in metric_rows(tmp_path / "run") if r["train/acc_epoch"]]
    assert float(rows[-1]["train/acc_epoch"]) >= 0.99
    assert results(tmp_path / "run")["metrics"]["test/acc"] < 0.5  # it memorised, nothing to learn


def test_quick_debug_runs_finish(tmp_path: Path) -> None:
    here("-m", *QUICK, "logger=csv", "debug=fdr,limit", f"hydra.sweep.dir={tmp_path}")
    status = {p.name: results(p)["status"] for p in tmp_path.iterdir() if p.is_dir()}
    assert len(status) == 2 and set(status.values()) == {"finished"}


def test_help_lists_groups_and_useful_overrides(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    try:
        with pytest.raises(SystemExit) as e:
            train_main()
    finally:
        GlobalHydra.instance().clear()
    assert e.value.code == 0
    text = capsys.readouterr().out
    groups = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert {"leaky", "none", "relu"} <= set(groups["model.act"].split(", "))
    assert {"fdr", "limit", "overfit", "profiler"} <= set(groups["debug"].split(", "))
    assert "slope_optuna" in groups["hparams_search"]
    assert "ckpt_path=<run>/checkpoints/last.ckpt" in text
    assert "python eval.py" in text


def test_optuna_searches_slope_and_lr(tmp_path: Path) -> None:
    here(
        "hparams_search=slope_optuna",
        *QUICK,
        "logger=csv",
        "trainer.max_epochs=1",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "model.act.negative_slope" in best and "optimizer.lr" in best
    jobs = [results(p.parent) for p in (tmp_path / "sweep").glob("*/results.json")]
    assert len(jobs) == 2
    assert (tmp_path / "sweep" / "search" / "summary.md").is_file()  # beside the trials
    assert {j["config"]["act"] for j in jobs} == {"leaky"}
    assert len({j["config"]["negative_slope"] for j in jobs}) == 2
