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
