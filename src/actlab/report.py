"""Tables and plots from the job folders of a sweep: `make report` / `python -m actlab.report`.

The same figures make the sweep's summary run in W&B, written when a multirun ends (the Hydra
callback SweepSummaryRun, in configs/hydra/default.yaml) and by `make report` for a sweep that
has none. A search's sweep (hydra/sweeper=packed_optuna) also gets its study's summary, the
trials table and Optuna's plots, in <sweep>/search/, report.md and the summary run.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import itertools
import logging
import math
import os
import statistics
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from actlab import ROOT
from actlab.errors import UserError
from actlab.results import RESULTS, compared, effective_record
from actlab.wandb_runs import (
    SUMMARY_ID,
    has_summary_run,
    report_settings,
    run_settings,
    sweep_settings,
    wandb_mode,
)

log = logging.getLogger(__name__)

# Overrides that tell repeats of one configuration apart rather than configurations. Those
# that cannot change a result (`results.compared`: `ckpt_path=` of a resumed job, `+resume=true`,
# paths, loggers) tell nothing apart.
REPEAT_KEYS = ("seed",)
# Overrides shown as the `act` and `slope` columns rather than as their own.
ACT_KEYS = ("model.act", "model.act.negative_slope")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under the sweep that Hydra made for a job (it holds .hydra/)."""
    return sorted(p.parent for p in Path(sweep_dir).glob("**/.hydra") if p.is_dir())


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job, by folder name, unfinished and failed jobs included (status says which);
    with a `last heartbeat` column where a job is lost."""
    jobs = sorted(load_jobs(sweep_dir, history=False), key=lambda j: j.folder)
    metric = task_metric(jobs)
    lost = any(j.status == "lost" for j in jobs)
    return [
        {
            "job": j.folder.relative_to(sweep_dir).as_posix() or ".",
            "status": j.status,
            "act": j.act,
            "slope": j.slope,
            "seed": j.seed,
            f"test/{metric}": j.metrics.get(f"test/{metric}"),
            f"val/{metric}_best": j.metrics.get(f"val/{metric}_best"),
            "dead/mean": j.metrics.get("dead/mean"),
            "epochs": j.epochs,
            "seconds": j.seconds,
            **({"last heartbeat": j.heartbeat} if lost else {}),
        }
        for j in jobs
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no jobs)"
    cols = list(rows[0])
    formats = {c: _column_format(c, [r[c] for r in rows]) for c in cols}
    cells = [[formats[c](r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def pruned_and_unfinished(statuses: dict[str, str]) -> tuple[list[str], list[str]]:
    """Of {job: status}: the trials a search's pruner stopped, which ended as the search meant
    them to, and the jobs that did not finish (failed, diverged, interrupted, lost)."""
    pruned = [job for job, status in statuses.items() if status == "pruned"]
    unfinished = [job for job, status in statuses.items() if status not in ("finished", "pruned")]
    return pruned, unfinished


class SweepSummary(Callback):
    """Prints the sweep's table when a multirun ends; says which jobs did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        print(f"\nSweep {sweep_dir} ({len(rows)} jobs, each job's {RESULTS}):")
        print(format_table(rows))
        pruned, failed = pruned_and_unfinished({r["job"]: r["status"] for r in rows})
        if pruned:
            print(f"\n{len(pruned)} trial(s) pruned by the search: {', '.join(pruned)}")
        if failed:
            print(f"\n{len(failed)} job(s) did not finish: {', '.join(failed)}")


# Sweepers that run every job of a grid: a job that did not finish is a hole in the results. A
# search (Optuna) that ran to its end exits 0 however many trials failed: those are its results.
GRID_SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.actlab_grid.GridSweeper",
    "hydra_plugins.actlab_packed.PackedSweeper",
)


