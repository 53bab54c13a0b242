"""The rules the packed sweeper asks: can these jobs share a pack, and if not, the true reason.

They fail closed: a job packs only where the engine (actlab.pack) can tell it trains as its solo
job would. Its model must be `actlab.model.MLPClassifier`, whose training the pack reproduces;
its data the template's in-memory `actlab.data.MNISTDataModule`. A network of nn.Linear layers and
one stackable activation between them is stacked by hand (actlab.stacked_nets.StackedMLP): an
activation stacks when it passes `probe` (or its config says `stackable: true`); one with
parameters stacks with them stacked per member. Any other network packs through torch.func
(actlab.stacked_nets.StackedNets) when it passes `vmap_reason`. The network is built once per
distinct model config, on the meta device (and, for torch.func, twice on the CPU for its probe).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Literal

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from actlab.data import MNISTDataModule
from actlab.model import MLPClassifier
from actlab.nets import without_stackable

# Config keys in which the members of one pack may differ.
MEMBER_KEYS = (
    "seed",
    "model.act",
    "optimizer.lr",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "optimizer.dampening",
    "optimizer.nesterov",
    "optimizer.betas",
    "optimizer.eps",
    "optimizer.amsgrad",
    # each member steps its own scheduler and early stopping
    "scheduler",
    "callbacks.early_stopping",
)
# The optimizers whose update the pack re-implements per member
# (actlab.stacked_nets.StackedOptimizer).
OPTIMIZERS = {
    "torch.optim.SGD": torch.optim.SGD,
    "torch.optim.Adam": torch.optim.Adam,
    "torch.optim.AdamW": torch.optim.AdamW,
}
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
    "precision",  # a pack's key: members of one pack train in one precision
    "profiler",  # the pack's Trainer profiles the whole pack (actlab.pack.lightning_trainer)
}
CALLBACKS = {
    "model_checkpoint",
    "last_checkpoint",
    "model_summary",
    "progress_bar",
    "dead_units",
    "early_stopping",
}
# The probe's input: a few samples of one hidden layer, values on the scale of pre-activations.
_PROBE_ROWS = 8


def solo_reason(cfg: DictConfig, alone: bool = False) -> str | None:
    """Why this job cannot be a pack member (it then runs as a solo job), or None. `alone`: why
    it cannot be a pack of one, which may also start from a checkpoint (`ckpt_path=`)."""
    if reason := _data_reason(cfg):
        return reason
    if reason := _model(cfg)[0]:
        return reason
    # After the model's check: its activation's class imports.
    if device(cfg) != "cpu":
        if cfg.model.net.get("dropout"):
            return "model.net.dropout on a GPU draws masks a pack cannot repeat per member"
        if (target := cfg.model.act.get("_target_")) and random_activation(get_object(target)):
            return f"model.act {target} on a GPU draws numbers a pack cannot repeat per member"
    if cfg.get("ckpt_path") and not alone:
        return "ckpt_path is set"
    opt = cfg.optimizer
    if opt.get("_target_") not in OPTIMIZERS:
        return f"optimizer {opt.get('_target_')} is not SGD, Adam or AdamW"
    if opt.get("maximize"):
        return "optimizer maximize is set"
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
    if trainer.get("precision") == "16-mixed":
        # One GradScaler for the stack would skip every member's step where one member's
        # gradients overflow, and scale them all by its history.
        return (
            "trainer.precision=16-mixed: each job's loss scale skips its own steps, which one "
            "stacked step cannot repeat per member (bf16-mixed packs)"
        )
    callbacks = _container(cfg.get("callbacks") or {})
    extra = sorted(k for k, v in callbacks.items() if v and k not in CALLBACKS)
    if extra:
        return f"callbacks.{extra[0]} is set"
    return None


def device(cfg: DictConfig) -> str:
    """The device type a job of this config trains on without a device slot."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node


