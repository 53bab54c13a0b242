"""A run folder from its checkpoint: where it is, what it was trained with, how to continue it.

A run folder (a single run, or one job of a sweep) holds `.hydra/` (config.yaml, overrides.yaml),
`checkpoints/`, `results.json` and the loggers' files; a checkpoint lies in `<run>/checkpoints/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from actlab import ROOT
from actlab.errors import UserError

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
    earlier = [o for o in saved if _key(o) not in given | {"ckpt_path"}]
    here = [] if "hydra.run.dir" in given else [f"hydra.run.dir={quote(str(folder))}"]
    return [*earlier, *args, *here]


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
