"""Fault injection (issue 17): a job SIGKILLed at named moments of its run, then `+resume=true`.

Each kill is made by tests/kill_at.py (probes.KillAt): the process kills itself at the n-th call
of a named function (a training step, a checkpoint's write or rename, the record's write), so
the moment is the same on any machine. After each kill the job's results.json (if any) parses
and every checkpoint loads; then one `+resume=true` of the whole sweep brings every job to
`finished` with the numbers and weights of the same job run straight through, and a job that
left a usable last.ckpt continues from it instead of starting over.

$TMPDIR is put on another file system than the runs where the machine has one (/dev/shm), as on
a cluster's nodes: a checkpoint write that goes through $TMPDIR is then a copy into place.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import QUICK, TESTS, here, metric_rows, results, run_command, script_env

from actlab import ROOT, checkpoints
from actlab.results import read_results

pytestmark = pytest.mark.slow

EPOCHS = 3  # 8 steps each (500 training images, batch 64); every epoch is a new best here
SOLO = [
    "hydra/sweeper=basic",
    *QUICK,
    "logger=csv",
    f"trainer.max_epochs={EPOCHS}",
    "hydra.sweep.subdir=job${trial}",
]
# QUICK's trainer.enable_progress_bar would make the jobs solo jobs.
PACKED = [
    *(a for a in QUICK if not a.startswith("++trainer")),
    "logger=csv",
    f"trainer.max_epochs={EPOCHS}",
    "hydra/sweeper=packed",
    "seed=0,1",
    "hydra.sweep.subdir=job${trial}-seed${seed}",
]


@dataclass(frozen=True)
class Kill:
    """The moment: the n-th call of `point` (only calls on a path containing `match` count),
    before it or, with `after`, once it has returned."""

    what: str
    point: str
    n: int
    after: bool = False
    match: str | None = None

    def args(self) -> list[str]:
        flags = [
            *(["--after"] if self.after else []),
            *(["--match", self.match] if self.match else []),
        ]
        return [str(TESTS / "kill_at.py"), self.point, str(self.n), *flags, "--"]


STEP = "actlab.model.MLPClassifier.training_step"
SAVE = "actlab.checkpoints.save"
SOLO_KILLS = [
    Kill("before the first record", "actlab.results.write_json", 1),
    Kill("the first record in its temporary file", "os.replace", 1, match="results.json"),
    Kill("epoch 0, step 3", STEP, 3),
    Kill("before epoch 0's best is written", SAVE, 1, match="best-epoch000"),
    Kill("epoch 0's last.ckpt before its rename", "os.replace", 1, match=".last.ckpt.tmp"),
    Kill("epoch 0's last.ckpt renamed", "os.replace", 1, True, "last.ckpt"),
    Kill("epoch 1, step 4", STEP, 12),
    Kill("epoch 1's last.ckpt opened for writing", "builtins.open", 2, True, "last.ckpt"),
    Kill("epoch 1's new best saved, its last.ckpt not", SAVE, 2, match="last.ckpt"),
    Kill(
        "epoch 1's last.ckpt saved, the old best not removed",
        "pathlib.Path.unlink",
        1,
        match="best-epoch000",
    ),
    Kill("epoch 2, its last step", STEP, 24),
    Kill("epoch 2's best before its rename", "os.replace", 1, match="best-epoch002"),
    Kill("the last epoch's last.ckpt renamed, the record not", "os.replace", 3, True, "last.ckpt"),
    Kill("before the test", "lightning.pytorch.trainer.trainer.Trainer.test", 1),
    Kill("the record's second write in its temporary file", "os.replace", 2, match="results.json"),
    Kill(
        "the job finished, the sweep's table not", "actlab.report.SweepSummary.on_multirun_end", 1
    ),
]
# A member resumed beside other members than in the straight run sits at another row of the
# stacked weights, which the CPU's matrix kernels may round apart in the last bits (measured
# 1.5e-8 - 2.2e-8 on an AVX-512 CPU, 0 on others): the weights within this, the metrics relative.
RESTACKED_ATOL = 1e-6
PACK_KILLS = [
    Kill("epoch 1, step 4", "actlab.stacked_nets.StackedOptimizer.step", 12),
    Kill("epoch 1: one member's last.ckpt saved, the other's not", SAVE, 4, match="last.ckpt"),
    Kill("epoch 2: a best before its rename", "os.replace", 1, match="best-epoch002"),
    Kill("before the test", "actlab.pack.PackTrainer.test", 1),
    Kill("one member finished, the other not", "actlab.pack.Member.end", 1, True),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    runs = tmp_path_factory.mktemp("runs")
    shm = Path("/dev/shm")
    other = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != runs.stat().st_dev
    tmpdir = Path(tempfile.mkdtemp(dir=shm)) if other else tmp_path_factory.mktemp("tmpdir")
    yield script_env(TMPDIR=str(tmpdir))
    shutil.rmtree(tmpdir)


def _train(args: list[str], env: dict[str, str], kill: Kill | None = None):
    script = kill.args() if kill else [str(ROOT / "train.py")]
    return run_command([sys.executable, *script, "-m", *args], env=env)


def _whole(job: Path) -> dict[str, int]:
    """Each checkpoint's epoch (every one must load, by the project's loader) and the record's
    status (it must parse)."""
    state = {p.name: checkpoints.load(p)["epoch"] for p in job.glob("checkpoints/*.ckpt")}
    if (job / "results.json").exists():
        state["status"] = results(job)["status"]
    return state


def _killed_and_resumed(tmp: Path, env: dict, kills: list[Kill], base: list[str], jobs) -> dict:
    """Each kill into its own job folder of one sweep, then one `+resume=true` of them all."""
    sweep = tmp / "sweep"
    after_kill = {}
    for i, kill in enumerate(kills):
        proc = _train([*base, f"+trial={i}", f"hydra.sweep.dir={sweep}"], env, kill)
        assert proc.returncode == -9, (kill.what, proc.stdout[-2000:], proc.stderr[-3000:])
        after_kill[i] = {job: _whole(sweep / job) for job in jobs(i)}
    trials = ",".join(map(str, range(len(kills))))
    proc = _train([*base, f"+trial={trials}", "+resume=true", f"hydra.sweep.dir={sweep}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train([*base, "+trial=99", f"hydra.sweep.dir={tmp / 'straight'}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"sweep": sweep, "straight": tmp / "straight", "after_kill": after_kill}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = checkpoints.load(ckpt)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def _check_continued(job: Path, straight: Path, after_kill: dict, atol: float = 0.0) -> None:
    """`job` finished as `straight` did, continuing from the last.ckpt the kill left: to the
    bit, or with its weights within `atol` and its metrics within `atol` relative."""
    record, expected = results(job), results(straight)
    assert record["status"] == "finished", record.get("error")
    assert record["metrics"] == pytest.approx(expected["metrics"], rel=atol, abs=0)
    assert record["epochs"] == expected["epochs"] == EPOCHS
    best = Path(record["best_checkpoint"])
    assert best.name == Path(expected["best_checkpoint"]).name
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == [best.name, "last.ckpt"]
    for name in (best.name, "last.ckpt"):
        ours, theirs = (
            _weights(job / "checkpoints" / name),
            _weights(straight / "checkpoints" / name),
        )
        assert ours.keys() == theirs.keys()
        for k, w in ours.items():
            torch.testing.assert_close(w, theirs[k], rtol=0, atol=atol)
    # Each epoch's validation row once, with the uninterrupted run's numbers.
    val = [(r["epoch"], float(r["val/acc"])) for r in metric_rows(job) if r.get("val/acc")]
    assert val == pytest.approx(
        [(r["epoch"], float(r["val/acc"])) for r in metric_rows(straight) if r.get("val/acc")],
        rel=atol,
        abs=0,
    )
    if after_kill.get("status") == "finished":
        assert "resumed_from" not in record  # skipped: nothing to continue
    elif "last.ckpt" in after_kill:
        assert record["resumed_from"] == str(job / "checkpoints" / "last.ckpt")
        (kept,) = (job / "attempts").iterdir()
        assert kept.name == f"1-{after_kill['status']}"
        assert results(kept)["status"] == after_kill["status"]
        assert (kept / "config.yaml").is_file() and (kept / "overrides.yaml").is_file()
    else:
        assert "resumed_from" not in record  # nothing usable: started over


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, env: dict) -> dict:
    return _killed_and_resumed(
        tmp_path_factory.mktemp("solo"), env, SOLO_KILLS, SOLO, lambda i: [f"job{i}"]
    )


def _left(run: dict, kills: list[Kill], what: str) -> list[dict]:
    """What the kill at the moment `what` left in each of its job folders."""
    i = next(i for i, k in enumerate(kills) if k.what == what)
    return list(run["after_kill"][i].values())


def test_every_kill_leaves_a_readable_record_and_whole_checkpoints(solo: dict) -> None:
    """Every record parsed and every checkpoint loaded (in _whole); and the moments are where
    they were meant to be."""

    def left(what: str) -> dict:
        return _left(solo, SOLO_KILLS, what)[0]

    assert left("before the first record") == {}
    assert left("the first record in its temporary file") == {}
    assert left("epoch 0, step 3") == {"status": "running"}
    assert left("epoch 0's last.ckpt renamed") == {
        "best-epoch000.ckpt": 0,
        "last.ckpt": 0,
        "status": "running",
    }
    # Lightning's way, through $TMPDIR, would have left a truncated last.ckpt here.
    assert left("epoch 1's last.ckpt opened for writing")["last.ckpt"] == 0
    assert left("epoch 1's new best saved, its last.ckpt not") == {
        "best-epoch000.ckpt": 0,  # kept until a last.ckpt names the new best
        "best-epoch001.ckpt": 1,
        "last.ckpt": 0,
        "status": "running",
    }
    end = left("the last epoch's last.ckpt renamed, the record not")
    assert end["last.ckpt"] == EPOCHS - 1 and end["status"] == "running"
    assert left("the job finished, the sweep's table not")["status"] == "finished"


def test_resume_brings_every_killed_job_to_the_uninterrupted_numbers(solo: dict) -> None:
    for i, kill in enumerate(SOLO_KILLS):
        job = solo["sweep"] / f"job{i}"
        try:
            _check_continued(job, solo["straight"] / "job99", solo["after_kill"][i][f"job{i}"])
        except AssertionError as e:
            raise AssertionError(f"killed at {kill.what} ({kill.point}): {e}") from e


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, env: dict) -> dict:
    return _killed_and_resumed(
        tmp_path_factory.mktemp("packed"),
        env,
        PACK_KILLS,
        PACKED,
        lambda i: [f"job{i}-seed0", f"job{i}-seed1"],
    )


# The two kill fixtures are the suite's longest: under `make test`'s workers they build apart.
@pytest.mark.xdist_group("fault_injection_packs")
def test_resume_continues_each_member_of_a_killed_pack_to_its_uninterrupted_numbers(
    packed: dict,
) -> None:
    seen = packed["after_kill"]
    # Killed between the members' saves: they continue from different epochs, in two packs.
    between = _left(packed, PACK_KILLS, "epoch 1: one member's last.ckpt saved, the other's not")
    assert sorted(m["last.ckpt"] for m in between) == [0, 1]
    one = _left(packed, PACK_KILLS, "one member finished, the other not")
    assert sorted(m["status"] for m in one) == ["finished", "running"]
    for i, kill in enumerate(PACK_KILLS):
        for seed in (0, 1):
            job = packed["sweep"] / f"job{i}-seed{seed}"
            try:
                straight = packed["straight"] / f"job99-seed{seed}"
                _check_continued(job, straight, seen[i][job.name], RESTACKED_ATOL)
            except AssertionError as e:
                raise AssertionError(
                    f"killed at {kill.what} ({kill.point}), {job.name}: {e}"
                ) from e
    i = next(i for i, k in enumerate(PACK_KILLS) if k.what.startswith("epoch 1: one member"))
    sizes = [read_results(job)["pack"]["size"] for job in packed["sweep"].glob(f"job{i}-*")]
    assert sizes == [1, 1]


def test_an_interrupted_sweep_job_continues_from_its_last_checkpoint_in_the_same_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (here: KeyboardInterrupt at the start of epoch 2) leaves `interrupted`; the
    continuation logs to the same W&B run (offline: one offline-run-* folder per attempt with
    the run's id, which `make sync` uploads into one run)."""
    from actlab.model import MLPClassifier

    base = [a for a in SOLO if a != "logger=csv"]  # the default: W&B (offline here) and csv
    args = ["-m", *base, "+trial=0", f"hydra.sweep.dir={tmp_path}/sweep"]
    start = MLPClassifier.on_train_epoch_start

    def interrupt_at_epoch_2(self: MLPClassifier) -> None:
        if self.current_epoch == 2:
            raise KeyboardInterrupt
        start(self)

    with monkeypatch.context() as m:
        m.setattr(MLPClassifier, "on_train_epoch_start", interrupt_at_epoch_2)
        with pytest.raises(SystemExit):
            here(*args)
    job = tmp_path / "sweep" / "job0"
    assert results(job)["status"] == "interrupted"
    run_id = (job / "wandb" / "run_id").read_text()
    here(*args, "+resume=true")
    here("-m", *SOLO, "+trial=0", f"hydra.sweep.dir={tmp_path}/straight")
    _check_continued(job, tmp_path / "straight" / "job0", {"last.ckpt": 1, "status": "interrupted"})
    assert (job / "wandb" / "run_id").read_text() == run_id
    offline = sorted((job / "wandb").glob("offline-run-*"))
    # The run id in each attempt's log file, which `make sync` reads: the folder's name gets a
    # `-1` from W&B when the two attempts start within one second.
    assert len(offline) == 2 and all((p / f"run-{run_id.strip()}.wandb").is_file() for p in offline)
