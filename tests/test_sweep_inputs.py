"""A sweep's own inputs: identical jobs of a grid run once (both sweepers), max_members checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, QUICK, metric_rows, run_train

from actlab.errors import UserError
from actlab.results import read_results
from hydra_plugins.actlab_packed import members_limit

SWEEP = [*QUICK, "logger=csv", "trainer.max_epochs=2"]
PACKED = [*FAST, "logger=csv", "trainer.max_epochs=2", "hydra/sweeper=packed"]  # QUICK cannot pack


def _sweep(folder: Path, *args: str, base: list[str] = SWEEP) -> str:
    proc = run_train("-m", *base, *args, f"hydra.sweep.dir={folder}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def _once(out: str) -> list[str]:
    return [line for line in out.splitlines() if "it runs once" in line]


@pytest.mark.slow
def test_identical_jobs_of_a_grid_run_once(tmp_path: Path) -> None:
    # Four jobs in the grid, one job: the same seed twice, the same rate written two ways.
    out = _sweep(tmp_path, "hydra/sweeper=basic", "seed=0,0", "optimizer.lr=0.05,5e-2")
    (folder,) = [p.parent for p in tmp_path.glob("*/results.json")]
    assert "optimizer.lr=0.05," in folder.name and read_results(folder)["status"] == "finished"
    assert not (folder / "attempts").exists()  # not trained a second time over the first
    lines = _once(out)
    assert len(lines) == 3, out
    # Hydra names a job by its values: 5e-2 is the 0.05 job.
    assert all(f"job {folder.name} is in the grid more than once" in line for line in lines)


@pytest.mark.slow
def test_identical_jobs_of_a_packed_grid_are_one_member(tmp_path: Path) -> None:
    out = _sweep(tmp_path, "seed=0,0,1", base=PACKED)
    assert "packed sweep: 2 jobs as 1 pack(s) and 0 solo job(s)" in out, out
    assert len(_once(out)) == 1, out
    for seed in (0, 1):
        (folder,) = tmp_path.glob(f"*seed={seed}*")
        assert read_results(folder)["status"] == "finished"
        assert not (folder / "attempts").exists()
        epochs = [row["epoch"] for row in metric_rows(folder) if row.get("val/acc")]
        assert epochs == ["0", "1"]  # each epoch's row once


@pytest.mark.parametrize("value", [-1, 0, 2.5, "8", True])
def test_max_members_is_null_or_a_positive_integer(value: object) -> None:
    # The function PackedSweeper.__init__ checks with (Hydra's plugin scan may have reloaded the
    # basic sweeper's module, so the class itself is not built outside a sweep here).
    with pytest.raises(UserError, match=f"hydra.sweeper.max_members={value}: give an integer"):
        members_limit(value)
    assert members_limit(1) == 1
    assert members_limit(None) is None
