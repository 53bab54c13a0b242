"""Packed sweeps: K jobs that share an architecture train as one stacked model.

A *member* is a solo job's config plus its index in the stack. The members of a pack differ only
in MEMBER_KEYS (activation, seed, the optimizer's numbers); everything else is shared. Weights
are stacked as `[K, in, out]` and trained with batched matmuls, so one forward, backward and
optimizer step serves all K, and the per-step overhead of a training framework is paid once.

Each member gets exactly its solo job's start and data: its layers are built by the solo code
under its seed (`actlab.model.MLPClassifier` after `L.seed_everything(seed)`), and its batches of
epoch e come in `batch_order(seed, e, n)`. Its update is the one `torch.optim.SGD` / `Adam` makes
(re-implemented on stacked tensors with per-member hyperparameters), so a member's results
equal its solo job's up to floating-point rounding. A member whose loss turns NaN/inf is
recorded `diverged` and frozen; the others never see its numbers (each slice of a batched matmul
is computed on its own, and the summed loss passes a gradient of 1 to every member).

What a member writes (its `.hydra/`, results.json, csv, W&B run, checkpoints) goes through the
functions a solo job uses, into its own folder: to a user it is a solo job.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import _save_config
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from torch import nn

from actlab import checkpoints
from actlab import loggers as actlab_loggers
from actlab.data import batch_order
from actlab.errors import Interrupted, UserError, interruption
from actlab.launch import finished_before, usable_cores
from actlab.results import (
    RESULTS,
    Heartbeat,
    logged_config,
    provenance,
    read_results,
    running_record,
    write_json,
)
from actlab.runs import drop_rows_after, keep_attempt, resumable, set_aside, trained_epochs
from actlab.validation import check_net

log = logging.getLogger(__name__)

MANIFEST = "members.yaml"
# Config keys in which the members of one pack may differ.
MEMBER_KEYS = ("seed", "model.act", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay")
# Element-wise, no weights, no randomness: each run of equal ones applied to its members' slice.
STACKABLE = (
    "torch.nn.ReLU",
    "torch.nn.LeakyReLU",
    "torch.nn.Identity",
    "torch.nn.ELU",
    "torch.nn.GELU",
    "torch.nn.SiLU",
    "torch.nn.Tanh",
    "torch.nn.Sigmoid",
)
OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam")
# Trainer keys a pack honours; any other set key makes the job a solo job.
TRAINER_KEYS = {
    "_target_",
    "default_root_dir",
    "max_epochs",
    "accelerator",
    "devices",
    "log_every_n_steps",
    "check_val_every_n_epoch",
    "deterministic",
}
CALLBACKS = {"model_checkpoint", "last_checkpoint", "model_summary", "progress_bar", "dead_units"}


def solo_reason(cfg: DictConfig) -> str | None:
    """Why this job cannot be a pack member (it then runs as a solo job), or None."""
    net = cfg.model.net.get("_target_")
    if net != "actlab.nets.MLP":
        return f"model.net {net} is not actlab.nets.MLP, the one network the pack can stack"
    act = cfg.model.act.get("_target_")
    if act not in STACKABLE:
        return f"model.act {act} has weights or randomness and cannot be stacked"
    if cfg.model.get("task", "classification") != "classification":
        return "model.task is not classification"
    if cfg.model.net.get("dropout"):
        return "model.net.dropout draws random numbers per member"
    if cfg.get("scheduler"):
        return "a scheduler is set"
    if cfg.get("ckpt_path"):
        return "ckpt_path is set"
    opt = cfg.optimizer
    if opt.get("_target_") not in OPTIMIZERS:
        return f"optimizer {opt.get('_target_')} is not SGD or Adam"
    if opt.get("nesterov") or opt.get("dampening") or opt.get("amsgrad") or opt.get("maximize"):
        return "optimizer nesterov/dampening/amsgrad/maximize is set"
    # Unresolved: the sweeper composes configs before any job's `${hydra:...}` is known.
    trainer = {
        k: v
        for k, v in _container(cfg.trainer).items()
        if v is not None and not (k == "accumulate_grad_batches" and v == 1)  # the default
    }
    extra = sorted(set(trainer) - TRAINER_KEYS)
    if extra:
        return f"trainer.{extra[0]} is set"
    if (
        trainer.get("devices", 1) not in (1, "1", "auto")
        or trainer.get("check_val_every_n_epoch", 1) != 1
    ):
        return "trainer.devices or trainer.check_val_every_n_epoch is not 1"
    if trainer.get("max_epochs") in (None, -1):
        return "trainer.max_epochs is not set"
    callbacks = _container(cfg.get("callbacks") or {})
    extra = sorted(k for k, v in callbacks.items() if v and k not in CALLBACKS)
    if extra:
        return f"callbacks.{extra[0]} is set"
    return None


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node


def pack_key(cfg: DictConfig) -> str:
    """Equal for jobs that can share a pack: the config with the member keys taken out."""
    shared = OmegaConf.to_container(cfg, resolve=False)
    shared.pop("hydra", None)
    for key in MEMBER_KEYS:
        *parents, leaf = key.split(".")
        node = shared
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return OmegaConf.to_yaml(OmegaConf.create(shared), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The stacked model and its optimizer


def runs(keys: list[Any]) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal consecutive keys."""
    bounds = [0] + [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)]
    return list(itertools.pairwise(bounds))


