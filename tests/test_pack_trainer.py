"""A pack trains under Lightning's Trainer (actlab.pack.PackModule): each Lightning batch is a
group of the pack's optimizer steps, and the Trainer's profiler serves a packed sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import PACKABLE, here, results, run_command, script_env

from actlab import ROOT, pack

# 500 training rows of 50: 10 optimizer steps an epoch, so that a group of 8 or 4 ends short.
RUN = [*PACKABLE, "data.batch_size=50", "trainer.max_epochs=2", "seed=0,1"]
STEPS, EPOCHS = 10, 2


def _packed(folder: Path, *extra: str) -> dict[str, dict]:
    """The sweep's records by job folder, each finished in the one pack of 2."""
    here("-m", *RUN, *extra, f"hydra.sweep.dir={folder}")
    records = {f.parent.name: results(f.parent) for f in folder.glob("*/.hydra")}
    assert len(records) == 2
    for r in records.values():
        assert r["status"] == "finished" and r["pack"]["size"] == 2
    return records


def test_each_lightning_batch_of_a_pack_is_a_group_of_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default 8 optimizer steps per Lightning batch, `data.steps_per_batch` steps where it
    is set; the steps, each member's step count and its results are the same either way."""
    calls: list[tuple[int, int]] = []  # (batch, steps it took)
    training_step, step = pack.PackModule.training_step, pack.PackTrainer.step

    def counted_batch(self: pack.PackModule, batch: int) -> None:
        calls.append((batch, 0))
        training_step(self, batch)

    def counted_step(self: pack.PackTrainer, s: int) -> bool:
        calls[-1] = (calls[-1][0], calls[-1][1] + 1)
        return step(self, s)

    monkeypatch.setattr(pack.PackModule, "training_step", counted_batch)
    monkeypatch.setattr(pack.PackTrainer, "step", counted_step)
    runs = {}
    for group, extra in ((pack.STEPS_PER_BATCH, []), (4, ["+data.steps_per_batch=4"])):
        calls.clear()
        runs[group] = _packed(tmp_path / str(group), *extra)
        sizes = [min(group, STEPS - first) for first in range(0, STEPS, group)]
        assert calls == [*enumerate(sizes)] * EPOCHS
    assert pack.STEPS_PER_BATCH == 8  # the premise: 8 + 2 steps an epoch against 4 + 4 + 2
    by_seed = {
        group: {r["composed_config"]["seed"]: r for r in records.values()}
        for group, records in runs.items()
    }
    assert sorted(by_seed[8]) == sorted(by_seed[4]) == [0, 1]
    for seed, record in by_seed[8].items():
        assert by_seed[4][seed]["metrics"] == record["metrics"]
        for r in (record, by_seed[4][seed]):
            last = Path(r["best_checkpoint"]).parent / "last.ckpt"
            assert torch.load(last, weights_only=False)["global_step"] == EPOCHS * STEPS


def test_a_packed_sweep_is_profiled_by_its_trainer(tmp_path: Path) -> None:
    """`+trainer.profiler=simple` packs (it used to send each job solo), and the pack's Trainer
    profiles the pack's own hooks, as a solo job's profiles its module's."""
    proc = run_command(
        [sys.executable, ROOT / "train.py", "-m", *RUN, "+trainer.profiler=simple"]
        + [f"hydra.sweep.dir={tmp_path}"],
        env=script_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr  # the report is logged by Lightning's own logger
    assert "2 jobs as 1 pack(s) and 0 solo job(s)" in out
    assert "FIT Profiler Report" in out
    assert "[Strategy]SingleDeviceStrategy.training_step" in out
    assert "[LightningModule]PackModule.on_train_epoch_end" in out  # the members' epoch end


def test_debug_profiler_profiles_a_pack_into_its_folder(tmp_path: Path) -> None:
    """`debug=profiler` (a profiler that writes a file into the job's folder) packs, and writes
    the pack's profile into the pack's folder, not one member's."""
    records = _packed(tmp_path, "debug=profiler")
    (profile,) = tmp_path.glob(".packs/*/fit-profile.txt")
    assert "[LightningModule]PackModule.on_train_epoch_end" in profile.read_text()
    assert not [p for name in records for p in (tmp_path / name).glob("*profile*")]
