"""W&B runs that never prompt, and where the run that sums up a sweep in W&B goes.

The summary run itself is actlab.report's (its figures are the report's). The mode decision lives
here rather than in actlab.loggers so that `make report` can start a W&B run without importing
Lightning (seconds on a small machine).
"""

from __future__ import annotations

import functools
import netrc
import os
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig, OmegaConf

from actlab import ROOT
from actlab.errors import UserError

# The summary run's id, kept in the sweep folder as a job keeps its own (wandb/run_id): a sweep
# that has it has a summary run, and a resumed sweep updates that run instead of adding one.
SUMMARY_ID = Path("wandb") / "summary_run_id"
# The settings of the logger group's wandb node that say where a run goes (and save_dir).
SETTINGS = ("project", "entity", "mode", "init_timeout")


def wandb_api_key_configured() -> bool:
    """True when W&B would find a key without prompting: WANDB_API_KEY or a netrc entry.

    The netrc file is the one W&B reads: $NETRC when set, else ~/.netrc.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str = "auto") -> str:
    """The mode a run starts in, decided before W&B could prompt: `auto` is WANDB_MODE when set,
    else online with an API key and offline without."""
    has_key = wandb_api_key_configured()
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    if mode == "online" and not has_key:
        raise UserError(
            "logger.wandb.mode=online but no W&B API key is configured: set WANDB_API_KEY or run "
            "`wandb login`, or leave the mode at auto to log offline and `make sync` later."
        )
    return mode


def run_settings(**kwargs: Any) -> Any:
    """wandb.Settings for a run of this project: W&B's scan of the installed packages for each run
    it starts (x_save_requirements; 0.08 s a run on this CPU, paid again by each member of a pack)
    off, for `save_requirements`, which scans once per process."""
    import wandb

    return wandb.Settings(x_save_requirements=False, **kwargs)


@functools.cache
def _installed() -> str:
    dists = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(dists.items()) if name)


def save_requirements(run: Any) -> None:
    """The installed packages into the run's requirements.txt, where W&B's own scan puts them."""
    (Path(run.dir) / "requirements.txt").write_text(_installed())


def sweep_settings(config: DictConfig) -> dict[str, Any] | None:
    """Where a sweep's jobs sent their W&B runs (its logger group's wandb node); None when they
    logged no W&B run (e.g. logger=csv)."""
    node = OmegaConf.select(config, "logger.wandb")
    if not isinstance(node, DictConfig):
        return None
    settings = {k: node[k] for k in SETTINGS if k in node}
    # Each job's W&B folder is its own (${paths.output_dir}); the summary's is the sweep folder,
    # unless the jobs were all sent to one folder.
    save_dir = OmegaConf.to_container(node, resolve=False).get("save_dir")
    if isinstance(save_dir, str) and "${" not in save_dir:
        settings["save_dir"] = save_dir
    return settings


def report_settings(sweep_dir: Path) -> dict[str, Any]:
    """Settings for a summary written after the fact: the sweep's own (multirun.yaml), else those
    of configs/logger/wandb.yaml, where its jobs would have gone with logger=wandb."""
    saved = Path(sweep_dir) / "multirun.yaml"
    settings = sweep_settings(OmegaConf.load(saved)) if saved.is_file() else None
    if settings is None:
        node = yaml.safe_load((ROOT / "configs" / "logger" / "wandb.yaml").read_text())["wandb"]
        settings = {k: node[k] for k in SETTINGS if k in node}
    return settings


def has_summary_run(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / SUMMARY_ID).is_file()
