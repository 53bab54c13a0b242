"""`make bench`: how close the project's training epoch runs to a plain PyTorch loop.

Three ways to train the same 784-256-10 MLP on the same MNIST split, batch size and thread count:

  project    `actlab.train.train(cfg)` as `python train.py` runs it (MNISTDataModule, MLPClassifier,
             the default callbacks, the CSV logger; `project+wandb` adds the offline W&B logger),
             with one extra callback that reads the clock at epoch boundaries;
             `project grouped` the same with `+data.steps_per_batch=8` (8 minibatches, 8
             optimizer steps, per Lightning batch);
  plain      a hand-written loop over the same in-memory tensors: the floor on this machine;
  per-sample the project's Trainer fed as the reference templates feed theirs: torchvision's MNIST
             with ToTensor + Normalize, one image per call, and `DataLoader(num_workers=0)`.

Each measurement is one epoch after a warm-up epoch; the variants are interleaved round by round
(A B C D, then B C D A, ...) so that load from other processes hits them alike; times are
medians, ratios medians of per-round ratios.
Then `python train.py` is launched as a user would to time process start -> first training step
(against `python -c "import lightning"` launched the same way) and the peak RSS of the process.
The sweep section (`--sweep-epochs`) runs `experiment=act_compare` (3 activations x 3 seeds) three
ways: one job per configuration (`hydra/sweeper=basic`), packed (the default), and packed under
`hydra/launcher=parallel` (split into packs that fill the device slots); each against the plain
loop's epoch measured in the same run. The pack-size section (`--pack-sizes`, off by default) gives
member-epochs per second of one pack of each size K, against solo jobs (and, on a GPU, against
4 solo jobs sharing it). The search section (`--search-seeds`, off by default) runs
`hparams_search=slope_optuna` packed with successive-halving pruning and one trial at a time.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset

from actlab import CONFIG_DIR, ROOT
from actlab.data import MNISTDataModule, batch_order
from actlab.launch import usable_cores
from actlab.results import write_json
from actlab.train import train

GROUPED = 8  # data.steps_per_batch of the `project grouped` variant


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _times(start: tuple, train_end: tuple, end: tuple) -> dict[str, float]:
    """Wall seconds of the training steps and of the whole epoch, and the steps' CPU seconds.

    CPU time (all threads of this process) is less disturbed by other processes than wall
    time, which makes it a second opinion on a busy machine.
    """
    return {
        "train_s": train_end[0] - start[0],
        "epoch_s": end[0] - start[0],
        "train_cpu_s": train_end[1] - start[1],
    }


class EpochClock(L.Callback):
    """Reads the clock at epoch boundaries and writes the per-epoch times to `path` at the end.

    `train_s` is the training steps of an epoch, `epoch_s` the whole epoch: steps, validation,
    checkpointing and epoch-end logging.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.epochs: list[dict[str, float]] = []
        self._start = self._train_end = (0.0, 0.0)

    def _close(self) -> None:
        if self._start[0]:
            now = _clocks()
            end = self._train_end if self._train_end[0] else now
            self.epochs.append(_times(self._start, end, now))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        self._start, self._train_end = _clocks(), (0.0, 0.0)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._train_end = _clocks()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        Path(self.path).write_text(json.dumps(self.epochs))


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM, Linux).

    Not `ru_maxrss`: that survives exec, so a child forked from a big parent (this bench)
    would report the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


class StartupProbe(L.Callback):
    """Records the wall-clock time of the first training batch and, at exit, the peak RSS.

    Both go to `path` as JSON when the process exits, so the peak covers fit and test.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.first_step: float | None = None
        atexit.register(self._write)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def _write(self) -> None:
        record = {"first_step": self.first_step, "peak_rss_gb": peak_rss_gb()}
        Path(self.path).write_text(json.dumps(record))


# The baseline process: `import lightning`, then the same record as StartupProbe writes.
_BASELINE = """import lightning
import json, time, pathlib
t = time.time()
status = pathlib.Path("/proc/self/status").read_text().splitlines()
hwm = next(line for line in status if line.startswith("VmHWM:"))
record = {{"first_step": t, "peak_rss_gb": int(hwm.split()[1]) / 1e6}}
pathlib.Path({path!r}).write_text(json.dumps(record))
"""


# ---------------------------------------------------------------------------------------------
# The per-sample path of the reference templates


def per_sample_mnist(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> Dataset:
    """torchvision's `MNIST(transform=Compose([ToTensor(), Normalize(...)]))`, the reference
    templates' data set, over arrays already in memory.

    Its own `__getitem__` runs: a PIL image from the uint8 array, then the transforms, one image
    per call; a flatten for the MLP ends the transform. Only the files are not read: `__init__`
    would look for them under `<root>/MNIST/raw`, and the bench also runs on other sources.
    """
    from torchvision import transforms
    from torchvision.datasets import MNIST, VisionDataset

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((mean,), (std,)), torch.flatten]
    )
    ds = MNIST.__new__(MNIST)
    VisionDataset.__init__(ds, root=None, transform=transform)
    ds.train, ds.data, ds.targets = True, torch.from_numpy(images), torch.from_numpy(labels)
    return ds


class PerSampleDataModule(MNISTDataModule):
    """The project's DataModule (same split) serving per-sample DataLoaders instead of tensors."""

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x_tr, y_tr, x_te, y_te = self.source.load(self.data_dir)
        idx_train, idx_val = self.split_indices(len(x_tr))
        self.train = per_sample_mnist(x_tr[idx_train], y_tr[idx_train], self.mean, self.std)
        self.val = per_sample_mnist(x_tr[idx_val], y_tr[idx_val], self.mean, self.std)
        self.test = per_sample_mnist(x_te, y_te, self.mean, self.std)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.eval_batch_size, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.eval_batch_size, num_workers=0)


