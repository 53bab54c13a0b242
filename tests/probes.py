"""Callbacks that tests add to a real run (`+callbacks.<name>._target_=probes.<Class>`).

They let a test wait on what the run does instead of on the clock: a run that must still be
running when a signal comes holds at a known point until the test lets it go, and a run's
first non-finite loss is written down where the test can read it. Subprocesses find this module
through PYTHONPATH (see conftest.script_env).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from actlab.loggers import AppendingCSVLogger


class HoldAtEpoch(L.Callback):
    """While the file `hold` exists, the run stops at the start of epoch `epoch` and waits there.

    It first writes `<hold>.reached`, so a test knows the run is held (earlier epochs and their
    checkpoints are complete). A signal (Ctrl-C, scancel) ends the wait like any other; deleting
    `hold` lets the run go on. Without the file the callback does nothing, so a resumed run with
    the same config trains straight through.
    """

    def __init__(self, epoch: int, hold: str) -> None:
        self.epoch, self.hold = epoch, Path(hold)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch or not self.hold.exists():
            return
        Path(f"{self.hold}.reached").write_text(str(trainer.current_epoch))
        while self.hold.exists():
            time.sleep(0.05)


class FirstNonFiniteLoss(L.Callback):
    """Writes to `path` the global step at which the training loss was first NaN or infinite.

    Lightning calls a callback's on_train_batch_end before the module's, where the run checks
    for divergence: this sees every step's loss, including the one that stops the run.
    """

    def __init__(self, path: str) -> None:
        self.path, self.seen = Path(path), False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.seen:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not math.isfinite(float(loss)):
            self.seen = True
            self.path.write_text(json.dumps({"global_step": trainer.global_step}))


class FailAtEpoch(L.Callback):
    """While the file `fail` exists, the run raises at the start of epoch `epoch`: a run that
    fails in the middle of its training (its earlier epochs checkpointed). Without the file it
    does nothing, so the same command, resumed, trains through."""

    def __init__(self, epoch: int, fail: str) -> None:
        self.epoch, self.fail = epoch, Path(fail)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and self.fail.exists():
            raise RuntimeError(f"FailAtEpoch: failed at the start of epoch {self.epoch}")


class ReplaceBestCheckpoint(L.Callback):
    """At the end of fitting, copies the file `source` over the run's best checkpoint: the test
    that follows makes Lightning itself load `source`."""

    def __init__(self, source: str) -> None:
        self.source = Path(source)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = Path(trainer.checkpoint_callback.best_model_path)
        best.write_bytes(self.source.read_bytes())


class HoldAtEpochCSVLogger(AppendingCSVLogger):
    """HoldAtEpoch for a run without Lightning's callbacks (a pack's members): the CSV logger
    (`logger.csv._target_=probes.HoldAtEpochCSVLogger`), held when it is first given a metric of
    epoch `epoch`, before it writes it. A pack logs its members' steps after every member's
    checkpoints of the epoch before are saved (`trainer.log_every_n_steps=1` logs each step)."""

    def __init__(self, *args, epoch: int, hold: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch, self.hold = epoch, Path(hold)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if metrics.get("epoch") == self.epoch and self.hold.exists():
            Path(f"{self.hold}.reached").write_text(str(self.epoch))
            while self.hold.exists():
                time.sleep(0.05)
        super().log_metrics(metrics, step)


class KillAt:
    """SIGKILLs this process at the n-th call of `point`, a function or method by its dotted
    name (`os.replace`, `torch.save`, `actlab.results.write_json`,
    `actlab.model.MLPClassifier.training_step`): before the call, or just after it returns
    with `after=True`. With `match`, only the calls with a path argument (a str, a path, an
    open file) that contains it count (`match="last.ckpt"`). The function is replaced where it
    is defined and in every module that imported it by name, so install it before the code
    under test is imported (tests/kill_at.py does).
    """

    def __init__(self, point: str, n: int, after: bool = False, match: str | None = None) -> None:
        owner, name = _resolve(point)
        original = getattr(owner, name)
        calls = 0

        def kill_at(*args, **kwargs):
            nonlocal calls
            hit = match is None or any(match in p for p in _paths([*args, *kwargs.values()]))
            calls += hit
            if hit and calls == n and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if hit and calls == n and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, kill_at)
        for module in list(sys.modules.values()):
            for attr, value in list(vars(module).items()):
                if value is original and module is not owner:
                    setattr(module, attr, kill_at)


def _paths(args: list) -> list[str]:
    named = [getattr(a, "name", None) for a in args]  # an open file
    return [os.fspath(a) for a in args if isinstance(a, str | os.PathLike)] + [
        n for n in named if isinstance(n, str)
    ]


def _resolve(point: str) -> tuple[object, str]:
    """The object that holds the function named `point`, and the function's name in it."""
    parts = point.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:-1]:
            owner = getattr(owner, part)
        return owner, parts[-1]
    raise ValueError(f"no function {point}")


