"""Packed sweeps: K jobs that share an architecture train as one stacked model.

A *member* is a solo job's config plus its index in the stack. The members of a pack differ only
in `actlab.packing.MEMBER_KEYS` (activation, seed, the optimizer's numbers, the scheduler,
early stopping); everything else is shared (actlab.packing decides which jobs can be members).
Weights are stacked as `[K, in, out]` and trained with batched matmuls, so one forward, backward
and optimizer step serves all K, and the per-step overhead of a training framework is paid once.
An activation's parameters (PReLU's slope, a learnable Swish's beta) are stacked as `[K, ...]`
and trained alike. Any other network that can (actlab.packing.vmap_reason: a CNN, say) trains
through torch.func instead (actlab.stacked_nets.StackedNets), its parameters `[K, *solo_shape]`.

Each member gets exactly its solo job's start and data: its layers are built by the solo code
under its seed (`actlab.model.MLPClassifier` after `L.seed_everything(seed)`), its batches of
epoch e come in `batch_order(seed, e, n)`, its dropout masks from a generator in the state its
solo job's dropout draws from. Its update is the one `torch.optim.SGD` / `Adam` / `AdamW` makes
(re-implemented on stacked tensors with per-member hyperparameters), with the learning rate its
own scheduler (a real one, on its solo optimizer) gives at each epoch, so a member's results
equal its solo job's up to floating-point rounding. Lightning's EarlyStopping, one per member,
stops a member whose monitored metric stopped improving; it ends as its solo job would (its
epochs, tested on its best checkpoint) while the others train on. A member whose loss turns
NaN/inf is recorded `diverged` and frozen; the others never see its numbers (each slice of a
batched matmul is computed on its own, and the summed loss passes a gradient of 1 to every
member). A member that stopped (early-stopped, pruned by a search, diverged, failed) leaves the
stack at the end of that epoch (PackTrainer._drop): the later steps compute the others only.
In a search's pack the slots they free take new trials (PackTrainer.add), each trained from its
own first epoch, with its own step count, as its solo job.

What a member writes (its `.hydra/`, results.json, csv, W&B run, checkpoints) goes through the
functions a solo job uses, into its own folder: to a user it is a solo job. This module is the
members' lifecycle and the pack's training, which Lightning's Trainer runs (PackModule: each
Lightning batch a group of the pack's optimizer steps); the stacked math is actlab.stacked_nets.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import operator
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from omegaconf import DictConfig, OmegaConf
from omegaconf._impl import _resolve_container_value
from torch import nn
from torchmetrics.functional.regression.r2 import _r2_score_compute

from actlab import checkpoints, packing
from actlab import loggers as actlab_loggers
from actlab.data import batch_order
from actlab.diagnostics import grad_norms, hidden_activations, unit_metrics
from actlab.errors import Diverged, Interrupted, UserError, interruption
from actlab.launch import ShareIdleCores, finished_before, usable_cores
from actlab.model import TASKS
from actlab.results import (
    RESULTS,
    SEARCH,
    Heartbeat,
    logged_config,
    provenance,
    read_results,
    running_record,
    write_json,
    write_text,
)
from actlab.runs import (
    Origin,
    drop_rows_after,
    load_weights,
    nothing_to_train,
    origin_of,
    put_earlier_aside,
)
from actlab.stacked_nets import (
    StackedMLP,
    StackedNets,
    StackedOptimizer,
    activation_bytes,
    clip_per_member,
    put_solo,
    runs,
)
from actlab.validation import check_net

log = logging.getLogger(__name__)

# A pack's state on the host at an epoch's end: stacked weights, optimizer state, buffers.
Host = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[torch.Tensor]]

MANIFEST = "members.yaml"


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
    best: float = -math.inf  # of the eval metric (val/acc_best, val/r2_best)
    best_score: float | None = None  # the checkpoint's monitor, at its best checkpoint
    best_state: dict[str, torch.Tensor] | None = None
    best_path: Path | None = None
    last_path: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    origin: Origin = field(default_factory=Origin)  # a checkpoint it continues or starts from
    early_stopping: EarlyStopping | None = None
    stopped: tuple[int, int] | None = None  # (epochs, global step) when it stopped early
    # The pack's epoch and step when it joined the stack: a search's refilled slot (its own
    # epochs and steps count from there), else 0, 0.
    joined: tuple[int, int] = (0, 0)
    start: float | None = None  # when it joined a pack that had started (time.perf_counter)

    @property
    def first_epoch(self) -> int:
        return self.origin.epoch

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


def act_keys(members: list[Member]) -> list[str]:
    """Each member's activation config: consecutive members with the same one are one run of
    the stacked model (one vmapped call)."""
    return [OmegaConf.to_yaml(m.cfg.model.act) for m in members]


# Hydra's `${hydra:key}` reads the process's HydraConfig; a member's `${oc.select:hydra.key}` reads
# the hydra node in its own config, so no member sees another's (or the pack job's) values.
HYDRA_RESOLVER = re.compile(r"\$\{\s*hydra\s*:\s*")


def _own_hydra(value: Any) -> Any:
    if isinstance(value, str):
        return HYDRA_RESOLVER.sub("${oc.select:hydra.", value)
    if isinstance(value, dict):
        return {k: _own_hydra(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_hydra(v) for v in value]
    return value


def member_from(full: DictConfig, index: int) -> Member:
    """A member from the config the sweeper composed for it: writes its `.hydra/` folder as
    Hydra does for a job (hydra.core.utils._save_config), and resolves its config against its
    own hydra node, never Hydra's global one."""
    data = OmegaConf.to_container(full)
    mode = data["hydra"]["mode"]  # a name in members.yaml, composed (a search's refill) not
    data["hydra"]["mode"] = (
        RunMode[mode] if isinstance(mode, str) else mode
    )  # as HydraConfig.get() gives it
    full = OmegaConf.create(data)  # its own root, for `${paths...}`
    keys = [k for k in data if k != "hydra"]
    own = OmegaConf.create({k: v if k == "hydra" else _own_hydra(v) for k, v in data.items()})
    for key in keys:
        _resolve_container_value(own, key)  # what OmegaConf.resolve does, key by key
    resolved = OmegaConf.masked_copy(own, keys)
    out = Path(full.hydra.runtime.output_dir)
    task = OmegaConf.masked_copy(full, keys)
    hydra_dir = out / str(full.hydra.output_subdir)
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(task, hydra_dir / "config.yaml")
    OmegaConf.save(full, hydra_dir / "hydra.yaml")
    OmegaConf.save(full.hydra.overrides.task, hydra_dir / "overrides.yaml")
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