# ---------------------------------------------------------------------------------------------
# The plain loop


def plain_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    order: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of minibatch SGD in plain PyTorch: returns (mean loss, accuracy) as tensors.

    It keeps the same training metrics as the project (loss and accuracy summed on the device,
    read once at the end), so that the comparison is of the loops, not of the work.
    """
    model.train()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for idx in order.to(x.device).split(batch_size):
        xb, yb = x[idx], y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss * len(idx)
            correct += (logits.argmax(1) == yb).sum()
    return loss_sum / len(x), correct / len(x)


@torch.no_grad()
def plain_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = sum(
        (model(xb).argmax(1) == yb).sum()
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return float(correct) / len(x)


# ---------------------------------------------------------------------------------------------
# Running the variants


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send the progress bar, model summary and Lightning's info lines to /dev/null."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "actlab")
    levels = {n: logging.getLogger(n).level for n in names}
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stderr(null),
        contextlib.redirect_stdout(null),
    ):
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def compose(overrides: list[str], output_dir: Path) -> Any:
    """The config `python train.py <overrides>` would run in `output_dir`, Hydra's state set."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task sees its config, Hydra's is in HydraConfig
    return cfg


def run_project(
    workdir: Path,
    batch_size: int,
    epochs: int,
    logger: str,
    threads: int,
    per_sample: bool = False,
    extra: tuple[str, ...] = (),
) -> list[dict[str, float]]:
    """`train(cfg)` for 1 warm-up + `epochs` epochs; returns the measured epochs' times."""
    out = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{logger}-{batch_size}-"))
    clock = out / "epochs.json"
    overrides = [
        f"logger={logger}",
        f"data.batch_size={batch_size}",
        f"trainer.max_epochs={1 + epochs}",
        f"threads={threads}",
        "test=false",
        f"paths.data_dir={ROOT / 'data'}",
        f"paths.log_dir={workdir}",
        "+callbacks.epoch_clock._target_=benchmarks.bench.EpochClock",
        f"+callbacks.epoch_clock.path={clock}",
    ]
    if per_sample:
        overrides.append("data._target_=benchmarks.bench.PerSampleDataModule")
    overrides += extra
    cfg = compose(overrides, out)
    with _quiet():
        train(cfg)
    return json.loads(clock.read_text())[1:]


def run_plain(cfg: Any, batch_size: int, epochs: int) -> list[dict[str, float]]:
    """The plain loop on the project's own tensors (same split, model, optimizer, threads)."""
    dm: MNISTDataModule = instantiate(cfg.data)
    dm.setup()
    (x, y), (xv, yv) = dm.train, dm.val
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model.net)  # the run's own network, as train.py builds it
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    times = []
    for epoch in range(1 + epochs):
        start = _clocks()
        plain_epoch(model, optimizer, x, y, batch_size, batch_order(cfg.seed, epoch, len(x)))[
            0
        ].item()
        train_end = _clocks()
        plain_eval(model, xv, yv, cfg.data.eval_batch_size)
        times.append(_times(start, train_end, _clocks()))
    return times[1:]


