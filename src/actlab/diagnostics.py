"""Training probes: what the hidden units of the MLP do (dead, rarely active), their gradients."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn


def hidden_activations(net: nn.Module) -> list[nn.Module]:
    """The activation module after each hidden Linear of a `build_mlp` network, in order.

    Its input is that layer's pre-activation. The read-out Linear feeds no activation.
    """
    mods = list(net.children())
    return [
        mods[i + 1]
        for i, m in enumerate(mods[:-1])
        if isinstance(m, nn.Linear) and not isinstance(mods[i + 1], nn.Linear)
    ]


class UnitStats:
    """Per-unit counts over the samples seen by forward hooks on the hidden activations.

    A hook sees the activation's input (the pre-activation) and output. Everything stays on
    the device: nothing is read back until `tensors`, so the hooks add no host sync per batch.
    """

    def __init__(self, net: nn.Module) -> None:
        self.layers = hidden_activations(net)
        self.active: list[torch.Tensor | None] = [None] * len(self.layers)
        self.act_sum: list[torch.Tensor | None] = [None] * len(self.layers)
        self.n = 0
        self._handles: list[Any] = []

    def attach(self) -> UnitStats:
        for i, act in enumerate(self.layers):
            self._handles.append(act.register_forward_hook(self._hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            pre = inputs[0].detach().flatten(0, -2)
            active = (pre > 0).sum(0)
            act_sum = output.detach().flatten(0, -2).sum(0, dtype=torch.float32)
            if self.active[i] is None:
                self.active[i], self.act_sum[i] = active, act_sum
            else:
                self.active[i] += active
                self.act_sum[i] += act_sum
            if i == 0:
                self.n += pre.shape[0]

        return hook

    def tensors(self) -> dict[str, torch.Tensor]:
        """`dead/layerK`, `rare/layerK`, `act_mean/layerK` and `dead/mean` as 0-d device tensors.

        Dead: pre-activation <= 0 for every sample seen (ReLU passes no gradient through it).
        Rare: active (> 0) on fewer than 1% of the samples. `dead/mean` is the mean over layers.
        """
        out: dict[str, torch.Tensor] = {}
        if self.n == 0:
            return out
        dead = []
        for k, (active, act_sum) in enumerate(zip(self.active, self.act_sum, strict=True), 1):
            dead.append((active == 0).float().mean())
            out[f"dead/layer{k}"] = dead[-1]
            out[f"rare/layer{k}"] = (active < 0.01 * self.n).float().mean()
            out[f"act_mean/layer{k}"] = act_sum.mean() / self.n
        out["dead/mean"] = torch.stack(dead).mean()
        return out


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

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._stats = UnitStats(pl_module.net).attach()

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

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Right after backward, before the model clips them: the norms clipping is there to cut.
        if not self.grad_norms or (trainer.global_step + 1) % trainer.log_every_n_steps:
            return
        linears = [m for m in pl_module.net.children() if isinstance(m, nn.Linear)]
        names = [f"layer{k}" for k in range(1, len(linears))] + ["output"]
        norms = {}
        for name, lin in zip(names, linears, strict=True):
            grads = [p.grad for p in lin.parameters() if p.grad is not None]
            if grads:
                norms[f"grad_norm/{name}"] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                )
        pl_module.log_dict(norms, on_step=True, on_epoch=False)