class StackedMLP(nn.Module):
    """K MLPs with the same layer sizes: weights [K, in, out], biases [K, 1, out].

    `acts` is one activation module per member (the solo job's own). Consecutive members with
    the same activation get one call on their slice of the stack (a contiguous view): the solo
    kernel, at its speed, where a broadcast `where` over per-member slopes costs 20x a ReLU.
    """

    def __init__(self, nets: list[nn.Sequential], acts: list[nn.Module]) -> None:
        super().__init__()
        linears = [[m for m in net if isinstance(m, nn.Linear)] for net in nets]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].weight.detach().T for ls in linears]).contiguous())
            for i in range(len(linears[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].bias.detach()[None] for ls in linears]))
            for i in range(len(linears[0]))
        )
        self.acts = acts
        self.runs = runs([repr(a) for a in acts])

    def __len__(self) -> int:
        return self.weights[0].shape[0]

    def act(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.runs) == 1:
            return self.acts[0](h)
        return torch.cat([self.acts[a](h[a:b]) for a, b in self.runs])

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
            h = torch.baddbmm(b, h, w)
            if i < last:
                pre, h = h, self.act(h)
                if probe:
                    probe(i, pre, h)
        return h

    def member_state(self, k: int, names: list[str]) -> dict[str, torch.Tensor]:
        """Member k's weights under its solo module's state_dict names (net.0.weight, ...)."""
        out = {}
        tensors = [t for w, b in zip(self.weights, self.biases, strict=True) for t in (w, b)]
        for name, t in zip(names, tensors, strict=True):
            out[name] = (t[k].T if name.endswith("weight") else t[k, 0]).detach().clone()
        return out


