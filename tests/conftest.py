from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from actlab import ROOT
from actlab.data import IDXSource, md5, write_idx
from actlab.train import CONFIG_DIR

# Quick, offline defaults for a training run in a test; a test adds its own overrides.
FAST = ["data=synthetic", "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture(autouse=True)
def _no_wandb_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never reach W&B's servers: no key, no netrc, so W&B decides 'offline'."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def run_train(
    *overrides: str, cwd: Path = ROOT, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` as a user runs it; stdout and stderr captured together."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_train(*overrides: str) -> DictConfig:
    """The composed training config (with its `hydra` node), as `python train.py` would see it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture
def idx_dataset(tmp_path: Path) -> tuple[IDXSource, Path, dict[str, np.ndarray]]:
    """A small MNIST-format dataset written as IDX files, with an IDXSource that knows its MD5s."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(120, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=120, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=30, dtype=np.uint8),
    }
    data_dir = tmp_path / "data"
    folder = data_dir / "tiny"
    files = {}
    for key, arr in arrays.items():
        path = folder / f"{key}-idx"
        write_idx(path, arr)
        files[key] = [path.name, md5(path)]
    return IDXSource(name="tiny", files=files, mirrors=[]), data_dir, arrays


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM of scripts/slurm_local.sh, started (and installed) for the slurm tests."""
    script = str(ROOT / "scripts" / "slurm_local.sh")

    def call(action: str, timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([script, action], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"slurm_local.sh {action}: still running after {timeout}s\n{e.stderr}")

    was_up = call("status", 30).returncode == 0
    proc = call("start", 400)
    if proc.returncode == 3:
        pytest.skip(f"no local SLURM: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    yield
    if not was_up:
        assert call("stop", 60).returncode == 0
