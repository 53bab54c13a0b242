"""A run folder from its checkpoint: where it is, what it was trained with, how to continue it.

A run folder (a single run, or one job of a sweep) holds `.hydra/` (config.yaml, overrides.yaml),
`checkpoints/`, `results.json` and the loggers' files; a checkpoint lies in `<run>/checkpoints/`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from actlab.errors import UserError

CKPT_ARG = "ckpt_path="


def _key(override: str) -> str:
    return override.lstrip("~+").split("=", 1)[0]


def quote(value: str) -> str:
    """A value Hydra reads as one string, whatever it holds (job folders contain `=` and `,`)."""
    q = '"' if "'" in value else "'"
    return f"{q}{value}{q}"


def checkpoint_arg(args: list[str]) -> Path | None:
    """The checkpoint named by `ckpt_path=` among command-line overrides, quoted or not."""
    values = [a[len(CKPT_ARG) :] for a in args if a.startswith(CKPT_ARG)]
    if not values or values[-1] in ("", "null"):
        return None
    value = values[-1]
    if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]:
        value = value[1:-1]
    path = Path(value)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: give a .ckpt file from a run's checkpoints/.")
    return path


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
