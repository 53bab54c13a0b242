"""A run folder from its checkpoint: where it is, what it was trained with, how to continue it.

A run folder (a single run, or one job of a sweep) holds `.hydra/` (config.yaml, overrides.yaml),
`checkpoints/`, `results.json` and the loggers' files; a checkpoint lies in `<run>/checkpoints/`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from actlab import CONFIG_DIR, ROOT, checkpoints
from actlab.errors import UserError
from actlab.results import MOVED, RESULTS, config_differences, read_results, upgraded
from actlab.validation import validate

log = logging.getLogger(__name__)

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
    """The config a run was trained with (unresolved, as Hydra saved it; an older version's
    read as today's configs say it)."""
    saved = OmegaConf.load(folder / ".hydra" / "config.yaml")
    return OmegaConf.create(upgraded(OmegaConf.to_container(saved, resolve=False)))


def _moved(override: str) -> str:
    """An override of a run saved by an older version, in today's key (results.MOVED)."""
    key = _key(override)
    if key not in MOVED:
        return override
    prefix = override[: len(override) - len(override.lstrip("~+"))]
    return prefix + MOVED[key] + override[len(prefix) + len(key) :]


def refuse_moved(args: list[str]) -> None:
    """One line for a key that moved (`model.hidden_sizes=`), not Hydra's 'Could not override'."""
    for a in args:
        if (key := _key(a)) in MOVED:
            raise UserError(
                f"{key} is now {MOVED[key]} (the network is the config node model.net, its "
                f"sizes the data's): write {_moved(a)}"
            )


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
    saved = [_moved(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
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


@dataclass(frozen=True)
class Origin:
    """Where a job's training starts. `ckpt` continues a run's whole state (weights, optimizer,
    epochs, best so far) from its `epoch`: the job's own last.ckpt under `+resume=true`, or
    `ckpt_path=` in a run folder. `weights`, a `ckpt_path=` from anywhere else, gives only its
    network's weights to a run from epoch 0. `source` is what the record names."""

    ckpt: Path | None = None
    weights: Path | None = None
    epoch: int = 0
    here: bool = False  # continues in the checkpoint's own run folder
    source: str | None = None
    given: bool = False  # by `ckpt_path=`

    @property
    def record(self) -> dict[str, str]:
        """The record's note of where the run started: resumed_from or initialized_from."""
        if self.source is None:
            return {}
        return {("initialized_from" if self.weights else "resumed_from"): self.source}


def origin_of(ckpt_path: str | None, resume: bool, out: Path, record: dict[str, Any]) -> Origin:
    """Where a job in folder `out` (this attempt's `record`) starts training, given its
    `ckpt_path=` and `+resume=true`."""
    if ckpt_path:
        given, folder = Path(ckpt_path), run_dir(Path(ckpt_path))
        if folder is None:
            return Origin(weights=given, source=ckpt_path, given=True)
        epoch, here = trained_epochs(given), folder == out.resolve()
        return Origin(given, epoch=epoch, here=here, source=ckpt_path, given=True)
    last = resumable(out, record) if resume else None
    if last is None:
        return Origin()
    return Origin(last, epoch=trained_epochs(last), here=True, source=str(last))


def put_earlier_aside(out: Path, origin: Origin) -> Path | None:
    """Where the folder's earlier attempt went: its files set aside for a run that starts anew
    there, its record and config kept for one that continues it. Called once the folder's
    `.hydra/` is this attempt's (Hydra or, for a pack's member, member_from wrote it); a single
    run's `ckpt_path=` continuation was kept by train.main before that."""
    if not origin.here:
        return set_aside(out)
    if origin.given and HydraConfig.get().mode == RunMode.RUN:
        return None
    return keep_attempt(out, origin.ckpt, hydra_written=True)


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


def _new_attempt(folder: Path, record: dict[str, Any]) -> Path:
    """`<folder>/attempts/<n>-<status>/`, made: the next number, the earlier record's status."""
    attempts = folder / ATTEMPTS
    n = len(list(attempts.iterdir())) + 1 if attempts.is_dir() else 1
    dest = attempts / f"{n}-{record.get('status', 'unknown')}"
    dest.mkdir(parents=True)
    return dest


def set_aside(folder: Path) -> Path | None:
    """Move an earlier attempt's files to `<folder>/attempts/<n>-<status>/`; None if none.

    A run that starts from scratch in a folder that already holds one (a failed job of a sweep
    run again) then starts clean: no appended metrics.csv or W&B run, no stale checkpoints, and
    nothing of the earlier attempt lost. `.hydra/` (already this attempt's) and the log stay.
    """
    record = read_results(folder)
    if record is None:
        return None
    dest = _new_attempt(folder, record)
    for path in folder.iterdir():
        if path.name not in (ATTEMPTS, ".hydra") and path.suffix != ".log":
            path.rename(dest / path.name)
    return dest


def keep_attempt(folder: Path, ckpt: Path | None = None, hydra_written: bool = False) -> Path:
    """Copy a run's record and config to `<folder>/attempts/<n>-<status>/` before it resumes.

    The resumed attempt continues the folder's checkpoints and metrics, but rewrites
    results.json and `.hydra/`: should it fail, the earlier attempt's stay readable here. Where
    Hydra has already written this attempt's `.hydra/` (a sweep's job), the earlier config.yaml
    and overrides.yaml are rebuilt from its record. Checkpoints that `ckpt` does not know of
    (written after it by an attempt killed between a new best and last.ckpt), which the resumed
    attempt writes again, are moved there; temporary files of killed saves are removed.
    """
    record = read_results(folder) or {}
    dest = _new_attempt(folder, record)
    # Not in a `.hydra/` of its own: the sweep table takes every folder with one for a job.
    hydra = [] if hydra_written else sorted((folder / ".hydra").glob("*.yaml"))
    for path in [folder / RESULTS, *hydra]:
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    if hydra_written and "composed_config" in record:
        OmegaConf.save(OmegaConf.create(record["composed_config"]), dest / "config.yaml")
    if hydra_written and "job" in record:
        OmegaConf.save(OmegaConf.create(record["job"]["overrides"]), dest / "overrides.yaml")
    if ckpt is None:
        return dest
    # By name: a run folder that was copied keeps its checkpoints' names, not their paths.
    known = {p.name for p in _named_checkpoints(_checkpoint(ckpt))} | {ckpt.name}
    for path in ckpt.parent.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()  # a save that was killed: never renamed into place
        elif path.name not in known:
            (dest / "checkpoints").mkdir(exist_ok=True)
            path.rename(dest / "checkpoints" / path.name)
    return dest


def check_output_dirs(args: list[str]) -> None:
    """Fail in one line, before Hydra tries, where the run folder cannot be made.

    Looks at the folders the command line names (hydra.run.dir, hydra.sweep.dir, paths.log_dir;
    the repository's logs/ by default) by doing what Hydra will do: making the folder (then
    removing what was made) or, where it exists, a file in it. Asking os.access would not do:
    root passes it for /proc or a read-only mount, where Hydra then fails.
    """
    given = {_key(a): _unquote(a.split("=", 1)[1]) for a in args if "=" in a}
    names = ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir")
    folders = [given[n] for n in names if n in given] or [str(ROOT / "logs")]
    for folder in folders:
        if "${" in folder:
            continue
        path = Path(folder).absolute()
        missing = []
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
        try:
            if missing:
                missing[0].mkdir(parents=True, exist_ok=True)
            else:
                fd, probe = tempfile.mkstemp(dir=path, prefix=".actlab-probe-")
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            raise UserError(
                f"cannot create the run folder under {folder} ({e.strerror}): {path} is not a "
                "folder you can write to. Fix its permissions or point paths.log_dir at another "
                "folder."
            ) from None
        finally:
            for made in missing:  # deepest first; a folder another process filled stays
                with contextlib.suppress(OSError):
                    made.rmdir()


# ---------------------------------------------------------------------------------------------
# Continuing a job that did not end (`+resume=true`)

LAST = "last.ckpt"
# Records of a job whose process ended before the job did: a kill, a signal, a lost node.
UNENDED = ("running", "interrupted", "lost")


def _checkpoint(ckpt: Path) -> dict[str, Any]:
    return checkpoints.load(ckpt, mmap=True)


def _named_checkpoints(state: dict[str, Any]) -> set[Path]:
    """The checkpoint files the ModelCheckpoint states in `state` know of (best, top k, last)."""
    paths = set()
    for cb in (state.get("callbacks") or {}).values():
        if not isinstance(cb, dict):
            continue
        named = [cb.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
        for p in [*named, *(cb.get("best_k_models") or {})]:
            if p:
                paths.add(Path(p))
    return paths


def resumable(folder: Path, record: dict[str, Any]) -> Path | None:
    """The last.ckpt that `+resume=true` continues the job in `folder` from, or None (it then
    starts over): the job did not end (its record says running, interrupted or lost), ran the
    config of `record` (this attempt's) by every key that can change a result, and left a whole
    last.ckpt whose best checkpoint exists."""
    earlier = read_results(folder)
    if not earlier or earlier.get("status") not in UNENDED:
        return None
    ckpt = folder / "checkpoints" / LAST
    status = earlier["status"]
    why = None
    if not ckpt.is_file():
        why = "no checkpoints/last.ckpt (stopped in its first epoch)"
    elif differing := config_differences(
        earlier.get("composed_config") or {}, record["composed_config"]
    ):
        why = f"its config differs ({'; '.join(differing)})"
    else:
        try:
            state = _checkpoint(ckpt)
            int(state["epoch"])
        except Exception as e:
            why = f"its last.ckpt is not readable ({type(e).__name__})"
        else:
            missing = sorted(str(p) for p in _named_checkpoints(state) if not p.is_file())
            if missing:
                why = f"its last.ckpt names checkpoints that are gone ({', '.join(missing)})"
    if why:
        log.info(
            "%s: the %s attempt cannot be continued, %s: starts over", folder.name, status, why
        )
        return None
    log.info("%s: continues the %s attempt from %s", folder.name, status, ckpt)
    return ckpt


def checkpoint_metrics(ckpt: Path) -> dict[str, float]:
    """The metrics a run had when it saved `ckpt` (what its record would say had it ended then)."""
    return dict(_checkpoint(ckpt).get("metrics") or {})


def drop_rows_after(metrics_csv: Path, epoch: int) -> None:
    """Remove a csv logger's rows of epochs after `epoch`: a continuation logs them again."""
    if not metrics_csv.is_file():
        return
    with open(metrics_csv, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "epoch" not in rows[0]:
        return
    col = rows[0].index("epoch")

    def before(row: list[str]) -> bool:  # a row cut short by a kill is dropped too
        try:
            return len(row) == len(rows[0]) and float(row[col]) <= epoch
        except ValueError:
            return False

    kept = [rows[0], *filter(before, rows[1:])]
    if len(kept) == len(rows):
        return
    tmp = metrics_csv.with_name(f".{metrics_csv.name}.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, metrics_csv)
