"""The sweep's summary W&B run, read back with W&B's own reader (`wandb leet`, offline files)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from conftest import CPU, compose_train, run_train, script_env, wandb_inspect, wandb_leet
from hydra.utils import instantiate
from test_report_sweep import FINISHED, make_job

from actlab import report, wandb_runs

# Small synthetic data, 2 epochs; optimizer.lr=-1 fails each of its jobs at the config check.
SWEEP = [
    "-m",
    "data=synthetic",
    "data.source.n_train=600",
    "data.source.n_test=100",
    "data.val_size=100",
    "trainer.max_epochs=2",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "++trainer.enable_progress_bar=false",
    *CPU,
    "model.act=relu,leaky",
    "optimizer.lr=0.1,-1",
    "seed=0,1",
    "hydra.sweep.subdir=${hydra.job.num}",  # the overrides above make too long a name
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wandb_summary")
    env = script_env(NETRC=str(tmp / "no-netrc"), WANDB_CONFIG_DIR=str(tmp / "wandb-config"))
    proc = run_train(*SWEEP, f"hydra.sweep.dir={tmp / 'sweep'}", env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # failed jobs
    # After the sweep's table, one line says where the summary run went.
    assert proc.stdout.index("Sweep ") < proc.stdout.index("W&B sweep summary run: ")
    return tmp / "sweep"


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def job_folders(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


def offline_run(folder: Path) -> Path:
    (run,) = (folder / "wandb").glob("offline-run-*")
    return run


def run_record(run: Path) -> dict:
    """The run record of an offline run's .wandb log: project, group, job type, name."""
    out = wandb_leet(run, "--json")
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return next(r["run"] for r in records if r["type"] == "run")


def logged_table(run: Path, key: str) -> list[dict]:
    """A wandb.Table as the offline run stored it, as one dict per row."""
    (path,) = (run / "files" / "media" / "table").glob(f"{key}_*.table.json")
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_the_sweep_ends_with_a_summary_run_in_its_jobs_project_and_group(sweep: Path) -> None:
    run = offline_run(sweep)
    summary = run_record(run)
    finished = [j for j in job_folders(sweep) if results(j)["status"] == "finished"]
    job_runs = [run_record(offline_run(j)) for j in finished]
    assert summary["job_type"] == "sweep-summary"
    assert summary["display_name"] == sweep.name
    assert summary["run_group"] == sweep.name
    assert {r["run_group"] for r in job_runs} == {sweep.name}
    assert {r["project"] for r in job_runs} == {summary["project"]} == {"actlab"}
    assert wandb_inspect(run)["state"] == "finished"


def test_jobs_table_has_a_row_per_job_with_what_its_results_hold(sweep: Path) -> None:
    rows = {r["folder"]: r for r in logged_table(offline_run(sweep), "sweep/jobs")}
    jobs = job_folders(sweep)
    assert sorted(rows) == sorted(j.name for j in jobs) and len(rows) == 8
    statuses = []
    for job in jobs:
        res, row = results(job), rows[job.name]
        overrides = dict(o.split("=", 1) for o in res["job"]["overrides"])
        statuses.append(row["status"])
        assert row["status"] == res["status"]
        assert (row["act"], row["seed"]) == (res["config"]["act"], res["config"]["seed"])
        assert row["optimizer.lr"] == float(overrides["optimizer.lr"])
        metrics = res.get("metrics", {})
        for key in ("test/acc", "val/acc_best", "dead/mean"):
            assert row[key] == (pytest.approx(metrics[key]) if key in metrics else None)
        assert row["epochs"] == res.get("epochs")
    # The jobs with a negative learning rate failed, and are rows all the same.
    assert sorted(statuses) == ["failed"] * 4 + ["finished"] * 4


