"""Checkpoints are untrusted input (issue 17, item 10).

A `.ckpt` crafted to create a file when unpickled is given through every way a checkpoint is
loaded: `ckpt_path=` outside and inside a run folder, eval.py, `+resume=true` of a sweep and
Lightning's own load. The file never appears and the command ends with one `error:` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import pickle
import shlex
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import QUICK, here, here_exit, results, run_command, run_train

from actlab import ROOT
from actlab.checkpoints import SAFE_GLOBALS, SafeCheckpointIO, load
from actlab.errors import UserError


class _RunsCommand:
    """Unpickled, runs `touch <marker>` (what a shared "pretrained" file could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _TouchesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def craft(path: Path, marker: Path, payload: type = _RunsCommand, **save: object) -> Path:
    """A file shaped like a training checkpoint, with the payload among its entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"epoch": 0, "global_step": 1, "state_dict": {}, "extra": payload(marker)}
    torch.save(ckpt, path, **save)
    return path


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "marker"


@pytest.mark.parametrize(
    "payload, save, refused",
    [
        (_RunsCommand, {}, "posix.system"),
        (_TouchesFile, {}, "getattr"),
        (_RunsCommand, {"_use_new_zipfile_serialization": False}, "posix.system"),
    ],
    ids=["os.system", "Path.touch", "legacy-format"],
)
def test_the_crafted_file_would_run_and_the_loader_refuses_it(
    tmp_path: Path, marker: Path, payload: type, save: dict, refused: str
) -> None:
    path = craft(tmp_path / "x.ckpt", marker, payload, **save)
    with pytest.raises(UserError, match=f"holds {refused}, which could run code"):
        load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the unsafe loader the project used before
    assert marker.exists()  # so the file is live: the checks above can fail


def test_a_bare_pickle_is_refused_unrun(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "x.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _RunsCommand(marker)}))
    with pytest.raises(UserError, match="not a checkpoint torch can read"):
        load(path)  # the unpickler stops at pickle protocol 4's first frame, before the call
    with pytest.raises(UserError, match="not a checkpoint torch can read"):
        load(path, mmap=True)
    assert not marker.exists()


def test_a_user_allows_their_own_types_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "ratio": Fraction(1, 3)}, path)
    with pytest.raises(UserError) as e:
        load(path)
    assert str(e.value).endswith(
        f"a type of your own is allowed with {SAFE_GLOBALS}=fractions.Fraction."
    )
    monkeypatch.setenv(SAFE_GLOBALS, "fractions.Fraction, collections.OrderedDict")
    assert load(path)["ratio"] == Fraction(1, 3)
    monkeypatch.setenv(SAFE_GLOBALS, "fractions.Nope")
    with pytest.raises(UserError, match=f"{SAFE_GLOBALS} names fractions.Nope, which cannot be"):
        load(path)


def test_lightnings_checkpoint_io_reads_with_the_safe_loader(tmp_path: Path, marker: Path) -> None:
    path = craft(tmp_path / "x.ckpt", marker)
    with pytest.raises(UserError, match="holds posix.system"):
        SafeCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run of one epoch that finished, trained as a user runs it (its output kept)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    proc = run_train(*QUICK, "logger=csv", "trainer.max_epochs=1", f"hydra.run.dir={folder}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert results(folder)["status"] == "finished"
    return {"folder": folder, "output": proc.stdout + proc.stderr}


def test_lightnings_advertisement_is_not_printed(finished_run: dict) -> None:
    assert "Trainer.fit` stopped" in finished_run["output"]  # Lightning's own lines are there
    assert "litlogger" not in finished_run["output"]
    assert "Tip:" not in finished_run["output"]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_a_crafted_last_ckpt_in_a_run_folder_is_refused(
    finished_run: dict, tmp_path: Path, marker: Path, entry: str
) -> None:
    folder = Path(shutil.copytree(finished_run["folder"], tmp_path / "run"))
    last = craft(folder / "checkpoints" / "last.ckpt", marker)
    before = snapshot(folder)
    proc = run_command([sys.executable, ROOT / entry, f"ckpt_path={last}"], cwd=tmp_path)
    assert one_error_line(proc).startswith(f"error: {last} holds posix.system, which could run")
    assert not marker.exists()
    assert snapshot(folder) == before


@pytest.mark.slow
def test_a_crafted_checkpoint_from_elsewhere_is_refused(tmp_path: Path, marker: Path) -> None:
    shared = craft(tmp_path / "pretrained.ckpt", marker)
    proc = run_train(*QUICK, "logger=csv", f"ckpt_path={shared}", f"paths.log_dir={tmp_path}")
    assert one_error_line(proc) == (
        f"error: {shared} holds posix.system, which could run code when the file is loaded, so "
        f"it is not loaded: use checkpoints you trust; a type of your own is allowed with "
        f"{SAFE_GLOBALS}=posix.system."
    )
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()  # nothing started


def test_lightnings_own_load_refuses_a_crafted_checkpoint(tmp_path: Path, marker: Path) -> None:
    """The best checkpoint is replaced after fitting: the test Lightning runs then loads it."""
    crafted = craft(tmp_path / "crafted.ckpt", marker)
    folder = tmp_path / "run"
    code, _, err = here_exit(
        *QUICK,
        "logger=csv",
        "trainer.max_epochs=1",
        f"hydra.run.dir={folder}",
        "+callbacks.swap._target_=probes.ReplaceBestCheckpoint",
        f"+callbacks.swap.source={crafted}",
    )
    message = err.strip()
    assert code == 2 and message.startswith("error: ") and "holds posix.system" in message, err
    assert "\n" not in message
    assert not marker.exists()
    assert results(folder)["status"] == "failed"


def test_resume_true_never_runs_a_crafted_last_ckpt(tmp_path: Path, marker: Path) -> None:
    """A sweep job that failed after its first epoch, whose last.ckpt is then replaced.

    Continued from its last.ckpt (issue 17 item 3), the job is refused in one line; started
    again from scratch, the crafted file is set aside unread. Either way nothing in it runs.
    """
    sweep, fail = tmp_path / "sweep", tmp_path / "fail"
    fail.touch()
    args = [
        "-m",
        "hydra/sweeper=basic",  # a solo job continued from its last.ckpt
        *QUICK,
        "logger=csv",
        "trainer.max_epochs=2",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=job",
        "+callbacks.fail._target_=probes.FailAtEpoch",
        "+callbacks.fail.epoch=1",
        f"+callbacks.fail.fail={fail}",
    ]
    code, _, _ = here_exit(*args)  # a sweep whose job failed exits 1
    job = sweep / "job"
    assert code == 1 and results(job)["status"] == "failed"
    fail.unlink()
    craft(job / "checkpoints" / "last.ckpt", marker)
    # As a job killed in its second epoch leaves it: +resume=true continues it from last.ckpt.
    record = results(job)
    record["status"] = "interrupted"
    (job / "results.json").write_text(json.dumps(record))
    # A sweep with a job that did not finish exits non-zero (item 6): its record tells.
    with contextlib.suppress(SystemExit):
        here(*args, "+resume=true")
    assert not marker.exists()
    record = results(job)
    if record["status"] == "finished":
        assert "resumed_from" not in record
    else:
        assert "holds posix.system" in record["error"], record
