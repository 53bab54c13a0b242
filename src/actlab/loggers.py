"""Logger factories that need a decision made before the logger exists."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger

from actlab.errors import UserError

log = logging.getLogger(__name__)


def wandb_api_key_configured() -> bool:
    """True when W&B would find a key without prompting: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, project: str, mode: str = "auto", **kwargs) -> WandbLogger:
    """A WandbLogger that never prompts: online with a key, offline without (mode=auto).

    In a multirun the W&B group is the sweep folder's name and the run name the job's overrides,
    so W&B's tables line up with the folders under logs/.
    """
    has_key = wandb_api_key_configured()
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    if mode == "online" and not has_key:
        raise UserError(
            "logger.wandb.mode=online but no W&B API key is configured: set WANDB_API_KEY or run "
            "`wandb login`, or leave the mode at auto to log offline and `make sync` later."
        )
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    act = hc.runtime.choices.get("model.act")
    kwargs.setdefault("group", Path(hc.sweep.dir).name if multirun else None)
    kwargs.setdefault("name", hc.job.override_dirname or f"{act}")
    kwargs.setdefault("tags", [f"act={act}"])
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(save_dir=save_dir, project=project, mode=mode, **kwargs)


def announce(logger: WandbLogger) -> None:
    """Say where the run went: a URL online, a folder to `make sync` offline."""
    run = logger.experiment
    if run.settings.mode == "offline":
        log.info("W&B offline run in %s (`make sync` uploads it)", Path(run.dir).parent)
    else:
        log.info("W&B run: %s", run.url)
