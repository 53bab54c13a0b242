"""Each job's record of what it was and what it got: `results.json`, written atomically."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actlab import ROOT
from actlab.errors import UserError

RESULTS = "results.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.

    A full disk or a read-only folder raises a UserError and leaves any earlier file whole.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _unwritable(path, e) from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results and data are for everyone
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _unwritable(path, e) from e
        raise


def _unwritable(path: Path, e: OSError) -> UserError:
    return UserError(
        f"could not write {path} ({e.strerror}): free some space, or point paths.log_dir at "
        "another folder."
    )


def read_results(job_dir: Path) -> dict[str, Any] | None:
    path = Path(job_dir) / RESULTS
    if not path.exists():
        return None
    return json.loads(path.read_text())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def describe(cfg: DictConfig, choices: dict[str, Any]) -> dict[str, Any]:
    """The keys a comparison is made on, flat, for results.json and the loggers' config."""
    act = cfg.model.act
    return {
        "act": choices.get("model.act"),
        "negative_slope": act.get("negative_slope"),
        "data": choices.get("data"),
        "hidden_sizes": list(cfg.model.get("hidden_sizes", [])),
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.get("lr"),
        "batch_size": cfg.data.get("batch_size"),
        "max_epochs": cfg.trainer.get("max_epochs"),
        "seed": cfg.seed,
    }


def running_record(
    name: str,
    num: Any,
    overrides: list[str],
    cfg: DictConfig,
    choices: dict[str, Any],
    composed: dict[str, Any],
) -> dict[str, Any]:
    """What a job's results.json says when it starts, solo or as a pack member alike.

    `composed` is its config unresolved, as .hydra/config.yaml (which the next attempt
    overwrites): `+resume=true` compares it with the config of that attempt.
    """
    return {
        "status": "running",
        "job": {"name": name, "num": num, "overrides": overrides},
        "config": describe(cfg, choices),
        "composed_config": composed,
    }


# Keys of the composed config that cannot change what a job computes: where its files go, how it
# is logged and shown, how it was started or resumed, and the resources it runs on (threads and
# device slots change at most the float rounding: README, "Parallel sweeps").
NOT_COMPARED = (
    "paths",
    "data.data_dir",
    "logger",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "ckpt_path",
    "resume",
    "optimized_metric",
    "threads",
    "launch",
)


def compared(key: str) -> bool:
    """Whether a config key (dotted, as in an override) can change a job's result."""
    key = key.lstrip("~+")
    return not any(key == k or key.startswith(f"{k}.") for k in NOT_COMPARED)


def config_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: before -> now` for every key that can change a result and differs (sorted)."""
    a, b = flatten(before), flatten(now)
    absent = object()
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, absent) != b.get(k, absent))
    keys = [k for k in keys if compared(k)]
    return [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in keys]


def logged_config(cfg: DictConfig, choices: dict[str, Any]) -> dict[str, Any]:
    """The summary keys first (W&B table columns such as `act`), then the whole config, flat."""
    full = OmegaConf.to_container(cfg, resolve=True)
    full.pop("paths", None)
    return {**describe(cfg, choices), **flatten(full)}


# Folders whose untracked files do not make a checkout dirty, and how many untracked files a
# record lists (then only their number).
UNRECORDED = ("logs", "data")
UNTRACKED_LISTED = 20


def provenance() -> dict[str, Any]:
    """Library versions and the git state, so a number can be traced to the code that made it."""
    versions = {}
    for pkg in ("torch", "lightning", "torchmetrics", "hydra-core", "wandb", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    base = {"python": platform.python_version(), "versions": versions}
    try:
        commit = _git(ROOT, "rev-parse", "HEAD")
        changed = bool(_git(ROOT, "status", "--porcelain", "--untracked-files=no"))
        # A new activation module or config counts as much as an edited one; runs' outputs and
        # downloaded data do not (nor what .gitignore ignores).
        others = _git(ROOT, "ls-files", "--others", "--exclude-standard", "-z", "--", ".")
        untracked = [f for f in others.split("\0") if f and f.split("/")[0] not in UNRECORDED]
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or git hung
        return {**base, "git_commit": None, "git_dirty": None}
    return {
        **base,
        "git_commit": commit,
        "git_dirty": changed or bool(untracked),
        "git_untracked": untracked[:UNTRACKED_LISTED],
        "git_untracked_more": max(0, len(untracked) - UNTRACKED_LISTED),
    }


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
