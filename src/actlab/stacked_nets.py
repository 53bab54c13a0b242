"""A pack's stacked model for a network that is not hand-stacked (actlab.pack.StackedMLP takes
Linear layers and activations only): a CNN, a plain nn.Module of the user's own.

The members' own networks (each built by its solo job's code under its seed) give their
parameters, stacked by `torch.func.stack_module_state` as [K, *solo_shape]: `stacked[k]` is
member k's solo tensor (the "act" kind of actlab.pack.to_solo), so the pack's optimizer,
clipping, checkpoints and restore take them as they are. The forward is
`vmap(functional_call(net, params, x))` over the members, on a copy of a member's network that
holds no weights (the meta device). Members whose networks differ (another activation) get one
such call per run of equal ones. actlab.packing.vmap_reason decides which networks may: no
buffers, nothing random, and vmap gives each member its own network's output.

Measured on a CPU, one thread, tests/user_nets.SmallCNN (README "Packed sweeps"): a member's
epoch costs 0.6x (K = 3) and 0.5x (K = 9) its solo job's; a training step, 0.8-0.9x of K plain
torch steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from actlab.diagnostics import hidden_activations, per_unit, weighted_layers


class StackedNets(nn.Module):
    """K networks with the same parameters by name and shape, trained as one: [K, B, out].

    `runs` ([start, stop) of members, actlab.pack.runs) cover members whose networks compute
    the same function of their weights (the same activation): each run is one vmapped call.
    """

    def __init__(self, nets: list[nn.Module], runs: list[tuple[int, int]]) -> None:
        super().__init__()
        params, _ = stack_module_state(nets)  # packing.vmap_reason: no buffers
        self.names = list(params)
        self.stacked = nn.ParameterList(nn.Parameter(params[n].detach()) for n in self.names)
        self.runs = runs
        # Not submodules: a weightless copy does not move to a device.
        self.bases = [copy.deepcopy(nets[a]).to("meta") for a, _ in self.runs]
        # The dead-unit probe's per-member reductions, gathered inside the vmapped call.
        self._seen: list[torch.Tensor] | None = None
        for base in self.bases:
            for act, channels in hidden_activations(base):
                act.register_forward_hook(self._hook(channels))
        modules = dict(self.bases[0].named_modules())
        index = {n: i for i, n in enumerate(self.names)}
        self.layers = [
            [index[f"{name}.{p}"] for p, _ in modules[name].named_parameters()]
            for name, m in modules.items()
            if any(m is w for w in weighted_layers(self.bases[0]))
        ]
        self.hidden_layers = len(hidden_activations(self.bases[0]))

    def __len__(self) -> int:
        return self.stacked[0].shape[0]

    def keep(self, members: list[int], runs: list[tuple[int, int]]) -> None:
        """Only these members (positions in the stack, in order) stay, in `runs` of equal
        networks; each run's weightless network is one its members had (with its probe hooks)."""
        base = [b for (a, z), b in zip(self.runs, self.bases, strict=True) for _ in range(a, z)]
        self.bases = [base[members[a]] for a, _ in runs]
        self.runs = runs
        keep_rows(self.stacked, members)

    def train(self, mode: bool = True) -> StackedNets:
        for base in self.bases:
            base.train(mode)
        return super().train(mode)

    def _hook(self, channels: bool) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._seen is not None:
                self._seen += per_unit(inputs[0].detach(), output.detach(), channels)

        return hook

    def forward(
        self,
        x: torch.Tensor,
        probe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """x: [K, B, in] (each member's batch) or [B, in] (one batch for all); -> [K, B, out].

        `probe(layer, pre, post)` sees each hidden activation's input and output per unit,
        [K, B, units], as the solo job's diagnostics.UnitStats sees them."""
        each = x.dim() == 3
        outs, seen = [], []
        for (a, b), base in zip(self.runs, self.bases, strict=True):

            def member(params: dict[str, torch.Tensor], h: torch.Tensor, base=base) -> tuple:
                self._seen = [] if probe else None
                try:
                    return functional_call(base, params, (h,)), *(self._seen or [])
                finally:
                    self._seen = None

            params = {n: p[a:b] for n, p in zip(self.names, self.stacked, strict=True)}
            out, *units = vmap(member, in_dims=(0, 0 if each else None))(
                params, x[a:b] if each else x
            )
            outs.append(out)
            seen.append(units)
        if probe:
            for i in range(self.hidden_layers):
                pre, post = (torch.cat([u[2 * i + j] for u in seen]) for j in (0, 1))
                probe(i, pre, post)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def weighted_params(self) -> list[list[nn.Parameter]]:
        """Each Linear and Conv layer's stacked parameters (diagnostics.weighted_layers' order)."""
        return [[self.stacked[i] for i in layer] for layer in self.layers]

    def solo_order(self) -> tuple[list[nn.Parameter], list[str]]:
        """The stacked parameters in the order of a solo network's parameters, and their kinds
        (actlab.pack.to_solo): each [K, *solo_shape]."""
        return list(self.stacked), ["act"] * len(self.stacked)

    def member_state(
        self, k: int, names: list[str], stacked: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Member k's weights under its solo module's state_dict names, sliced from `stacked` (a
        copy of solo_order's parameters, by default those)."""
        tensors = stacked or list(self.stacked)
        return {n: t[k].detach().clone() for n, t in zip(names, tensors, strict=True)}


def keep_rows(params: nn.ParameterList, members: list[int]) -> None:
    """Each stacked parameter ([K, ...]) replaced by a new one of these members' rows (not cut in
    place: autograd's record of a parameter, which the last step's graph keeps, holds its shape)."""
    for i, p in enumerate(params):
        params[i] = nn.Parameter(p.detach()[members])


def activation_bytes(net: nn.Module, in_features: int) -> tuple[int, int]:
    """Per sample: the bytes of every leaf module's output in one forward of `net` (a meta-device
    one will do), and of the largest. A pack's estimate (actlab.pack.memory_need) bounds its
    activations by these."""
    sizes: list[int] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output[0].numel() * output.element_size())

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if next(m.children(), None) is None
    ]
    try:
        with torch.no_grad():
            param = next(net.parameters(), None)
            net(torch.zeros(1, in_features, device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)