class SweepExitStatus(Callback):
    """Exit status 1 for a grid sweep in which a job did not finish (failed, diverged,
    interrupted, lost), so that a script or CI can tell. Listed first in configs/hydra/default.yaml:
    Hydra ends a multirun with its callbacks in reverse order, so this comes after the table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") not in GRID_SWEEPERS:
            return
        if any(r["status"] != "finished" for r in collect(Path(config.hydra.sweep.dir))):
            sys.exit(1)


# ---------------------------------------------------------------------------------------------
# The comparison report: one row per configuration, statistics over its seeds, and plots.


@dataclass
class Job:
    folder: Path
    status: str
    overrides: dict[str, str]  # the job's command-line overrides, repeats (seed) excluded
    act: str | None
    slope: float | None
    seed: Any
    metrics: dict[str, float]
    seconds_per_epoch: float | None
    error: str | None
    epochs: int | None = None
    seconds: float | None = None
    history: Any = None  # pandas DataFrame: one row per epoch, or None without metrics.csv
    num: int | None = None  # Hydra's job number in the sweep
    heartbeat: str | None = None  # when a lost job's process was last alive (UTC)

    @property
    def finished(self) -> bool:
        return self.status == "finished"


@dataclass
class Configuration:
    act: str | None
    slope: float | None
    extra: dict[str, str]  # the other overrides that vary across the sweep
    jobs: list[Job] = field(default_factory=list)

    @property
    def label(self) -> str:
        name = " ".join(str(v) for v in (self.act, self.slope) if v is not None)
        return ", ".join([name or "(defaults)", *(f"{k}={v}" for k, v in self.extra.items())])


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(o.lstrip("~+").split("=", 1) for o in items or [] if "=" in o)


def epoch_history(csv_path: Path) -> Any:
    """metrics.csv (one row per logging call) reduced to one row per epoch: its last values."""
    import pandas as pd

    if not csv_path.exists():
        return None
    try:
        df = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError):
        # A running job's logger rewrites the file when new keys appear: no curve for it yet.
        log.warning("could not read %s (still being written?)", csv_path)
        return None
    if "epoch" not in df or df.empty:
        return None
    return df.groupby("epoch").last()


def load_jobs(sweep_dir: Path, history: bool = True) -> list[Job]:
    """Every job of the sweep in the sweep's order; `history` also reads each metrics.csv."""
    jobs = []
    for folder in job_dirs(sweep_dir):
        res = effective_record(folder) or {"status": "no results", "config": {}}
        overrides = _overrides(folder)
        cfg = res.get("config", {})
        act = cfg.get("act") or overrides.get("model.act")
        slope = cfg.get("negative_slope")
        if slope is None and "model.act.negative_slope" in overrides:
            slope = float(overrides["model.act.negative_slope"])
        jobs.append(
            Job(
                folder=folder,
                status=res["status"],
                overrides={
                    k: v for k, v in overrides.items() if k not in REPEAT_KEYS and compared(k)
                },
                act=act,
                slope=slope,
                seed=cfg.get("seed", overrides.get("seed")),
                metrics=res.get("metrics", {}),
                seconds_per_epoch=res.get("seconds_per_epoch"),
                error=res.get("error"),
                epochs=res.get("epochs"),
                seconds=res.get("seconds"),
                history=epoch_history(folder / "csv" / "metrics.csv") if history else None,
                num=res.get("job", {}).get("num"),
                heartbeat=(res.get("heartbeat") or {}).get("time"),  # a lost record's
            )
        )
    # The sweep's own order (relu, leaky, none as the user listed them), not the folders' names.
    return sorted(jobs, key=lambda j: (j.num is None, j.num or 0))


