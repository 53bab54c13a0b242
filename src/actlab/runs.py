"""A run folder from its checkpoint: where it is, what it was trained with, how to continue it.

A run folder (a single run, or one job of a sweep) holds `.hydra/` (config.yaml, overrides.yaml),
`checkpoints/`, `results.json` and the loggers' files; a checkpoint lies in `<run>/checkpoints/`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from actlab import ROOT
from actlab.errors import UserError
from actlab.results import read_results

CKPT_ARG = "ckpt_path="


def _key(override: str) -> str:
    return override.lstrip("~+").split("=", 1)[0]


def _unquote(value: str) -> str:
    if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]:
        return value[1:-1]
    return value


def quote(value: str) -> str:
    """A value Hydra reads as one string, whatever it holds (job folders contain `=` and `,`)."""
    q = '"' if "'" in value else "'"
    return f"{q}{value}{q}"


def checkpoint_arg(args: list[str]) -> Path | None:
    """The checkpoint named by `ckpt_path=` among command-line overrides, quoted or not."""
    values = [a[len(CKPT_ARG) :] for a in args if a.startswith(CKPT_ARG)]
    if not values or values[-1] in ("", "null"):
        return None
    path = Path(_unquote(values[-1]))
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: give a .ckpt file from a run's checkpoints/.")
    return path


def require_checkpoint(path: Path | None) -> None:
    """Refuse a file torch cannot load (before Lightning fails on it deep inside fit or test)."""
    if path is None:
        return
    import torch

    try:  # mmap: reads the structure, not the tensors
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UserError(
            f"{path} is not a checkpoint torch can read ({type(e).__name__}): give a .ckpt file "
            "from a run's checkpoints/."
        ) from e


def run_dir(ckpt: Path) -> Path | None:
    """The run folder a checkpoint belongs to, or None for a checkpoint from elsewhere."""
    folder = ckpt.resolve().parent.parent
    return folder if (folder / ".hydra" / "config.yaml").is_file() else None


def require_run_dir(ckpt: Path) -> Path:
    folder = run_dir(ckpt)
    if folder is None:
        raise UserError(
            f"{ckpt} is not in a run folder's checkpoints/ (no .hydra/config.yaml two levels up): "
            "use a checkpoint where training left it."
        )
    return folder


def trained_config(folder: Path) -> DictConfig:
    """The config a run was trained with (unresolved, as Hydra saved it)."""
    return OmegaConf.load(folder / ".hydra" / "config.yaml")


def resume_args(args: list[str]) -> list[str]:
    """Command-line overrides that continue the run of `ckpt_path=` in its own folder.

    The run's own overrides come first, so the composed config is the one it was trained with;
    the overrides given now win (e.g. `trainer.max_epochs=20` to train longer). A checkpoint from
    outside a run folder, or a multirun, only gets its path quoted.
    """
    ckpt = checkpoint_arg(args)
    if ckpt is None:
        return args
    args = [a for a in args if not a.startswith(CKPT_ARG)] + [CKPT_ARG + quote(str(ckpt))]
    folder = run_dir(ckpt)
    if folder is None or "-m" in args or "--multirun" in args:
        return args
    given = {_key(a) for a in args}
    saved = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    # `+resume=true` told the sweep to skip finished jobs; it is not part of the job's config.
    earlier = [o for o in saved if _key(o) not in given | {"ckpt_path", "resume"}]
    here = [] if "hydra.run.dir" in given else [f"hydra.run.dir={quote(str(folder))}"]
    return [*earlier, *args, *here]


def trained_epochs(ckpt: Path) -> int:
    """The epochs a checkpoint has completed (training saves them at epoch ends)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        return int(state["epoch"]) + 1
    except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, TypeError) as e:
        raise UserError(f"{ckpt} is not a training checkpoint ({e}): give a .ckpt file.") from e


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Only the network's weights (`net.*`) of a checkpoint: no epoch, optimizer or best."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    try:
        model.net.load_state_dict(net)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise UserError(
            f"the weights in {ckpt} do not fit this model ({reason}): give the model.* "
            "settings they were trained with."
        ) from e


ATTEMPTS = "attempts"


def set_aside(folder: Path) -> Path | None:
    """Move an earlier attempt's files to `<folder>/attempts/<n>-<status>/`; None if none.

    A run that starts from scratch in a folder that already holds one (a failed job of a sweep
    run again) then starts clean: no appended metrics.csv or W&B run, no stale checkpoints, and
    nothing of the earlier attempt lost. `.hydra/` (already this attempt's) and the log stay.
    """
    record = read_results(folder)
    if record is None:
        return None
    attempts = folder / ATTEMPTS
    n = len(list(attempts.iterdir())) + 1 if attempts.is_dir() else 1
    dest = attempts / f"{n}-{record.get('status', 'unknown')}"
    dest.mkdir(parents=True)
    for path in folder.iterdir():
        if path.name not in (ATTEMPTS, ".hydra") and path.suffix != ".log":
            path.rename(dest / path.name)
    return dest


def check_output_dirs(args: list[str]) -> None:
    """Fail in one line, before Hydra tries, where the run folder cannot be made.

    Looks at the folders the command line names (hydra.run.dir, hydra.sweep.dir, paths.log_dir;
    the repository's logs/ by default): the nearest one that exists must be a folder this user
    can write to.
    """
    given = {_key(a): _unquote(a.split("=", 1)[1]) for a in args if "=" in a}
    names = ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir")
    folders = [given[n] for n in names if n in given] or [str(ROOT / "logs")]
    for folder in folders:
        if "${" in folder:
            continue
        existing = Path(folder).absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot create the run folder under {folder}: {existing} is not a folder you can "
                "write to. Fix its permissions or point paths.log_dir at another folder."
            )