def time_first_step(args: list[str], workdir: Path) -> dict[str, float]:
    """Launch `python train.py <args>` (or the baseline if args is empty) and return the seconds
    from launch to its first training batch and its peak RSS."""
    fd, name = tempfile.mkstemp(dir=workdir, suffix=".json")
    os.close(fd)
    stamp = Path(name)
    stamp.unlink()
    if args:
        cmd = [
            sys.executable,
            "train.py",
            *args,
            "+callbacks.startup_probe._target_=benchmarks.bench.StartupProbe",
            f"+callbacks.startup_probe.path={stamp}",
        ]
    else:
        cmd = [sys.executable, "-c", _BASELINE.format(path=str(stamp))]
    with tempfile.TemporaryFile(dir=workdir) as err:
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        if proc.returncode != 0 or not stamp.exists():
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    record = json.loads(stamp.read_text())
    return {"first_step_s": record["first_step"] - t0, "peak_rss_gb": record["peak_rss_gb"]}


# ---------------------------------------------------------------------------------------------
# The report


def _median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def measure_epochs(
    batch_sizes: list[int], rounds: int, epochs: int, threads: int, workdir: Path, say: Callable
) -> dict[str, Any]:
    variants: dict[str, Callable[[int], list[dict[str, float]]]] = {
        "project": lambda b: run_project(workdir, b, epochs, "csv", threads),
        "plain": lambda b: run_plain(
            compose([f"paths.data_dir={ROOT / 'data'}"], workdir), b, epochs
        ),
        "project+wandb": lambda b: run_project(workdir, b, epochs, "wandb", threads),
        # The opt-in grouping of minibatches: Lightning's per-batch cost once per GROUPED steps.
        "project grouped": lambda b: run_project(
            workdir, b, epochs, "csv", threads, extra=(f"+data.steps_per_batch={GROUPED}",)
        ),
        # The slow path needs no repeats to show a 4x gap: one measured epoch per round.
        "per-sample": lambda b: run_project(workdir, b, 1, "csv", threads, per_sample=True),
    }
    out: dict[str, Any] = {}
    for b in batch_sizes:
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for r in range(rounds):
            names = list(variants)
            names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order per round
            for name in names:
                samples[name] += [dict(e, round=r) for e in variants[name](b)]
                last = samples[name][-1]
                say(f"  batch {b} round {r + 1}/{rounds} {name:<14} {last['train_s']:.3f} s/epoch")
        out[str(b)] = {
            name: {
                "train_s": _median(s, "train_s"),
                "epoch_s": _median(s, "epoch_s"),
                "train_cpu_s": _median(s, "train_cpu_s"),
                "samples": s,
            }
            for name, s in samples.items()
        }
        out[str(b)]["ratios"] = {
            f"{a}/{c}{suffix}": paired_ratio(samples[a], samples[c], key)
            for a, c in (
                ("project", "plain"),
                ("project grouped", "plain"),
                ("project+wandb", "project"),
                ("per-sample", "project"),
            )
            for key, suffix in (("train_s", ""), ("epoch_s", " epoch"), ("train_cpu_s", " cpu"))
        }
    return out


