"""Training probes: what a network's hidden units do (dead, rarely active), their gradients."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


# The probe's contract with a network (README "Extending"): the activations it watches are the
# first module after each Linear or Conv layer, in the order the net registers its modules, with
# normalisation, dropout and pooling passed over; Flatten/Unflatten end the search.
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
PASSED_OVER = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


def hidden_activations(net: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each activation module of `net` the probe watches, in order, and whether it follows a
    Conv (its units are channels, dim 1) rather than a Linear (features, the last dim).

    Its input is that layer's pre-activation. The read-out Linear feeds no activation.
    """
    found, after = [], None
    for m in net.modules():
        if next(m.children(), None) is not None:
            continue  # containers: their leaves come next
        if isinstance(m, WEIGHTED):
            after = not isinstance(m, nn.Linear)
        elif isinstance(m, nn.Flatten | nn.Unflatten):
            after = None
        elif after is not None and not isinstance(m, PASSED_OVER):
            found.append((m, after))
            after = None
    return found


def weighted_layers(net: nn.Module) -> list[nn.Module]:
    """The Linear and Conv layers of `net` in registration order (the last is the read-out)."""
    return [m for m in net.modules() if isinstance(m, WEIGHTED)]


class UnitStats:
    """Per-unit counts over the samples seen by forward hooks on the hidden activations.

    A hook sees the activation's input (the pre-activation) and output. A unit after a Linear is
    a feature; after a Conv a channel, active on a sample where it is > 0 at any position (its
    output averaged over positions). Everything stays on the device: nothing is read back until
    `tensors`, so the hooks add no host sync per batch.
    """

    def __init__(self, net: nn.Module) -> None:
        self.layers = hidden_activations(net)
        self.active: list[torch.Tensor | None] = [None] * len(self.layers)
        self.act_sum: list[torch.Tensor | None] = [None] * len(self.layers)
        self.n = 0
        self._handles: list[Any] = []

    def attach(self) -> UnitStats:
        for i, (act, channels) in enumerate(self.layers):
            self._handles.append(act.register_forward_hook(self._hook(i, channels)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int, channels: bool):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            pre, post = per_unit(inputs[0].detach(), output.detach(), channels)
            active = (pre > 0).sum(0)
            act_sum = post.sum(0, dtype=torch.float32)
            if self.active[i] is None:
                self.active[i], self.act_sum[i] = active, act_sum
            else:
                self.active[i] += active
                self.act_sum[i] += act_sum
            if i == 0:
                self.n += pre.shape[0]

        return hook

    def tensors(self) -> dict[str, torch.Tensor]:
        """unit_metrics of the samples seen, as 0-d device tensors."""
        return unit_metrics(self.active, self.act_sum, self.n) if self.n else {}


def per_unit(
    pre: torch.Tensor, post: torch.Tensor, channels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A hidden activation's input and output as [samples, units]: a Conv's channel is > 0 on a
    sample where it is anywhere, its output averaged over the positions."""
    if channels and pre.dim() > 2:  # [B, C, *positions] -> [B, C]
        pre, post = pre.flatten(2).amax(-1), post.flatten(2).mean(-1)
    return pre.flatten(0, -2), post.flatten(0, -2)


def unit_metrics(
    active: list[torch.Tensor], act_sum: list[torch.Tensor], n: int
) -> dict[str, torch.Tensor]:
    """`dead/layerK`, `rare/layerK`, `act_mean/layerK` and `dead/mean` from each hidden layer's
    per-unit counts over `n` samples: how often the pre-activation was > 0, and the sum of the
    activation's output. The units are the last dim; leading dims (a pack's members) are kept.

    Dead: pre-activation <= 0 for every sample seen (ReLU passes no gradient through it).
    Rare: active (> 0) on fewer than 1% of the samples. `dead/mean` is the mean over layers.
    """
    out: dict[str, torch.Tensor] = {}
    dead = []
    for k, (a, s) in enumerate(zip(active, act_sum, strict=True), 1):
        dead.append((a == 0).float().mean(-1))
        out[f"dead/layer{k}"] = dead[-1]
        out[f"rare/layer{k}"] = (a < 0.01 * n).float().mean(-1)
        out[f"act_mean/layer{k}"] = s.mean(-1) / n
    if dead:
        out["dead/mean"] = torch.stack(dead).mean(0)
    return out


def grad_norms(layers: list[list[torch.Tensor]], members: int = 0) -> dict[str, torch.Tensor]:
    """`grad_norm/layerK` for the hidden layers and `grad_norm/output` for the last: the 2-norm of
    each layer's gradients (weight and bias together), from each layer's gradient tensors. The
    first `members` dims are kept (1 for a pack's stacked [K, ...] gradients)."""
    names = [f"layer{k}" for k in range(1, len(layers))] + ["output"][: len(layers)]
    return {
        f"grad_norm/{name}": sum(g.pow(2).flatten(members).sum(-1) for g in grads).sqrt()
        for name, grads in zip(names, layers, strict=True)
        if grads
    }


class DeadUnitMonitor(L.Callback):
    """Dead and rarely active units per hidden layer, measured during the regular validation pass.

    Also logs the gradient norm of each layer (hidden layers, then the read-out as `output`),
    before gradient clipping, on the training steps where the trainer writes its logs. The last
    epoch's values stay in `trainer.callback_metrics`, which `actlab.train` records in
    results.json.
    """

    def __init__(self, grad_norms: bool = True) -> None:
        self.grad_norms = grad_norms
        self._stats: UnitStats | None = None
        self._said_none = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stats = UnitStats(pl_module.net)
        if not stats.layers:
            if not self._said_none:
                log.info(
                    "dead units: model.net (%s) has no activation module after a Linear or Conv "
                    'layer (README "Extending"): dead/*, rare/* and act_mean/* are not logged',
                    type(pl_module.net).__name__,
                )
                self._said_none = True
            return
        self._stats = stats.attach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stats is None:
            return
        stats, self._stats = self._stats, None
        stats.detach()
        # Under DDP each rank saw its shard of the validation set: add the counts up.
        stats.active = [trainer.strategy.reduce(a, reduce_op="sum") for a in stats.active]
        stats.act_sum = [trainer.strategy.reduce(a, reduce_op="sum") for a in stats.act_sum]
        stats.n = int(
            trainer.strategy.reduce(
                torch.tensor(float(stats.n), device=pl_module.device), reduce_op="sum"
            )
        )
        pl_module.log_dict(stats.tensors())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls it before the module's own hook (which clips): the norms clipping is
        # there to cut; under 16-mixed, after the GradScaler unscaled them (backward made them
        # the loss scale times larger).
        if not self.grad_norms or (trainer.global_step + 1) % trainer.log_every_n_steps:
            return
        layers = [
            [p.grad for p in lin.parameters() if p.grad is not None]
            for lin in weighted_layers(pl_module.net)
        ]
        pl_module.log_dict(grad_norms(layers), on_step=True, on_epoch=False)
