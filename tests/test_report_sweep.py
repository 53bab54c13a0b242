"""`actlab.report` on a hand-made sweep folder: two seeds per configuration and one failed job."""

import json
import os
import statistics
from pathlib import Path

import pandas as pd
import pytest

from actlab import report

# (slope, seed) -> test acc, best val acc, final train loss, dead fraction, s/epoch
FINISHED = {
    (0.01, 0): (0.971, 0.975, 0.081, 0.10, 1.5),
    (0.01, 1): (0.965, 0.970, 0.092, 0.14, 1.7),
    (0.1, 0): (0.962, 0.966, 0.101, 0.00, 1.4),
    (0.1, 1): (0.958, 0.969, 0.097, 0.02, 1.6),
}


def make_job(sweep: Path, slope: float, seed: int, status: str = "finished") -> Path:
    overrides = [f"model.act.negative_slope={slope}", f"seed={seed}"]
    job = sweep / ",".join(overrides)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    record = {
        "status": status,
        "config": {"act": "leaky", "negative_slope": slope, "seed": seed},
    }
    if status == "finished":
        test_acc, val_best, loss, dead, spe = FINISHED[(slope, seed)]
        record.update(
            metrics={
                "test/acc": test_acc,
                "val/acc_best": val_best,
                "train/loss_epoch": loss,
                "dead/mean": dead,
            },
            seconds_per_epoch=spe,
        )
        rows = []
        for epoch in range(3):  # one validation row and one training row per epoch, as Lightning
            rows.append(
                {
                    "epoch": epoch,
                    "step": 10 * epoch + 9,
                    "val/acc": val_best - 0.01 * (2 - epoch),
                    "dead/layer1": dead,
                    "dead/layer2": dead / 2,
                }
            )  # noqa: E501
            rows.append(
                {"epoch": epoch, "step": 10 * epoch + 9, "train/loss_epoch": loss * (3 - epoch)}
            )  # noqa: E501
        (job / "csv").mkdir()
        pd.DataFrame(rows).to_csv(job / "csv" / "metrics.csv", index=False)
    elif status == "pruned":  # a search's pruner stopped it after its first epoch
        record.update(epochs=1, pruned={"epoch": 1, "val/acc": 0.9})
    else:
        record["error"] = "RuntimeError: loss is NaN"
    (job / "results.json").write_text(json.dumps(record))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for slope, seed in FINISHED:
        make_job(tmp_path, slope, seed)
    make_job(tmp_path, 0.3, 0, status="failed")
    return tmp_path


def test_table_has_mean_and_std_over_seeds_and_lists_the_failed_job(
    sweep: Path, capsys: pytest.CaptureFixture
) -> None:
    report.main([str(sweep)])
    printed = capsys.readouterr().out
    md = (sweep / "report.md").read_text()

    rows = report.summarize(report.group(report.load_jobs(sweep)))
    by_slope = {r["slope"]: r for r in rows}
    assert set(by_slope) == {0.01, 0.1, 0.3}
    names = ["test acc", "best val acc", "final train loss", "dead fraction", "s/epoch"]
    for slope in (0.01, 0.1):
        runs = [v for (s, _), v in FINISHED.items() if s == slope]
        assert by_slope[slope]["seeds"] == 2
        for i, name in enumerate(names):
            values = [r[i] for r in runs]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert by_slope[slope][name] == pytest.approx((mean, std))
            places = 2 if name == "s/epoch" else 4  # seconds with 2 decimals, the rest with 4
            assert f"{mean:.{places}f} ± {std:.{places}f}" in md
            assert f"{mean:.{places}f} ± {std:.{places}f}" in printed
    failed = by_slope[0.3]
    assert failed["seeds"] == 0 and failed["not finished"] == 1
    assert "model.act.negative_slope=0.3,seed=0`: failed (RuntimeError: loss is NaN)" in md


def test_pruned_trials_are_listed_apart_from_the_jobs_that_did_not_finish(sweep: Path) -> None:
    make_job(sweep, 0.5, 0, status="pruned")
    report.main([str(sweep)])
    md = (sweep / "report.md").read_text()

    pruned = md.index("## Trials pruned by the search (1)\n")
    unfinished = md.index("## Jobs that did not finish (1)\n")
    assert (
        "- `model.act.negative_slope=0.5,seed=0`: pruned after 1 epoch(s)\n"
        in md[pruned:unfinished]
    )
    assert md[unfinished:].count("\n- `") == 1  # the failed job only
    assert "`model.act.negative_slope=0.3,seed=0`: failed" in md[unfinished:]
    by_slope = {r["slope"]: r for r in report.summarize(report.group(report.load_jobs(sweep)))}
    assert (by_slope[0.5]["pruned"], by_slope[0.5]["not finished"]) == (1, 0)
    assert (by_slope[0.3]["pruned"], by_slope[0.3]["not finished"]) == (0, 1)
    assert "| pruned |" in md


def test_plots_are_written(sweep: Path) -> None:
    report.main([str(sweep)])
    for name in ("curves.png", "slope.png", "dead.png"):
        png = sweep / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (sweep / "report.md").read_text()


def test_folder_without_jobs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no job folders"):
        report.main([str(tmp_path)])


def test_default_sweep_is_the_one_started_last_not_the_last_name(tmp_path: Path) -> None:
    for name, started in (("zzz_old", 1_000), ("aaa_new", 2_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "multirun.yaml").write_text("{}")
        os.utime(tmp_path / name / "multirun.yaml", (started, started))
    assert report.latest_sweep(tmp_path).name == "aaa_new"
