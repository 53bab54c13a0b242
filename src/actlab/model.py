"""The MLP and the LightningModule that trains it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from actlab.errors import Diverged


def build_mlp(
    in_features: int,
    hidden_sizes: Sequence[int],
    out_features: int,
    act: Callable[[], nn.Module],
    dropout: float = 0.0,
) -> nn.Sequential:
    """Linear -> act (-> dropout) per hidden layer, then a linear read-out.

    `act` is called once per hidden layer: activations with weights (PReLU) are not shared.
    An empty `hidden_sizes` gives a linear (softmax-regression) model.
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden_sizes:
        layers += [nn.Linear(width, h), act()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class MLPClassifier(L.LightningModule):
    """An MLP classifier whose activation comes from the `model.act` config group.

    Training metrics are accumulated on the device and read once per epoch (plus every
    `log_every_n_steps`), so a small model is not slowed down by a host sync per step.
    """

    def __init__(
        self,
        act: Callable[[], nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        hidden_sizes: Sequence[int] = (256,),
        dropout: float = 0.0,
        in_features: int = 784,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.net = build_mlp(in_features, list(hidden_sizes), num_classes, act, dropout)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.register_buffer("_train_sums", torch.zeros(3), persistent=False)  # loss, correct, n
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        acc = dict(num_classes=num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = MulticlassAccuracy(**acc), MulticlassAccuracy(**acc)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # a resumed run keeps its best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
            step = torch.stack([loss * len(y), correct.to(loss.dtype), loss.new_tensor(len(y))])
            self._train_sums += step
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict({"train/loss": loss, "train/acc": correct / len(y)})
        return loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        # The epoch's loss sum turns NaN/inf with the first bad step and stays so. Reading it at
        # the logging interval and on the epoch's last batch (before validation and checkpoints)
        # costs one host sync there, none on the other steps.
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if last or self.global_step % self.trainer.log_every_n_steps == 0:
            loss_sum = self._train_sums[0].item()
            bad = not math.isfinite(loss_sum)
            # Under DDP every rank must stop together, or the others wait forever.
            if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
                raise Diverged(
                    f"the training loss became {loss_sum} by step {self.global_step} (epoch "
                    f"{self.current_epoch}): lower optimizer.lr or change the model."
                )

    def on_train_epoch_start(self) -> None:
        self._train_sums.zero_()

    def on_train_epoch_end(self) -> None:
        loss_sum, correct, n = self._train_sums
        self.log_dict(
            {"train/loss_epoch": loss_sum / n, "train/acc_epoch": correct / n}, sync_dist=True
        )

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        getattr(self, f"{stage}_loss").update(F.cross_entropy(logits, y), weight=len(y))
        getattr(self, f"{stage}_acc").update(logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_eval(self, stage: str) -> torch.Tensor:
        loss, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        value = acc.compute()
        self.log_dict({f"{stage}/loss": loss.compute(), f"{stage}/acc": value})
        loss.reset()
        acc.reset()
        return value

    def on_validation_epoch_end(self) -> None:
        acc = self._log_eval("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
        # Before the first real epoch (sanity check) there is no best yet: log the current value.
        best = self.val_acc_best.compute() if self.val_acc_best.update_called else acc
        self.log("val/acc_best", best)

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