def round_ratios(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> list[float]:
    """a/b in each round both were measured in, each round's figures taken back to back."""
    rounds = sorted({s["round"] for s in a} & {s["round"] for s in b})
    return [
        _median([s for s in a if s["round"] == r], key)
        / _median([s for s in b if s["round"] == r], key)
        for r in rounds
    ]


def paired_ratio(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> float:
    """Median over rounds of a/b (round_ratios).

    Load from other processes drifts over minutes; within a round both sides see about the
    same, so the per-round ratio is steadier than a ratio of overall medians.
    """
    return statistics.median(round_ratios(a, b, key))


def measure_startup(rounds: int, workdir: Path, say: Callable) -> dict[str, Any]:
    common = ["trainer.max_epochs=1", "+trainer.limit_train_batches=20", f"paths.log_dir={workdir}"]
    runs = {
        "import lightning": [],
        "train.py logger=csv": ["logger=csv", *common],
        "train.py logger=wandb": ["logger=wandb", *common],
    }
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for r in range(rounds):
        for name, args in runs.items():
            samples[name].append(time_first_step(args, workdir))
            took = samples[name][-1]["first_step_s"]
            say(f"  start-up round {r + 1}/{rounds} {name:<22} {took:.2f} s")
    return {
        name: {
            "first_step_s": _median(s, "first_step_s"),
            "peak_rss_gb": max(x["peak_rss_gb"] for x in s),
            "samples": s,
        }
        for name, s in samples.items()
    }


def run_process(cmd: list[str], workdir: Path) -> dict[str, float]:
    """A whole process as a user runs it: its wall seconds and peak RSS (GB)."""
    with tempfile.TemporaryFile(dir=workdir) as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{tail}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20}  # ru_maxrss: KiB


def measure_main_job(rounds: int, epochs: int, workdir: Path, say: Callable) -> dict[str, Any]:
    """`python train.py -m model.act=relu,leaky,none` (default sweeper and logger: packed, W&B
    offline) and with `hydra/sweeper=basic`, against benchmarks/plain_sweep.py training the
    same three networks one after another; whole processes, in rotating order each round."""
    data = ROOT / "data"

    def commands(epochs: int) -> dict[str, list[str]]:
        train = [
            sys.executable, "train.py", "-m", "model.act=relu,leaky,none",
            f"paths.data_dir={data}", f"trainer.max_epochs={epochs}",
        ]  # fmt: skip
        return {
            "plain PyTorch script": [
                sys.executable, "benchmarks/plain_sweep.py", f"--data-dir={data / 'mnist'}",
                f"--epochs={epochs}",
            ],
            "main job (default: packed)": train,
            "main job, hydra/sweeper=basic": [*train, "hydra/sweeper=basic"],
        }  # fmt: skip

    # First one epoch of each, not measured: the first process in a while reads its libraries
    # and the data from disk (measured here: the plain script 21.7 s in its first round, then
    # 17.1-17.4 s), which would flatter whatever runs after it in the first round.
    def run(cmd: list[str], sweep_dir: Path) -> dict[str, float]:
        return run_process([*cmd, f"hydra.sweep.dir={sweep_dir}"] if "-m" in cmd else cmd, workdir)

    for i, (name, cmd) in enumerate(commands(1).items()):
        say(f"  warm-up: {name}, 1 epoch")
        run(cmd, workdir / "warm-up" / str(i))
    ways = commands(epochs)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    names = list(ways)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sweep_dir = workdir / "main_job" / f"{r}-{len(samples[name])}"
            samples[name].append({**run(ways[name], sweep_dir), "round": r})
            say(f"  main job round {r + 1}/{rounds} {name:<30} {samples[name][-1]['wall_s']:.1f} s")
    plain = samples["plain PyTorch script"]
    out = {}
    for name, s in samples.items():
        ratios = round_ratios(s, plain, "wall_s")
        out[name] = {
            "wall_s": round(_median(s, "wall_s"), 1),
            "peak_rss_gb": round(max(x["peak_rss_gb"] for x in s), 2),
            "x plain": round(statistics.median(ratios), 2),  # paired_ratio, from its rounds
            "x plain per round": [round(x, 2) for x in ratios],
            "samples": s,
        }
    return out


SWEEPS = {
    "one job per config": ["hydra/sweeper=basic"],
    "packed": [],
    "packed + parallel": ["hydra/launcher=parallel"],  # one pack per device slot
}


def run_sweep(
    args: list[str], sweep_dir: Path, ended: tuple[str, ...] = ("finished",)
) -> tuple[float, list[dict[str, Any]]]:
    """`python train.py -m <args>` into `sweep_dir`: its wall time and its jobs' records, each
    of which must have one of the statuses `ended`."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        raise RuntimeError(f"the sweep {' '.join(args)} failed:\n{tail}")
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    if not all(r["status"] in ended for r in records):
        raise RuntimeError(f"the sweep {' '.join(args)} left unfinished jobs in {sweep_dir}")
    return wall, records


def _sweep_args(data: str, epochs: int) -> list[str]:
    return [
        f"data={data}",
        "logger=csv",
        f"trainer.max_epochs={epochs}",
        "callbacks.progress_bar.refresh_rate=0",
        f"paths.data_dir={ROOT / 'data'}",
    ]


def measure_sweeps(
    epochs: int, threads: int, workdir: Path, say: Callable, data: str = "mnist"
) -> dict[str, Any]:
    """Wall time of act_compare run each way, and its fit seconds per member-epoch.

    Fit seconds per member-epoch: a job's `seconds_per_epoch` (its fit, set-up included, over its
    epochs; a member's share of its pack's); against the plain loop's whole epoch on the same data.
    """
    # First, on a quiet machine: right after a parallel sweep its workers' exit can still be
    # slowing the cores (measured once: 0.74 s against 0.54 s before the sweeps).
    overrides = [f"data={data}", f"paths.data_dir={ROOT / 'data'}", f"threads={threads}"]
    cfg = compose(overrides, workdir / "plain")
    out: dict[str, Any] = {"plain loop epoch_s": _median(run_plain(cfg, 64, 3), "epoch_s")}
    for name, extra in SWEEPS.items():
        args = ["experiment=act_compare", *_sweep_args(data, epochs), *extra]
        wall, records = run_sweep(args, workdir / name.replace(" ", "_"))
        # A member's seconds_per_epoch is its share of its pack's epoch.
        per_member = [r["seconds_per_epoch"] for r in records]
        out[name] = {
            "wall_s": round(wall, 1),
            "jobs": len(records),
            "train_s_per_member_epoch": statistics.median(per_member),
        }
        say(f"  {name}: {wall:.1f} s, {out[name]['train_s_per_member_epoch']:.3f} s/member-epoch")
    return out


def measure_pack_sizes(
    sizes: list[int],
    epochs: int,
    workdir: Path,
    say: Callable,
    data: str = "mnist",
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Member-epochs per second of one pack of K members (ReLU, seeds 0..K-1) for each K, of one
    job per configuration, and, on a GPU, of `launch.jobs_per_gpu=4` (4 solo jobs sharing it).

    Two rates each: by wall time (process start, data, test and records included) and by fit
    time (`seconds_per_epoch`: a pack's whole epoch, a solo job's own). For each K, the seconds
    per member-epoch of the fit and, of those, outside the training steps (evaluation, logging,
    checkpoints, batch orders): a pack's own record of them (K=1: a job of its own, a pack of
    one).
    """
    gpu = torch.cuda.is_available()
    common = [*_sweep_args(data, epochs), *(["trainer=gpu"] if gpu else []), *overrides]
    ways = {"one job per config": ["hydra/sweeper=basic", "seed=range(0,4)"]}
    if gpu:
        ways["jobs_per_gpu=4"] = [
            "hydra/sweeper=basic",
            "seed=range(0,8)",
            "hydra/launcher=parallel",
            "launch.jobs_per_gpu=4",
        ]
    for k in sizes:  # K=1: a job of its own, a pack of one
        ways[f"pack K={k}"] = [f"hydra.sweeper.max_members={k}", f"seed=range(0,{k})"]
    out: dict[str, Any] = {"device": "cuda" if gpu else "cpu"}
    for name, extra in ways.items():
        folder = name.replace(" ", "_").replace("=", "")  # `=` in hydra.sweep.dir needs quotes
        wall, records = run_sweep([*common, *extra], workdir / folder)
        jobs = len(records)
        packs = [r["pack"] for r in records if "pack" in r]
        outside = None
        if "hydra/launcher=parallel" in extra:
            fit_rate = None  # jobs overlap: only the wall rate says what they achieve together
        elif len(packs) == jobs:  # a pack's epoch is its members' (K jobs of one, K packs of 1)
            size = packs[0]["size"]
            fit_rate = size / statistics.median(p["seconds_per_epoch"] for p in packs)
            outside = statistics.median(p["seconds_outside_steps_per_epoch"] for p in packs) / size
        else:  # one job at a time under Lightning's loop
            fit_rate = 1 / statistics.median(r["seconds_per_epoch"] for r in records)
        out[name] = {
            "jobs": jobs,
            "wall_s": round(wall, 1),
            "member_epochs_per_s_wall": jobs * epochs / wall,
            "member_epochs_per_s_fit": fit_rate,
            "fit_s_per_member_epoch": 1 / fit_rate if fit_rate else None,
            "outside_steps_s_per_member_epoch": outside,
        }
        say(f"  {name}: {jobs * epochs / wall:.2f} member-epochs/s by wall time")
    return out


