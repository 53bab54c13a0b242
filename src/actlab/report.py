"""Tables (and, with `make report`, plots) from the job folders of a sweep."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from actlab.results import RESULTS, read_results

log = logging.getLogger(__name__)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under the sweep that Hydra made for a job (it holds .hydra/)."""
    return sorted(p.parent for p in Path(sweep_dir).glob("**/.hydra") if p.is_dir())


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job, unfinished and failed jobs included (status says which)."""
    rows = []
    for job in job_dirs(sweep_dir):
        res = read_results(job) or {"status": "no results", "config": {}}
        metrics = res.get("metrics", {})
        rows.append(
            {
                "job": job.relative_to(sweep_dir).as_posix() or ".",
                "status": res["status"],
                "act": res["config"].get("act"),
                "slope": res["config"].get("negative_slope"),
                "seed": res["config"].get("seed"),
                "test/acc": metrics.get("test/acc"),
                "val/acc_best": metrics.get("val/acc_best"),
                "epochs": res.get("epochs"),
                "seconds": res.get("seconds"),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no jobs)"
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.1f}"
        return str(v)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints the sweep's table when a multirun ends; says which jobs did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        print(f"\nSweep {sweep_dir} ({len(rows)} jobs, each job's {RESULTS}):")
        print(format_table(rows))
        failed = [r["job"] for r in rows if r["status"] != "finished"]
        if failed:
            print(f"\n{len(failed)} job(s) did not finish: {', '.join(failed)}")


def latest_sweep(log_dir: Path = Path("logs/multiruns")) -> Path:
    sweeps = sorted(p for p in log_dir.glob("*") if p.is_dir())
    if not sweeps:
        sys.exit(f"error: no sweep under {log_dir}/; run `make sweep` first or name a folder.")
    return sweeps[-1]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sweep_dir = Path(argv[0]) if argv else latest_sweep()
    print(format_table(collect(sweep_dir)))


if __name__ == "__main__":
    main()
