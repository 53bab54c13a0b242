"""A pack's cost per epoch: no per-member Python work grows with its epochs, and a pack of 64
members with the default logger (W&B, offline here) trains in one process."""

from __future__ import annotations

import gc
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from conftest import COMMAND_TIMEOUT, QUICK, here, results, script_env

from actlab import ROOT, pack

# QUICK without its trainer key (a pack honours only some: that one would make solo jobs).
TINY = [
    *(o for o in QUICK if not o.startswith("++trainer.")),
    "model.net.hidden_sizes=[8]",
    "threads=1",
]
# A bound for the pack's process: 64 members with their W&B runs and train.logs open fit well
# inside it (measured: about 150), while a handle or two more per member would not.
OPEN_FILES = 320


def _pack(tmp: Path, epochs: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A 2-member pack of `epochs` epochs in this process; counts of what it did per call."""
    calls = {"instantiate": 0, "to device": 0}
    instantiate, tensors = pack.instantiate, pack.PackTrainer._tensors

    def counted_instantiate(*args, **kwargs):
        calls["instantiate"] += 1
        return instantiate(*args, **kwargs)

    def counted_tensors(self, split):
        calls["to device"] += 1
        return tensors(self, split)

    with monkeypatch.context() as m:
        m.setattr(pack, "instantiate", counted_instantiate)
        m.setattr(pack.PackTrainer, "_tensors", counted_tensors)
        here(
            "-m", *TINY, "logger=csv", f"trainer.max_epochs={epochs}", "seed=0,1",
            f"hydra.sweep.dir={tmp}",
        )  # fmt: skip
    assert [results(f.parent)["status"] for f in tmp.glob("*/.hydra")] == ["finished"] * 2
    return calls


def test_a_packs_per_epoch_work_builds_nothing_and_moves_no_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three epochs instantiate nothing more than one (checkpoint callbacks built once) and
    move the train, val and test tensors to the device once each."""
    one = _pack(tmp_path / "one", 1, monkeypatch)
    three = _pack(tmp_path / "three", 3, monkeypatch)
    assert three == one
    assert three["to device"] == 3


def test_a_pack_keeps_no_solo_network_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each member's solo net is built, stacked and freed: its optimizer and scheduler (which
    give the member's learning rate) hold none of its parameters."""
    params: dict[int, weakref.ref] = {}
    hidden_activations, fit = pack.hidden_activations, pack.PackTrainer.fit
    alive: list[int] = []

    def watched(net):  # called with each member's solo net as it is built (and stacked)
        params.update((id(p), weakref.ref(p)) for p in net.parameters())
        return hidden_activations(net)

    def fit_after_gc(self):
        gc.collect()
        alive.append(sum(r() is not None for r in params.values()))
        return fit(self)

    monkeypatch.setattr(pack, "hidden_activations", watched)
    monkeypatch.setattr(pack.PackTrainer, "fit", fit_after_gc)
    here("-m", *TINY, "logger=csv", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}")
    assert len(params) == 3 * 4 and alive == [0]


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@pytest.mark.slow
def test_a_pack_of_64_with_the_default_wandb_logger_trains_in_one_process(
    tmp_path: Path,
) -> None:
    """64 members, one process, the default logger (W&B offline + CSV), open files capped at
    OPEN_FILES: each finishes with its own W&B run folder, train.log and checkpoints."""
    args = [
        *TINY, "trainer.max_epochs=1", "hydra.sweeper.max_members=64", "seed=range(0,64)",
        f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, ROOT / "train.py", "-m", *args],
        cwd=ROOT,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        preexec_fn=_limit_open_files,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "Too many open files" not in output
    folders = sorted(f.parent for f in tmp_path.glob("*/.hydra"))
    assert len(folders) == 64
    runs = set()
    for i, folder in enumerate(folders):
        record = results(folder)
        assert record["status"] == "finished", (folder.name, record.get("error"))
        assert record["pack"]["size"] == 64
        (run,) = (folder / "wandb").glob("offline-run-*")
        runs.add(run.name)
        log = (folder / "train.log").read_text()
        assert f"{folder.name}: test/acc=" in log
        assert f"{folders[i - 1].name}: test/acc=" not in log  # only its own lines
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
            "best-epoch000.ckpt",
            "last.ckpt",
        ]
    assert len(runs) == 64