SEARCHES = {
    "packed": ["hydra.sweeper.members_per_round=8", "hydra.sweeper.pruner=halving"],
    "one at a time": ["hydra.sweeper.members_per_round=1", "hydra.sweeper.pruner=none"],
}


def measure_search(
    seeds: int, trials: int, epochs: int, workdir: Path, say: Callable, data: str = "mnist"
) -> dict[str, Any]:
    """`hparams_search=slope_optuna` (Leaky ReLU slope x learning rate, TPE), `trials` trials of
    `epochs` epochs, each way of SEARCHES for the sampler seeds 0..seeds-1 (the ways alternate
    which goes first): wall time, and the best trial's val/acc_best (optimization_results.yaml).
    """
    common = [
        "hparams_search=slope_optuna",
        *_sweep_args(data, epochs),
        f"hydra.sweeper.n_trials={trials}",
    ]
    out: dict[str, Any] = {"trials": trials, "epochs": epochs, **{name: [] for name in SEARCHES}}
    names = list(SEARCHES)
    for seed in range(seeds):
        for name in names[seed % 2 :] + names[: seed % 2]:
            folder = workdir / "search" / f"{seed}-{name.replace(' ', '_')}"
            args = [*common, f"hydra.sweeper.seed={seed}", *SEARCHES[name]]
            # A search's diverged trials are results of the search, told failed to Optuna.
            wall, records = run_sweep(args, folder, ended=("finished", "pruned", "diverged"))
            best = OmegaConf.load(folder / "optimization_results.yaml").best_value
            pruned = sum(r["status"] == "pruned" for r in records)
            out[name].append(
                {"seed": seed, "wall_s": round(wall, 1), "best": best, "pruned": pruned}
            )
            say(f"  search seed {seed}, {name}: {wall:.1f} s, best {best:.4f}, {pruned} pruned")
    packed, solo = out["packed"], out["one at a time"]
    out["one at a time / packed wall"] = _mean(solo, "wall_s") / _mean(packed, "wall_s")
    out["packed - one at a time mean best (points)"] = 100 * (
        _mean(packed, "best") - _mean(solo, "best")
    )
    return out


