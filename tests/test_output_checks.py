"""Where a run writes, checked by writing (root included); what a run's code was, untracked
files included."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import run_command

from actlab import ROOT, results
from actlab.errors import UserError
from actlab.runs import check_output_dirs

NOBODY = 65534


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if "error:" in line]
    assert line.startswith("error: cannot create the run folder under"), line
    return line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this platform")
def test_a_log_dir_under_proc_is_one_error_line_even_for_root(tmp_path: Path) -> None:
    # /proc refuses new files to everyone, root too, though os.access says root may write.
    proc = run_command([sys.executable, ROOT / "train.py", "paths.log_dir=/proc/nope"])
    assert "/proc" in _one_error_line(proc)


def _refusal(args: list[str], uid: int | None) -> str:
    """check_output_dirs(args)'s refusal ("" if none), as user `uid` (a forked child: this
    Python, under /root, may be closed to other users)."""
    if uid is None:
        try:
            check_output_dirs(args)
        except UserError as e:
            return str(e)
        return ""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no return, only the answer
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.write(write, _refusal(args, None).encode() or b"-")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return "" if answer == "-" else answer


def test_a_log_dir_in_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    # Root may write into a read-only folder (and Hydra then would): the check runs as nobody.
    uid = NOBODY if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory() as top:  # not under pytest's 0700 folders: nobody enters
        os.chmod(top, 0o755)
        read_only = Path(top) / "read-only"
        read_only.mkdir(mode=0o555)
        for args in ([f"paths.log_dir={read_only}"], [f"hydra.sweep.dir={read_only}/a/sweep"]):
            refusal = _refusal(args, uid)
            assert f"{read_only} is not a folder you can write to" in refusal, refusal
        assert list(read_only.iterdir()) == []
        writable = Path(top) / "writable"
        writable.mkdir()
        writable.chmod(0o777)
        assert _refusal([f"paths.log_dir={writable}/logs"], uid) == ""


def test_the_check_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output_dirs([f"paths.log_dir={tmp_path}/not/yet/made", f"hydra.run.dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []  # neither the folders it made nor its probe file
    with pytest.raises(UserError, match=r"\(Not a directory\)"):
        (tmp_path / "a_file").write_text("")
        check_output_dirs([f"paths.log_dir={tmp_path}/a_file/logs"])


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def _write(repo: Path, *names: str) -> None:
    for name in names:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x\n")


def test_untracked_code_makes_the_checkout_dirty_and_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    _write(repo, "train.py", ".gitignore")
    (repo / ".gitignore").write_text("*.tmp\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    monkeypatch.setattr(results, "ROOT", repo)
    # Runs' outputs, data and ignored files are not the code.
    _write(repo, "logs/runs/1/results.json", "data/mnist/train-images", "notes.tmp")
    record = results.provenance()
    assert record["git_dirty"] is False and record["git_untracked"] == []
    _write(repo, "src/actlab/swish.py", "configs/model.act/swish.yaml")
    record = results.provenance()
    assert record["git_dirty"] is True
    listed = sorted(record["git_untracked"])
    assert listed == ["configs/model.act/swish.yaml", "src/actlab/swish.py"]
    assert record["git_untracked_more"] == 0
    _write(repo, *(f"scratch/{i}.py" for i in range(30)))
    record = results.provenance()
    assert len(record["git_untracked"]) == results.UNTRACKED_LISTED
    assert record["git_untracked_more"] == 32 - results.UNTRACKED_LISTED
