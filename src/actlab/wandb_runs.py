"""W&B runs that never prompt, and the run that sums up a sweep in W&B.

The summary run is written when a multirun ends (the Hydra callback SweepSummaryRun, in
configs/hydra/default.yaml) and by `make report` for a sweep that has none. Its figures are
actlab.report's. The mode decision lives here rather than in actlab.loggers so that `make report`
can start a W&B run without importing Lightning (seconds on a small machine).
"""

from __future__ import annotations

import netrc
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from actlab import ROOT, report
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


class SweepSummaryRun(Callback):
    """When a multirun ends (any launcher or sweeper): the summary run of a sweep whose jobs
    logged to W&B."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if (settings := sweep_settings(config)) is not None:
            write_summary_run(Path(config.hydra.sweep.dir), settings)


def has_summary_run(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / SUMMARY_ID).is_file()


def write_summary_run(sweep_dir: Path, settings: dict[str, Any]) -> None:
    """The sweep's summary W&B run, in its jobs' project and group, and one line on where it went.

    W&B not starting (no network, online without a key) is reported in one line rather than
    raised: the sweep's results are on disk and `make report SWEEP=<folder>` writes the run later.
    With mode `disabled` (e.g. WANDB_MODE=disabled), or no job folder, nothing is written.
    """
    sweep_dir = Path(sweep_dir)
    if not report.job_dirs(sweep_dir):
        return
    try:
        mode = wandb_mode(settings.get("mode", "auto"))
        if mode == "disabled":
            return
        where = _log_summary(sweep_dir, settings, mode)
    except UserError as e:
        print(f"W&B summary run not written: {e} `make report SWEEP={sweep_dir}` writes it later.")
        return
    print(f"W&B sweep summary run: {where}")


def _log_summary(sweep_dir: Path, settings: dict[str, Any], mode: str) -> str:
    import wandb  # here, not at the top: sweeps and reports without W&B do not import it

    jobs = report.load_jobs(sweep_dir)
    configs = report.group(jobs)
    metric = report.task_metric(jobs)
    rows = report.summarize(configs, metric)

    id_file = sweep_dir / SUMMARY_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    save_dir = Path(settings.get("save_dir", sweep_dir))
    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=settings.get("project"),
            entity=settings.get("entity"),
            group=sweep_dir.name,  # the jobs' group (actlab.loggers.wandb_logger)
            name=sweep_dir.name,
            job_type="sweep-summary",
            id=run_id,
            resume="allow",
            dir=save_dir,
            mode=mode,
            config={"sweep_dir": str(sweep_dir), "metric": metric, "jobs": len(jobs)},
            reinit="create_new",  # the jobs' runs of this process are finished, not reused
            settings=wandb.Settings(
                init_timeout=settings.get("init_timeout", 30), console="off", silent=True
            ),
        )
    # Not only wandb.Error: see actlab.loggers.announce.
    except Exception as e:
        raise UserError(f"W&B could not start it ({' '.join(str(e).split())}).") from e
    where = (
        f"{Path(run.dir).parent} (offline; `make sync` uploads it)"
        if run.settings.mode == "offline"
        else run.url
    )
    with run, tempfile.TemporaryDirectory() as tmp:
        run.log(
            {
                "sweep/jobs": _table(wandb, _job_rows(sweep_dir, configs)),
                "sweep/configurations": _table(wandb, _config_rows(configs, rows)),
                **_val_curves(wandb, configs, metric),
                **{
                    f"sweep/{png.stem}": wandb.Image(str(png))
                    for png in report.plot_all(configs, rows, metric, Path(tmp))
                },
            }
        )
        run.summary.update(_best(configs, rows, metric))
    id_file.parent.mkdir(exist_ok=True)
    id_file.write_text(run_id + "\n")
    return where


def _value(override: str) -> Any:
    """An override's value as the number it stands for (W&B tables sort and plot numbers)."""
    if override == "-":  # the key was not given to this job (report.group)
        return None
    try:
        value = yaml.safe_load(override)
    except yaml.YAMLError:
        return override
    return value if isinstance(value, int | float | str | bool) else override


def _table(wandb: Any, rows: list[dict[str, Any]]) -> Any:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    data = [[r.get(c) for c in columns] for r in rows]
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


def _job_rows(sweep_dir: Path, configs: list[Any]) -> list[dict[str, Any]]:
    """The sweep table's rows (report.collect), each with the swept values that are not its
    activation, slope or seed (e.g. optimizer.lr)."""
    swept = {
        j.folder.relative_to(sweep_dir).as_posix() or ".": c.extra for c in configs for j in c.jobs
    }
    rows = []
    for row in report.collect(sweep_dir):
        folder = row.pop("job")
        extra = {k: _value(v) for k, v in swept.get(folder, {}).items()}
        # The swept values come right after the seed; the rest keeps the sweep table's order.
        head = {k: row[k] for k in ("status", "act", "slope", "seed")}
        rows.append({"folder": folder, **head, **extra, **row})
    return rows


def _config_rows(configs: list[Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """report.summarize's rows, each (mean, std) pair as two columns."""
    out = []
    for c, row in zip(configs, rows, strict=True):
        flat: dict[str, Any] = {"configuration": c.label}
        for k, v in row.items():
            if isinstance(v, tuple):
                flat[f"{k} mean"], flat[f"{k} std"] = v
            else:
                flat[k] = _value(v) if k in c.extra else v
        out.append(flat)
    return out


def _val_curves(wandb: Any, configs: list[Any], metric: str) -> dict[str, Any]:
    """Validation metric per epoch, mean over each configuration's seeds, as the report plots it."""
    lines = []
    for c in configs:
        curve = report._curve([j for j in c.jobs if j.finished] or c.jobs, f"val/{metric}")
        if curve is not None:
            x, mean, _ = curve
            lines.append((c.label, [int(e) + 1 for e in x], [float(m) for m in mean]))
    if not lines:
        return {}
    chart = wandb.plot.line_series(
        xs=[x for _, x, _ in lines],
        ys=[y for _, _, y in lines],
        keys=[label for label, _, _ in lines],
        title=f"val/{metric} by epoch (mean over seeds)",
        xname="epoch",
    )
    return {f"sweep/val_{metric}": chart}


def _best(configs: list[Any], rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Job counts, and the configuration with the best mean test metric over its seeds."""
    summary: dict[str, Any] = {
        "jobs": sum(len(c.jobs) for c in configs),
        "jobs_finished": sum(r["seeds"] for r in rows),
    }
    test = f"test {metric}"
    tested = [(r, c) for r, c in zip(rows, configs, strict=True) if r[test][0] is not None]
    if tested:
        row, best = max(tested, key=lambda rc: rc[0][test][0])
        summary.update(
            {
                "best/configuration": best.label,
                f"best/test/{metric}": row[test][0],
                f"best/test/{metric}_std": row[test][1],
                f"best/val/{metric}_best": row[f"best val {metric}"][0],
            }
        )
    return summary