def pack_key(cfg: DictConfig) -> str:
    """Equal for jobs that can share a pack: the config with the member keys taken out, and
    the shapes of the activation's parameters (stacked per member, so equal in a pack)."""
    shared = OmegaConf.to_container(cfg, resolve=False)
    shared.pop("hydra", None)
    for key in MEMBER_KEYS:
        *parents, leaf = key.split(".")
        node = shared
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    shared["activation parameters"] = _model(cfg)[1]
    return OmegaConf.to_yaml(OmegaConf.create(shared), sort_keys=True)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _data_reason(cfg: DictConfig) -> str | None:
    target = cfg.data.get("_target_")
    try:
        cls = get_object(target)
    except Exception:  # noqa: BLE001 -- a solo job reports it in its own words
        return f"data._target_={target} cannot be imported here"
    if cls is not MNISTDataModule:
        return f"data {target} is not actlab.data.MNISTDataModule, the in-memory data a pack reads"
    return None


# How a pack trains a network: stacked by hand (actlab.stacked_nets.StackedMLP) or through
# torch.func (actlab.stacked_nets.StackedNets).
Engine = Literal["stacked", "torch.func"]
# model config (resolved, without its optimizer and scheduler) and the data's width ->
# (solo reason, parameter shapes, engine)
_MODELS: dict[str, tuple[str | None, str, Engine | None]] = {}


def engine(cfg: DictConfig) -> Engine:
    """How a pack of jobs of this config trains their networks (for a job that can pack)."""
    decided = _model(cfg)[2]
    assert decided is not None, "engine() of a job that cannot pack"
    return decided


def _model(cfg: DictConfig) -> tuple[str | None, str, Engine | None]:
    """Why this job's model cannot be stacked (or None), the parameter shapes that members of
    one pack share ("" for none), and the engine that packs it; decided once per distinct model
    config."""
    target = cfg.model.get("_target_")
    try:
        cls = get_object(target)
    except Exception:  # noqa: BLE001
        return f"model._target_={target} cannot be imported here", "", None
    if cls is not MLPClassifier:
        return (
            f"model {target} is not actlab.model.MLPClassifier, whose training a pack reproduces",
            "",
            None,
        )
    try:
        node = OmegaConf.to_container(cfg.model, resolve=True)
        in_features = OmegaConf.select(cfg, "data.in_features")
    except Exception as e:  # noqa: BLE001
        return f"the model config does not resolve here ({type(e).__name__}: {e})", "", None
    node.pop("optimizer", None)  # the optimizer and scheduler build no part of the network
    node.pop("scheduler", None)
    key = OmegaConf.to_yaml(OmegaConf.create(node), sort_keys=True) + f"in_features: {in_features}"
    if key not in _MODELS:
        _MODELS[key] = _decide(OmegaConf.create(node), in_features)
    return _MODELS[key]


def _decide(node: DictConfig, in_features: Any) -> tuple[str | None, str, Engine | None]:
    try:
        with torch.device("meta"):
            net = instantiate(node, optimizer=None, scheduler=None).net
    except Exception as e:  # noqa: BLE001 -- the solo job reports it in its own words
        return f"the model cannot be built here ({type(e).__name__}: {e})", "", None
    act_cfg = node.get("act") or {}
    target = act_cfg.get("_target_")
    stackable = act_cfg.get("stackable")
    reason = network_reason(net)
    widths = [] if reason else [m.out_features for m in list(net)[:-1] if isinstance(m, nn.Linear)]
    # A linear model has no activation for the key to be about.
    if (reason or widths) and stackable is False:
        return f"model.act {target} has stackable: false", "", None
    if (reason or widths) and stackable not in (None, True):
        return f"model.act.stackable={stackable} is not true or false", "", None
    if reason:
        if why := vmap_reason(node, net, in_features):
            return (
                f"model.net {node.net.get('_target_')} cannot be stacked ({reason}) nor packed "
                f"through torch.func: {why}",
                "",
                None,
            )
        # Stacked by name: members of one pack have the same parameters.
        shapes = ",".join(f"{n}{tuple(p.shape)}" for n, p in net.named_parameters())
        return None, shapes, "torch.func"
    if not widths:
        return None, "", "stacked"  # a linear model: nothing to activate
    with torch.random.fork_rng(devices=[]):  # the sweeper's own random state is left alone
        act = without_stackable(instantiate(act_cfg))()
    if any(type(a) is not type(act) for a in _without_dropout(net)[1::2]):
        return f"the network's activations are not all model.act's {target}", "", None
    shapes = ",".join(f"{n}{tuple(p.shape)}" for n, p in act.named_parameters())
    if stackable or random_activation(act):  # the pack draws its numbers per member
        return None, shapes, "stacked"
    for width in sorted(set(widths)):
        if why := probe(act, width):
            return (
                f"model.act {target} cannot be stacked: {why}; if the probe is wrong, set "
                "model.act.stackable=true",
                "",
                None,
            )
    return None, shapes, "stacked"