# Of a device's memory, the part a pack may plan for: the rest is for what the estimate leaves
# out (the CUDA context, the allocator's cache, Python and the libraries on a CPU) and its margin
# (tests/test_pack_memory.py).
HEADROOM = 0.8


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a pack keeps on its device, by what holds them (actlab.pack.memory_need)."""

    kept: dict[str, int]  # through the whole training
    phases: dict[str, int]  # one at a time: the peak holds the largest

    @property
    def peak(self) -> int:
        return sum(self.kept.values()) + max(self.phases.values())

    def largest(self, n: int) -> list[tuple[str, int]]:
        return sorted({**self.kept, **self.phases}.items(), key=lambda kv: -kv[1])[:n]


def memory_need(
    net: nn.Sequential, cfgs: list[DictConfig], data: list[torch.Tensor], device: torch.device
) -> MemoryNeed:
    """What a pack of members with these configs keeps on `device`; `net` is one member's network
    (its shapes: a meta-device one will do), `data` the tensors of the train, val and test
    splits (x, y each)."""
    k, first = len(cfgs), cfgs[0]
    params = sum(p.numel() * p.element_size() for p in net.parameters())  # one member's
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    largest = max(p.numel() * p.element_size() for p in net.parameters())
    opts = [c.optimizer for c in cfgs]
    if first.optimizer._target_ == "torch.optim.SGD":
        states = int(any(o.get("momentum") for o in opts))
        # weight decay and Nesterov each make a gradient-sized tensor
        temporaries = any(o.get("weight_decay") for o in opts) + any(
            o.get("nesterov") for o in opts
        )
    else:  # Adam's two moments (amsgrad's maximum), and its step's denominator in two tensors
        states, temporaries = 2 + any(o.get("amsgrad") for o in opts), 2
    callbacks = first.get("callbacks") or {}
    bs, eval_bs = int(first.data.batch_size), int(first.data.eval_batch_size)
    rows = min(bs, len(data[0]))  # a batch is no larger than its split
    val_rows, test_rows = (min(eval_bs, len(x)) for x in data[2::2])
    if packing.engine(first) == "stacked":  # the engine PackTrainer trains them with
        train, evaluation = _mlp_activations(net, k, rows, val_rows, test_rows, callbacks)
    else:
        # Through torch.func: a bound (measured for a CNN at K = 9-27: 40-85% of it). Each
        # module's output is kept for the backward pass, vmap may move the members' dim into a
        # copy of it (a Conv's input, its output), and the backward pass makes a gradient of
        # each, and a copy; the batch (float32) and its labels.
        each, widest = activation_bytes(net, int(first.data.in_features))
        x = 4 * int(first.data.in_features)
        train = k * rows * (x + 4 * each + 2 * widest + 8)
        # Without a graph: an output, its copy and the next one at a time, and the probe's
        # per-unit tensors (measured: 68-76% of it).
        evaluation = k * max(val_rows, test_rows) * (x + 4 * widest)
    return MemoryNeed(
        kept={
            "data": sum(t.nbytes for t in data),
            "weights": k * (params + buffers),
            "gradients": k * params,
            "optimizer state": states * k * params,
            # Each member's best weights, kept for its test in the host's memory (cut from the
            # epoch's one copy to the host), which on a CPU is the device's.
            "best states": (
                k * (params + buffers)
                if callbacks.get("model_checkpoint") and device.type == "cpu"
                else 0
            ),
            "batch orders": k * len(data[0]) * 8,
        },
        phases={
            f"training activations (data.batch_size={bs})": train,
            "optimizer step": temporaries * k * largest,
            f"evaluation activations (data.eval_batch_size={eval_bs})": evaluation,
        },
    )


def _mlp_activations(
    net: nn.Sequential, k: int, rows: int, val_rows: int, test_rows: int, callbacks: Any
) -> tuple[int, int]:
    """The bytes of a hand-stacked pack's activations: training, evaluation."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    widths = [lin.out_features for lin in linears[:-1]]
    inputs, out = linears[0].in_features, linears[-1].out_features
    widest = max([*widths, out])
    # Each hidden layer keeps its pre- and post-activation for the backward pass; with dropout
    # also its mask and the masked output.
    per_layer = 4 if any(isinstance(m, nn.Dropout) and m.p for m in net) else 2
    # The batch, its labels, the hidden layers, the logits and their log-softmax; the backward
    # pass adds two gradients of the widest layer at a time.
    train = k * rows * (4 * (inputs + per_layer * sum(widths) + 2 * out + 2 * widest) + 8)
    # Without a graph, a layer's pre- and post-activation at a time, and the next layer's
    # pre-activation (4 bytes a unit each); the dead-unit probe of the validation pass holds a
    # layer's pre > 0 as bool and as int64 beside its pre- and post-activation (8 + 9).
    held = 8 if len(widths) == 1 else 12
    val_unit = 17 if callbacks.get("dead_units") else held
    evaluation = k * max(
        val_rows * (val_unit * widest + 12 * out), test_rows * (held * widest + 12 * out)
    )
    return train, evaluation


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes: a GPU's (this process's cached blocks count as free: an earlier
    pack's), or the machine's RAM (MemTotal, MemAvailable)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return total, free + cached
    with contextlib.suppress(OSError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines)}
        return info["MemTotal"], info["MemAvailable"]
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc: macOS
    return total, total


def memory_budget(total: int, free: int, sharing: int) -> int:
    """The bytes a pack may take: the free memory of a device it has alone; its share of the
    device's total where `sharing` device slots share it. Packs that start at once would each
    read the same free memory and plan for all of it; a share needs no reading."""
    return free if sharing <= 1 else total // sharing