def hold_packs(epoch: int, hold: str) -> None:
    """HoldAtEpoch for packs, which run no Lightning callbacks: once pack epoch `epoch - 1` has
    ended (its checkpoints and heartbeat written), a pack writes `<hold>.reached` and waits while
    `hold` exists. For this process only: see held_pack_train.py."""
    from actlab import pack

    end_epoch = pack.PackTrainer._end_epoch

    def held(self: pack.PackTrainer, done: int, sums) -> None:
        end_epoch(self, done, sums)
        path = Path(hold)
        if done + 1 == epoch and path.exists():
            Path(f"{path}.reached").write_text(str(epoch))
            while path.exists():
                time.sleep(0.05)

    pack.PackTrainer._end_epoch = held


def prune_after(epochs: int, match: str) -> Callable[[str, int, dict[str, float]], bool]:
    """A pack's pruner, as a search's trials.yaml names one by `_target_` (actlab.pack.SEARCH):
    once `epochs` epochs are trained it prunes each member whose folder's name contains `match`."""
    return lambda name, done, metrics: done == epochs and match in name


class MatmulPrecisionSeen(L.Callback):
    """Writes to `path` torch.get_float32_matmul_precision() as the run's training starts."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(torch.get_float32_matmul_precision())


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field)))


def measure_pack_memory(out: str) -> None:
    """Writes to `out` (JSON) a pack's memory estimate (the `need` its check was given) and what
    it used from the check to the end of its test: on a GPU the rise of
    torch.cuda.max_memory_allocated, on a CPU of the process's peak RSS (VmHWM, reset at the check
    through /proc/self/clear_refs: Linux). For this process only: see measured_pack_train.py."""
    from actlab import pack

    check, test = pack.check_memory, pack.PackTrainer.test
    seen: dict = {}

    def checked(need, members, device, sharing=1, resident=0):
        budget = check(need, members, device, sharing, resident)
        seen.update(
            need={**need.kept, **need.phases}, peak=need.peak, resident=resident, device=device.type
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            seen["base"] = torch.cuda.memory_allocated(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            seen["base"] = 1024 * _status_kib("VmRSS:")
        return budget

    def tested(self) -> None:
        test(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            seen["used"] = torch.cuda.max_memory_allocated(self.device) - seen["base"]
        else:
            seen["used"] = 1024 * _status_kib("VmHWM:") - seen["base"]
        Path(out).write_text(json.dumps(seen))

    pack.check_memory, pack.PackTrainer.test = checked, tested


class PlainBackward(L.Callback):
    """Writes to `path`, at the end of training, the global step and whether the module called
    loss.backward() itself (actlab.model.plain_backward)."""

    def __init__(self, path: str) -> None:
        self.path, self.calls = Path(path), {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {**self.calls, "steps": trainer.global_step, "plain": pl_module._plain_backward}
        self.path.write_text(json.dumps(record))


class BackwardCalls(PlainBackward):
    """PlainBackward, and how often Lightning called the hooks around backward."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.calls = {"before": 0, "after": 0}

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss) -> None:
        self.calls["before"] += 1

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.calls["after"] += 1
