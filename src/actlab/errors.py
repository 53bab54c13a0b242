"""What the entry points turn into an exit: mistakes a user can fix and divergence (one line
`error: ...`), and the signals that stop a run (SIGTERM, SIGINT).

Exit status: 0 done; 1 a job did not finish (failed, diverged, interrupted, lost: a sweep's table
says which) or a mistake Hydra found in the command line, as Hydra exits; 2 refused before
training (a UserError); 128 + the signal's number when SIGTERM (143) or SIGINT (130) stopped it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)
# The signals that stop a run as Ctrl-C does. SIGUSR1/SIGUSR2 are left to SLURM's requeue.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: every job that had not ended is recorded `interrupted`.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` (one failed job of a
    sweep) takes it for a job's failure.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interruption(e: BaseException) -> Interrupted | None:
    """The signal that stopped a run, when `e` is how it stopped; else None.

    Lightning raises its own exceptions while handling a stop: Ctrl-C that reaches it as
    KeyboardInterrupt becomes sys.exit(1), and a SIGTERM that reaches only Lightning's handler
    (another handler came first, e.g. submitit's) a SIGTERMException, which would exit 0.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    for cause in (e, e.__context__):
        if isinstance(cause, Interrupted):
            return cause
        if isinstance(cause, SIGTERMException):
            return Interrupted(signal.SIGTERM)
        if isinstance(cause, KeyboardInterrupt):
            return Interrupted(signal.SIGINT)
    return None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within it, SIGTERM and SIGINT raise Interrupted in the main thread, once: a signal that
    comes again while the jobs are being recorded is ignored, with one log line. A signal that
    other code already handles (submitit's, under SLURM) or that this process ignores is left so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            log.warning(
                "%s again: already stopping (recording the jobs that had not ended); "
                "kill -9 %d stops at once",
                signal.Signals(signum).name,
                os.getpid(),
            )
            return
        stopping = True
        raise Interrupted(signum)

    before = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            before[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def exit_with(e: UserError) -> NoReturn:
    """End the program with the one line `error: ...`: status 1 for a run that diverged (a
    result), 2 for one refused (nothing trained)."""
    _exit(f"error: {e}", 1 if isinstance(e, Diverged) else 2)


def _exit(message: str, status: int) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(status)


def _hydra_message(e: ConfigCompositionException | OverrideParseException) -> str:
    """One line for a mistake Hydra found in the command line (an unknown key or option)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, MissingConfigException) and len(lines) > 1:
        # "In 'train': Could not find 'model.act/swish'", "Available options in ...:", options,
        # then Hydra's search path.
        what = lines[0].split(": ", 1)[-1]
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search")), None)
        options = ", ".join(lines[2:end])
        if "hydra/sweeper/optuna" in what:  # hydra-optuna-sweeper's, which the project left
            return f"{what}: the search sweeper is hydra/sweeper=packed_optuna (README, Search)"
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
    command line ends the program with one line `error: ...` on stderr; Interrupted with 128 + its
    signal's number. Other exceptions keep their traceback. Exit statuses: the module's doc."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises here instead of printing its report
    try:
        yield
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except Exception as e:
        if (found := user_error(e)) is not None:
            exit_with(found)
        if isinstance(e, ConfigCompositionException | OverrideParseException):
            _exit(f"error: {_hydra_message(e)}", 1)
        raise
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