def group(jobs: list[Job]) -> list[Configuration]:
    """Jobs that differ only in their seed form one configuration; keys equal in all jobs are
    left out of the label."""
    keys = sorted({k for j in jobs for k in j.overrides})
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    configs: dict[tuple, Configuration] = {}
    for j in jobs:
        key = tuple(j.overrides.get(k, "-") for k in varying)
        extra = {k: j.overrides.get(k, "-") for k in varying if k not in ACT_KEYS}
        configs.setdefault(key, Configuration(j.act, j.slope, extra)).jobs.append(j)
    return list(configs.values())


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def task_metric(jobs: list[Job]) -> str:
    """`acc` for classification sweeps, `r2` for regression ones (what the jobs logged)."""
    return "r2" if any("test/r2" in j.metrics or "val/r2" in j.metrics for j in jobs) else "acc"


def summarize(configs: list[Configuration], metric: str = "acc") -> list[dict[str, Any]]:
    """One row per configuration: (mean, std) over its finished seeds of each measured quantity."""
    columns = {
        f"test {metric}": lambda j: j.metrics.get(f"test/{metric}"),
        f"best val {metric}": lambda j: j.metrics.get(f"val/{metric}_best"),
        "final train loss": lambda j: j.metrics.get("train/loss_epoch"),
        "dead fraction": lambda j: j.metrics.get("dead/mean"),
        "s/epoch": lambda j: j.seconds_per_epoch,
    }
    searched = any(j.status == "pruned" for c in configs for j in c.jobs)
    rows = []
    for c in configs:
        done = [j for j in c.jobs if j.finished]
        row: dict[str, Any] = {"act": c.act, "slope": c.slope, **c.extra}
        for name, get in columns.items():
            row[name] = mean_std([get(j) for j in done])
        row["seeds"] = len(done)
        pruned, unfinished = pruned_and_unfinished({str(j.folder): j.status for j in c.jobs})
        row["not finished"] = len(unfinished)
        if searched:  # a column of a search's sweep only
            row["pruned"] = len(pruned)
        rows.append(row)
    return rows


# Columns of seconds get 2 decimals; a setting (slope) as many as its most precise value needs.
SECONDS_COLUMNS = ("s/epoch", "seconds")
SETTING_COLUMNS = ("slope",)


def _decimals(v: float) -> int:
    return len(f"{v:.6f}".rstrip("0").split(".")[1])


