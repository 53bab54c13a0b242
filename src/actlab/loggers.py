"""Logger factories that need a decision made before the logger exists."""

from __future__ import annotations

import csv
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from actlab.errors import UserError
from actlab.wandb_runs import run_settings, save_requirements, wandb_mode

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; keep it and continue its columns.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to the metrics.csv in its folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(
    save_dir: str,
    project: str,
    mode: str = "auto",
    init_timeout: float = 30,
    new_run: bool = False,
    job: Any = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger that never prompts: online with a key, offline without (mode=auto).

    In a multirun the W&B group is the sweep folder's name and the run name the job's overrides,
    so W&B's tables line up with the folders under logs/. The run id is kept in the folder
    (wandb/run_id): a run resumed there continues the same W&B run (online), or syncs into it
    (offline). `init_timeout` bounds the wait for an unreachable server. `new_run` starts the
    run now, beside any other open in this process (the members of a pack, actlab.pack); `job`
    is the hydra node of the job the run is for (a member's own), by default Hydra's current one.
    """
    mode = wandb_mode(mode)
    hc = HydraConfig.get() if job is None else job
    multirun = hc.mode == RunMode.MULTIRUN
    act = hc.runtime.choices.get("model.act")
    kwargs.setdefault("group", Path(hc.sweep.dir).name if multirun else None)
    kwargs.setdefault("name", hc.job.override_dirname or f"{act}")
    kwargs.setdefault("tags", [f"act={act}"])
    import wandb  # here, not at the top: runs without W&B do not pay for importing it

    id_file = Path(save_dir) / "wandb" / "run_id"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    os.environ.setdefault("WANDB_SILENT", "true")
    settings = run_settings(init_timeout=init_timeout)
    if new_run:
        try:
            run = wandb.init(
                dir=save_dir, project=project, mode=mode, id=run_id, resume="allow",
                settings=settings, reinit="create_new", **kwargs,
            )  # fmt: skip
        except Exception as e:  # as announce() says it for a run started later
            raise _not_started(e) from e
        return WandbLogger(experiment=run, save_dir=save_dir, project=project)
    logger = WandbLogger(
        save_dir=save_dir,
        project=project,
        mode=mode,
        id=run_id,
        resume="allow",
        settings=settings,
        **kwargs,
    )
    # Lightning always passes anonymous=None, which W&B warns has no effect, on every run.
    logger._wandb_init.pop("anonymous", None)
    return logger


def announce(logger: WandbLogger) -> None:
    """Start the W&B run, then say where it went: a URL online, a folder to `make sync` offline."""
    if rank_zero_only.rank > 0:  # the run lives on rank 0; the others get a dummy
        return
    try:
        run = logger.experiment
    # Not only wandb.Error: an unreachable server ends in a plain TimeoutError, and a slow start
    # of W&B's service process in its own WandbServiceConnectionError.
    except Exception as e:
        raise _not_started(e) from e
    save_requirements(run)
    if run.settings.mode == "offline":
        log.info("W&B offline run in %s (`make sync` uploads it)", Path(run.dir).parent)
    else:
        log.info("W&B run: %s", run.url)


def _not_started(e: Exception) -> UserError:
    reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever W&B put in it
    return UserError(
        f"W&B could not start the run ({reason}). Check the network and WANDB_BASE_URL, or "
        "log offline with logger.wandb.mode=offline and upload later with `make sync`."
    )


def finish_wandb(status: str, run: Any = None) -> None:
    """End a W&B run (the job's, by default) with its `status` in the summary and, unless it
    finished (or a search pruned it), a non-zero exit code: W&B otherwise marks a diverged or
    failed run `finished`."""
    import wandb

    run = run if run is not None else wandb.run
    if run is not None:
        run.summary["status"] = status
        run.finish(exit_code=0 if status in ("finished", "pruned") else 1)