class StackedOptimizer:
    """torch.optim.SGD or Adam on stacked parameters, each member with its own numbers.

    Consecutive members with the same numbers are updated together, on their slice, by the
    operations of torch's single-tensor SGD and Adam with those numbers as scalars: elementwise,
    each member's update is the one its solo optimizer computes, bit for bit. A frozen member
    (diverged) is left out of every later update.
    """

    def __init__(self, params: list[nn.Parameter], target: str, members: list[DictConfig]) -> None:
        self.params, self.adam = params, target == "torch.optim.Adam"
        self.numbers = [
            tuple(float(m.get(key) or 0.0) for key in ("lr", "momentum", "weight_decay"))
            for m in members
        ]
        first = members[0]
        self.betas = tuple(first.get("betas", (0.9, 0.999)))
        self.eps = float(first.get("eps", 1e-8))
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in params]
        self.steps = 0
        self.active = [True] * len(members)
        self._runs()

    def _runs(self) -> None:
        keys = [n if on else None for n, on in zip(self.numbers, self.active, strict=True)]
        self.runs = [(a, b, keys[a]) for a, b in runs(keys) if keys[a] is not None]

    def freeze(self, k: int) -> None:
        self.active[k] = False
        self._runs()

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for p, state in zip(self.params, self.state, strict=True):
            if not state:
                self._init_state(p, state)
            for a, b, (lr, momentum, weight_decay) in self.runs:
                g = p.grad[a:b]
                if weight_decay:
                    g = g.add(p[a:b], alpha=weight_decay)
                s = {k: v[a:b] for k, v in state.items()}
                if self.adam:
                    self._adam(p[a:b], g, s, lr)
                else:
                    self._sgd(p[a:b], g, s, lr, momentum)

    def _init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if self.adam:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        elif any(n[1] for n in self.numbers):
            state["momentum_buffer"] = torch.zeros_like(p)

    def _sgd(
        self, p: torch.Tensor, g: torch.Tensor, s: dict[str, torch.Tensor], lr: float, m: float
    ) -> None:
        if m:
            buf = s["momentum_buffer"]
            if self.steps == 1:
                buf.copy_(g)  # torch starts the buffer as the first gradient
            else:
                buf.mul_(m).add_(g)
            g = buf
        p.add_(g, alpha=-lr)

    def _adam(
        self, p: torch.Tensor, g: torch.Tensor, s: dict[str, torch.Tensor], lr: float
    ) -> None:
        b1, b2 = self.betas
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1**self.steps)
        denom = (v.sqrt() / (1 - b2**self.steps) ** 0.5).add_(self.eps)  # as torch rounds it
        p.addcdiv_(m, denom, value=-step_size)

    def member_state(self, k: int, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """Member k's state in torch.optim's own state_dict format (`groups` from its optimizer)."""
        state = {}
        for i, s in enumerate(self.state):
            weight = i % 2 == 0  # the solo order: weight, bias of each layer
            tensors = {n: (t[k].T if weight else t[k, 0]).clone() for n, t in s.items()}
            if not self.numbers[k][1]:
                tensors.pop("momentum_buffer", None)  # torch keeps none without momentum
            if self.adam and tensors:
                tensors["step"] = torch.tensor(float(self.steps))
            if tensors:
                state[i] = tensors
        return {"state": state, "param_groups": copy.deepcopy(groups)}


def _put(stacked: torch.Tensor, k: int, solo: torch.Tensor, weight: bool) -> None:
    """Member k's slice of a stacked tensor set from its solo job's tensor (the inverse of
    member_state)."""
    (stacked[k] if weight else stacked[k, 0]).copy_(solo.T if weight else solo)


def clip_per_member(params: list[nn.Parameter], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each member's gradients on its own."""
    dims = [tuple(range(1, p.dim())) for p in params]
    norms = (
        torch.stack([p.grad.pow(2).sum(d) for p, d in zip(params, dims, strict=True)]).sum(0).sqrt()
    )
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0).view(-1, 1, 1)
    for p in params:
        p.grad.mul_(coef)


# ---------------------------------------------------------------------------------------------
# One pack's training


@dataclass
class Member:
    """One job of the pack: its resolved config, folder, record and loggers."""

    cfg: DictConfig
    out: Path
    choices: dict[str, Any]
    index: int
    full: DictConfig  # with its `hydra` node, as the sweeper composed it
    record: dict[str, Any] = field(default_factory=dict)
    loggers: list = field(default_factory=list)
    status: str = "running"
    best: float = -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_path: Path | None = None
    last_path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    resumed: Path | None = None  # the last.ckpt it continues from (`+resume=true`)
    first_epoch: int = 0

    def write(self) -> None:
        with contextlib.suppress(UserError):  # a full disk must not hide the original error
            write_json(self.out / RESULTS, self.record)

    def end(self, status: str, error: str | None = None, **extra: Any) -> None:
        self.status = status
        self.record.update(status=status, **extra)
        if error:
            self.record["error"] = error
        self.write()
        for lg in self.loggers:
            lg.save()
            if isinstance(lg, actlab_loggers.WandbLogger):
                actlab_loggers.finish_wandb(status, lg.experiment)
        self.loggers = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)


@contextlib.contextmanager
def hydra_of(full: DictConfig) -> Iterator[None]:
    """HydraConfig set to a member's own (its folder, overrides, choices) for a moment."""
    instance = HydraConfig.instance()
    saved = instance.cfg
    # set_config() wants Hydra's typed node; a member's comes back from members.yaml untyped.
    instance.cfg = OmegaConf.masked_copy(full, "hydra")
    try:
        yield
    finally:
        instance.cfg = saved


def member_from(full: DictConfig, index: int) -> Member:
    """A member from the config the sweeper composed for it: writes its `.hydra/` folder."""
    full = OmegaConf.create(OmegaConf.to_container(full))  # its own root, for `${paths...}`
    full.hydra.mode = RunMode[full.hydra.mode]  # an enum again, as HydraConfig.get() gives it
    out = Path(full.hydra.runtime.output_dir)
    task = copy.deepcopy(full)
    with read_write(task), open_dict(task):
        del task["hydra"]
    with hydra_of(full):
        hydra_dir = out / str(full.hydra.output_subdir)
        _save_config(task, "config.yaml", hydra_dir)
        _save_config(full, "hydra.yaml", hydra_dir)
        _save_config(full.hydra.overrides.task, "overrides.yaml", hydra_dir)
        resolved = copy.deepcopy(task)
        OmegaConf.resolve(resolved)  # `${hydra:...}` must not depend on which member is current
    choices = OmegaConf.to_container(full.hydra.runtime.choices)
    return Member(resolved, out, choices, index, full)


