"""A pack's K members' networks and optimizer, stacked: the math of actlab.pack's training loop.

StackedMLP stacks Linear layers and activations by hand: weights [K, in, out], batched matmuls
(one per member where a CPU's threads would idle otherwise: `by_member`).
StackedNets takes any other network that can (a CNN, a plain nn.Module of the user's own).
StackedOptimizer is SGD / Adam / AdamW on the stacked tensors with each member's numbers.
`to_solo` and `put_solo` read and set member k's slice as its solo job's tensor (checkpoints,
restore, best states).

For StackedNets, the members' own networks (each built by its solo job's code under its seed)
give their parameters and buffers, stacked by `torch.func.stack_module_state` as
[K, *solo_shape]: `stacked[k]` is member k's solo tensor (the "act" kind of to_solo), so the
pack's optimizer, clipping, checkpoints and restore take them as they are. The forward is
`vmap(functional_call(net, (params, buffers), x))` over the members, on a copy of a member's
network that holds no weights (the meta device); a buffer its forward updates in place
(BatchNorm's running statistics) is updated in each member's row. Members whose networks differ
(another activation) get one such call per run of equal ones. actlab.packing.vmap_reason decides
which networks may: nothing random, and vmap gives each member its own network's output and
buffers.

Measured on a CPU, one thread, tests/user_nets.SmallCNN (README "Packed sweeps"): a member's
epoch costs 0.6x (K = 3) and 0.5x (K = 9) its solo job's; a training step, 0.8-0.9x of K plain
torch steps.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from actlab.diagnostics import hidden_activations, per_unit, weighted_layers
from actlab.packing import OPTIMIZERS, random_activation

# The numbers of a param group that a member's update depends on.
SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")


def runs(keys: list[Any]) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal consecutive keys."""
    if not keys:
        return []
    bounds = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)]
    return list(itertools.pairwise(bounds))


