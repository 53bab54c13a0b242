"""Every rule on config values, in one place: checked before anything is built or trained.

`validate(cfg)` runs at the entry points (train, eval) on the composed config and reports all
problems at once, named by the config key the user types. `check_split` is the one rule that
needs the data's size; the DataModule calls it once the data is loaded. `check_net` is the one
that needs the built network; training calls it before the first step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from actlab.errors import UserError

if TYPE_CHECKING:
    import torch

_MISSING = object()
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _per_channel(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """`ok` for a number, or for each of a non-empty list (a value per image channel)."""
    return lambda v: ok(v) or (isinstance(v, list | ListConfig) and len(v) > 0 and all(map(ok, v)))


# The precisions the solo module and a pack train in (Lightning's names; 32 is 32-true).
PRECISIONS = (32, "32", "32-true", "bf16-mixed", "16-mixed")
MATMUL_PRECISIONS = ("highest", "high", "medium")

# (config key, test, what the value must be). A key the config does not have is not checked.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", lambda v: _int_at_least(0)(v) and v < 2**32, "an integer in [0, 2**32 - 1]"),
    ("threads", lambda v: v is None or _int_at_least(1)(v), "null (all usable cores) or >= 1"),
    ("data.batch_size", _int_at_least(1), "an integer >= 1"),
    ("data.eval_batch_size", _int_at_least(1), "an integer >= 1"),
    ("data.val_size", _int_at_least(1), "an integer >= 1"),
    ("data.train_size", lambda v: v is None or _int_at_least(1)(v), "null or an integer >= 1"),
    ("data.mean", _per_channel(_number), "a number, or a list of them (one per channel)"),
    (
        "data.std",
        _per_channel(lambda v: _number(v) and v > 0),
        "a number > 0, or a list of them (one per channel)",
    ),
    ("data.in_features", _int_at_least(1), "an integer >= 1"),
    ("data.num_classes", _int_at_least(1), "an integer >= 1"),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("optimizer.momentum", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    (
        "model.net.hidden_sizes",
        lambda v: isinstance(v, list | ListConfig) and all(_int_at_least(1)(h) for h in v),
        "a list of integers >= 1 ([] is a linear model)",
    ),
    ("model.net.dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("model.act.negative_slope", _number, "a finite number"),
    ("model.act.stackable", lambda v: isinstance(v, bool), "true or false"),
    # -1 would train forever with no message, 0 would record an untrained model as finished.
    ("trainer.max_epochs", lambda v: v is None or _int_at_least(1)(v), "an integer >= 1"),
    ("trainer.log_every_n_steps", _int_at_least(1), "an integer >= 1"),
    ("model.gradient_clip_val", lambda v: v is None or (_number(v) and v > 0), "null or > 0"),
    # The module optimizes manually (for speed), which Lightning's own clipping cannot serve.
    ("trainer.gradient_clip_val", lambda v: v is None, "null: use model.gradient_clip_val"),
    ("trainer.accumulate_grad_batches", lambda v: v == 1, "1: the module steps every batch"),
    ("trainer.precision", lambda v: v in PRECISIONS, "32-true, bf16-mixed or 16-mixed"),
    ("matmul_precision", lambda v: v in MATMUL_PRECISIONS, "highest, high or medium"),
]


def _unknown_arguments(node: DictConfig, key: str) -> list[str]:
    """Keys of a `_target_` node that its class or function does not accept.

    Catches a key forced in with `+` (`+model.act.negative_slope=0.1` on ReLU) before it becomes
    a TypeError deep inside instantiate.
    """
    problems = []
    target = node.get("_target_")
    if isinstance(target, str):
        try:
            obj = get_object(target)
        except (ImportError, AttributeError, ValueError):
            return [f"{key}._target_={target} cannot be imported"]
        try:
            params = inspect.signature(obj).parameters
        except (ValueError, TypeError):  # no signature to check against (some C extensions)
            params = None
        kinds = [p.kind for p in (params or {}).values()]
        # An activation's `stackable:` is read by the packing rules, not passed to its class.
        own = {"stackable"} if key.rsplit(".", 1)[-1] == "act" else set()
        if params is not None and inspect.Parameter.VAR_KEYWORD not in kinds:
            for name in sorted(set(node.keys()) - _HYDRA_KEYS - own - set(params)):
                accepted = ", ".join(params) or "nothing"
                problems.append(f"{key}.{name}: {target} takes no {name!r} (it takes: {accepted})")
    for name, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig):
            problems += _unknown_arguments(child, f"{key}.{name}" if key else str(name))
    return problems


def _data_fits_model(cfg: DictConfig) -> list[str]:
    """The model keys the data's source needs (its `model_needs`): real targets need
    model.task=regression. Its sizes the data config says itself (data.in_features, ...)."""
    target = OmegaConf.select(cfg, "data.source._target_", default=None)
    model = OmegaConf.select(cfg, "model", default=None)
    if not isinstance(target, str) or not isinstance(model, DictConfig):
        return []
    try:
        needs = getattr(get_object(target), "model_needs", {})
    except (ImportError, AttributeError, ValueError):  # reported by _unknown_arguments
        return []
    if all(model.get(k) == v for k, v in needs.items()):
        return []
    wanted = " ".join(f"model.{k}={v}" for k, v in needs.items())
    return [f"the data ({target}) needs {wanted}: add these overrides"]


def _data_sizes(cfg: DictConfig) -> list[str]:
    """The sizes the network reads from the data config (`${data.in_features}`, ...)."""
    if not isinstance(OmegaConf.select(cfg, "data", default=None), DictConfig):
        return []
    return [
        f'data.{key} is not set: the data config says it, the network reads it (README "Extending")'
        for key in ("in_features", "num_classes")
        if OmegaConf.select(cfg, f"data.{key}", default=_MISSING) is _MISSING
    ]


def missing_accelerator(cfg: DictConfig) -> bool:
    """The config asks for a GPU and this machine shows none."""
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator not in ("gpu", "cuda"):
        return False
    import torch

    mps = accelerator == "gpu" and torch.backends.mps.is_available()
    return not (torch.cuda.is_available() or mps)


def _accelerator_present(cfg: DictConfig) -> list[str]:
    if not missing_accelerator(cfg):
        return []
    accelerator = cfg.trainer.accelerator
    return [f"trainer.accelerator={accelerator} but no GPU is visible: use trainer=cpu"]


def _precision_runs_here(cfg: DictConfig) -> list[str]:
    """16-mixed on a CPU, which Lightning would silently train in bf16-mixed instead."""
    if OmegaConf.select(cfg, "trainer.precision", default=None) != "16-mixed":
        return []
    import torch

    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    if accelerator == "cpu" or (accelerator == "auto" and not gpu):
        return [
            "trainer.precision=16-mixed needs a GPU (on a CPU Lightning would train in bf16): "
            "use trainer.precision=bf16-mixed on a CPU"
        ]
    return []


def validate(cfg: DictConfig) -> None:
    """Raise one UserError that lists every value that breaks a rule."""
    problems = []
    for key, ok, requirement in RULES:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not ok(value):
            problems.append(f"{key}={value} must be {requirement}")
    problems += _unknown_arguments(cfg, "") + _data_fits_model(cfg) + _data_sizes(cfg)
    problems += _accelerator_present(cfg) + _precision_runs_here(cfg)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def check_net(net: torch.nn.Module, in_features: int, num_classes: int) -> None:
    """Refuse a network that does not take the data's rows to one output per class (target).

    One forward of two zero rows, in eval mode and without gradients: no weight, running
    statistic or random stream changes.
    """
    import torch

    name = type(net).__name__
    training = net.training
    param = next(net.parameters(), None)
    x = torch.zeros(2, in_features, device=param.device if param is not None else "cpu")
    net.eval()
    try:
        with torch.no_grad():
            out = net(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.net ({name}) cannot take the data's rows [batch, {in_features}] "
            f"(data.in_features): {reason}. Make its input {in_features} wide."
        ) from None
    finally:
        net.train(training)
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != [2, num_classes]:
        raise UserError(
            f"model.net ({name}) gives {shape} for [2, {in_features}] rows but the data has "
            f"{num_classes} classes (data.num_classes): make its output [batch, {num_classes}], "
            "e.g. by reading ${data.num_classes} in its config."
        )


def check_split(n: int, val_size: int, train_size: int | None) -> int:
    """The number of training images, once the dataset's size `n` is known."""
    n_train = n - val_size if train_size is None else train_size
    if val_size < 1 or n_train < 1 or n_train + val_size > n:
        train = "null" if train_size is None else train_size  # as the config spells it
        raise UserError(
            f"data.val_size={val_size} and data.train_size={train} do not fit the {n} "
            f"training images: choose sizes with train + val <= {n} (and at least 1 each)."
        )
    return n_train