def start_record(m: Member) -> dict[str, Any]:
    """The record a solo job of this config starts with, so that `+resume=true` judges a member
    and a solo job alike."""
    composed = OmegaConf.to_container(m.full, resolve=False)
    del composed["hydra"]
    hydra = m.full.hydra
    return running_record(
        m.out.name, hydra.job.get("num"), list(hydra.overrides.task), m.cfg, m.choices, composed
    )


def fail_unended(pack_dir: Path, error: str, status: str = "failed") -> list[str]:
    """Record each member of a pack that ended without a result (SLURM cancelled it, it timed
    out or was killed for memory, its process was killed): a member that was running gets
    `status` (`lost`: +resume=true continues it), one that never started `failed`. A member left
    `running` or without a folder would be neither resumed nor listed. Returns their names."""
    ended = []
    for i, full in enumerate(OmegaConf.load(pack_dir / MANIFEST)):
        out = Path(full.hydra.runtime.output_dir)
        record = read_results(out)
        started = record is not None
        if not started:
            m = member_from(full, i)  # never started: its .hydra/ lists it in the sweep table
            record = start_record(m)
        if record.get("status") != "running":
            continue  # it ended on its own (finished, diverged, failed) before the pack died
        record.update(status=status if started else "failed", error=error)
        write_json(out / RESULTS, record)
        ended.append(out.name)
    return ended