def to_solo(stacked: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """Member k's slice of a stacked tensor as its solo job's tensor; `kind` is "weight"
    ([K, in, out]), "bias" ([K, 1, out]) or "act" ([K, *solo_shape]: an activation's parameter,
    or any parameter of StackedNets)."""
    return stacked[k].T if kind == "weight" else stacked[k, 0] if kind == "bias" else stacked[k]


def put_solo(stacked: torch.Tensor, k: int, solo: torch.Tensor, kind: str) -> None:
    """Member k's slice of a stacked tensor set from its solo job's tensor (the inverse of
    to_solo)."""
    (stacked[k, 0] if kind == "bias" else stacked[k]).copy_(solo.T if kind == "weight" else solo)


def by_member(w: torch.Tensor) -> bool:
    """Whether the stacked layer `w` [K, in, out] is faster as one matmul per member than as
    one baddbmm, here. On a CPU baddbmm hands whole members to threads, each member's matmul
    on one; when that leaves the threads idle for more than an eighth of the time (K = 3 on 2
    threads: one member's time of 4), K matmuls that each use every thread are faster. Measured
    on 2 threads, forward and backward per member of a 784x256 layer: K = 3, 322 against 373 us;
    K = 5, 344 against 367; K = 7 even; K = 2, 4, 9 and 27, baddbmm faster by 4-30%; at 256x10 the
    matmuls are too small to share and baddbmm is always faster.
    """
    k, threads = len(w), torch.get_num_threads()
    if w.device.type != "cpu" or k == 1 or w[0].numel() < 2**16 or torch.is_autocast_enabled("cpu"):
        return False
    return k / (threads * math.ceil(k / threads)) < 7 / 8


class MemberMatmuls(torch.autograd.Function):
    """`torch.baddbmm(b, h, w)` computed as one addmm per member, forward and backward (the
    same numbers, bit for bit: tests/test_pack.py)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, w)
        out = h.new_empty(len(w), h.shape[1], w.shape[2])
        for k in range(len(w)):
            torch.addmm(b[k], h[k], w[k], out=out[k])
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w = ctx.saved_tensors
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = h.new_empty(h.shape)
            for k in range(len(w)):
                torch.mm(g[k], w[k].T, out=gh[k])
        if ctx.needs_input_grad[1]:
            gw = torch.empty_like(w)
            for k in range(len(w)):
                torch.mm(h[k].T, g[k], out=gw[k])
        return gh, gw, g.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None


class StackedMLP(nn.Module):
    """K MLPs with the same layer sizes: weights [K, in, out], biases [K, 1, out], and each
    hidden layer's activation parameters (PReLU's slope, ...) [K, ...], taken from `nets`.

    `acts` is one activation module per member (the solo job's own); `keys` are equal where two
    members' activations compute the same function (default: their repr). Consecutive members
    with the same key get one call on their slice of the stack (a contiguous view): the solo
    kernel, at its speed, where a broadcast `where` over per-member slopes costs 20x a ReLU. An
    activation with parameters is applied to its slice by torch.func.vmap over the members'
    parameters of that layer (actlab.packing.probe checks it gives each member's output).

    Dropout (the nets' `nn.Dropout`, in training mode) and RReLU draw each member's masks and
    slopes from its own generator in `generators`, as they draw them on a CPU from the global
    generator of the member's solo job: a generator in that state gives that job's numbers.
    """

    def __init__(
        self, nets: list[nn.Sequential], acts: list[nn.Module], keys: list[str] | None = None
    ) -> None:
        super().__init__()
        self.p = next((m.p for m in nets[0] if isinstance(m, nn.Dropout)), 0.0)
        self.generators: list[torch.Generator] = []
        linears = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].weight.detach().T for ls in linears]).contiguous())
            for i in range(len(linears[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].bias.detach()[None] for ls in linears]))
            for i in range(len(linears[0]))
        )
        hidden = [[act for act, _ in hidden_activations(net)] for net in nets]
        self.act_names = [n for n, _ in hidden[0][0].named_parameters()] if hidden[0] else []
        self.act_params = nn.ParameterList(
            nn.Parameter(torch.stack([dict(h[i].named_parameters())[n].detach() for h in hidden]))
            for i in range(len(hidden[0]))
            for n in self.act_names
        )
        self.acts = acts
        self._set_runs(runs(keys or [repr(a) for a in acts]))

    def _set_runs(self, spans: list[tuple[int, int]]) -> None:
        self.runs = spans
        self.run_sizes = [b - a for a, b in spans]
        # Asked once, not per step: inspect.signature takes ~11 us, 30 ms an MNIST epoch of 3 runs.
        self.random_runs = {a for a, _ in spans if random_activation(self.acts[a])}
        if self.act_names:
            self.applied = [
                vmap(lambda p, h, module=self.acts[start]: functional_call(module, p, (h,)))
                for start, _ in self.runs
            ]

    def keep(self, members: list[int], spans: list[tuple[int, int]]) -> None:
        """Only these members (positions in the stack, in order) stay, in `spans`: the runs of
        their activations' keys."""
        for params in (self.weights, self.biases, self.act_params):
            keep_rows(params, members)
        self.acts = [self.acts[k] for k in members]
        self.generators = [self.generators[k] for k in members]
        self._set_runs(spans)

    def add(self, new: StackedMLP, spans: list[tuple[int, int]]) -> None:
        """`new`'s members join the stack after the others, all of them in `spans`."""
        for params, more in (
            (self.weights, new.weights),
            (self.biases, new.biases),
            (self.act_params, new.act_params),
        ):
            for i, (p, q) in enumerate(zip(params, more, strict=True)):
                params[i] = nn.Parameter(torch.cat([p.detach(), q.detach().to(p.device)]))
        self.acts += new.acts
        self.generators += new.generators
        self._set_runs(spans)

    def __len__(self) -> int:
        return self.weights[0].shape[0]

    @property
    def hidden_layers(self) -> int:
        return len(self.weights) - 1

    def weighted_params(self) -> list[list[nn.Parameter]]:
        """Each layer's stacked weight and bias."""
        return [[w, b] for w, b in zip(self.weights, self.biases, strict=True)]

    def train(self, mode: bool = True) -> StackedMLP:
        # The members' activations are not submodules (each run shares one): RReLU's mode too.
        for act in self.acts:
            act.train(mode)
        return super().train(mode)

    def layer_act_params(self, layer: int) -> dict[str, nn.Parameter]:
        """Hidden layer `layer`'s activation parameters, stacked, by their solo names."""
        n = len(self.act_names)
        return dict(zip(self.act_names, self.act_params[layer * n : (layer + 1) * n], strict=True))

    def act(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # One split, not a slice per run: its backward is one cat, where each slice's would fill
        # a stack-sized gradient with zeros and the runs' would be summed (relu, leaky, none on
        # [3, 64, 256]: forward and backward 117-155 us against 198-239 on this CPU).
        slices = [h] if len(self.runs) == 1 else h.split(self.run_sizes)
        if self.act_names:
            params = self.layer_act_params(layer)
            outs = [
                apply({name: p[a:b] for name, p in params.items()}, part)
                for apply, (a, b), part in zip(self.applied, self.runs, slices, strict=True)
            ]
        else:
            outs = [self._run(part, a, b) for (a, b), part in zip(self.runs, slices, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, h: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Members a..b-1's activation of their slice `h`. One that draws random numbers from a
        `generator` argument (actlab.activations.RReLU) draws each member's from its own, as its
        solo job draws them from the global one."""
        act = self.acts[a]
        if not (self.training and a in self.random_runs):
            return act(h)
        return torch.stack([act(h[k - a], generator=self.generators[k]) for k in range(a, b)])

    def forward(
        self,
        x: torch.Tensor,
        probe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """x: [K, B, in] (each member's batch) or [B, in] (one batch for all); -> [K, B, out].

        `probe(layer, pre, post)` sees each hidden layer's pre- and post-activation.
        """
        h = x if x.dim() == 3 else x.expand(len(self), *x.shape)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = MemberMatmuls.apply(h, w, b) if by_member(w) else torch.baddbmm(b, h, w)
            if i < last:
                pre, h = h, self.act(h, i)
                if probe:
                    probe(i, pre, h)
                if self.p and self.training:
                    h = self.dropout(h)
        return h

    @property
    def stacked_buffers(self) -> list[torch.Tensor]:
        """None: the layers it stacks (Linear, activations, Dropout) hold no buffers."""
        return []

    def solo_order(self) -> tuple[list[nn.Parameter], list[str]]:
        """The stacked parameters in the order of a solo module's parameters (layer 1's weight,
        bias, its activation's parameters, layer 2's weight, ...), and their kinds (to_solo)."""
        params, kinds = [], []
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            last = i == len(self.weights) - 1
            acts = [] if last else list(self.layer_act_params(i).values())
            params += [w, b, *acts]
            kinds += ["weight", "bias", *["act"] * len(acts)]
        return params, kinds

    def dropout(self, h: torch.Tensor) -> torch.Tensor:
        """torch's CPU dropout (`noise.bernoulli_(1 - p)`, `noise.div_(1 - p)`, `h * noise`), with
        each member's noise drawn by its own generator."""
        shape = h.shape[1:]
        noise = torch.stack(
            [h.new_empty(shape).bernoulli_(1 - self.p, generator=g) for g in self.generators]
        )
        return h * noise.div_(1 - self.p)

    def member_state(
        self, k: int, names: list[str], stacked: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Member k's weights under its solo module's state_dict names (net.0.weight, ...),
        sliced from `stacked` (a copy of solo_order's parameters, by default those)."""
        params, kinds = self.solo_order()
        return {
            name: to_solo(t, k, kind).detach().clone()
            for name, t, kind in zip(names, stacked or params, kinds, strict=True)
        }


class StackedOptimizer:
    """torch.optim.SGD, Adam or AdamW on stacked parameters, each member with its own numbers.

    A member's numbers are its solo optimizer's param group (torch's defaults filled in);
    `set_groups` gives new ones, e.g. each member's learning rate after its scheduler stepped.
    Consecutive members with the same numbers are updated together, on their slice, by the
    operations of torch's single-tensor SGD and Adam with those numbers as scalars: elementwise,
    each member's update is the one its solo optimizer computes, bit for bit. A frozen member
    (diverged) is left out of every later update; `keep` takes the members that stopped out of
    the stack's state, `add` starts new members' (each member counts its own steps).
    """

    def __init__(self, params: list[nn.Parameter], target: str, members: list[Any]) -> None:
        cls = OPTIMIZERS[target]
        self.params, self.adam = params, cls is not torch.optim.SGD
        # Older torch's Adam has no decoupled_weight_decay in its groups: AdamW is its own class.
        self.defaults = {"decoupled_weight_decay": cls is torch.optim.AdamW}
        self.keys = ADAM_KEYS if self.adam else SGD_KEYS
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        self.steps = [0] * len(members)
        self.active = [True] * len(members)
        kwargs = [{k: v for k, v in dict(m).items() if not k.startswith("_")} for m in members]
        self.set_groups([cls([torch.zeros(0)], **kw).param_groups[0] for kw in kwargs])

    def set_groups(self, groups: list[dict[str, Any]]) -> None:
        self.numbers = [{k: {**self.defaults, **g}[k] for k in self.keys} for g in groups]
        self._runs()

    def _runs(self) -> None:
        # Adam's bias correction takes the step count, SGD's momentum whether it is the first.
        keys = [
            (*n.values(), steps if self.adam else steps == 0) if on else None
            for n, on, steps in zip(self.numbers, self.active, self.steps, strict=True)
        ]
        self.runs = [(a, b, self.numbers[a]) for a, b in runs(keys) if keys[a] is not None]

    def freeze(self, k: int) -> None:
        self.active[k] = False
        self._runs()

    def keep(self, members: list[int], params: list[nn.Parameter]) -> None:
        """Only these members (positions in the stack, in order) stay, their stacked parameters
        now `params`: their numbers and state (momentum, Adam's moments) as they were."""
        self.params = params
        for state in self.state:
            state.update({key: t[members] for key, t in state.items()})
        self.numbers = [self.numbers[k] for k in members]
        self.active = [self.active[k] for k in members]
        self.steps = [self.steps[k] for k in members]
        self._runs()

    def add(self, groups: list[dict[str, Any]], params: list[nn.Parameter]) -> None:
        """New members (their solo optimizers' param groups) join after the others, with a
        fresh state, the stacked parameters now `params`."""
        self.params = params
        k = len(groups)
        for state in self.state:
            for key, t in state.items():
                state[key] = torch.cat([t, t.new_zeros(k, *t.shape[1:])])
        self.active += [True] * k
        self.steps += [0] * k
        self.set_groups([*self.numbers, *groups])

    @torch.no_grad()
    def step(self) -> None:
        for p, state in zip(self.params, self.state, strict=True):
            if not state:
                self._init_state(p, state)
        update = self._adam if self.adam else self._sgd
        grads = [p.grad for p in self.params]
        state = {k: [s[k] for s in self.state] for k in self.state[0]}
        # A run's members have taken as many steps (SGD's: all past their first, or none). Its
        # update is one _foreach_ call per operation over every parameter: on a CPU those apply
        # the single-tensor ops one tensor after another (the same numbers), with one Python
        # call, not one per tensor.
        for a, b, numbers in self.runs:
            tensors = [self.params, grads, *state.values()]
            if (a, b) != (0, len(self.steps)):
                tensors = [[t[a:b] for t in ts] for ts in tensors]
            ps, gs, *kept = tensors
            update(ps, gs, dict(zip(state, kept, strict=True)), self.steps[a] + 1, **numbers)
        self.steps = [n + on for n, on in zip(self.steps, self.active, strict=True)]

    def _init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if self.adam:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            if any(n["amsgrad"] for n in self.numbers):
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        elif any(n["momentum"] for n in self.numbers):
            state["momentum_buffer"] = torch.zeros_like(p)

    def _sgd(
        self,
        p: list[torch.Tensor],
        g: list[torch.Tensor],
        s: dict[str, list[torch.Tensor]],
        step: int,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
    ) -> None:
        if weight_decay:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        if momentum:
            buf = s["momentum_buffer"]
            if step == 1:
                torch._foreach_copy_(buf, g)  # torch starts the buffer as the first gradient
            else:
                torch._foreach_mul_(buf, momentum)
                torch._foreach_add_(buf, g, alpha=1 - dampening)
            g = torch._foreach_add(g, buf, alpha=momentum) if nesterov else buf
        torch._foreach_add_(p, g, alpha=-lr)

    def _adam(
        self,
        p: list[torch.Tensor],
        g: list[torch.Tensor],
        s: dict[str, list[torch.Tensor]],
        step: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        decoupled_weight_decay: bool,
    ) -> None:
        if weight_decay and decoupled_weight_decay:  # AdamW
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        elif weight_decay:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        b1, b2 = betas
        m, v = s["exp_avg"], s["exp_avg_sq"]
        torch._foreach_lerp_(m, g, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        if amsgrad:
            torch._foreach_maximum_(s["max_exp_avg_sq"], v)
            v = s["max_exp_avg_sq"]
        step_size = lr / (1 - b1**step)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - b2**step) ** 0.5)  # as torch rounds it
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, value=-step_size)

    def member_state(
        self,
        k: int,
        groups: list[dict[str, Any]],
        kinds: list[str],
        stacked: list[dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        """Member k's state in torch.optim's own state_dict format (`groups` from its optimizer,
        `kinds` of the parameters as to_solo takes them), sliced from `stacked` (a copy of the
        stacked state, by default the state itself)."""
        state = {}
        numbers = self.numbers[k]
        for i, s in enumerate(self.state if stacked is None else stacked):
            tensors = {n: to_solo(t, k, kinds[i]).clone() for n, t in s.items()}
            # torch keeps a state only for what the member's numbers use
            if not numbers.get("momentum"):
                tensors.pop("momentum_buffer", None)
            if not numbers.get("amsgrad"):
                tensors.pop("max_exp_avg_sq", None)
            if self.adam and tensors:
                tensors["step"] = torch.tensor(float(self.steps[k]))
            if tensors:
                state[i] = tensors
        return {"state": state, "param_groups": copy.deepcopy(groups)}


def clip_per_member(params: list[nn.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each member's gradients on its own."""
    # A [K] parameter (one number per member) too: sum over no dims would add all members.
    norms = torch.stack([p.grad.pow(2).reshape(len(p), -1).sum(1) for p in params]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *[1] * (p.dim() - 1)))


class StackedNets(nn.Module):
    """K networks with the same parameters by name and shape, trained as one: [K, B, out].

    `runs` ([start, stop) of members, from runs()) cover members whose networks compute the
    same function of their weights (the same activation): each run is one vmapped call.
    """

    def __init__(self, nets: list[nn.Module], runs: list[tuple[int, int]]) -> None:
        super().__init__()
        params, buffers = stack_module_state(nets)
        self.names = list(params)
        self.stacked = nn.ParameterList(nn.Parameter(params[n].detach()) for n in self.names)
        self.buffer_names = list(buffers)
        for i, n in enumerate(self.buffer_names):
            self.register_buffer(f"stacked_buffer{i}", buffers[n])
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

    @property
    def stacked_buffers(self) -> list[torch.Tensor]:
        """The stacked buffers ([K, *solo_shape]), in the order of a solo network's buffers."""
        return [self.get_buffer(f"stacked_buffer{i}") for i in range(len(self.buffer_names))]

    def keep(self, members: list[int], runs: list[tuple[int, int]]) -> None:
        """Only these members (positions in the stack, in order) stay, in `runs` of equal
        networks; each run's weightless network is one its members had (with its probe hooks)."""
        base = [b for (a, z), b in zip(self.runs, self.bases, strict=True) for _ in range(a, z)]
        self.bases = [base[members[a]] for a, _ in runs]
        self.runs = runs
        keep_rows(self.stacked, members)
        for i, b in enumerate(self.stacked_buffers):
            setattr(self, f"stacked_buffer{i}", b[members])

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

            def member(state: tuple[dict, dict], h: torch.Tensor, base=base) -> tuple:
                self._seen = [] if probe else None
                try:
                    return functional_call(base, state, (h,)), *(self._seen or [])
                finally:
                    self._seen = None

            params = {n: p[a:b] for n, p in zip(self.names, self.stacked, strict=True)}
            # Views of the members' rows: an update in place lands in the stacked buffer.
            buffers = {
                n: t[a:b] for n, t in zip(self.buffer_names, self.stacked_buffers, strict=True)
            }
            out, *units = vmap(member, in_dims=(0, 0 if each else None))(
                (params, buffers), x[a:b] if each else x
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
        (to_solo): each [K, *solo_shape]."""
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
            device = param.device if param is not None else "cpu"
            net(torch.zeros(2, in_features, device=device))  # BatchNorm trains on 2 rows or more
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)