def _mean(samples: list[dict[str, float]], key: str) -> float:
    return statistics.mean(s[key] for s in samples)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(result: dict[str, Any]) -> str:
    """The Markdown tables `make bench` prints (and README's Performance section shows)."""
    epochs, startup = result.get("epochs", {}), result.get("startup")
    rows: list[str] = []
    if epochs:
        rows += [
            "Seconds per epoch, training steps only (median; ratios: median of per-round ratios):",
            "",
            _row(
                "batch",
                "plain",
                "project (CSV)",
                "project (W&B+CSV)",
                "per-sample DataLoader",
                "project/plain",
                "same, CPU time",
                f"grouped ({GROUPED} steps/batch)/plain",
                "same, CPU time",
                "W&B/CSV",
                "per-sample/project",
            ),
            _row(*["---"] * 11),
        ]
        for b, m in epochs.items():
            p, c, w, d = (
                m[k]["train_s"] for k in ("plain", "project", "project+wandb", "per-sample")
            )
            q = m["ratios"]
            rows.append(
                _row(
                    b, f"{p:.3f}", f"{c:.3f}", f"{w:.3f}", f"{d:.3f}",
                    f"{q['project/plain']:.2f}", f"{q['project/plain cpu']:.2f}",
                    f"{q['project grouped/plain']:.2f}", f"{q['project grouped/plain cpu']:.2f}",
                    f"{q['project+wandb/project']:.2f}", f"{q['per-sample/project']:.1f}",
                )
            )  # fmt: skip
        rows += [
            "",
            "Seconds per whole epoch (steps, validation, checkpoints, epoch-end logging; median):",
            "",
            _row("batch", "plain", "project (CSV)", "project (W&B+CSV)", "project/plain"),
            _row(*["---"] * 5),
        ]
        for b, m in epochs.items():
            p, c, w = (m[k]["epoch_s"] for k in ("plain", "project", "project+wandb"))
            q = m["ratios"]["project/plain epoch"]
            rows.append(_row(b, f"{p:.3f}", f"{c:.3f}", f"{w:.3f}", f"{q:.2f}"))
    if startup:
        base = startup["import lightning"]["first_step_s"]
        rows += [
            "",
            _row(
                "process",
                "start -> first training step (s)",
                "minus `import lightning`",
                "peak RSS (GB)",
            ),
            _row(*["---"] * 4),
        ]
        for name, v in startup.items():
            rows.append(
                _row(
                    f"`{name}`",
                    f"{v['first_step_s']:.2f}",
                    f"{v['first_step_s'] - base:+.2f}",
                    f"{v['peak_rss_gb']:.2f}",
                )
            )
    main_job = result.get("main_job")
    if main_job:
        rows += [
            "",
            "The main job, whole processes (median wall; x plain: median of per-round ratios):",
            "",
            _row("process", "wall (s)", "x plain", "x plain per round", "peak RSS (GB)"),
            _row(*["---"] * 5),
        ]
        for name, v in main_job.items():
            # Each round's ratio beside the median: their spread is the noise the median sits in.
            per_round = ", ".join(f"{x:.2f}" for x in v["x plain per round"])
            rows.append(
                _row(
                    name, v["wall_s"], f"{v['x plain']:.2f}x", per_round, f"{v['peak_rss_gb']:.2f}"
                )
            )
    sweeps = result.get("sweeps")
    if sweeps:
        plain = sweeps["plain loop epoch_s"]
        base = sweeps["one job per config"]["wall_s"]
        rows += [
            "",
            f"experiment=act_compare (9 jobs), plain loop epoch {plain:.3f} s:",
            "",
            _row("sweep", "wall (s)", "speed-up", "fit s per member-epoch", "vs plain epoch"),
            _row(*["---"] * 5),
        ]
        for name, v in sweeps.items():
            if name in SWEEPS:
                t = v["train_s_per_member_epoch"]
                rows.append(
                    _row(name, v["wall_s"], f"{base / v['wall_s']:.2f}x", f"{t:.3f}",
                         f"{t / plain:.2f}x")
                )  # fmt: skip
    packs = result.get("pack_sizes")
    if packs:
        base = packs["one job per config"]["member_epochs_per_s_wall"]
        rows += [
            "",
            f"member-epochs per second on {packs['device']} (ReLU, seeds 0..K-1):",
            "",
            _row(
                "way",
                "jobs",
                "wall (s)",
                "by wall time",
                "x one job per config",
                "by fit time",
                "fit ms per member-epoch",
                "of which outside the steps",
            ),
            _row(*["---"] * 8),
        ]
        ms = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
        for name, v in packs.items():
            if name == "device":
                continue
            fit = v["member_epochs_per_s_fit"]
            rate = v["member_epochs_per_s_wall"]
            rows.append(
                _row(name, v["jobs"], v["wall_s"], f"{rate:.2f}", f"{rate / base:.1f}x",
                     "-" if fit is None else f"{fit:.2f}", ms(v.get("fit_s_per_member_epoch")),
                     ms(v.get("outside_steps_s_per_member_epoch")))
            )  # fmt: skip
    search = result.get("search")
    if search:
        packed, solo = search["packed"], search["one at a time"]
        rows += [
            "",
            f"hparams_search=slope_optuna, {search['trials']} trials of {search['epochs']} epochs; "
            "packed: 8 trials a round, successive halving; one at a time: no pruning:",
            "",
            _row("sampler seed", "packed wall (s)", "one at a time wall (s)", "ratio",
                 "packed best val/acc_best", "one at a time best", "packed pruned"),
            _row(*["---"] * 7),
        ]  # fmt: skip
        for p, s in zip(packed, solo, strict=True):
            rows.append(
                _row(p["seed"], p["wall_s"], s["wall_s"], f"{s['wall_s'] / p['wall_s']:.2f}x",
                     f"{p['best']:.4f}", f"{s['best']:.4f}", p["pruned"])
            )  # fmt: skip
        rows.append(
            _row("mean", f"{_mean(packed, 'wall_s'):.1f}", f"{_mean(solo, 'wall_s'):.1f}",
                 f"{search['one at a time / packed wall']:.2f}x", f"{_mean(packed, 'best'):.4f}",
                 f"{_mean(solo, 'best'):.4f}", f"{_mean(packed, 'pruned'):.1f}")
        )  # fmt: skip
    checks = targets(result)
    if checks:
        rows += ["", _row("target", "measured", "goal", ""), _row(*["---"] * 4)]
        rows += [
            _row(name, f"{v:.2f}", f"{op} {goal}", "met" if ok else "MISSED")
            for name, v, op, goal, ok in checks
        ]
    return "\n".join(rows)