def max_members(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


def check_memory(
    nets: int, params_per_member: int, batch: int, widths: int, dev: torch.device
) -> None:
    """Refuse, before training, a pack whose tensors would not fit the device's free memory."""
    # params, grads, two optimizer states; activations and their grads for a batch.
    need = nets * 4 * (4 * params_per_member + 4 * batch * widths)
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * free:
        raise UserError(
            f"a pack of {nets} members needs about {need / 2**30:.1f} GiB but {dev} has "
            f"{free / 2**30:.1f} GiB free: lower hydra.sweeper.max_members."
        )


class PackTrainer:
    """Fits the members on one device, writing each member's metrics, checkpoints and record."""

    def __init__(self, members: list[Member], device: torch.device) -> None:
        self.members, self.device = members, device
        first = members[0].cfg
        self.epochs = int(first.trainer.max_epochs)
        self.log_every = int(first.trainer.get("log_every_n_steps", 50))
        self.clip = first.model.get("gradient_clip_val")
        callbacks = first.get("callbacks") or {}
        self.probe_units = bool(callbacks.get("dead_units"))
        self.grad_norms = self.probe_units and callbacks.dead_units.get("grad_norms", True)
        self.keep_best = bool(callbacks.get("model_checkpoint"))
        self.keep_last = bool(callbacks.get("last_checkpoint"))
        self.global_step = 0
        self.heartbeat: Heartbeat | None = None
        self._loop_template: dict[str, Any] | None = None
        self.start = time.perf_counter()
        self.datamodule = instantiate(first.data)
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        nets, acts, self.groups = [], [], []
        for m in members:
            L.seed_everything(m.cfg.seed, workers=True, verbose=False)  # as the solo job does
            solo = instantiate(m.cfg.model)
            check_net(solo.net, m.cfg.data.in_features, m.cfg.data.num_classes)
            nets.append(solo.net)
            # model.net.hidden_sizes=[] is a linear model: nothing to activate.
            hidden = (a for a in solo.net if not isinstance(a, nn.Linear | nn.Dropout))
            acts.append(next(hidden, nn.Identity()))
            opt = instantiate(m.cfg.optimizer)(params=solo.parameters())
            self.groups.append(opt.state_dict()["param_groups"])
        self.names = [f"net.{n}" for n, _ in nets[0].named_parameters()]
        n_params = sum(p.numel() for p in nets[0].parameters())
        widths = sum(p.shape[0] for p in nets[0].parameters() if p.dim() == 2)
        check_memory(len(members), n_params, int(first.data.batch_size), widths, device)
        self.model = StackedMLP(nets, acts).to(device)
        # The solo order (layer 1 weight, bias, layer 2 weight, ...), as in its optimizer state.
        pairs = zip(self.model.weights, self.model.biases, strict=True)
        self.params = [p for pair in pairs for p in pair]
        self.optimizer = StackedOptimizer(
            self.params, first.optimizer._target_, [m.cfg.optimizer for m in members]
        )
        self.seeds = [int(m.cfg.seed) for m in members]
        self.first_epoch = members[0].first_epoch  # train_pack packs members of one epoch
        if self.first_epoch:
            self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        """Each member's state at the end of its last.ckpt's epoch: weights, optimizer state and
        step count, best so far (value, checkpoint, weights), metrics."""
        for m in self.members:
            ckpt = checkpoints.load(m.resumed)
            self.global_step = self.optimizer.steps = int(ckpt["global_step"])
            opt = ckpt["optimizer_states"][0]["state"]
            for i, (name, p, state) in enumerate(
                zip(self.names, self.params, self.optimizer.state, strict=True)
            ):
                weight = name.endswith("weight")
                _put(p, m.index, ckpt["state_dict"][name], weight)
                if not state:
                    self.optimizer._init_state(p, state)
                for key, t in state.items():
                    if key in opt.get(i, {}):
                        _put(t, m.index, opt[i][key], weight)
            m.best = float(ckpt["state_dict"]["val_acc_best.max_value"])
            m.metrics = dict(ckpt.get("metrics") or {})
            m.last_path = m.resumed
            for key, cb in ckpt["callbacks"].items():
                if "'monitor': None" not in key and cb.get("best_model_path"):
                    m.best_path = Path(cb["best_model_path"])
                    best = checkpoints.load(m.best_path)
                    m.best_state = {n: best["state_dict"][n] for n in self.names}

    def _tensors(self, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in split)

    def fit(self) -> None:
        x, y = self._tensors(self.datamodule.train)
        n, bs = len(x), int(self.members[0].cfg.data.batch_size)
        steps = -(-n // bs)
        K = len(self.members)
        for epoch in range(self.first_epoch, self.epochs):
            orders = torch.stack([batch_order(s, epoch, n) for s in self.seeds]).to(self.device)
            sums = torch.zeros(3, K, device=self.device)  # loss, correct, n
            for s in range(steps):
                idx = orders[:, s * bs : (s + 1) * bs]
                flat = idx.flatten()
                xb = x.index_select(0, flat).view(K, -1, *x.shape[1:])
                yb = y.index_select(0, flat).view(K, -1)
                logits = self.model(xb)
                losses = (
                    F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
                    .view(K, -1)
                    .mean(1)
                )
                for p in self.params:
                    p.grad = None
                losses.sum().backward()
                log_now = (self.global_step + 1) % self.log_every == 0
                step_logs: dict[str, torch.Tensor] = {}
                if log_now and self.grad_norms:
                    step_logs.update(self._grad_norms())
                if self.clip:
                    clip_per_member(self.params, float(self.clip))
                self.optimizer.step()
                self.global_step += 1
                with torch.no_grad():
                    correct = (logits.argmax(-1) == yb).sum(1)
                    b = yb.shape[1]
                    sums += torch.stack(
                        [losses * b, correct.to(losses.dtype), losses.new_full((K,), b)]
                    )
                if log_now:
                    step_logs.update({"train/loss": losses, "train/acc": correct / b})
                    self._log_each(step_logs, self.global_step - 1, epoch)
                if s + 1 == steps or self.global_step % self.log_every == 0:
                    self._check_divergence(sums[0], epoch)
                if not self.running:
                    return
            self._end_epoch(epoch, sums)

    @property
    def running(self) -> list[Member]:
        return [m for m in self.members if m.status == "running"]

    def _log_each(self, logs: dict[str, torch.Tensor], step: int, epoch: int) -> None:
        values = {k: v.tolist() for k, v in logs.items()}
        for m in self.running:
            metrics = {k: v[m.index] for k, v in values.items()}
            m.metrics.update(metrics)
            m.log({**metrics, "epoch": epoch}, step)

    def _grad_norms(self) -> dict[str, torch.Tensor]:
        names = [f"layer{i}" for i in range(1, len(self.model.weights))] + ["output"]
        out = {}
        for name, w, b in zip(names, self.model.weights, self.model.biases, strict=True):
            sq = w.grad.pow(2).sum((1, 2)) + b.grad.pow(2).sum((1, 2))
            out[f"grad_norm/{name}"] = sq.sqrt()
        return out

    def _check_divergence(self, loss_sums: torch.Tensor, epoch: int) -> None:
        values = loss_sums.tolist()
        for m in self.running:
            if not math.isfinite(values[m.index]):
                self.optimizer.freeze(m.index)
                error = (
                    f"Diverged: the training loss became {values[m.index]} by step "
                    f"{self.global_step} (epoch {epoch}): lower optimizer.lr or change the model."
                )
                log.error("%s: %s", m.out.name, error)
                m.end("diverged", error, seconds=self.seconds())

    @torch.no_grad()
    def evaluate(self, split: tuple[torch.Tensor, torch.Tensor], units: bool) -> dict:
        x, y = self._tensors(split)
        K = len(self.members)
        loss, correct = torch.zeros(K, device=self.device), torch.zeros(K, device=self.device)
        layers = len(self.model.weights) - 1
        active = [0] * layers
        act_sum = [0] * layers

        def probe(i: int, pre: torch.Tensor, post: torch.Tensor) -> None:
            active[i] = active[i] + (pre > 0).sum(1)
            act_sum[i] = act_sum[i] + post.sum(1, dtype=torch.float32)

        bs = int(self.members[0].cfg.data.eval_batch_size)
        for xb, yb in zip(x.split(bs), y.split(bs), strict=True):
            logits = self.model(xb, probe if units else None)
            target = yb.expand(K, -1)
            loss += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
            correct += (logits.argmax(-1) == target).sum(1)
        n = len(x)
        out = {"loss": loss / n, "acc": correct / n}
        if units and layers:
            dead = []
            for k in range(layers):
                dead.append((active[k] == 0).float().mean(1))
                out[f"dead/layer{k + 1}"] = dead[-1]
                out[f"rare/layer{k + 1}"] = (active[k] < 0.01 * n).float().mean(1)
                out[f"act_mean/layer{k + 1}"] = act_sum[k].mean(1) / n
            out["dead/mean"] = torch.stack(dead).mean(0)
        return {k: v.tolist() for k, v in out.items()}

    def _end_epoch(self, epoch: int, sums: torch.Tensor) -> None:
        loss_sum, correct, n = sums.tolist()
        val = self.evaluate(self.datamodule.val, self.probe_units)
        for m in self.running:
            k = m.index
            acc = val["acc"][k]
            improved = acc > m.best
            m.best = max(m.best, acc)
            metrics = {
                "train/loss_epoch": loss_sum[k] / n[k],
                "train/acc_epoch": correct[k] / n[k],
                "val/loss": val["loss"][k],
                "val/acc": acc,
                "val/acc_best": m.best,
                **{key: v[k] for key, v in val.items() if "/" in key},
            }
            m.metrics.update(metrics)
            m.log({**metrics, "epoch": epoch}, self.global_step - 1)
            for lg in m.loggers:
                lg.save()
            state = self.model.member_state(k, self.names)
            old = None
            if improved:
                m.best_state = state
                if self.keep_best:
                    old, m.best_path = (
                        m.best_path,
                        m.out / "checkpoints" / f"best-epoch{epoch:03d}.ckpt",
                    )
                    self.save(m, m.best_path, state, epoch)
            if self.keep_last:
                m.last_path = m.out / "checkpoints" / "last.ckpt"
                self.save(m, m.last_path, state, epoch)
            # Only now: killed before, last.ckpt still names a best checkpoint that exists.
            if old and old != m.best_path:
                old.unlink(missing_ok=True)
        if self.heartbeat:
            self.heartbeat.beat(epoch + 1)

    def save(self, m: Member, path: Path, state: dict[str, torch.Tensor], epoch: int) -> None:
        """A checkpoint in the solo job's format: eval.py and `ckpt_path=` read it."""
        ckpt = {
            "epoch": epoch,
            "global_step": self.global_step,
            "pytorch-lightning_version": L.__version__,
            "state_dict": {**state, "val_acc_best.max_value": torch.tensor(m.best)},
            "loops": self._loops(epoch),
            "optimizer_states": [self.optimizer.member_state(m.index, self.groups[m.index])],
            "lr_schedulers": [],
            "callbacks": self._checkpointer_states(m),
            "metrics": dict(m.metrics),
        }
        checkpoints.save(ckpt, path)

    def _checkpointer_states(self, m: Member) -> dict[str, Any]:
        """The member's ModelCheckpoint states, so a resumed solo run knows its best so far."""
        states = {}
        for name in ("model_checkpoint", "last_checkpoint"):
            node = (m.cfg.get("callbacks") or {}).get(name)
            if not node:
                continue
            cb = instantiate(node)
            if cb.monitor is None:
                cb.best_model_path = str(m.last_path or "")
            elif m.best_path is not None:
                best = torch.tensor(m.best)
                cb.best_model_path = cb.kth_best_model_path = str(m.best_path)
                cb.best_model_score = cb.kth_value = best
                cb.best_k_models = {str(m.best_path): best}
                cb.current_score = torch.tensor(m.metrics["val/acc"])
            states[cb.state_key] = cb.state_dict()
        return states

    def _loops(self, epoch: int) -> dict[str, Any]:
        """Lightning's loop state at the end of `epoch`, so `ckpt_path=` resumes after it."""
        if self._loop_template is None:
            t = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
            self._loop_template = {
                f"{k}_loop": getattr(t, f"{k}_loop").state_dict()
                for k in ("fit", "validate", "test", "predict")
            }
        loops = copy.deepcopy(self._loop_template)
        fit = loops["fit_loop"]
        steps = self.global_step // (epoch + 1)
        val = -(-len(self.datamodule.val[0]) // int(self.members[0].cfg.data.eval_batch_size))
        for progress, current, total in (
            (fit["epoch_loop.batch_progress"], steps, self.global_step),
            (fit["epoch_loop.manual_optimization.optim_step_progress"], self.global_step, None),
            (fit["epoch_loop.val_loop.batch_progress"], val, val),
        ):
            for scope, n in (("current", current), ("total", total or current)):
                for key in progress[scope]:
                    progress[scope][key] = n
        fit["epoch_loop.batch_progress"]["is_last_batch"] = True
        fit["epoch_loop.val_loop.batch_progress"]["is_last_batch"] = True
        fit["epoch_loop.state_dict"] = {"_batches_that_stepped": self.global_step}
        for scope in ("current", "total"):
            fit["epoch_progress"][scope].update(
                completed=epoch, processed=epoch + 1, ready=epoch + 1, started=epoch + 1
            )
        return loops

    def test(self) -> None:
        """Each running member's best-by-val weights (its last without a best) on the test set."""
        with torch.no_grad():
            for m in self.running:
                if m.best_state is None or not self.keep_best:
                    continue
                for i, name in enumerate(self.names):
                    t = self.params[i]
                    v = m.best_state[name]
                    t[m.index].copy_(v.T if name.endswith("weight") else v[None])
        tested = self.evaluate(self.datamodule.test, False)
        for m in self.running:
            metrics = {"test/loss": tested["loss"][m.index], "test/acc": tested["acc"][m.index]}
            m.metrics.update(metrics)
            m.log({**metrics, "epoch": self.epochs}, self.global_step)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)


# ---------------------------------------------------------------------------------------------
# The pack job: what `train.py` runs for a job the packed sweeper made


def train_pack(cfg: DictConfig) -> dict[str, Any]:
    """Train the members listed in this job's folder (members.yaml, written by the sweeper)."""
    from actlab.validation import validate

    hc = HydraConfig.get()
    pack_dir = Path(hc.runtime.output_dir)
    fulls = OmegaConf.load(pack_dir / MANIFEST)
    with member_logs() as logs:
        members = []
        for full in fulls:
            m = member_from(full, len(members))
            m.record = start_record(m)
            # The pack job's own `resume` too: a SLURM requeue appends `++resume=true` to it.
            resume = cfg.get("resume") or m.cfg.get("resume")
            try:
                if resume and finished_before(m.out, m.record):
                    log.info("%s: finished before, skipped (resume=true)", m.out.name)
                    continue
            except UserError as e:  # a finished run of another config: left as it is
                log.error("%s: job failed: %s", m.out.name, e)
                continue
            logs.add(m)
            m.resumed = resumable(m.out, m.record) if resume else None
            # Hydra's `.hydra/` of the member is this attempt's (member_from wrote it).
            if m.resumed:
                earlier = keep_attempt(m.out, m.resumed, hydra_written=True)
            else:
                earlier = set_aside(m.out)
            if earlier:
                log.info("%s: the earlier attempt is kept in %s", m.out.name, earlier)
            if m.resumed:
                m.first_epoch = trained_epochs(m.resumed)
                m.record["resumed_from"] = str(m.resumed)
            m.record.update(provenance())
            m.write()
            try:
                validate(m.cfg)
            except UserError as e:
                log.error("%s: job failed: %s", m.out.name, e)
                m.end("failed", f"UserError: {e}")
                logs.drop(m)  # the pack's lines are not about it
                continue
            members.append(m)
        # One stack trains from one epoch: members continued from their checkpoints train with
        # those at the same epoch, each such pack after the other (the new members first).
        by_epoch: dict[int, list[Member]] = {}
        for m in members:
            by_epoch.setdefault(m.first_epoch, []).append(m)
        packs = [by_epoch[e] for e in sorted(by_epoch)]
        for p, pack in enumerate(packs):
            # Members with the same optimizer numbers and activation next to each other: each
            # run of them is updated and activated by one operation on its slice of the stack.
            pack.sort(key=lambda m: OmegaConf.to_yaml(m.cfg.optimizer) + repr(m.cfg.model.act))
            for i, m in enumerate(pack):
                m.index = i
                m.record["pack"] = {"id": pack_dir.name, "size": len(pack), "member": i}
                m.write()  # a pack killed outright leaves records that say it was one
            try:
                _fit_members(cfg, pack)
            except BaseException as e:
                _end_unended([m for later in packs[p + 1 :] for m in later], e, 0.0)
                raise
            for m in pack:
                logs.drop(m)  # the next pack's lines are not about it
        return {"status": "finished", "metrics": {}}


class _MemberLogs(logging.Handler):
    """Each member's `train.log`, as a solo job has one: the pack's lines, except that a line
    about one member (`<its folder>: ...`) goes to that member's log only."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Any] = {}

    def add(self, m: Member) -> None:
        self.files[m.out.name] = open(m.out / "train.log", "a")  # noqa: SIM115

    def drop(self, m: Member) -> None:
        self.files.pop(m.out.name).close()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record) + "\n"
        name = record.getMessage().partition(":")[0]
        for f in [self.files[name]] if name in self.files else self.files.values():
            f.write(text)
            f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        super().close()


@contextlib.contextmanager
def member_logs() -> Iterator[_MemberLogs]:
    root = logging.getLogger()
    handler = _MemberLogs()
    # Formatted and filtered as Hydra's job log is.
    if hydra_log := next((h for h in root.handlers if isinstance(h, logging.FileHandler)), None):
        handler.setFormatter(hydra_log.formatter)
        handler.setLevel(hydra_log.level)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()


def _fit_members(cfg: DictConfig, members: list[Member]) -> dict[str, Any]:
    slot = None
    trainer: PackTrainer | None = None
    heartbeat = Heartbeat([m.out for m in members])
    heartbeat.start()
    try:
        torch.set_num_threads(cfg.get("threads") or usable_cores())
        slot = instantiate(cfg.launch).acquire() if cfg.get("launch") else None
        launch_info = {}
        if slot:
            for m in members:
                m.record["launch"] = slot.info()
            launch_info = {f"launch.{k}": v for k, v in slot.info().items()}
        device = torch.device(slot.device if slot and not slot.simulated else _device(cfg))
        log.info("pack of %d members on %s: %s", len(members), device, _names(members))
        trainer = PackTrainer(members, device)
        trainer.heartbeat = heartbeat
        for m in members:
            with hydra_of(m.full):
                for c in (m.cfg.get("logger") or {}).values():
                    if not c:
                        continue
                    own_run = c.get("_target_") == "actlab.loggers.wandb_logger"
                    lg = instantiate(c, **({"new_run": True} if own_run else {}))
                    m.loggers.append(lg)
                    if m.resumed and isinstance(lg, CSVLogger):  # its later epochs come again
                        drop_rows_after(Path(lg.log_dir) / "metrics.csv", m.first_epoch - 1)
                    if own_run:
                        actlab_loggers.announce(lg)
                    lg.log_hyperparams({**logged_config(m.cfg, m.choices), **launch_info})
        trainer.fit()
        fit_seconds = trainer.seconds()
        if cfg.get("test", True):
            trainer.test()
        epochs = trainer.epochs
        pack_epoch = fit_seconds / max(epochs - trainer.first_epoch, 1)
        for m in trainer.running:
            m.record["metrics"] = m.metrics
            # Its share of the pack's epoch, comparable with a solo job's s/epoch.
            m.record["pack"]["seconds_per_epoch"] = round(pack_epoch, 3)
            log.info(
                "%s: test/acc=%.4f val/acc_best=%.4f epochs=%d -> %s",
                m.out.name,
                m.metrics.get("test/acc", float("nan")),
                m.best,
                epochs,
                m.out,
            )
            m.end(
                "finished",
                epochs=epochs,
                seconds=trainer.seconds(),
                seconds_per_epoch=round(pack_epoch / len(members), 3),
                best_checkpoint=str(m.best_path) if m.best_path else None,
                device=str(device),
                threads=torch.get_num_threads(),
            )
        return {"status": "finished", "metrics": {}}
    except BaseException as e:
        seconds = trainer.seconds() if trainer else 0.0
        if (stop := _end_unended(members, e, seconds)) is not None and stop is not e:
            raise stop from e  # Lightning's stand-in for the signal: exit 128 + its number
        raise
    finally:
        heartbeat.stop()
        if slot:
            slot.release()


def _end_unended(members: list[Member], e: BaseException, seconds: float) -> Interrupted | None:
    """Record each member still running as the exception `e` that stopped the pack ends it;
    returns the signal that stopped it, if one did."""
    stop = interruption(e)
    for m in members:
        if m.status != "running":
            continue
        if stop is None:
            m.end("failed", f"{type(e).__name__}: {e}", seconds=seconds)
            continue
        last = m.last_path or m.resumed
        last = str(last) if last else None
        m.end("interrupted", str(stop), last_checkpoint=last, seconds=seconds)
        if last:
            log.info("%s: interrupted; to resume: python train.py ckpt_path=%s", m.out.name, last)
        else:
            log.info("%s: interrupted before a checkpoint was saved", m.out.name)
    return stop


def _device(cfg: DictConfig) -> str:
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _names(members: list[Member]) -> str:
    return ", ".join(m.out.name for m in members)