def _column_format(name: str, values: list[Any]) -> Callable[[Any], str]:
    """One format for every number of a column, so that a column reads evenly in every sweep:
    4 decimals for metrics, 2 for seconds, a setting's own precision (slope 0 as 0.00 beside
    0.01). Cells are numbers, (mean, std) pairs or None (`-`)."""
    numbers = [x for v in values for x in (v if isinstance(v, tuple) else (v,))]
    numbers = [x for x in numbers if isinstance(x, int | float) and not isinstance(x, bool)]
    # A column with any fraction is all fractions: `model.act.negative_slope=0` arrives as int 0.
    real = any(isinstance(x, float) for x in numbers)
    if name in SECONDS_COLUMNS:
        places = 2
    elif name in SETTING_COLUMNS:
        places = max((_decimals(x) for x in numbers if math.isfinite(x)), default=0)
    else:
        places = 4

    def number(x: Any) -> str:
        real_number = real and isinstance(x, int | float) and not isinstance(x, bool)
        return f"{x:.{places}f}" if real_number else str(x)

    def cell(v: Any) -> str:
        if isinstance(v, tuple):
            mean, std = v
            if mean is None:
                return "-"
            return number(mean) if std is None else f"{number(mean)} ± {number(std)}"
        return "-" if v is None else number(v)

    return cell


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no jobs)"
    cols = list(rows[0])
    formats = {c: _column_format(c, [r[c] for r in rows]) for c in cols}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(formats[c](r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, written as PNG next to report.md)


def _curve(jobs: list[Job], column: str) -> tuple[Any, Any, Any] | None:
    """Epochs, mean and std over the jobs of one per-epoch column (None if no job logged it)."""
    import pandas as pd

    series = [
        j.history[column].dropna() for j in jobs if j.history is not None and column in j.history
    ]
    series = [s for s in series if not s.empty]
    if not series:
        return None
    frame = pd.concat(series, axis=1)
    return frame.index.to_numpy(), frame.mean(axis=1).to_numpy(), frame.std(axis=1).to_numpy()


def _band(ax: Any, jobs: list[Job], column: str, label: str, color: Any) -> bool:
    curve = _curve(jobs, column)
    if curve is None:
        return False
    x, mean, std = curve
    from matplotlib.ticker import MaxNLocator

    ax.plot(x + 1, mean, label=label, color=color, marker="o", markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(jobs) > 1:
        ax.fill_between(x + 1, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    return True


def _colors(n: int) -> list[Any]:
    """One colour per configuration: tab10's distinct ones, a viridis ramp beyond 6."""
    import matplotlib.pyplot as plt

    if n > 6:
        return [plt.cm.viridis(i / (n - 1)) for i in range(n)]
    return [plt.cm.tab10(i) for i in range(n)]


def _legend(ax: Any, n: int) -> None:
    ax.legend(fontsize="small", ncol=2 if n > 6 else 1, framealpha=0.85)


def plot_curves(configs: list[Configuration], metric: str, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c, color in zip(configs, _colors(len(configs)), strict=True):
        done = [j for j in c.jobs if j.finished] or c.jobs
        _band(a1, done, f"val/{metric}", c.label, color)
        _band(a2, done, "train/loss_epoch", c.label, color)
    name = {"acc": "accuracy", "r2": "R²"}.get(metric, metric)
    a1.set(xlabel="epoch", ylabel=f"validation {name}", title=f"Validation {name}")
    a2.set(xlabel="epoch", ylabel="training loss (epoch mean)", title="Training loss")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        _legend(ax, len(configs))
    fig.suptitle("Mean over seeds, band: ± 1 std", fontsize="small")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_slope(rows: list[dict[str, Any]], metric: str, out: Path) -> Path | None:
    """Test metric against Leaky ReLU's negative slope (symlog x: slope 0 shows)."""
    import matplotlib.pyplot as plt

    points = sorted(
        (r["slope"], *r[f"test {metric}"])
        for r in rows
        if r["slope"] is not None and r[f"test {metric}"][0] is not None
    )
    if len({p[0] for p in points}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = [p[0] for p in points]
    y = [p[1] for p in points]
    err = [p[2] or 0.0 for p in points]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="mean ± std over seeds")
    ax.legend(fontsize="small", frameon=False)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set(
        xlabel="negative slope (symlog; 0 = ReLU, 1 = identity)",
        ylabel=f"test {metric}",
        title=f"Test {metric} vs Leaky ReLU negative slope",
    )
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "slope.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dead(configs: list[Configuration], out: Path) -> Path | None:
    """Dead fraction per epoch, one panel per hidden layer, one line per configuration."""
    import matplotlib.pyplot as plt

    layers = sorted(
        {
            col
            for c in configs
            for j in c.jobs
            if j.history is not None
            for col in j.history.columns
            if col.startswith("dead/layer")
        },
        key=lambda s: int(s.removeprefix("dead/layer")),
    )
    if not layers:
        return None
    ncols = min(len(layers), 3)
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False, sharey=True
    )
    colors = _colors(len(configs))
    for k, col in enumerate(layers):
        ax = axes[k // ncols][k % ncols]
        for c, color in zip(configs, colors, strict=True):
            _band(ax, [j for j in c.jobs if j.finished] or c.jobs, col, c.label, color)
        ax.set(xlabel="epoch", title=f"hidden layer {col.removeprefix('dead/layer')}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("dead fraction (no val sample > 0)")
    for k in range(len(layers), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    _legend(axes[0][0], len(configs))
    fig.tight_layout()
    path = out / "dead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(
    configs: list[Configuration], rows: list[dict[str, Any]], metric: str, out: Path
) -> list[Path]:
    """The report's plots as PNG files in `out`: those the sweep has data for."""
    import matplotlib

    matplotlib.use("Agg")
    plots = [
        plot_curves(configs, metric, out),
        plot_slope(rows, metric, out),
        plot_dead(configs, out),
    ]
    return [p for p in plots if p is not None]


def write_report(sweep_dir: Path) -> str:
    """report.md and the PNG plots into the sweep folder; returns the table."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    configs = group(jobs)
    metric = task_metric(jobs)
    rows = summarize(configs, metric)
    table = markdown_table(rows)
    plots = plot_all(configs, rows, metric, sweep_dir)
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"{len(jobs)} jobs, {len(configs)} configurations. Each cell: mean ± sample std over the "
        "finished seeds; dead fraction = share of hidden units whose pre-activation is <= 0 on "
        "every validation sample, at the last epoch, averaged over layers.",
        "",
    ]
    named = {j.folder.relative_to(sweep_dir).as_posix(): j for j in jobs}
    pruned, unfinished = pruned_and_unfinished({name: j.status for name, j in named.items()})
    if pruned:
        table += f"\n\n## Trials pruned by the search ({len(pruned)})\n\n" + "\n".join(
            f"- `{name}`: pruned after {named[name].epochs} epoch(s)" for name in pruned
        )
    if unfinished:
        table += f"\n\n## Jobs that did not finish ({len(unfinished)})\n\n" + "\n".join(
            f"- `{name}`: {named[name].status}"
            + (f" ({named[name].error})" if named[name].error else "")
            for name in unfinished
        )
    lines += [table, ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if (search := write_search(sweep_dir)) is not None:
        lines += ["", "## Search", "", *search_markdown(search, f"{SEARCH_DIR}/")]
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n")
    return table


# ---------------------------------------------------------------------------------------------
# A search's summary (hydra/sweeper=packed_optuna): its study's trials and Optuna's plots of them,
# from <sweep>/study.db through Optuna's own storage. Optuna's matplotlib plots (plotly's image
# export needs a browser), the contour one of our own (Optuna's needs scipy).

STUDY = "study.db"
SEARCH_DIR = "search"  # <sweep>/search/: summary.md, trials.csv and the plots
SEARCH_STATES = ("complete", "pruned", "fail", "running", "waiting")  # Optuna's, in this order


def study_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{(Path(sweep_dir) / STUDY).resolve()}"


@dataclass
class Search:
    headline: str  # the study, its trials by state and its best trial
    rows: list[dict[str, Any]]  # the trials table: one row per trial
    plots: list[Path]
    notes: list[str]  # one line for each plot that could not be drawn, saying why
    best: dict[str, Any]  # the best trial's number and value ({} if none finished)


def search_summary(sweep_dir: Path, out: Path) -> Search | None:
    """The trials table of the search in `sweep_dir` (it holds study.db) and its plots as PNG
    files in `out`; None while the study has no trial."""
    try:
        import optuna
    except ImportError:
        note = "No search summary: Optuna is not installed (`pip install -e '.[search]'`)."
        return Search(note, [], [], [], {})
    saved = Path(sweep_dir) / "multirun.yaml"
    name = (
        OmegaConf.select(OmegaConf.load(saved), "hydra.sweeper.study_name")
        if saved.is_file()
        else None
    )
    study = optuna.load_study(study_name=name, storage=study_storage(sweep_dir))
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return None
    state = optuna.trial.TrialState
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = [
        {
            "trial": t.number,
            **{k: t.params.get(k) for k in params},
            "value": t.value,
            "state": t.state.name.lower(),
            # A trial reports after each epoch, as its step the epochs it has trained.
            "pruned at epoch": t.last_step if t.state == state.PRUNED else None,
            "folder": Path(t.user_attrs["job"]).name if "job" in t.user_attrs else None,
        }
        for t in trials
    ]
    done = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
    metric = next((t.user_attrs["metric"] for t in trials if "metric" in t.user_attrs), "value")
    counts = collections.Counter(r["state"] for r in rows)
    headline = (
        f"Study `{study.study_name}` ({study.direction.name.lower()} `{metric}`), "
        f"{len(rows)} trials: "
        + ", ".join(f"{counts[s]} {s}" for s in SEARCH_STATES if counts[s])
        + "."
    )
    best = {}
    if done:
        best = {"trial": study.best_trial.number, "value": study.best_value}
        headline += f" Best: trial {best['trial']}, {metric} = {best['value']:.4f}."
    few = f"{done} trial(s) finished, it takes 2"
    vis = optuna.visualization.matplotlib
    # PED-ANOVA (Optuna 5's default) needs no scikit-learn, unlike Optuna 4's fANOVA.
    evaluator = optuna.importance.PedAnovaImportanceEvaluator
    drawings = [
        (
            "best_so_far",
            "best-so-far curve",
            None if done else "no trial finished",
            lambda: vis.plot_optimization_history(study, target_name=metric),
        ),
        (
            "param_importances",
            "parameter importances",
            None if done >= 2 else few,
            lambda: vis.plot_param_importances(study, evaluator=evaluator(), target_name=metric),
        ),
        (
            "contour",
            "contour plot",
            f"the search has {len(params)} parameter(s), a contour plots two"
            if len(params) < 2
            else (None if done >= 2 else few),
            lambda: contour(study, params, metric),
        ),
    ]
    plots, notes = [], []
    for name, what, why_not, draw in drawings:
        if why_not is None:
            plots.append(_save_optuna_plot(draw, out / f"{name}.png"))
        else:
            notes.append(f"No {what}: {why_not}.")
    return Search(headline, rows, plots, notes, best)


def _save_optuna_plot(draw: Callable[[], Any], path: Path) -> Path:
    import matplotlib
    import numpy as np
    from optuna.exceptions import ExperimentalWarning

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Optuna's plots set a style of their own (ggplot): kept to them, not to the report's plots.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # Optuna marks each one so
        fig = np.ravel(draw())[0].figure
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return path


def contour(study: Any, params: list[str], metric: str) -> Any:
    """For each pair of parameters, the finished trials' values interpolated linearly over their
    Delaunay triangles (matplotlib.tri), each trial a dot; a log-scaled parameter's axis is in
    log10, a choice's its choices. Not Optuna's plot_contour: that interpolates with scipy, which
    is not installed (where it is, importing Lightning imports scipy.signal, 0.8 s of every job's
    start). Trials all on one line leave a pair's dots without colour between them."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.ticker import FuncFormatter
    from matplotlib.tri import Triangulation
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = np.array([t.value for t in done])
    norm = Normalize(values.min(), values.max() if np.ptp(values) else values.min() + 1)
    cmap = "Blues" if study.direction.name == "MAXIMIZE" else "Blues_r"  # the best darkest

    dists = {k: next(t.distributions[k] for t in done if k in t.params) for k in params}
    logs = {k: not isinstance(d, CategoricalDistribution) and d.log for k, d in dists.items()}

    def coordinates(name: str, trials: list) -> np.ndarray:
        dist = dists[name]
        if isinstance(dist, CategoricalDistribution):
            return np.array([dist.to_internal_repr(t.params[name]) for t in trials], float)
        x = np.array([t.params[name] for t in trials], float)
        return np.log10(x) if logs[name] else x

    def label(axis: Any, name: str) -> None:
        axis.set_label_text(f"{name} (log scale)" if logs[name] else name)
        if isinstance(dists[name], CategoricalDistribution):
            choices = dists[name].choices
            axis.set_ticks(range(len(choices)), [str(c) for c in choices])
        elif logs[name]:
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{10**v:.3g}"))

    pairs = list(itertools.combinations(params, 2))
    cols = math.ceil(math.sqrt(len(pairs)))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.6 * rows), squeeze=False)
    for ax, (a, b) in itertools.zip_longest(axes.flat, pairs, fillvalue=(None, None)):
        trials = [t for t in done if a in t.params and b in t.params]
        if not trials:  # a grid's spare cell
            ax.set_axis_off()
            continue
        x, y = coordinates(a, trials), coordinates(b, trials)
        z = np.array([t.value for t in trials])
        # Fewer than 3 trials, or all on one line: no triangle to fill.
        with contextlib.suppress(RuntimeError, ValueError):
            ax.tricontourf(Triangulation(x, y), z, levels=12, cmap=cmap, norm=norm)
        ax.scatter(x, y, c=z, cmap=cmap, norm=norm, edgecolors="black", zorder=2)
        ax.margins(0.05)
        label(ax.xaxis, a)
        label(ax.yaxis, b)
    fig.colorbar(plt.cm.ScalarMappable(norm, cmap), ax=axes, label=metric)
    fig.suptitle(f"{metric} of the {len(done)} finished trials")
    return axes


def search_markdown(search: Search, prefix: str = "") -> list[str]:
    """The search's summary under a heading of report.md or search/summary.md (its plots under
    `prefix`)."""
    lines = [search.headline, ""]
    if search.rows:
        lines += [markdown_table(search.rows), ""]
    lines += [f"![{p.stem}]({prefix}{p.name})" for p in search.plots]
    return lines + [line for note in search.notes for line in ("", note)]


# What write_search last wrote for a sweep folder, with its study.db's (mtime, size) before it
# read it: the summary run of the same process logs those files rather than drawing them again.
_written: dict[Path, tuple[tuple[int, int], Search | None]] = {}


def _study_stamp(sweep_dir: Path) -> tuple[int, int]:
    stat = (sweep_dir / STUDY).stat()
    return stat.st_mtime_ns, stat.st_size


def write_search(sweep_dir: Path) -> Search | None:
    """The search's summary into <sweep>/search/ (summary.md, trials.csv, the plots), each file
    written beside the folder first and renamed into it: a reader never sees half a file. None
    for a sweep that is not a search, or a search with no trial yet."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / STUDY).is_file():
        return None
    stamp = _study_stamp(sweep_dir)
    search = _write_search(sweep_dir)
    _written[sweep_dir.resolve()] = stamp, search
    return search


def written_search(sweep_dir: Path) -> Search | None:
    """The search's summary in <sweep>/search/: as write_search left it in this process if the
    study has not changed since, else written anew."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / STUDY).is_file():
        return None
    stamp, search = _written.get(sweep_dir.resolve(), (None, None))
    return search if stamp == _study_stamp(sweep_dir) else write_search(sweep_dir)


def _write_search(sweep_dir: Path) -> Search | None:
    out = sweep_dir / SEARCH_DIR
    with tempfile.TemporaryDirectory(dir=sweep_dir, prefix=".search-") as tmp:
        search = search_summary(sweep_dir, Path(tmp))
        if search is None:
            return None
        md = [f"# Search {sweep_dir.name}", "", *search_markdown(search)]
        (Path(tmp) / "summary.md").write_text("\n".join(md) + "\n")
        if search.rows:
            with open(Path(tmp) / "trials.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(search.rows[0]))
                writer.writeheader()
                writer.writerows(search.rows)
        out.mkdir(exist_ok=True)
        for made in Path(tmp).iterdir():
            os.replace(made, out / made.name)
    return dataclasses.replace(search, plots=[out / p.name for p in search.plots])


# ---------------------------------------------------------------------------------------------
# The sweep's summary run in W&B: the report's table and plots, logged as a run of its own.


class SweepSummaryRun(Callback):
    """When a multirun ends (any launcher or sweeper): the summary run of a sweep whose jobs
    logged to W&B."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if (settings := sweep_settings(config)) is not None:
            write_summary_run(Path(config.hydra.sweep.dir), settings)


def write_summary_run(sweep_dir: Path, settings: dict[str, Any]) -> None:
    """The sweep's summary W&B run, in its jobs' project and group, and one line on where it went.

    W&B not starting (no network, online without a key) is reported in one line rather than
    raised: the sweep's results are on disk and `make report SWEEP=<folder>` writes the run later.
    With mode `disabled` (e.g. WANDB_MODE=disabled), or no job folder, nothing is written.
    """
    sweep_dir = Path(sweep_dir)
    if not job_dirs(sweep_dir):
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

    jobs = load_jobs(sweep_dir)
    configs = group(jobs)
    metric = task_metric(jobs)
    rows = summarize(configs, metric)

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
            settings=run_settings(
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
    search = written_search(sweep_dir)
    with run, tempfile.TemporaryDirectory() as tmp:
        run.log(
            {
                "sweep/jobs": _table(wandb, _job_rows(sweep_dir, configs)),
                "sweep/configurations": _table(wandb, _config_rows(configs, rows)),
                **_val_curves(wandb, configs, metric),
                **{
                    f"sweep/{png.stem}": wandb.Image(str(png))
                    for png in plot_all(configs, rows, metric, Path(tmp))
                },
                **_search_log(wandb, search),
            }
        )
        run.summary.update(_best(configs, rows, metric))
        if search is not None and search.best:
            run.summary.update({f"search/best_{k}": v for k, v in search.best.items()})
    id_file.parent.mkdir(exist_ok=True)
    id_file.write_text(run_id + "\n")
    return where


def _search_log(wandb: Any, search: Search | None) -> dict[str, Any]:
    """The search's trials table and plots (search_summary), under search/."""
    if search is None or not search.rows:
        return {}
    images = {f"search/{png.stem}": wandb.Image(str(png)) for png in search.plots}
    return {"search/trials": _table(wandb, search.rows), **images}


def _value(override: str) -> Any:
    """An override's value as the number it stands for (W&B tables sort and plot numbers)."""
    if override == "-":  # the key was not given to this job (group)
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
    """The sweep table's rows (collect), each with the swept values that are not its
    activation, slope or seed (e.g. optimizer.lr)."""
    swept = {
        j.folder.relative_to(sweep_dir).as_posix() or ".": c.extra for c in configs for j in c.jobs
    }
    rows = []
    for row in collect(sweep_dir):
        folder = row.pop("job")
        extra = {k: _value(v) for k, v in swept.get(folder, {}).items()}
        # The swept values come right after the seed; the rest keeps the sweep table's order.
        head = {k: row[k] for k in ("status", "act", "slope", "seed")}
        rows.append({"folder": folder, **head, **extra, **row})
    return rows


def _config_rows(configs: list[Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """summarize's rows, each (mean, std) pair as two columns."""
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
        curve = _curve([j for j in c.jobs if j.finished] or c.jobs, f"val/{metric}")
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


def latest_sweep(log_dir: Path = ROOT / "logs" / "multiruns") -> Path:
    """The sweep started last (its multirun.yaml is written at the start), whatever its name."""
    sweeps = [p for p in log_dir.glob("*") if p.is_dir()]
    if not sweeps:
        sys.exit(f"error: no sweep under {log_dir}/; run `make sweep` first or name a folder.")
    return max(sweeps, key=lambda p: ((p / "multirun.yaml").exists(), _started(p)))


def _started(sweep: Path) -> float:
    marker = sweep / "multirun.yaml"
    return (marker if marker.exists() else sweep).stat().st_mtime


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sweep_dir = Path(argv[0]) if argv else latest_sweep()
    if not job_dirs(sweep_dir):
        sys.exit(f"error: {sweep_dir} holds no job folders (.hydra/); name a sweep folder.")
    print(write_report(sweep_dir))
    print(f"\nwrote {sweep_dir / 'report.md'} and its plots")
    if not has_summary_run(sweep_dir):
        write_summary_run(sweep_dir, report_settings(sweep_dir))


if __name__ == "__main__":
    main()