def test_configuration_table_is_mean_and_std_over_seeds(sweep: Path) -> None:
    run = offline_run(sweep)
    by_config: dict[tuple, list[dict]] = {}
    for job in job_folders(sweep):
        res = results(job)
        lr = float(dict(o.split("=", 1) for o in res["job"]["overrides"])["optimizer.lr"])
        by_config.setdefault((res["config"]["act"], lr), []).append(res)
    rows = {(r["act"], r["optimizer.lr"]): r for r in logged_table(run, "sweep/configurations")}
    assert set(rows) == set(by_config)
    means = {}
    for key, records in by_config.items():
        done = [r["metrics"] for r in records if r["status"] == "finished"]
        row = rows[key]
        assert (row["seeds"], row["not finished"]) == (len(done), len(records) - len(done))
        if key[1] < 0:
            assert row["test acc mean"] is None
            continue
        for name, metric in (("test acc", "test/acc"), ("best val acc", "val/acc_best")):
            values = [m[metric] for m in done]
            assert row[f"{name} mean"] == pytest.approx(statistics.fmean(values))
            assert row[f"{name} std"] == pytest.approx(statistics.stdev(values))
        means[row["configuration"]] = statistics.fmean(m["test/acc"] for m in done)
    best = wandb_inspect(run)["summary"]
    assert best["best/test/acc"] == pytest.approx(max(means.values()))
    assert means[best["best/configuration"]] == pytest.approx(max(means.values()))


def test_val_accuracy_per_epoch_is_a_line_per_configuration_and_plots_are_images(
    sweep: Path,
) -> None:
    run = offline_run(sweep)
    val: dict[str, dict[int, list[float]]] = {}  # act -> epoch (from 1) -> val/acc of each seed
    for job in job_folders(sweep):
        if results(job)["status"] == "finished":
            act = results(job)["config"]["act"]
            with open(job / "csv" / "metrics.csv", newline="") as f:
                for r in csv.DictReader(f):
                    if r["val/acc"]:
                        val.setdefault(act, {}).setdefault(int(r["epoch"]) + 1, []).append(
                            float(r["val/acc"])
                        )
    points = logged_table(run, "sweep/val_acc_table")  # the line-series chart's data
    lines = {p["lineKey"] for p in points}
    assert len(lines) == 2  # the two configurations that trained; failed ones have no curve
    for p in points:
        act = p["lineKey"].split()[0].rstrip(",")
        assert p["lineVal"] == pytest.approx(statistics.fmean(val[act][p["step"]]))
    assert sorted(p["step"] for p in points) == [1, 1, 2, 2]

    summary = wandb_inspect(run)["summary"]
    for plot in ("curves", "dead"):
        image = summary[f"sweep/{plot}"]
        assert image["_type"] == "image-file"
        assert (run / "files" / image["path"]).read_bytes()[:4] == b"\x89PNG"


def test_make_report_writes_the_summary_of_a_sweep_that_has_none_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    for slope, seed in FINISHED:
        make_job(sweep, slope, seed)
    make_job(sweep, 0.3, 0, status="failed")
    # A sweep run with logger=csv ends (Hydra's callbacks, as configured) without a W&B run.
    config = compose_train("logger=csv", f"hydra.sweep.dir={sweep}")
    callbacks = [instantiate(c) for c in config.hydra.callbacks.values()]
    with pytest.raises(SystemExit):  # in Hydra's order, the reverse: exit status 1 comes last
        for callback in reversed(callbacks):
            callback.on_multirun_end(config)
    assert not (sweep / "wandb").exists()
    # Without W&B, `make report` writes its files only.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    report.main([str(sweep)])
    assert (sweep / "report.md").is_file() and not (sweep / "wandb").exists()

    monkeypatch.delenv("WANDB_MODE")
    report.main([str(sweep)])
    report.main([str(sweep)])  # it has one now: no second run
    run = offline_run(sweep)
    record = run_record(run)
    assert (record["job_type"], record["run_group"]) == ("sweep-summary", sweep.name)
    assert record["project"] == "actlab"  # configs/logger/wandb.yaml's
    rows = logged_table(run, "sweep/jobs")
    assert len(rows) == 5
    failed = [r for r in rows if r["slope"] == 0.3]
    assert [(r["status"], r["test/acc"]) for r in failed] == [("failed", None)]


def test_the_summary_goes_where_the_sweep_sent_its_jobs() -> None:
    default = compose_train()
    settings = wandb_runs.sweep_settings(default)
    # Each job's own folder is no place for the summary: it goes to the sweep folder.
    assert "save_dir" not in settings
    assert settings["project"] == default.logger.wandb.project
    given = compose_train(
        "logger.wandb.project=mine", "logger.wandb.mode=offline", "logger.wandb.save_dir=/w"
    )
    assert wandb_runs.sweep_settings(given) == {
        "project": "mine",
        "mode": "offline",
        "init_timeout": 30,
        "save_dir": "/w",
    }
    assert wandb_runs.sweep_settings(compose_train("logger=csv")) is None
