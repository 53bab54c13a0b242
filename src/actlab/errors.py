"""Exceptions the entry points turn into one line: mistakes a user can fix, and divergence."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """Printed as one line by the entry points (no traceback); the message says what to do."""


class Diverged(UserError):
    """The training loss became NaN or infinite: the run stops and is recorded as `diverged`."""


def user_error(e: BaseException | None) -> UserError | None:
    """The UserError `e` is, or the one it wraps: Hydra's instantiate ("Error in call to
    target ...") and OmegaConf's resolvers raise their own exception while handling the one a
    target or resolver raised."""
    while e is not None and not isinstance(e, UserError):
        e = (
            (e.__cause__ or e.__context__)
            if isinstance(e, HydraException | OmegaConfBaseException)
            else None
        )
    return e


def _hydra_message(e: ConfigCompositionException | OverrideParseException) -> str:
    """One line for a mistake Hydra found in the command line (an unknown key or option)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, MissingConfigException) and len(lines) > 1:
        # "In 'train': Could not find 'model.act/swish'", "Available options in ...:", options,
        # then Hydra's search path.
        what = lines[0].split(": ", 1)[-1]
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search")), None)
        options = ", ".join(lines[2:end])
        if "hydra/sweeper/optuna" in what:
            return f"{what}: the Optuna sweeper is not installed: pip install -e '.[search]'"
        return f"{what}: choose one of {options} (python train.py --help lists the groups)"
    if "not in struct" in str(e.__cause__):
        key = lines[0].removeprefix("Could not override ").rstrip(".")
        return (
            f"{key} is not a key of this config: check its spelling and the options chosen "
            "(python train.py --cfg job [overrides] prints the config); a leading + adds a key"
        )
    return " ".join(lines)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Around a Hydra entry point: a UserError, raised anywhere, or a mistake Hydra finds in the
    command line ends the program with one line `error: ...`. Other exceptions keep their
    traceback."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises here instead of printing its report
    try:
        yield
    except Exception as e:
        if (found := user_error(e)) is not None:
            sys.exit(f"error: {found}")
        if isinstance(e, ConfigCompositionException | OverrideParseException):
            sys.exit(f"error: {_hydra_message(e)}")
        raise
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