def check_memory(
    need: MemoryNeed, members: int, device: torch.device, sharing: int = 1, resident: int = 0
) -> int:
    """Refuse, before training, a pack whose peak (`memory_need`) exceeds HEADROOM of its
    `memory_budget` on the device; `resident` bytes of it are in the device's memory already
    (on a CPU, the data). Returns the budget."""
    total, free = device_memory(device)
    budget = memory_budget(total, free + resident, sharing)
    peak, allowed = need.peak, HEADROOM * budget
    gib = 2**30
    log.info(
        "pack of %d member%s: about %.2f GiB on %s, of the %.2f GiB it may take",
        members,
        "" if members == 1 else "s",
        peak / gib,
        device,
        allowed / gib,
    )
    if peak <= allowed:
        return budget
    parts = ", ".join(f"{name} {v / gib:.1f}" for name, v in need.largest(3))
    if sharing > 1:
        what = f"1/{sharing} of its {total / gib:.1f} GiB, shared by {sharing} device slots"
    else:
        what = f"of the {budget / gib:.1f} GiB free"
    # All but the data is in proportion to the members.
    data = need.kept["data"]
    fits = int((allowed - data) // ((peak - data) / members))
    lower = [f"hydra.sweeper.max_members to {fits}"] if fits >= 2 else []
    phase, size = max(need.phases.items(), key=lambda kv: kv[1])
    if "=" in phase and size >= peak / 10:
        lower.append(phase.partition("(")[2].partition("=")[0])  # its batch size
    if sharing > 1:
        lower.append("launch.jobs_per_gpu")
    lower = lower or ["model.net.hidden_sizes"]
    raise UserError(
        f"a pack of {members} members needs about {peak / gib:.1f} GiB on {device} ({parts} GiB) "
        f"but may take {allowed / gib:.1f} GiB ({HEADROOM:.0%} {what}): lower "
        + (f"{', '.join(lower[:-1])} or {lower[-1]}." if len(lower) > 1 else f"{lower[0]}.")
    )


class PackTrainer:
    """Fits the members on one device, writing each member's metrics, checkpoints and record.

    `stack` holds the members still in the stacked model, a member's `index` its position there;
    everything kept per member (its optimizer, scheduler, checkpoint callbacks, seed) is a list
    in that order, cut with the stack when members leave it (`_drop`).
    """

    def __init__(
        self,
        members: list[Member],
        device: torch.device,
        folder: Path,
        sharing: int = 1,
        test: bool = True,
    ) -> None:
        """`folder`: the pack job's (a profiler's file goes there); `sharing`: the device slots
        that share the device (actlab.launch.Slot.sharing); `test`: whether each member is
        tested (`test()` and when it leaves the stack)."""
        self.members, self.device, self.folder, self.tests = members, device, folder, test
        self.stack = list(members)
        first = members[0].cfg
        self.epochs = int(first.trainer.max_epochs)
        self.log_every = int(first.trainer.get("log_every_n_steps", 50))
        self.clip = first.model.get("gradient_clip_val")
        # As Lightning's bf16-mixed: forward and loss under autocast, the weights and their
        # gradients float32, no loss scale (packing.solo_reason sends 16-mixed jobs solo).
        precision = str(first.trainer.get("precision", "32-true"))
        self.precision = "32-true" if precision == "32" else precision  # as Lightning names it
        self.bf16 = self.precision == "bf16-mixed"
        self.classify = first.model.get("task", "classification") == "classification"
        self.metric = TASKS[first.model.get("task", "classification")][1]
        callbacks = first.get("callbacks") or {}
        self.probe_units = bool(callbacks.get("dead_units"))
        self.log_grad_norms = self.probe_units and callbacks.dead_units.get("grad_norms", True)
        self.keep_best = bool(callbacks.get("model_checkpoint"))
        if self.keep_best:
            self.monitor = callbacks.model_checkpoint.get("monitor", "val/acc")
            self.better = {"max": operator.gt, "min": operator.lt}[
                callbacks.model_checkpoint.get("mode", "min")
            ]
        self.keep_last = bool(callbacks.get("last_checkpoint"))
        self.global_step = 0
        self.heartbeat: Heartbeat | None = None
        self.callbacks: list[L.Callback] = []  # the Trainer's besides the progress bar
        # A search's link to its study (hydra_plugins.actlab_optuna.PackSearch): called, it says
        # whether a member, by its folder's name, stops now that it has trained this many epochs
        # with these metrics (it then leaves the stack, `pruned`).
        self.search: Any = None
        self._loop_template: dict[str, Any] = {}
        # Seconds of the epochs outside their training steps (batch orders, evaluation, logging,
        # checkpoints) and the epochs they cover: what a pack pays per epoch besides its steps.
        self.outside_steps, self.epochs_run = 0.0, 0
        self.fit_seconds: float | None = None
        self.start = time.perf_counter()
        self.datamodule = instantiate(first.data)
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        dm = self.datamodule
        data = [*dm.train, *dm.val, *dm.test]
        with torch.device("meta"):  # the shapes, before any member's weights are made
            shapes = instantiate(first.model, optimizer=None, scheduler=None).net
        need = memory_need(shapes, [m.cfg for m in members], data, device)
        on_device = sum(t.nbytes for t in data if t.device.type == device.type)
        check_memory(need, len(members), device, sharing, resident=on_device)
        # Each member's solo optimizer and scheduler: the scheduler steps it as in its solo job,
        # and the stacked optimizer takes its numbers from there. The optimizer holds one empty
        # tensor for its param group, not the solo net's parameters: those are freed once stacked.
        self.opts: list[torch.optim.Optimizer] = []
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler | None] = []
        # Each member's ModelCheckpoints, built once: their state goes into its checkpoints.
        self.checkpointers: list[dict[str, Any]] = []
        nets, acts, generators = self._build(members)
        self.names = [f"net.{n}" for n, _ in nets[0].named_parameters()]
        # A torch.func pack's buffers (BatchNorm's statistics): in checkpoints, not optimized.
        self.buffer_names = [f"net.{n}" for n, _ in nets[0].named_buffers()]
        keys = act_keys(members)
        self.func = packing.engine(first) == "torch.func"
        if self.func:
            self.model = StackedNets(nets, runs(keys)).to(device)
        else:
            self.model = StackedMLP(nets, acts, keys).to(device)
            self.model.generators = generators
        # A search's new trials for the slots members leave: called with the number of free
        # slots and the pack's next epoch, it gives the members that `add` puts in them.
        # `leave` ends the records of the members that left and tells the study.
        self.slots = len(members)
        self.join: Callable[[int, int], list[Member]] | None = None
        self.leave: Callable[[list[Member]], None] = lambda gone: None
        # The solo order, as in its optimizer state.
        self.params, self.kinds = self.model.solo_order()
        # A solo optimizer's param group numbers its parameters in this order.
        self.param_ids = list(range(len(self.params)))
        self.optimizer = StackedOptimizer(
            self.params, first.optimizer._target_, [m.cfg.optimizer for m in members]
        )
        self.optimizer.set_groups([o.param_groups[0] for o in self.opts])
        self.seeds = [int(m.cfg.seed) for m in members]
        self.first_epoch = members[0].first_epoch  # train_pack packs members of one epoch
        if self.first_epoch:
            self._restore()

    def _build(
        self, members: list[Member]
    ) -> tuple[list[nn.Module], list[nn.Module], list[torch.Generator]]:
        """Each member's network as its solo job builds it, its activation and dropout generator;
        its optimizer, scheduler, early stopping and checkpoint callbacks kept per member."""
        nets, acts, generators = [], [], []
        for m in members:
            L.seed_everything(m.cfg.seed, workers=True, verbose=False)  # as the solo job does
            solo = instantiate(m.cfg.model)
            if m.origin.weights:
                load_weights(solo, m.origin.weights)
            if not nets:  # the members' networks differ only in their weights: one check
                check_net(solo.net, m.cfg.data.in_features, m.cfg.data.num_classes)
            summary = (m.cfg.get("callbacks") or {}).get("model_summary")
            if summary and not self.opts:  # the pack's first member: what each member trains
                depth = summary.get("max_depth", 1)
                log.info("model (each member's):\n%s", ModelSummary(solo, max_depth=depth))
            # The global generator as the solo job's dropout first draws from it.
            generators.append(torch.Generator().set_state(torch.get_rng_state()))
            nets.append(solo.net)
            # model.net.hidden_sizes=[] is a linear model: nothing to activate.
            acts.append(next((a for a, _ in hidden_activations(solo.net)), nn.Identity()))
            opt = instantiate(m.cfg.optimizer)(params=[torch.zeros(0)])
            self.opts.append(opt)
            scheduler = m.cfg.get("scheduler")
            self.schedulers.append(instantiate(scheduler)(optimizer=opt) if scheduler else None)
            callbacks = m.cfg.get("callbacks") or {}
            if es := callbacks.get("early_stopping"):
                m.early_stopping = instantiate(es)
            names = [n for n in ("model_checkpoint", "last_checkpoint") if callbacks.get(n)]
            self.checkpointers.append({n: instantiate(callbacks[n]) for n in names})
        return nets, acts, generators

    def add(self, members: list[Member], epoch: int) -> None:
        """New members join the stack after the others, to train `self.epochs` epochs of their
        own from the pack's `epoch` on, each as its solo job would from its start."""
        if not members:
            return
        nets, acts, generators = self._build(members)
        for i, m in enumerate(members):
            m.index = len(self.stack) + i
            m.joined = (epoch, self.global_step)
        self.members += members
        self.stack += members
        self.seeds += [int(m.cfg.seed) for m in members]
        new = StackedMLP(nets, acts).to(self.device)
        new.generators = generators
        self.model.add(new, runs(act_keys(self.stack)))
        self.params = self.model.solo_order()[0]
        self.optimizer.add([o.param_groups[0] for o in self.opts[-len(members) :]], self.params)
        log.info("pack: %d new member(s) joined the stack, %d train", len(members), len(self.stack))

    def member_epoch(self, m: Member, epoch: int) -> int:
        """The member's own epoch in the pack's `epoch`."""
        return epoch - m.joined[0]

    def member_step(self, m: Member) -> int:
        """The member's own global step (optimizer steps taken)."""
        return self.global_step - m.joined[1]

    @torch.no_grad()
    def _restore(self) -> None:
        """Each member's state at the end of its last.ckpt's epoch: weights, optimizer state and
        step count, scheduler, early stopping, best so far (value, checkpoint, weights), metrics."""
        for m in self.members:
            ckpt = checkpoints.load(m.origin.ckpt)
            self.global_step = self.optimizer.steps[m.index] = int(ckpt["global_step"])
            opt = ckpt["optimizer_states"][0]["state"]
            # As Lightning restores a solo job's optimizer (its learning rate) and scheduler.
            saved = ckpt["optimizer_states"][0]["param_groups"]
            for group, numbers in zip(self.opts[m.index].param_groups, saved, strict=True):
                group.update({k: v for k, v in numbers.items() if k != "params"})
            if scheduler := self.schedulers[m.index]:
                scheduler.load_state_dict(ckpt["lr_schedulers"][0])
            if m.early_stopping:
                m.early_stopping.load_state_dict(ckpt["callbacks"][m.early_stopping.state_key])
            for i, (name, p, kind, state) in enumerate(
                zip(self.names, self.params, self.kinds, self.optimizer.state, strict=True)
            ):
                put_solo(p, m.index, ckpt["state_dict"][name], kind)
                if not state:
                    self.optimizer._init_state(p, state)
                for key, t in state.items():
                    if key in opt.get(i, {}):
                        put_solo(t, m.index, opt[i][key], kind)
            self._put_buffers(m, ckpt["state_dict"])
            m.best = float(ckpt["state_dict"]["val_acc_best.max_value"])
            m.metrics = dict(ckpt.get("metrics") or {})
            m.last_path = m.origin.ckpt
            for key, cb in ckpt["callbacks"].items():
                best_of = key.startswith("ModelCheckpoint") and "'monitor': None" not in key
                if best_of and cb.get("best_model_path"):
                    m.best_score = float(cb["best_model_score"])
                    m.best_path = Path(cb["best_model_path"])
                    best = checkpoints.load(m.best_path)
                    m.best_state = {n: best["state_dict"][n] for n in self.state_names}
        self.optimizer.set_groups([o.param_groups[0] for o in self.opts])

    def _put_buffers(self, m: Member, state: dict[str, torch.Tensor]) -> None:
        for name, b in zip(self.buffer_names, self.model.stacked_buffers, strict=True):
            b[m.index].copy_(state[name])

    def _tensors(self, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in split)

    def fit(self) -> None:
        """Trains the members under Lightning's Trainer (`PackModule`), from the pack's first
        epoch until each member has trained its epochs or left the stack."""
        self.x, self.y = self._tensors(self.datamodule.train)
        self.val = self._tensors(self.datamodule.val)  # on the device for every evaluation
        self.batch_size = int(self.members[0].cfg.data.batch_size)
        self.steps = -(-len(self.x) // self.batch_size)
        self.epoch = self.first_epoch
        if self._trains_on():
            first = self.members[0].cfg
            group = int(first.data.get("steps_per_batch") or 1)
            trainer = lightning_trainer(first, self.device, self.folder, self.callbacks)
            # Its loops' state before a step: each member's checkpoint holds it with the member's
            # own counts (_loops).
            self._loop_template = {
                f"{k}_loop": getattr(trainer, f"{k}_loop").state_dict()
                for k in ("fit", "validate", "test", "predict")
            }
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*configure_optimizers` returned `None`")
                trainer.fit(PackModule(self, group if group > 1 else STEPS_PER_BATCH))
        self.fit_seconds = self.seconds()

    def _trains_on(self) -> bool:
        """Whether a member of the stack has an epoch left to train from the pack's next one."""
        return any(self.member_epoch(m, self.epoch) < self.epochs for m in self.stack)

    def start_epoch(self) -> None:
        self.model.train()  # evaluate() left it in eval mode: no dropout there
        start = time.perf_counter()
        self.orders = self._orders(self.epoch, len(self.x))
        self.outside_steps += time.perf_counter() - start
        self.sums = torch.zeros(3, len(self.stack), device=self.device)  # loss, correct, n
        self.in_training = self.training  # changes within an epoch only when a member diverges

    def step(self, s: int) -> bool:
        """The epoch's optimizer step `s`, one minibatch of each member; False once no member
        trains (all diverged): the pack's training ends there, without the epoch's end."""
        x, y, bs, epoch = self.x, self.y, self.batch_size, self.epoch
        K = len(self.orders)
        idx = self.orders[:, s * bs : (s + 1) * bs]
        flat = idx.flatten()
        xb = x.index_select(0, flat).view(K, -1, *x.shape[1:])
        yb = y.index_select(0, flat).view(K, -1, *y.shape[1:])
        with self.autocast():
            logits = self.model(xb)
            losses = self._losses(logits, yb)
        for p in self.params:
            p.grad = None
        losses.sum().backward()
        training = self.in_training
        # Each member logs every log_every of its own steps, as its solo job does.
        due = [m for m in training if (self.member_step(m) + 1) % self.log_every == 0]
        step_logs: dict[str, torch.Tensor] = {}
        if due and self.log_grad_norms:
            layers = self.model.weighted_params()
            step_logs.update(grad_norms([[p.grad for p in ps] for ps in layers], members=1))
        if self.clip:
            clip_per_member(self.params, float(self.clip))
        self.optimizer.step()
        self.global_step += 1
        if s + 1 == self.steps:  # where the solo module steps its scheduler
            self._step_schedulers()
        with torch.no_grad():
            b = yb.shape[1]
            correct = (logits.argmax(-1) == yb).sum(1) if self.classify else losses.new_zeros(K)
            self.sums += torch.stack(
                [losses * b, correct.to(losses.dtype), losses.new_full((K,), b)]
            )
        if due:
            step_logs["train/loss"] = losses
            if self.classify:
                step_logs["train/acc"] = correct / b
            self._log_each(step_logs, due, epoch)
        if s + 1 == self.steps or self.global_step % self.log_every == 0:
            self._check_divergence(self.sums[0], epoch)
            if len(self.training) < len(training):
                self.in_training = training = self.training
                if not training:
                    return False
                # A diverged member leaves the stack now, not at the epoch's end: the others'
                # steps need not carry its frozen weights for the rest of it.
                keep = [m.index for m in training]
                self.orders, self.sums = self.orders[keep], self.sums[:, keep]
                self.leave(self._drop())
        return True

    def end_epoch(self) -> bool:
        """The members' end of the pack's epoch (`_end_epoch`), those that stopped leaving the
        stack and, in a search's pack, new trials joining it; whether the pack trains on."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the steps' time is the steps'
        start = time.perf_counter()
        self._end_epoch(self.epoch, self.sums)
        gone = self._drop()
        self.epochs_run += 1
        if self.join:  # a search's pack: who left is told, new trials take the free slots
            self.leave(gone)
            if free := self.slots - len(self.stack):
                self.add(self.join(free, self.epoch + 1), self.epoch + 1)
        self.outside_steps += time.perf_counter() - start
        self.epoch += 1
        return self._trains_on()

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:  # a disabled autocast still costs ~45 us a step on this CPU
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _orders(self, epoch: int, n: int) -> torch.Tensor:
        """Each member's batch order of the pack's `epoch`, [K, n] on the device: its solo job's
        of its own epoch, drawn as
        that job draws it (a CPU generator; a CUDA one gives other orders), sent in one copy."""
        orders = torch.stack(
            [
                batch_order(s, self.member_epoch(m, epoch), n)
                for s, m in zip(self.seeds, self.stack, strict=True)
            ]
        )
        if self.device.type == "cuda":
            orders = orders.pin_memory()
        return orders.to(self.device, non_blocking=True)

    def _losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each member's mean loss over its batch: [K]."""
        if self.classify:
            flat = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            return flat.view(len(logits), -1).mean(1)
        return F.mse_loss(logits, target, reduction="none").flatten(1).mean(1)

    def _step_schedulers(self) -> None:
        if not any(self.schedulers):
            return
        with warnings.catch_warnings():
            # Its optimizer is never stepped: the stacked one makes its updates.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
            for m in self.training:
                if scheduler := self.schedulers[m.index]:
                    scheduler.step()
        self.optimizer.set_groups([o.param_groups[0] for o in self.opts])

    @property
    def running(self) -> list[Member]:
        """The members not ended yet (early-stopped and pruned ones end with the pack)."""
        return [m for m in self.members if m.status == "running"]

    @property
    def training(self) -> list[Member]:
        return [m for m in self.stack if m.status == "running" and m.stopped is None]

    def _drop(self) -> list[Member]:
        """The members that stopped (early-stopped or pruned at an epoch's end, diverged as they
        did, failed) leave the stack: its weights, optimizer state and numbers, and every list
        kept per member, cut to the others, renumbered. One stopped early is tested first (its
        weights leave with it); its record ends with the pack's, as the others' do, unless
        `leave` ends it (a search's pack). Returns those that left."""
        keep = [m.index for m in self.training]
        gone = [m for m in self.stack if m.index not in keep]
        if not gone:
            return gone
        if self.tests:
            self._test([m for m in gone if m.status == "running"])
        self.stack = [self.stack[k] for k in keep]
        if not keep and not self.join:  # the pack has ended
            return gone
        for i, m in enumerate(self.stack):
            m.index = i
        self.opts = [self.opts[k] for k in keep]
        self.schedulers = [self.schedulers[k] for k in keep]
        self.checkpointers = [self.checkpointers[k] for k in keep]
        self.seeds = [self.seeds[k] for k in keep]
        self.model.keep(keep, runs(act_keys(self.stack)))
        self.params = self.model.solo_order()[0]
        self.optimizer.keep(keep, self.params)
        log.info("pack: %d member(s) left the stack, %d train on", len(gone), len(keep))
        return gone

    def _log_each(self, logs: dict[str, torch.Tensor], members: list[Member], epoch: int) -> None:
        values = {k: v.tolist() for k, v in logs.items()}
        for m in members:
            metrics = {k: v[m.index] for k, v in values.items()}
            m.metrics.update(metrics)
            m.log({**metrics, "epoch": self.member_epoch(m, epoch)}, self.member_step(m) - 1)

    def _check_divergence(self, loss_sums: torch.Tensor, epoch: int) -> None:
        values = loss_sums.tolist()
        for m in self.training:
            if not math.isfinite(values[m.index]):
                self.optimizer.freeze(m.index)
                error = (
                    f"Diverged: the training loss became {values[m.index]} by step "
                    f"{self.member_step(m)} (epoch {self.member_epoch(m, epoch)}): lower "
                    "optimizer.lr or change the model."
                )
                log.error("%s: %s", m.out.name, error)
                m.end("diverged", error, seconds=self.seconds(m))

    @torch.no_grad()
    def evaluate(
        self, split: tuple[torch.Tensor, torch.Tensor], units: bool, model: nn.Module | None = None
    ) -> dict:
        """Each member's loss and metric on `split`, tensors on the device, by the stacked
        `model` (default: the pack's)."""
        model = self.model if model is None else model
        model.eval()
        x, y = split
        K = len(model)
        loss, correct = torch.zeros(K, device=self.device), torch.zeros(K, device=self.device)
        r2 = 0  # torchmetrics' R2Score sums per member: targets, their squares, squared residuals
        layers = model.hidden_layers
        active = [0] * layers
        act_sum = [0] * layers

        def probe(i: int, pre: torch.Tensor, post: torch.Tensor) -> None:
            active[i] = active[i] + (pre > 0).sum(1)
            act_sum[i] = act_sum[i] + post.sum(1, dtype=torch.float32)

        bs = int(self.members[0].cfg.data.eval_batch_size)
        for xb, yb in zip(x.split(bs), y.split(bs), strict=True):
            # As Lightning runs a solo job's validation and test steps; the loss in float32, as
            # autocast computes it.
            with self.autocast():
                logits = model(xb, probe if units else None).float()
            target = yb.expand(K, *yb.shape)
            if self.classify:
                loss += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
                correct += (logits.argmax(-1) == target).sum(1)
            else:
                loss += F.mse_loss(logits, target, reduction="none").mean(2).sum(1)
                residual = target - logits
                r2 = r2 + torch.stack(
                    [target.sum(1), (target * target).sum(1), (residual * residual).sum(1)]
                )
        n = len(x)
        out = {"loss": loss / n}
        if self.classify:
            out["acc"] = correct / n
        else:
            obs, squared, rss = r2
            out["r2"] = torch.stack(
                [_r2_score_compute(squared[k], obs[k], rss[k], n) for k in range(K)]
            )
        if units:
            out.update(unit_metrics(active, act_sum, n))
        return {k: v.tolist() for k, v in out.items()}

    def _end_epoch(self, pack_epoch: int, sums: torch.Tensor) -> None:
        """Each member's end of its own epoch: its metrics, early stopping, checkpoints, pruning
        and, in a pack that refills its slots, its leaving once it has trained all its epochs."""
        loss_sum, correct, n = sums.tolist()
        val = self.evaluate(self.val, self.probe_units)
        name = self.metric
        # Once for all members: the stack on the host (one copy from a GPU).
        host = self._on_host()
        for m in self.training:
            k, step = m.index, self.member_step(m)
            epoch = self.member_epoch(m, pack_epoch)
            value = val[name][k]
            m.best = max(m.best, value)
            metrics = {
                "train/loss_epoch": loss_sum[k] / n[k],
                **({"train/acc_epoch": correct[k] / n[k]} if self.classify else {}),
                "val/loss": val["loss"][k],
                f"val/{name}": value,
                f"val/{name}_best": m.best,
                **{key: v[k] for key, v in val.items() if "/" in key},
            }
            m.metrics.update(metrics)
            m.log({**metrics, "epoch": epoch}, step - 1)
            for lg in m.loggers:
                lg.save()
            # As in a solo job, early stopping decides before the checkpoints are written: they
            # hold its state.
            stop = self._early_stop(m, epoch)
            try:
                self._checkpoint(m, host, self._loops(epoch, step), epoch)
            except Exception as e:  # its folder's fault, as for its solo job: the others go on
                error = f"{type(e).__name__}: {e}"
                log.error("%s: job failed: %s", m.out.name, error)
                m.end("failed", error, seconds=self.seconds(m))
                continue
            pruned = self.search is not None and self.search(m.out.name, epoch + 1, m.metrics)
            if not stop and pruned:
                log.info(
                    "%s: pruned after %d epoch(s) (val/%s=%.4f)", m.out.name, epoch + 1, name, value
                )
                m.record["pruned"] = {"epoch": epoch + 1, f"val/{name}": value}
                stop = True
            if stop or (self.join and epoch + 1 == self.epochs):
                m.stopped = (epoch + 1, step)
        if self.heartbeat:
            beats = {m.out: self.member_epoch(m, pack_epoch) + 1 for m in self.stack}
            self.heartbeat.beat(beats)

    @property
    def state_names(self) -> list[str]:
        """A member's state_dict names of its network: its parameters', then its buffers'."""
        return self.names + self.buffer_names

    def _on_host(self) -> Host:
        """The stacked weights, optimizer state and buffers on the CPU (the tensors themselves
        there)."""
        cpu = torch.device("cpu")
        weights = [p.detach().to(cpu) for p in self.params]
        opt_state = [{k: t.to(cpu) for k, t in s.items()} for s in self.optimizer.state]
        return weights, opt_state, [b.to(cpu) for b in self.model.stacked_buffers]

    def _checkpoint(
        self,
        m: Member,
        host: Host,
        loops: dict[str, Any],
        epoch: int,
    ) -> None:
        """The member's best (if this epoch is) and last checkpoints: each a whole file in its
        folder, serialized once where both hold the same."""
        weights, opt_state, buffers = host
        state = self.model.member_state(m.index, self.names, weights)
        state.update(
            (n, b[m.index].clone()) for n, b in zip(self.buffer_names, buffers, strict=True)
        )
        old = blob = None
        if self.keep_best and self._improved(m):
            m.best_score, m.best_state = m.metrics[self.monitor], state
            old, m.best_path = (
                m.best_path,
                m.out / "checkpoints" / f"best-epoch{epoch:03d}.ckpt",
            )
            blob = self.save(m, state, opt_state, loops, epoch)
            checkpoints.save(blob, m.best_path)
        if self.keep_last:
            last = m.out / "checkpoints" / "last.ckpt"
            if m.last_path != last:  # the checkpoint names it: the best's bytes say otherwise
                m.last_path, blob = last, None
            if blob is None:
                blob = self.save(m, state, opt_state, loops, epoch)
            checkpoints.save(blob, last)
        # Only now: killed before, last.ckpt still names a best checkpoint that exists.
        if old and old != m.best_path:
            old.unlink(missing_ok=True)

    def _improved(self, m: Member) -> bool:
        """ModelCheckpoint's decision (save_top_k=1): is this epoch the member's best so far?"""
        if self.monitor not in m.metrics:
            raise UserError(
                f"callbacks.model_checkpoint.monitor={self.monitor} is not logged: choose one of "
                f"{', '.join(sorted(m.metrics))}."
            )
        return m.best_score is None or self.better(m.metrics[self.monitor], m.best_score)

    def _early_stop(self, m: Member, epoch: int) -> bool:
        """Lightning's EarlyStopping check at the end of the member's epoch: does it stop?"""
        es = m.early_stopping
        if es is None:
            return False
        if es.monitor not in m.metrics:
            if es.strict:
                raise UserError(
                    f"callbacks.early_stopping.monitor={es.monitor} is not logged: choose one of "
                    f"{', '.join(sorted(m.metrics))}."
                )
            return False
        # The value as the solo job logs it: a float32 tensor.
        stop, reason = es._evaluate_stopping_criteria(torch.tensor(m.metrics[es.monitor]))
        if stop:
            es.stopped_epoch, es.stopping_reason_message = epoch, reason
            log.info("%s: early stopping after epoch %d: %s", m.out.name, epoch, reason)
        return stop

    def save(
        self,
        m: Member,
        state: dict[str, torch.Tensor],
        opt_state: list[dict[str, torch.Tensor]],
        loops: dict[str, Any],
        epoch: int,
    ) -> bytes:
        """A checkpoint in the solo job's format, serialized: eval.py and `ckpt_path=` read it."""
        groups = [{**g, "params": self.param_ids} for g in self.opts[m.index].param_groups]
        ckpt = {
            "epoch": epoch,
            "global_step": self.member_step(m),
            "pytorch-lightning_version": L.__version__,
            "state_dict": {**state, "val_acc_best.max_value": torch.tensor(m.best)},
            "loops": loops,
            "optimizer_states": [
                self.optimizer.member_state(m.index, groups, self.kinds, opt_state)
            ],
            "lr_schedulers": [s.state_dict()] if (s := self.schedulers[m.index]) else [],
            "callbacks": self._checkpointer_states(m),
            "metrics": dict(m.metrics),
        }
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        return buffer.getvalue()

    def _checkpointer_states(self, m: Member) -> dict[str, Any]:
        """The member's ModelCheckpoint and EarlyStopping states, so a resumed solo run knows its
        best so far and how long it has waited."""
        states = {}
        if es := m.early_stopping:
            states[es.state_key] = es.state_dict()
        for cb in self.checkpointers[m.index].values():
            if cb.monitor is None:
                cb.best_model_path = str(m.last_path or "")
            elif m.best_path is not None:
                best = torch.tensor(m.best_score)
                cb.best_model_path = cb.kth_best_model_path = str(m.best_path)
                cb.best_model_score = cb.kth_value = best
                cb.best_k_models = {str(m.best_path): best}
                cb.current_score = torch.tensor(m.metrics[cb.monitor])
            states[cb.state_key] = cb.state_dict()
        return states

    def _loops(self, epoch: int, global_step: int) -> dict[str, Any]:
        """Lightning's loop state at the end of a member's `epoch`, after `global_step` steps, so
        `ckpt_path=` resumes after it."""
        loops = copy.deepcopy(self._loop_template)
        fit = loops["fit_loop"]
        steps = global_step // (epoch + 1)
        val = -(-len(self.val[0]) // int(self.members[0].cfg.data.eval_batch_size))
        for progress, current, total in (
            (fit["epoch_loop.batch_progress"], steps, global_step),
            (fit["epoch_loop.manual_optimization.optim_step_progress"], global_step, None),
            (fit["epoch_loop.val_loop.batch_progress"], val, val),
        ):
            for scope, n in (("current", current), ("total", total or current)):
                for key in progress[scope]:
                    progress[scope][key] = n
        fit["epoch_loop.batch_progress"]["is_last_batch"] = True
        fit["epoch_loop.val_loop.batch_progress"]["is_last_batch"] = True
        fit["epoch_loop.state_dict"] = {"_batches_that_stepped": global_step}
        for scope in ("current", "total"):
            fit["epoch_progress"][scope].update(
                completed=epoch, processed=epoch + 1, ready=epoch + 1, started=epoch + 1
            )
        return loops

    def test(self) -> None:
        """The members that end in the stack, each tested as `_test` tests it."""
        self._test([m for m in self.stack if m.status == "running"])

    def _test(self, members: list[Member]) -> None:
        """These members' best-by-val weights (their last without a best) on the test set, each
        put in its place in the stack (which the test leaves changed)."""
        if not members:
            return
        with torch.no_grad():
            for m in members:
                if m.best_state is None or not self.keep_best:
                    continue
                for name, t, kind in zip(self.names, self.params, self.kinds, strict=True):
                    put_solo(t, m.index, m.best_state[name], kind)
                self._put_buffers(m, m.best_state)
        members = sorted(members, key=lambda m: m.index)
        model, rows = self.model, [m.index for m in members]
        if len(members) < len(self.stack) and not self.func:
            # A copy of the stack cut to their rows: a search's pack tests the few that leave
            # it at each rung, not the whole stack.
            model = copy.deepcopy(self.model)
            model.keep(rows, runs(act_keys(members)))
            rows = list(range(len(members)))
        tested = self.evaluate(self._tensors(self.datamodule.test), False, model)
        name = self.metric
        for m, k in zip(members, rows, strict=True):
            metrics = {"test/loss": tested["loss"][k], f"test/{name}": tested[name][k]}
            m.metrics.update(metrics)
            epochs, step = m.stopped or (self.epochs, self.member_step(m))
            m.log({**metrics, "epoch": epochs}, step)

    def seconds(self, m: Member | None = None) -> float:
        """Since the pack started, or since member `m` joined it."""
        start = m.start if m and m.start is not None else self.start
        return round(time.perf_counter() - start, 2)


# Optimizer steps per Lightning batch where `data.steps_per_batch` names none: Lightning's loop
# costs about 0.4 ms a batch, 8 steps make it about 4% of a small pack's step (README, Performance).
STEPS_PER_BATCH = 8


class PackModule(L.LightningModule):
    """A pack's training as Lightning's Trainer runs a module: each batch is `group` of the
    pack's optimizer steps (each a minibatch of every member), each epoch's end the members'
    (validation, checkpoints, early stopping, members leaving and joining the stack). The pack
    steps its own optimizer (StackedOptimizer) and writes each member's checkpoints in its solo
    job's format; the Trainer's loop, progress bar and profiler serve the whole pack."""

    def __init__(self, pack: PackTrainer, group: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pack, self.group = pack, group  # PackTrainer is no nn.Module: not a submodule

    def train_dataloader(self) -> range:
        return range(-(-self.pack.steps // self.group))

    def on_train_epoch_start(self) -> None:
        self.pack.start_epoch()

    def training_step(self, batch: int) -> None:
        first = batch * self.group
        for s in range(first, min(first + self.group, self.pack.steps)):
            if not self.pack.step(s):
                self.trainer.should_stop = True
                return

    def on_train_epoch_end(self) -> None:
        # An epoch in which every member diverged has no end.
        if self.pack.in_training and not self.pack.end_epoch():
            self.trainer.should_stop = True

    def configure_optimizers(self) -> None:
        """None: the pack steps its members itself (StackedOptimizer)."""


def lightning_trainer(
    cfg: DictConfig, device: torch.device, folder: Path, callbacks: list[L.Callback]
) -> L.Trainer:
    """The Trainer of a pack on `device` whose first member's config is `cfg`: its progress bar,
    `callbacks` (its device slot's) and profiler (one that writes a file writes it in the pack's
    `folder`: it profiles the whole pack); no logger or checkpoint of its own (each member has
    its own); as many epochs as the pack trains (PackModule ends them)."""
    configured = cfg.get("callbacks") or {}
    bar = [instantiate(configured.progress_bar)] if configured.get("progress_bar") else []
    profiler = cfg.trainer.get("profiler")
    if isinstance(profiler, DictConfig):
        profiler = instantiate(profiler, **({"dirpath": folder} if "dirpath" in profiler else {}))
    return L.Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_epochs=-1,
        callbacks=[*bar, *callbacks],
        enable_progress_bar=bool(bar),
        profiler=profiler,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


# ---------------------------------------------------------------------------------------------
# The pack job: what `train.py` runs for a job the packed sweeper made


def train_pack(cfg: DictConfig) -> dict[str, Any]:
    """Train the members listed in this job's folder (members.yaml, written by the sweeper)."""
    hc = HydraConfig.get()
    pack_dir = Path(hc.runtime.output_dir)
    fulls = OmegaConf.load(pack_dir / MANIFEST)
    with member_logs() as logs:
        members = []
        started = provenance()
        for full in fulls:
            if m := _start_member(cfg, member_from(full, len(members)), logs, started):
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
                trained = _fit_members(cfg, pack, logs, started)
            except BaseException as e:
                _end_unended([m for later in packs[p + 1 :] for m in later], e, 0.0)
                raise
            for m in trained:
                logs.drop(m)  # the next pack's lines are not about it
        return {"status": "finished", "metrics": {}}


def train_one(cfg: DictConfig) -> dict[str, Any]:
    """A job of its own (`python train.py`, a basic sweep's job) trained as a pack of one: one
    engine for every job, its one member this job in its own folder."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    composed = OmegaConf.to_container(cfg, resolve=False)
    full = OmegaConf.create({**composed, "hydra": OmegaConf.to_container(hc, resolve=False)})
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    choices = OmegaConf.to_container(hc.runtime.choices)
    started = {**provenance(), "pack": {"id": None, "size": 1, "member": 0}}
    with member_logs() as logs:
        m = _start_member(cfg, Member(resolved, out, choices, 0, full), logs, started, alone=True)
        if m is None:  # finished before
            return read_results(out)
        _fit_members(cfg, [m], logs, started)
    # Its end as a solo job's: a line and a status, not a pack's log of its member.
    error = m.record.get("error", "")
    if m.status == "diverged":
        raise Diverged(error.removeprefix("Diverged: "))
    if m.status == "failed":
        raise UserError(error.removeprefix("UserError: "))
    return m.record


def _start_member(
    cfg: DictConfig, m: Member, logs: _MemberLogs, started: dict[str, Any], alone: bool = False
) -> Member | None:
    """The member `m`, its folder and record started (with `started`: provenance() and what the
    pack adds); None where it does not train (finished before, or failed validation). `alone`:
    a job of its own (train_one), whose errors are raised where a member's are only recorded."""
    from actlab.validation import validate

    m.record = start_record(m)
    # The pack job's own `resume` too: a SLURM requeue appends `++resume=true` to it.
    resume = cfg.get("resume") or m.cfg.get("resume")
    try:
        if resume and finished_before(m.out, m.record):
            log.info("%s: finished before, skipped (resume=true)", m.out.name)
            return None
    except UserError as e:  # a finished run of another config: left as it is
        if alone:
            raise
        log.error("%s: job failed: %s", m.out.name, e)
        return None
    m.origin = origin_of(m.cfg.get("ckpt_path"), bool(resume), m.out, m.record)
    if m.origin.here and (
        done := nothing_to_train(m.out, m.origin.epoch, m.cfg.trainer.get("max_epochs"))
    ):
        log.info(done)
        return None
    logs.add(m)
    if earlier := put_earlier_aside(m.out, m.origin):
        log.info("%s: the earlier attempt is kept in %s", m.out.name, earlier)
    m.record.update(m.origin.record)
    m.record.update(started)
    m.write()
    try:
        validate(m.cfg)
    except UserError as e:
        if alone:  # its entry point prints it
            m.end("failed", f"UserError: {e}")
            raise
        log.error("%s: job failed: %s", m.out.name, e)
        m.end("failed", f"UserError: {e}")
        logs.drop(m)  # the pack's lines are not about it
        return None
    return m


class _MemberLogs(logging.Handler):
    """Each member's `train.log`, as a solo job has one: the pack's lines, except that a line
    about one member (`<its folder>: ...`) goes to that member's log only."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Any] = {}
        self.own: set[Path] = set()  # the files Hydra's handlers write already

    def add(self, m: Member) -> None:
        path = (m.out / "train.log").resolve()
        if path in self.own:  # a pack of one in its job's folder: Hydra's log is the member's
            return
        self.files[m.out.name] = open(path, "a")  # noqa: SIM115

    def drop(self, m: Member) -> None:
        """Lines are not about `m` from now on (once dropped, a member stays so)."""
        if file := self.files.pop(m.out.name, None):
            file.close()

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
    handler.own = {
        Path(h.baseFilename).resolve() for h in root.handlers if isinstance(h, logging.FileHandler)
    }
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()


def _fit_members(
    cfg: DictConfig, members: list[Member], logs: _MemberLogs, started: dict[str, Any]
) -> list[Member]:
    """Train `members` as one pack (and the trials that join it in a search, their records
    started with `started`): returns every member that trained in it."""
    slot = None
    trainer: PackTrainer | None = None
    heartbeat = Heartbeat([m.out for m in members])
    heartbeat.start()
    try:
        torch.set_num_threads(cfg.get("threads") or usable_cores())
        torch.set_float32_matmul_precision(members[0].cfg.get("matmul_precision", "highest"))
        slot = instantiate(cfg.launch).acquire() if cfg.get("launch") else None
        launch = {"launch": slot.info()} if slot else {}
        for m in members:
            m.record.update(launch)
        device = torch.device(slot.device if slot and not slot.simulated else packing.device(cfg))
        path = " (torch.func)" if packing.engine(members[0].cfg) == "torch.func" else ""
        pack_dir = Path(HydraConfig.get().runtime.output_dir)
        if members[0].out == pack_dir:  # train_one's
            log.info("%s: trains as a pack of one on %s%s", members[0].out.name, device, path)
        else:
            log.info("pack of %d members on %s%s: %s", len(members), device, path, _names(members))
        tests = bool(cfg.get("test", True))
        trainer = PackTrainer(members, device, pack_dir, slot.sharing if slot else 1, tests)
        trainer.heartbeat = heartbeat
        trainer.callbacks = slot.callbacks() if slot else []
        if (pack_dir / SEARCH).exists():
            trainer.search = instantiate(OmegaConf.load(pack_dir / SEARCH), _convert_="all")

        def finish(m: Member) -> None:
            epochs = m.stopped[0] if m.stopped else trainer.epochs
            # The pack's epoch so far, and a member's share of it (comparable with a solo job's
            # s/epoch), with what it costs besides its steps (PackTrainer.fit).
            pack_epoch = (trainer.fit_seconds or trainer.seconds()) / max(trainer.epochs_run, 1)
            m.record["metrics"] = m.metrics
            m.record["pack"]["seconds_per_epoch"] = round(pack_epoch, 3)
            m.record["pack"]["seconds_outside_steps_per_epoch"] = round(
                trainer.outside_steps / max(trainer.epochs_run, 1), 4
            )
            for cb in trainer.callbacks:
                if isinstance(cb, ShareIdleCores):
                    m.record["launch"]["threads_per_epoch"] = cb.threads
            log.info(
                "%s: test/acc=%.4f val/acc_best=%.4f epochs=%d -> %s",
                m.out.name,
                m.metrics.get("test/acc", float("nan")),
                m.best,
                epochs,
                m.out,
            )
            m.end(
                "pruned" if "pruned" in m.record else "finished",
                epochs=epochs,
                seconds=trainer.seconds(m),
                seconds_per_epoch=round(pack_epoch / trainer.slots, 3),
                best_checkpoint=str(m.best_path) if m.best_path else None,
                device=str(device),
                threads=torch.get_num_threads(),
                precision=trainer.precision,
                matmul_precision=torch.get_float32_matmul_precision(),
            )

        if getattr(trainer.search, "refills", False) and not trainer.func:
            # A search's pack refills its slots: each member ends when it leaves the stack, its
            # trial is told at once, and the new trials the study gives train in its place.

            def leave(gone: list[Member]) -> None:
                for m in gone:
                    if m.status == "running":
                        finish(m)
                    trainer.search.tell(m.out)
                    logs.drop(m)
                    heartbeat.drop(m.out)

            manifest = [(pack_dir / MANIFEST).read_text()]  # a YAML list: more items append

            def join(free: int, epoch: int) -> list[Member]:
                fulls = trainer.search.refill(free, trainer.members[0].full)
                if fulls:  # a pack killed from now on records them too (fail_unended)
                    manifest.append(OmegaConf.to_yaml(OmegaConf.create(fulls)))
                    write_text(pack_dir / MANIFEST, "".join(manifest))
                joining = []
                for full in fulls:
                    index = len(trainer.members) + len(joining)
                    pack = {"id": pack_dir.name, "size": trainer.slots, "joined_epoch": epoch}
                    m = member_from(full, index)
                    m = _start_member(cfg, m, logs, {**started, **launch, "pack": pack})
                    if m is None:
                        trainer.search.tell(Path(full.hydra.runtime.output_dir))
                        continue
                    m.start = time.perf_counter()
                    heartbeat.add(m.out)
                    _start_loggers(m)
                    joining.append(m)
                return joining

            trainer.join, trainer.leave = join, leave
        for m in members:
            _start_loggers(m)
        trainer.fit()
        if tests:
            trainer.test()
        for m in trainer.running:
            finish(m)
        return trainer.members
    except BaseException as e:
        seconds = trainer.seconds() if trainer else 0.0
        everyone = trainer.members if trainer else members
        if (stop := _end_unended(everyone, e, seconds)) is not None and stop is not e:
            raise stop from e  # Lightning's stand-in for the signal: exit 128 + its number
        raise
    finally:
        heartbeat.stop()
        if slot:
            slot.release()


def _start_loggers(m: Member) -> None:
    """The member's loggers, given its config and its device slot (its record's `launch`) as
    hyperparameters."""
    launch_info = {f"launch.{k}": v for k, v in m.record.get("launch", {}).items()}
    for c in (m.cfg.get("logger") or {}).values():
        if not c:
            continue
        own_run = c.get("_target_") == "actlab.loggers.wandb_logger"
        # A W&B run of its own, named from the member's hydra node, not the pack job's.
        lg = (
            instantiate(c, _partial_=True)(new_run=True, job=m.full.hydra)
            if own_run
            else instantiate(c)
        )
        m.loggers.append(lg)
        if m.origin.here and isinstance(lg, CSVLogger):  # its later epochs come again
            drop_rows_after(Path(lg.log_dir) / "metrics.csv", m.first_epoch - 1)
        if own_run:
            actlab_loggers.announce(lg)
        lg.log_hyperparams({**logged_config(m.cfg, m.choices), **launch_info})


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
        last = m.last_path or m.origin.ckpt
        last = str(last) if last else None
        m.end("interrupted", str(stop), last_checkpoint=last, seconds=seconds)
        if last:
            log.info("%s: interrupted; to resume: python train.py ckpt_path=%s", m.out.name, last)
        else:
            log.info("%s: interrupted before a checkpoint was saved", m.out.name)
    return stop


def _names(members: list[Member]) -> str:
    return ", ".join(m.out.name for m in members)
