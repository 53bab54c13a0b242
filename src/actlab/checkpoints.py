"""Checkpoints: read as untrusted input (torch's weights-only unpickler), written atomically.

A `.ckpt` file is a pickle, and a pickle may name any function to call while it is read: a
shared "pretrained" file could run a command as the user who loads it. Every load of this
project (the checks before a run, eval.py, and Lightning's own through SafeCheckpointIO) goes
through `load`, which builds only tensors and plain containers and refuses any other type before
anything of the file runs. The project's checkpoints (solo runs, pack members, every callback
of configs/callbacks) hold no other type. A user whose own module or callbacks save one names
it in ACTLAB_SAFE_GLOBALS: an environment variable, not a config key, because a run folder's
saved overrides are replayed on resume and must not be able to allow anything.

Every checkpoint this project writes (Lightning's through SafeCheckpointIO, a pack member's)
goes through `save`: a kill at any moment leaves the earlier file or the new one, whole.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from actlab.errors import UserError

SAFE_GLOBALS = "ACTLAB_SAFE_GLOBALS"


def allowed_globals() -> list[Any]:
    """The types ACTLAB_SAFE_GLOBALS names (`module.Class`, separated by commas or spaces)."""
    allowed = []
    for name in os.environ.get(SAFE_GLOBALS, "").replace(",", " ").split():
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError, ValueError) as e:
            raise UserError(
                f"{SAFE_GLOBALS} names {name}, which cannot be imported ({e}): give each type "
                "as module.Class, importable here."
            ) from e
    return allowed


def load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """What `torch.save` wrote to `path`, read by torch's weights-only unpickler.

    A file that holds a type not allowed is refused with a UserError naming it; a file torch
    cannot read at all (truncated, garbage, not torch's format) with another.
    """
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:
            raise _unreadable(path, e) from e
        what = refused.group(1)
        raise UserError(
            f"{path} holds {what}, which could run code when the file is loaded, so it is not "
            f"loaded: use checkpoints you trust; a type of your own is allowed with "
            f"{SAFE_GLOBALS}={what}."
        ) from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: str | Path, e: Exception) -> UserError:
    return UserError(
        f"{path} is not a checkpoint torch can read ({type(e).__name__}): give a .ckpt file "
        "from a run's checkpoints/."
    )


def save(checkpoint: dict[str, Any] | bytes, path: Path) -> None:
    """torch.save to a temporary file beside `path` (or bytes torch.save made: a pack's member
    writes one serialization to its best and last checkpoints), synced to disk, then renamed
    over it.

    Lightning writes a temporary file in $TMPDIR and moves it into place: a copy, cut short by
    a kill, where $TMPDIR is on another file system (as on most clusters), and never synced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(checkpoint, bytes):
                f.write(checkpoint)
            else:
                torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, reading with `load` (`ckpt_path=` of fit and test) and
    writing with `save`.

    The file a ModelCheckpoint drops (its previous best) is removed only once the next file is
    saved (the same epoch's last.ckpt) or training ends: killed in between, last.ckpt still
    names a best checkpoint that exists.
    """

    def __init__(self) -> None:
        super().__init__()
        self.doomed: list[Path] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        save(checkpoint, Path(path))
        self._remove_doomed(keep=Path(path))

    def remove_checkpoint(self, path: str | Path) -> None:
        self.doomed.append(Path(path))

    def teardown(self) -> None:
        self._remove_doomed()

    def _remove_doomed(self, keep: Path | None = None) -> None:
        for path in self.doomed:
            if path != keep:
                path.unlink(missing_ok=True)
        self.doomed = []

    def load_checkpoint(
        self, path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load(path, map_location)  # weights only, whatever the caller asks