def random_activation(act: nn.Module | type) -> bool:
    """Whether the activation draws its random numbers from a `generator` argument of its
    forward (as actlab.activations.RReLU does): a pack then gives each member its own."""
    forward = act.forward
    return "generator" in inspect.signature(forward).parameters


def network_reason(net: nn.Module) -> str | None:
    """Why a pack cannot stack this network, or None: it takes an nn.Sequential of biased
    nn.Linear layers with one activation module between each two, each activation followed by
    the same nn.Dropout or by none."""
    if not isinstance(net, nn.Sequential):
        return f"the network is a {_name(type(net))}, not an nn.Sequential"
    modules = list(net)
    dropouts = [i for i, m in enumerate(modules) if isinstance(m, nn.Dropout)]
    # Where actlab.nets puts it, each hidden layer's the same: the pack draws it per member there.
    if any(i < 2 or isinstance(modules[i - 1], nn.Linear | nn.Dropout) for i in dropouts):
        return "the network has an nn.Dropout that does not follow an activation"
    if len({modules[i].p for i in dropouts}) > 1:
        return "the network's nn.Dropout layers differ in p"
    for i, m in enumerate(_without_dropout(net)):
        linear = isinstance(m, nn.Linear)
        if i % 2 == 0 and not (linear and m.bias is not None):
            return (
                f"the network's layer {i} is {_name(type(m))} where a pack stacks only "
                "nn.Linear layers (with bias) and one activation between them"
            )
        if i % 2 == 1 and linear:
            return f"the network's layer {i} ({_name(type(m))}) is not an activation"
    if len(_without_dropout(net)) % 2 == 0:
        return "the network does not end with an nn.Linear"
    return None


_NOT_EACH = "does not give each member's output"


