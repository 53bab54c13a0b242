"""Records that tell the truth (issue 10): resume, `+resume=true`, W&B status, gradient norms,
the epochs rule, the parallel launcher's threads and the sweep table."""

from __future__ import annotations

import json
import shutil
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    QUICK,
    here,
    here_exit,
    metric_rows,
    results,
    run_folder_with_checkpoint,
    wandb_inspect,
)
from hydra import compose, initialize_config_dir

import actlab.train
from actlab import report
from actlab.errors import UserError
from actlab.launch import DeviceSlots
from actlab.runs import resume_args
from actlab.train import CONFIG_DIR
from actlab.validation import validate

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
    status, _, _ = here_exit(
        "-m",
        *QUICK,
        "logger=wandb",
        "model.act=none",
        "optimizer.lr=1000,0.05",  # diverges on this data; converges
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert status == 1  # a job did not finish
    seen = {}
    for job in (tmp_path / "sweep").iterdir():
        if (job / ".hydra").is_dir():  # a job folder (the sweep's own wandb/ is its summary)
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


def test_parallel_cpu_jobs_record_their_threads_and_can_keep_them_fixed(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        shared = DeviceSlots(str(tmp_path / "a"), cpus=4, accelerator="cpu", enabled=True)
        held = [shared.try_acquire() for _ in range(2)]
        (share,) = held[0].callbacks()
        share.on_train_epoch_start(None, None)  # 4 cores // 2 busy slots
        held[1].release()
        share.on_train_epoch_start(None, None)  # alone now
        assert share.threads == [2, 4]
        held[0].release()

        fixed = DeviceSlots(
            str(tmp_path / "b"), cpus=4, accelerator="cpu", enabled=True, share_idle_cores=False
        )
        slot = fixed.try_acquire()
        assert slot.callbacks() == []  # its threads stay its share, whatever the others do
        slot.release()
    finally:
        torch.set_num_threads(before)


# --- 2. Resume and `+resume=true` ------------------------------------------------------------


def test_a_resumed_job_stays_in_its_configurations_row(tmp_path: Path) -> None:
    """A 2-seed sweep whose seed-1 job was resumed the README's way: still one row."""
    for seed, extra in ((0, []), (1, [f"ckpt_path='{tmp_path}/seed=1/checkpoints/last.ckpt'"])):
        job = tmp_path / f"seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        overrides = ["model.act=leaky", f"seed={seed}", "+resume=true", *extra]
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        record = {
            "status": "finished",
            "config": {"act": "leaky", "negative_slope": 0.01, "seed": seed},
            "metrics": {"test/acc": 0.9 + seed / 100},
        }
        (job / "results.json").write_text(json.dumps(record))
    (row,) = report.summarize(report.group(report.load_jobs(tmp_path)))
    assert row["seeds"] == 2
    assert row["test acc"] == pytest.approx((0.905, 0.00707), abs=1e-5)


def test_resume_true_is_not_carried_into_a_later_resume(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    ckpt = run_folder_with_checkpoint(folder, ["model.act=leaky", "+resume=true"])
    args = resume_args([f"ckpt_path={ckpt}", "trainer.max_epochs=5"])
    assert args == [
        "model.act=leaky",
        "trainer.max_epochs=5",
        f"ckpt_path='{ckpt}'",
        f"hydra.run.dir='{folder}'",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs that finished."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    here(*QUICK, "logger=csv", "trainer.max_epochs=2", f"hydra.run.dir={folder}")
    assert results(folder)["status"] == "finished"
    return folder


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_resume_true_refuses_a_finished_job_of_another_config(
    finished_run: Path, tmp_path: Path
) -> None:
    folder = copy_of(finished_run, tmp_path)
    before = (folder / "results.json").read_bytes()
    args = [*QUICK, "logger=csv", "trainer.max_epochs=2", f"hydra.run.dir={folder}"]
    status, _, err = here_exit(*args, "optimizer.momentum=0.5", "+resume=true")
    assert status == 2
    assert "holds a finished run of another config" in err
    assert "optimizer.momentum: 0.9 -> 0.5" in err
    # Keys that cannot change the result (here the loggers) do not count: skipped as finished.
    here(*args, "logger=wandb", "+resume=true")
    assert (folder / "results.json").read_bytes() == before
    assert not (folder / "wandb").exists()


def test_a_finished_run_resumed_with_nothing_to_train_keeps_its_record(
    finished_run: Path, tmp_path: Path
) -> None:
    folder = copy_of(finished_run, tmp_path)
    before = (folder / "results.json").read_bytes()
    out = here(f"ckpt_path={folder}/checkpoints/last.ckpt")  # the same trainer.max_epochs=2
    assert "already trained 2 epochs (trainer.max_epochs=2), nothing to do" in out
    assert (folder / "results.json").read_bytes() == before


def test_seconds_per_epoch_of_a_resumed_run_counts_this_attempts_epochs(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_of(finished_run, tmp_path)
    # A clock that advances 10 s per reading: start, end of fit, end.
    monkeypatch.setattr(actlab.train, "time", SimpleNamespace(perf_counter=count(0, 10).__next__))
    here(f"ckpt_path={folder}/checkpoints/last.ckpt", "trainer.max_epochs=3")
    record = results(folder)
    assert record["epochs"] == 3
    assert record["seconds_per_epoch"] == 10.0  # one epoch in this attempt, not three


def test_a_checkpoint_from_elsewhere_gives_a_new_run_its_weights(
    finished_run: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "elsewhere" / "weights.ckpt"
    weights.parent.mkdir()
    shutil.copy(finished_run / "checkpoints" / "last.ckpt", weights)
    new = tmp_path / "new"
    # A step too small to move the weights: the new run's weights are the checkpoint's.
    args = [*QUICK, "logger=csv", "trainer.max_epochs=1", "optimizer.lr=1e-12"]
    here(*args, f"ckpt_path={weights}", f"hydra.run.dir={new}")
    record = results(new)
    assert record["status"] == "finished"
    assert record["epochs"] == 1  # started at epoch 0, not at the checkpoint's epoch 2
    assert record["initialized_from"] == str(weights)
    given = torch.load(weights, weights_only=False)["state_dict"]
    trained = torch.load(new / "checkpoints" / "last.ckpt", weights_only=False)
    assert trained["epoch"] == 0
    for key, value in given.items():
        if key.startswith("net."):
            torch.testing.assert_close(trained["state_dict"][key], value)


def test_a_failed_job_run_again_starts_clean_and_keeps_the_failed_attempt(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job = sweep / "job"
    args = ["-m", *QUICK, "logger=csv", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}"]
    args += ["hydra.sweep.subdir=job", "hydra/sweeper=basic"]
    # A file where the job wants its checkpoint folder: it fails after training its first epoch.
    job.mkdir(parents=True)
    (job / "checkpoints").write_text("in the way")
    assert here_exit(*args)[0] == 1
    failed = results(job)
    assert failed["status"] == "failed"
    failed_rows = metric_rows(job)
    assert failed_rows

    (job / "checkpoints").unlink()
    here(*args, "+resume=true")
    assert results(job)["status"] == "finished"
    rows = metric_rows(job)
    assert sum(r["epoch"] == "0" and bool(r["val/acc"]) for r in rows) == 1  # no earlier rows
    kept = job / "attempts" / "1-failed"
    assert results(kept) == failed
    assert metric_rows(kept) == failed_rows
