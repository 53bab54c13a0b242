"""A run folder from its checkpoint: where it is, what it was trained with, how to continue it.

A run folder (a single run, or one job of a sweep) holds `.hydra/` (config.yaml, overrides.yaml),
`checkpoints/`, `results.json` and the loggers' files; a checkpoint lies in `<run>/checkpoints/`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from actlab import CONFIG_DIR, ROOT, checkpoints
from actlab.errors import UserError
from actlab.results import RESULTS, read_results
from actlab.validation import validate

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
    if path is not None:
        checkpoints.load(path, mmap=True)  # mmap: reads the structure, not the tensors


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
    state = checkpoints.load(ckpt, mmap=True)
    try:
        return int(state["epoch"]) + 1
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt} is not a training checkpoint ({e!r}): give a .ckpt file.") from e


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Only the network's weights (`net.*`) of a checkpoint: no epoch, optimizer or best."""
    state = checkpoints.load(ckpt)["state_dict"]
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    try:
        model.net.load_state_dict(net)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise UserError(
            f"the weights in {ckpt} do not fit this model ({reason}): give the model.* "
            "settings they were trained with."
        ) from e


def check_before_run(args: list[str]) -> DictConfig | None:
    """The config of a single run that starts from a checkpoint, checked against it; None
    where there is nothing to check (no `ckpt_path=`, a multirun, a flag).

    Runs before Hydra writes the run folder's `.hydra/`: a resume that does not fit its
    checkpoint (another architecture, a bad override, a file that is no training checkpoint)
    is refused with the folder exactly as it was.
    """
    ckpt = checkpoint_arg(args)
    if ckpt is None or any(a.startswith("-") for a in args):
        return None
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=args)
    validate(cfg)
    state = checkpoints.load(ckpt, mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise UserError(f"{ckpt} is not a training checkpoint (no state_dict): give a .ckpt file.")
    if run_dir(ckpt) is not None:
        trained_epochs(ckpt)
    with torch.device("meta"):  # the shapes, without memory or initialization
        model = instantiate(cfg.model)
    # A checkpoint from a run folder restores the whole module, one from elsewhere its `net.*`.
    only = None if run_dir(ckpt) is not None else "net."
    _check_fits(state["state_dict"], model.state_dict(), only)
    return cfg


def _shape(t: object) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_fits(saved: dict, built: dict, only: str | None) -> None:
    """One line naming the first tensor where the checkpoint and the config's model differ."""
    keys = [k for k in [*built, *(k for k in saved if k not in built)] if k.startswith(only or "")]
    differ = [
        k for k in keys if k not in saved or k not in built or _shape(saved[k]) != _shape(built[k])
    ]
    if not differ:
        return
    k = differ[0]
    has = f"{k} {_shape(saved[k])}" if k in saved else f"no {k}"
    if k not in built:
        builds = f"no {k}"
    else:  # the tensor's name once, where both have it
        builds = _shape(built[k]) if k in saved else f"{k} {_shape(built[k])}"
    more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
    todo = (
        "give the model.* settings it was trained with"
        if only
        else "a resume continues the model its run trained, so drop the model.* overrides "
        "(the run's own are in its .hydra/overrides.yaml), or start a new run"
    )
    raise UserError(f"checkpoint has {has}, the config builds {builds}{more}: {todo}.")


def resumed_here(args: list[str]) -> Path | None:
    """The run folder a single run continues in place (see resume_args), else None."""
    ckpt = checkpoint_arg(args)
    folder = run_dir(ckpt) if ckpt is not None else None
    given = [_unquote(a.split("=", 1)[1]) for a in args if a.startswith("hydra.run.dir=")]
    if folder is None or not given or "-m" in args or "--multirun" in args:
        return None
    return folder if Path(given[-1]).resolve() == folder else None


def nothing_to_train(folder: Path, epochs: int, max_epochs: int | None) -> str | None:
    """Why a finished run resumed with no epoch left to train is left as it is, else None."""
    earlier = read_results(folder) or {}
    if max_epochs is None or epochs < max_epochs or earlier.get("status") != "finished":
        return None
    return (
        f"{folder.name}: already trained {epochs} epochs (trainer.max_epochs={max_epochs}), "
        "nothing to do: its record is unchanged. A larger trainer.max_epochs trains it longer."
    )


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


def keep_attempt(folder: Path) -> Path:
    """Copy a run's record and config to `<folder>/attempts/<n>-<status>/` before it resumes.

    The resumed attempt continues the folder's checkpoints and metrics, but rewrites
    results.json and `.hydra/`: should it fail, the earlier attempt's stay readable here.
    """
    record = read_results(folder) or {}
    attempts = folder / ATTEMPTS
    n = len(list(attempts.iterdir())) + 1 if attempts.is_dir() else 1
    dest = attempts / f"{n}-{record.get('status', 'unknown')}"
    dest.mkdir(parents=True)
    # Not in a `.hydra/` of its own: the sweep table takes every folder with one for a job.
    for path in [folder / RESULTS, *sorted((folder / ".hydra").glob("*.yaml"))]:
        if path.is_file():
            shutil.copy2(path, dest / path.name)
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