def vmap_reason(node: DictConfig, net: nn.Module, in_features: Any) -> str | None:
    """Why a pack cannot train this network (`net` built on the meta device from the model config
    `node`) through torch.func as each member's solo job trains it, or None.

    It stacks the members' parameters (float ones) and buffers (BatchNorm's running statistics,
    each member's updated in place in its own row). A module that draws random numbers (dropout,
    RReLU) would draw them under vmap apart from the member's solo job. The probe: two networks
    built from `node` (other weights), on a fixed random input each; vmap(functional_call) over
    their stacked parameters and buffers must give each one's own output in training mode, leave
    each one's buffers as its own forward does, and then give each one's output in eval mode.
    """
    if not isinstance(in_features, int):
        return f"data.in_features={in_features} is not an integer"
    if odd := [f"{n} ({p.dtype})" for n, p in net.named_parameters() if not p.is_floating_point()]:
        return f"its parameter {odd[0]} is not a float tensor"
    for name, m in net.named_modules():
        dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
        if dropout or isinstance(m, nn.RReLU) or random_activation(m):
            return (
                f"its module {name} ({_name(type(m))}) draws random numbers, which vmap cannot "
                "draw as each member's solo job does"
            )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, _PROBE_ROWS, in_features, generator=g)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            torch.manual_seed(0)
            nets = [instantiate(node, optimizer=None, scheduler=None).net for _ in range(2)]
        params, buffers = stack_module_state(nets)
        base = copy.deepcopy(nets[0]).to("meta")

        def together(mode: bool) -> torch.Tensor:
            base.train(mode)
            return vmap(lambda p, b, h: functional_call(base, (p, b), (h,)))(params, buffers, x)

        with torch.no_grad():
            trained = together(True)
            each = torch.stack([n.train()(x[k]) for k, n in enumerate(nets)])
            if not _close(trained, each):
                return f"torch.func.vmap of its forward over 2 members {_NOT_EACH}"
            for name, b in buffers.items():
                own = torch.stack([n.get_buffer(name) for n in nets])
                if not _close(b.double(), own.double()):
                    return (
                        f"torch.func.vmap of its forward does not update its buffer {name} as "
                        "each member's own forward does"
                    )
            each = torch.stack([n.eval()(x[k]) for k, n in enumerate(nets)])
            if not _close(together(False), each):
                return f"torch.func.vmap of its forward over 2 members in eval mode {_NOT_EACH}"
    except Exception as e:  # noqa: BLE001 -- what it raised is the reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torch.func.vmap of its forward raised {type(e).__name__} on the probe ({first})"
    return None


def _without_dropout(net: nn.Sequential) -> list[nn.Module]:
    return [m for m in net if not isinstance(m, nn.Dropout)]


def probe(act: nn.Module, width: int) -> str | None:
    """Why a pack cannot apply `act` to a hidden layer of `width` units as its solo job does,
    or None.

    No code can prove a module elementwise; the probe asks, on a fixed random input (training
    mode): no buffers (state a stack would share); the same output on a second call (no random
    numbers: the members would draw them apart from their solo jobs); the shape kept; and
    elementwise: without parameters, a permuted input gives the permuted output and a stack of
    members' inputs each member's output; with parameters (per layer or per unit), a changed
    input changes only its own output, and torch.func.vmap over members' parameters (how a pack
    applies it) gives each member's output.
    """
    if buffers := [n for n, _ in act.named_buffers()]:
        return f"it has buffers ({', '.join(buffers)})"
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(2, _PROBE_ROWS, width, generator=g)
    params = dict(act.named_parameters())
    act.train()
    try:
        with torch.no_grad():
            y = act(x[0])
            if y.shape != x[0].shape:
                return f"it changes its input's shape ({tuple(x[0].shape)} -> {tuple(y.shape)})"
            if not _close(act(x[0]), y):
                return "a second call gives another output (it draws random numbers)"
            if not params:
                perm = torch.randperm(x[0].numel(), generator=g)
                permuted = act(x[0].flatten()[perm].view_as(x[0]))
                if not _close(permuted.flatten(), y.flatten()[perm]):
                    return "a permuted input does not give the permuted output (not elementwise)"
                if not _close(act(x), torch.stack([y, act(x[1])])):
                    return "a stack of members' inputs does not give each member's output"
                return None
            changed = torch.rand(x[0].shape, generator=g) < 0.5
            other = act(torch.where(changed, x[1], x[0]))
            if not _close(other[~changed], y[~changed]):
                return "a changed input changes other outputs too (not elementwise)"
            stacked = {n: torch.stack([p, 0.5 * p + 0.25]) for n, p in params.items()}
            each = [
                functional_call(act, {n: s[k] for n, s in stacked.items()}, (x[k],)) for k in (0, 1)
            ]
            together = vmap(lambda p, h: functional_call(act, p, (h,)))(stacked, x)
            if not _close(together, torch.stack(each)):
                return "torch.func.vmap over members' parameters does not give each member's output"
    except Exception as e:  # noqa: BLE001 -- what it raised is the reason
        return f"it raised {type(e).__name__} on the probe input ({e})"
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Not bit-equal: a vectorised kernel may round its tail elements apart from the others.
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
