"""The LightningModule that trains the network of `model.net`."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.regression import R2Score

from actlab.data import Minibatches
from actlab.errors import Diverged, UserError

# task -> (loss, name of the eval metric logged as <stage>/<name> and <stage>/<name>_best)
TASKS = {"classification": (F.cross_entropy, "acc"), "regression": (F.mse_loss, "r2")}


class MLPClassifier(L.LightningModule):
    """Trains `net` (built by Hydra from `model.net`; an `actlab.nets.MLP` by default) as a
    classifier: cross-entropy on its [B, num_classes] output, accuracy as the eval metric.

    `task="regression"` trains the same network on real-valued targets with the mean-squared
    error (its output is then [B, targets]) and reports R^2 instead of accuracy.

    `act` is the `model.act` choice. The default net's config takes it by interpolation
    (`act: ${model.act}`); it is a parameter here only because Hydra passes every key of
    `model`, so a net of the user's own may ignore the group.

    Training metrics are accumulated on the device and read once per epoch (plus every
    `log_every_n_steps`), so a small model is not slowed down by a host sync per step.

    Optimization is manual (`automatic_optimization = False`), with the same semantics as
    Lightning's automatic loop: one zero_grad/backward/step per minibatch, an epoch-interval
    scheduler stepped after each epoch's last batch, optimizer and scheduler state in the
    checkpoints. Why: for a model this small Lightning's automatic step (closure, extra hooks,
    the loss's result tracking) adds a large fraction of the model's own forward and backward
    time (`make bench`, README "Performance"). Gradient clipping is therefore the model's
    `gradient_clip_val` (by norm), not the trainer's; Lightning refuses the trainer options that
    need its automatic loop (`gradient_clip_val`, `accumulate_grad_batches`).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        act: Callable[[], nn.Module] | None = None,
        task: str = "classification",
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise UserError(f"model.task={task!r} is unknown; choose one of {', '.join(TASKS)}.")
        self.loss_fn, self.metric = TASKS[task]
        self.classify = task == "classification"
        self.automatic_optimization = False
        self._plain_backward = False  # set where training starts (plain_backward)
        self.gradient_clip_val = gradient_clip_val
        self.net = net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.register_buffer("_train_sums", torch.zeros(3), persistent=False)  # loss, correct, n
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        if self.classify:  # accuracy: the mean of 0/1 per sample, whatever the read-out's width
            self.val_acc, self.test_acc = MeanMetric(), MeanMetric()
        else:  # the eval metric keeps the `*_acc` attributes; it is logged under its own name
            self.val_acc, self.test_acc = R2Score(), R2Score()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # a resumed run keeps its best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor] | Minibatches, batch_idx: int
    ) -> torch.Tensor:
        last = batch_idx + 1 == self.trainer.num_training_batches
        if not isinstance(batch, Minibatches):
            return self._step(batch, last)
        # `data.steps_per_batch` minibatches: one optimizer step each, as if each were a batch.
        loop = self.trainer.fit_loop.epoch_loop
        for i, minibatch in enumerate(batch):
            if i:
                # Lightning's logging step counts the batches that stepped: keep it counting
                # optimizer steps, so that metrics land on the steps one minibatch a batch gives.
                loop._batches_that_stepped = self.global_step
            loss = self._step(minibatch, last and i + 1 == len(batch))
            if i + 1 == len(batch) or 0 <= self.trainer.max_steps <= self.global_step:
                break  # the batch's last step: sent and checked after it, as a plain batch's
            if self.global_step % self.trainer.log_every_n_steps == 0:
                # Sent as Lightning sends a batch's step metrics at the batch's end.
                self.trainer._logger_connector.update_train_step_metrics()
            self._check_finite(last=False)
        return loss

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], last: bool) -> torch.Tensor:
        """One optimizer step on one minibatch; `last`: the epoch's last."""
        x, y = batch
        # Lightning sends step metrics to the loggers every log_every_n_steps batches: log then.
        log_now = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        optimizer = self.optimizers()
        logits = self(x)
        loss = self.loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if self._plain_backward:
            loss.backward()
        else:
            self.manual_backward(loss)  # under 16-mixed: of the loss times the GradScaler's scale
        optimizer.step()  # clips in on_before_optimizer_step
        # Where Lightning's automatic loop steps an epoch-interval scheduler: after the epoch's
        # last batch, before validation and the checkpoint that a resumed run restarts from.
        if last:
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum() if self.classify else loss.new_zeros(())
            # In place (`+=` would go through nn.Module.__setattr__ each step); new_full, not
            # new_tensor: a fill on the device instead of a host-to-device copy (a sync on a GPU).
            self._train_sums.add_(
                torch.stack([loss * len(y), correct.to(loss.dtype), loss.new_full((), len(y))])
            )
        if log_now:
            logs = {"train/loss": loss, "train/acc": correct / len(y)}
            self.log_dict(logs if self.classify else {"train/loss": loss})
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Inside optimizer.step(): under 16-mixed after Lightning's GradScaler unscaled the
        # gradients (and before it skips a step whose gradients are not finite).
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, self.gradient_clip_val, "norm")

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self._check_finite(last=batch_idx + 1 >= self.trainer.num_training_batches)

    def _check_finite(self, last: bool) -> None:
        # The epoch's loss sum turns NaN/inf with the first bad step and stays so. Reading it at
        # the logging interval and on the epoch's last step (before validation and checkpoints)
        # costs one host sync there, none on the other steps.
        if last or self.global_step % self.trainer.log_every_n_steps == 0:
            loss_sum = self._train_sums[0].item()
            bad = not math.isfinite(loss_sum)
            # Under DDP every rank must stop together, or the others wait forever.
            if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
                raise Diverged(
                    f"the training loss became {loss_sum} by step {self.global_step} (epoch "
                    f"{self.current_epoch}): lower optimizer.lr or change the model."
                )

    def on_train_start(self) -> None:
        self._plain_backward = plain_backward(self.trainer, self)

    def on_train_epoch_start(self) -> None:
        self._train_sums.zero_()

    def on_train_epoch_end(self) -> None:
        loss_sum, correct, n = self._train_sums
        logs = {"train/loss_epoch": loss_sum / n, "train/acc_epoch": correct / n}
        if not self.classify:
            logs.pop("train/acc_epoch")
        self.log_dict(logs, sync_dist=True)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        getattr(self, f"{stage}_loss").update(self.loss_fn(logits, y), weight=len(y))
        acc = getattr(self, f"{stage}_acc")
        if self.classify:
            acc.update((logits.argmax(1) == y).float())
        else:
            acc.update(logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_eval(self, stage: str) -> torch.Tensor:
        loss, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        value = acc.compute()
        self.log_dict({f"{stage}/loss": loss.compute(), f"{stage}/{self.metric}": value})
        loss.reset()
        acc.reset()
        return value

    def on_validation_epoch_end(self) -> None:
        acc = self._log_eval("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
        # Before the first real epoch (sanity check) there is no best yet: log the current value.
        best = self.val_acc_best.compute() if self.val_acc_best.update_called else acc
        self.log(f"val/{self.metric}_best", best)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer(params=self.parameters())
        if self.scheduler is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer=optimizer), "interval": "epoch"},
        }


_BACKWARD_HOOKS = ("on_before_backward", "on_after_backward")


def plain_backward(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether `manual_backward(loss)` would do nothing but `loss.backward()`: one device, 32-bit
    precision, no profiler, and no callback or module that overrides `backward` or the hooks
    around it.

    Lightning's manual_backward calls on_before_backward and on_after_backward on every callback
    and on the module, each through the profiler: for a small model, about a tenth of its step
    (README "Performance"). Where no one listens, the module calls loss.backward() itself.
    """
    return (
        type(trainer.strategy) is SingleDeviceStrategy
        and type(trainer.precision_plugin) is Precision
        and isinstance(trainer.profiler, PassThroughProfiler)
        and not any(
            is_overridden(h, module, L.LightningModule) for h in ("backward", *_BACKWARD_HOOKS)
        )
        and not any(
            is_overridden(h, cb, L.Callback) for cb in trainer.callbacks for h in _BACKWARD_HOOKS
        )
    )