def targets(result: dict[str, Any]) -> list[tuple[str, float, str, float, bool]]:
    """(name, measured, "<=" or ">=", goal, met) for each measured target of issues 5 and 20."""
    out = []
    goals = {"64": 1.3, "512": 1.15}
    for b, m in result.get("epochs", {}).items():
        q = m["ratios"]
        if b in goals:
            out.append((f"project/plain, batch {b}", q["project/plain"], "<=", goals[b]))
            out.append((f"project grouped/plain, batch {b}", q["project grouped/plain"], "<=",
                        goals[b]))  # fmt: skip
        out.append((f"W&B/CSV, batch {b}", q["project+wandb/project"], "<=", 1.10))
        out.append((f"per-sample/project, batch {b}", q["per-sample/project"], ">=", 4.0))
    s = result.get("startup")
    if s:
        base = s["import lightning"]["first_step_s"]
        csv = s["train.py logger=csv"]
        out.append(
            ("first step - import lightning (s), CSV", csv["first_step_s"] - base, "<=", 1.0)
        )
        rss = max(v["peak_rss_gb"] for k, v in s.items() if k.startswith("train.py"))
        out.append(("peak RSS of train.py (GB)", rss, "<=", 1.2))
    mj = result.get("main_job")
    if mj:
        out.append(
            (
                "main job / plain script (goal 0.8)",
                mj["main job (default: packed)"]["x plain"],
                "<=",
                1.0,
            )
        )
    sw = result.get("sweeps")
    if sw:
        packed = sw["packed"]
        ratio = packed["train_s_per_member_epoch"] / sw["plain loop epoch_s"]
        out.append(("packed s per member-epoch / plain epoch", ratio, "<=", 1.0))
        speedup = sw["one job per config"]["wall_s"] / packed["wall_s"]
        out.append(("packed sweep wall speed-up", speedup, ">=", 1.6))
    packs = result.get("pack_sizes")
    if packs and packs["device"] == "cuda" and "pack K=64" in packs:
        rate = packs["pack K=64"]["member_epochs_per_s_wall"]
        base = packs["one job per config"]["member_epochs_per_s_wall"]
        out.append(("GPU pack K=64 / one job per config", rate / base, ">=", 20.0))
    search = result.get("search")
    if search:
        out.append(("search wall, one at a time / packed", search["one at a time / packed wall"],
                    ">=", 3.0))  # fmt: skip
        out.append(("search mean best, packed - one at a time (points)",
                    search["packed - one at a time mean best (points)"], ">=", -0.2))  # fmt: skip
    return [(n, v, op, g, v <= g if op == "<=" else v >= g) for n, v, op, g in out]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per batch size (0: none)"
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="measured epochs per run (after 1 warm-up)"
    )
    parser.add_argument("--startup-rounds", type=int, default=3, help="0 skips the start-up runs")
    parser.add_argument(
        "--sweep-epochs", type=int, default=10, help="act_compare sweeps' epochs (0: skip them)"
    )
    parser.add_argument(
        "--main-job-rounds", type=int, default=3,
        help="rounds of the main job against plain PyTorch, whole processes (0: skip)",
    )  # fmt: skip
    parser.add_argument("--main-job-epochs", type=int, default=10, help="their epochs")
    parser.add_argument("--sweep-data", default="mnist", help="their data (synthetic: a check)")
    parser.add_argument(
        "--pack-sizes", type=int, nargs="*", default=[],
        help="member-epochs/s of one pack of each size K (e.g. 1 8 64 256 on a GPU)",
    )  # fmt: skip
    parser.add_argument("--pack-epochs", type=int, default=2, help="epochs of those sweeps")
    parser.add_argument(
        "--pack-overrides", nargs="*", default=[],
        help="config overrides for those sweeps (e.g. model.net.hidden_sizes=[32])",
    )  # fmt: skip
    parser.add_argument(
        "--search-seeds", type=int, default=0,
        help="sampler seeds of the packed against the one-at-a-time search (issue 20's figure: "
        "3; 0: skip)",
    )  # fmt: skip
    parser.add_argument("--search-trials", type=int, default=32, help="trials of each search")
    parser.add_argument("--search-epochs", type=int, default=5, help="epochs of each trial")
    parser.add_argument("--search-data", default="mnist", help="their data (synthetic: a check)")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench")
    args = parser.parse_args(argv)
    if args.rounds and importlib.util.find_spec("torchvision") is None:
        sys.exit(
            "error: the per-sample row runs torchvision's MNIST and this venv has no torchvision: "
            "install the torch and torchvision pair (README, Install) or pass --rounds 0"
        )

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus_usable": usable_cores(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "platform": platform.platform(),
            "load_average_before": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with tempfile.TemporaryDirectory(prefix="actlab-bench-") as tmp:
        workdir = Path(tmp)
        if args.rounds:
            say(f"seconds per epoch, {args.rounds} interleaved rounds of {args.epochs} epochs")
            result["epochs"] = measure_epochs(
                args.batch_sizes, args.rounds, args.epochs, args.threads, workdir, say
            )
        if args.startup_rounds:
            say("start-up and memory of `python train.py` (20 training steps, then test)")
            result["startup"] = measure_startup(args.startup_rounds, workdir, say)
        if args.main_job_rounds:
            say(f"the main job against plain PyTorch, {args.main_job_rounds} rounds")
            result["main_job"] = measure_main_job(
                args.main_job_rounds, args.main_job_epochs, workdir, say
            )
        if args.sweep_epochs:
            say(f"act_compare, {args.sweep_epochs} epochs: one job per config, packed, parallel")
            result["sweeps"] = measure_sweeps(
                args.sweep_epochs, args.threads, workdir, say, args.sweep_data
            )
        if args.pack_sizes:
            say(f"packs of {args.pack_sizes} members, {args.pack_epochs} epochs")
            result["pack_sizes"] = measure_pack_sizes(
                args.pack_sizes,
                args.pack_epochs,
                workdir,
                say,
                args.sweep_data,
                tuple(args.pack_overrides),
            )
        if args.search_seeds:
            say(f"searches of {args.search_trials} trials, {args.search_seeds} sampler seed(s)")
            result["search"] = measure_search(
                args.search_seeds,
                args.search_trials,
                args.search_epochs,
                workdir,
                say,
                args.search_data,
            )
    result["machine"]["load_average_after"] = os.getloadavg()
    result["bench_seconds"] = round(time.perf_counter() - started, 1)

    path = args.out / f"{dt.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.json"
    write_json(path, result)
    print(table(result))
    la = result["machine"]
    print(
        f"\n{la['threads']} threads on {la['cpus_usable']} usable CPUs; load average "
        f"{la['load_average_before'][0]:.1f} before, {la['load_average_after'][0]:.1f} after "
        f"(above {la['cpus_usable']} means other processes shared the CPUs). "
        f"{result['bench_seconds']:.0f} s in all; figures in {path}"
    )


if __name__ == "__main__":
    main()
