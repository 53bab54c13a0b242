"""Callbacks that tests add to a real run (`+callbacks.<name>._target_=probes.<Class>`).

They let a test wait on what the run does instead of on the clock: a run that must still be
running when a signal comes holds at a known point until the test lets it go, and a run's
first non-finite loss is written down where the test can read it. Subprocesses find this module
through PYTHONPATH (see conftest.script_env).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L

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
