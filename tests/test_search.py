"""hydra/sweeper=packed_optuna (hparams_search=slope_optuna): Optuna's trials asked a round at a
time, trained as packs, their values told back from their results.json; resume; solo trials."""

from __future__ import annotations

import csv
import shutil
import statistics
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import CPU, here, here_exit, metric_rows, net_weights, results, wandb_inspect
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from test_wandb_summary import logged_table, offline_run

from actlab import pack, report
from actlab.errors import UserError
from actlab.results import write_json
from hydra_plugins.actlab_optuna import PackSearch, Space

# Packable (no progress-bar flag of the trainer's), small, one epoch, offline.
SEARCH = [
    "hparams_search=slope_optuna",
    "data=synthetic",
    "data.source.n_train=300",
    "data.source.n_test=100",
    "data.val_size=100",
    "callbacks.progress_bar.refresh_rate=0",
    *CPU,
    "logger=csv",
    "trainer.max_epochs=1",
]
SPACE = {
    "model.act.negative_slope": FloatDistribution(0.0, 0.5),
    "optimizer.lr": FloatDistribution(0.001, 0.3, log=True),
}


def study(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name="slope_optuna", storage=f"sqlite:///{sweep}/study.db")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 trials, 4 a round (TPE after 3), trial 0 failing mid-training."""
    sweep = tmp_path_factory.mktemp("search") / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "checkpoints").write_text("in the way")  # trial 0 cannot save a checkpoint
    here(
        *SEARCH,
        "hydra.sweeper.n_trials=7",
        "hydra.sweeper.members_per_round=4",
        "hydra.sweeper.n_startup_trials=3",
        f"hydra.sweep.dir={sweep}",
    )
    return sweep


def test_space_parses_as_a_grid_is_written() -> None:
    lines = [
        "a=interval(0.0, 0.5)",
        "b=tag(log, interval(0.001, 0.3))",
        "c=choice([8],[16,16])",
        "d=range(1,5)",
        "e=choice(relu,leaky)",
        "f=tag(int, interval(1, 4))",
        "seed=3",
    ]
    space = Space(OverridesParser.create().parse_overrides(lines))
    assert space.distributions == {
        "a": FloatDistribution(0.0, 0.5),
        "b": FloatDistribution(0.001, 0.3, log=True),
        "c": CategoricalDistribution(["[8]", "[16,16]"]),
        "d": IntDistribution(1, 4),
        "e": CategoricalDistribution(["relu", "leaky"]),
        "f": IntDistribution(1, 4),
    }
    params = {"a": 0.25, "b": 0.01, "c": "[16,16]", "d": 2, "e": "leaky", "f": 3}
    assert space.overrides(params) == [
        "seed=3",
        "a=0.25",
        "b=0.01",
        "c=[16,16]",
        "d=2",
        "e=leaky",
        "f=3",
    ]
    with pytest.raises(UserError, match="but a is an interval: write choice"):
        space.grid()
    grid = Space(OverridesParser.create().parse_overrides(lines[2:5])).grid()
    assert grid == {"c": ["[8]", "[16,16]"], "d": [1, 2, 3, 4], "e": ["relu", "leaky"]}


@pytest.mark.slow
def test_rounds_train_as_one_pack_each_and_tell_each_members_value(searched: Path) -> None:
    trials = study(searched).get_trials()
    assert [t.number for t in trials] == list(range(7))
    for t in trials:
        record = results(searched / str(t.number))
        assert t.params == {
            "model.act.negative_slope": record["config"]["negative_slope"],
            "optimizer.lr": record["config"]["lr"],
        }
        assert t.user_attrs["status"] == record["status"]
        if t.number == 0:  # failed: told so, and the other 6 trials trained on
            assert record["status"] == "failed" and t.state == TrialState.FAIL
        else:
            assert record["status"] == "finished" and t.state == TrialState.COMPLETE
            assert t.value == record["metrics"]["val/acc_best"]
        # Rounds of 4 and 3 trials, each one pack (named by its first trial).
        pack = "pack-0" if t.number < 4 else "pack-4"
        assert record["pack"]["id"] == pack
        assert record["pack"]["size"] == (4 if t.number < 4 else 3)
    members = {
        p.parent.name: len(yaml.safe_load(p.read_text()))
        for p in searched.glob(".packs/*/members.yaml")
    }
    assert members == {"pack-0": 4, "pack-4": 3}
    best = yaml.safe_load((searched / "optimization_results.yaml").read_text())
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    top = max(done, key=lambda t: t.value)
    assert best["best_trial"] == top.number and best["best_value"] == top.value
    assert best["best_params"] == top.params and best["best_job"] == str(searched / str(top.number))


@pytest.mark.slow
def test_the_study_is_the_one_optuna_makes_with_the_same_seed_and_values(searched: Path) -> None:
    ours = study(searched).get_trials()
    direct = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3)
    )
    for start, stop in ((0, 4), (4, 7)):  # asked a round at a time, told after it
        asked = [direct.ask(SPACE) for _ in range(start, stop)]
        assert [t.params for t in asked] == [t.params for t in ours[start:stop]]
        for trial, told in zip(asked, ours[start:stop], strict=True):
            direct.tell(trial, told.value, state=told.state)


@pytest.mark.slow
def test_a_killed_search_resumes_its_study(tmp_path: Path) -> None:
    """A search killed in its second round: trial 1's job had finished, trial 2's was running."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    made = optuna.create_study(
        study_name="slope_optuna", storage=f"sqlite:///{sweep}/study.db", direction="maximize"
    )
    for n in range(3):
        trial = made.ask(SPACE)
        trial.set_user_attr("job", str(sweep / str(n)))
        trial.set_user_attr("metric", "val/acc_best")
        if n == 0:
            trial.set_user_attr("status", "finished")
            made.tell(trial, 0.4)
    write_json(
        sweep / "1" / "results.json", {"status": "finished", "metrics": {"val/acc_best": 0.5}}
    )
    write_json(sweep / "2" / "results.json", {"status": "running", "metrics": {}})
    (sweep / "2" / "checkpoints").mkdir()

    status, _, err = here_exit(*SEARCH, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}")
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        f"error: {sweep} holds the study slope_optuna (3 trials): add +resume=true to continue "
        "it, or choose another hydra.sweep.dir."
    )
    assert len(study(sweep).trials) == 3  # untouched

    here(*SEARCH, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", "+resume=true")
    trials = study(sweep).get_trials()
    assert [(t.number, t.state) for t in trials] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.COMPLETE),  # its job had finished: its value told now
        (2, TrialState.FAIL),  # stopped by the kill: failed, not counted
        (3, TrialState.COMPLETE),  # n_trials=3 across attempts: one more trial
    ]
    assert trials[1].value == 0.5 and trials[2].user_attrs["stopped"] == "running"
    assert "status" not in trials[2].user_attrs
    assert not (sweep / "2" / "results.json").exists()  # its attempt set aside
    (kept,) = (sweep / "2" / "attempts").iterdir()
    assert results(kept)["status"] == "running" and (kept / "checkpoints").is_dir()
    assert trials[3].value == results(sweep / "3")["metrics"]["val/acc_best"]


@pytest.mark.slow
def test_trials_that_cannot_pack_run_solo(tmp_path: Path) -> None:
    """The network's sizes in the space (a list-valued choice): trials pack with those of their
    round that have the same network, one alone runs as a solo job."""
    sweep = tmp_path / "sweep"
    here(
        *SEARCH,
        "model.net.hidden_sizes=choice([8],[16,16])",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.members_per_round=3",
        f"hydra.sweep.dir={sweep}",
    )
    trials = study(sweep).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    sizes = [t.params["model.net.hidden_sizes"] for t in trials]
    assert len(set(sizes)) == 2  # with this seed: one network twice, the other once
    for t in trials:
        record = results(sweep / str(t.number))
        assert str(record["config"]["hidden_sizes"]).replace(" ", "") == sizes[t.number]
        same = sizes.count(sizes[t.number])
        assert record["pack"]["size"] == same  # the one alone: a pack of one


PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("best_so_far", "param_importances", "contour")


def trials_csv(sweep: Path) -> dict[int, dict[str, str]]:
    with open(sweep / "search" / "trials.csv", newline="") as f:
        return {int(r["trial"]): r for r in csv.DictReader(f)}


def same_trials(rows: dict[int, dict], trials: list[optuna.trial.FrozenTrial]) -> None:
    """The trials table (csv text or W&B values) has each trial's params, value, state, folder."""
    assert sorted(rows) == [t.number for t in trials]
    for t in trials:
        row = rows[t.number]
        assert row["state"] == t.state.name.lower()
        assert str(row["folder"]) == Path(t.user_attrs["job"]).name
        assert (float(row["value"]) if row["value"] not in ("", None) else None) == t.value
        for key, value in t.params.items():
            assert float(row[key]) == value


@pytest.mark.slow
def test_a_search_ends_with_its_summary_in_the_sweep_report_and_w_and_b(
    searched: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trials = study(searched).get_trials()
    folder = searched / "search"
    for name in PLOTS:
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG
        assert f"]({name}.png)" in (folder / "summary.md").read_text()
    same_trials(trials_csv(searched), trials)
    assert trials_csv(searched)[0]["state"] == "fail"  # trial 0 could not save a checkpoint

    drawn = []
    draw = report.search_summary
    monkeypatch.setattr(report, "search_summary", lambda *a: drawn.append(a) or draw(*a))
    report.main([str(searched)])  # make report: report.md, and the W&B summary run (offline)
    assert len(drawn) == 1  # the summary run logs the files report.md shows, not a second drawing
    md = (searched / "report.md").read_text()
    search = md[md.index("## Search\n") :]
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert f"7 trials: 6 complete, 1 fail. Best: trial {best.number}, val/acc_best =" in search
    assert sum(line.startswith("|") for line in search.splitlines()) == 2 + 7  # a row a trial
    for name in PLOTS:
        assert f"](search/{name}.png)" in search
    run = offline_run(searched)
    same_trials({r["trial"]: r for r in logged_table(run, "search/trials")}, trials)
    summary = wandb_inspect(run)["summary"]
    assert (summary["search/best_trial"], summary["search/best_value"]) == (best.number, best.value)
    for name in PLOTS:
        image = summary[f"search/{name}"]
        assert (run / "files" / image["path"]).read_bytes()[:8] == PNG


def made_study(sweep: Path, space: dict, outcomes: list[str]) -> optuna.Study:
    """A study in <sweep>/study.db, made by Optuna directly: a trial per outcome, as the sweeper
    records them (its folder, and a pruned one's epochs reported)."""
    made = optuna.create_study(study_name="made", storage=f"sqlite:///{sweep}/study.db")
    for n, outcome in enumerate(outcomes):
        trial = made.ask(space)
        trial.set_user_attr("job", str(sweep / str(n)))
        trial.set_user_attr("metric", "val/acc_best")
        if outcome == "complete":
            made.tell(trial, 0.5 + n / 100)
        elif outcome == "pruned":
            trial.report(0.1, 1)
            trial.report(0.2, 2)
            made.tell(trial, state=TrialState.PRUNED)
        else:
            made.tell(trial, state=TrialState.FAIL)
    return made


def test_what_optuna_cannot_plot_is_one_line_of_the_summary(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    made_study(one, {"x": FloatDistribution(0.0, 1.0)}, ["complete"] * 3)
    report.write_search(one)
    summary = (one / "search" / "summary.md").read_text()
    assert "\nNo contour plot: the search has 1 parameter(s), a contour plots two.\n" in summary
    assert not (one / "search" / "contour.png").exists()
    for name in PLOTS[:2]:
        assert (one / "search" / f"{name}.png").read_bytes()[:8] == PNG

    few = tmp_path / "few"
    few.mkdir()
    made_study(few, SPACE, ["fail", "complete", "pruned"])
    search = report.write_search(few)
    assert search.notes == [
        "No parameter importances: 1 trial(s) finished, it takes 2.",
        "No contour plot: 1 trial(s) finished, it takes 2.",
    ]
    assert [p.name for p in (few / "search").glob("*.png")] == ["best_so_far.png"]
    rows = trials_csv(few)
    assert [rows[n]["state"] for n in range(3)] == ["fail", "complete", "pruned"]
    assert [rows[n]["pruned at epoch"] for n in range(3)] == ["", "", "2"]  # steps 1 and 2


def test_the_contour_plots_each_pair_of_parameters_on_their_own_scales(tmp_path: Path) -> None:
    space = {
        **SPACE,
        "model.net.hidden_sizes": CategoricalDistribution(["[8]", "[16,16]"]),
    }
    made = made_study(tmp_path, space, ["complete"] * 6 + ["fail"])
    done = made.get_trials(states=(TrialState.COMPLETE,))
    axes = report.contour(made, list(space), "val/acc_best").ravel()
    pairs = [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes if ax.axison]
    assert pairs == [
        ("model.act.negative_slope", "optimizer.lr (log scale)"),
        ("model.act.negative_slope", "model.net.hidden_sizes"),
        ("optimizer.lr (log scale)", "model.net.hidden_sizes"),
    ]
    dots = [ax.collections[-1] for ax in axes if ax.axison]
    for dot in dots:
        assert len(dot.get_offsets()) == len(done)  # a dot a finished trial, the failed one none
    first = dots[0].get_offsets()
    lr = [t.params["optimizer.lr"] for t in done]
    assert torch.allclose(torch.tensor(first[:, 1]), torch.tensor(lr).log10().double())
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["[8]", "[16,16]"]
    # The best trial (made_study minimises) is the darkest dot.
    shade = dots[0].to_rgba(dots[0].get_array())[:, :3].sum(1)
    assert done[shade.argmin()].number == made.best_trial.number == 0
    assert all(len(ax.collections) >= 2 for ax in axes if ax.axison)  # the filled contour too

    two = tmp_path / "two"
    two.mkdir()
    made = made_study(two, SPACE, ["complete"] * 2)
    (ax,) = report.contour(made, list(SPACE), "val/acc_best").ravel()
    assert len(ax.collections) == 1  # no triangle to fill: the two dots alone
    assert len(ax.collections[0].get_offsets()) == 2


def val_best(folder: Path) -> list[float]:
    """The member's val/acc_best after each epoch, from its metrics.csv."""
    return [float(r["val/acc_best"]) for r in metric_rows(folder) if r["val/acc_best"]]


@pytest.mark.slow
@pytest.mark.parametrize("per_round", [3, 1], ids=["packed", "solo"])
def test_a_median_pruner_stops_trials_records_them_and_tells_them_pruned(
    tmp_path: Path, per_round: int
) -> None:
    """A trial is pruned after the first epoch at which its best is below the median, at that
    epoch, of the trials finished before its round (once 3 have), as read from their csv files:
    a pack's members (3 a round) and solo trials (1 a round) alike."""
    sweep = tmp_path / "sweep"
    out = here(
        *SEARCH,
        "trainer.max_epochs=3",
        "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.members_per_round={per_round}",
        "hydra.sweeper.pruner=median",
        "hydra.sweeper.pruner_startup_trials=3",
        "hydra.sweeper.pruner_warmup_epochs=0",
        f"hydra.sweep.dir={sweep}",
    )
    trials = study(sweep).get_trials()
    assert (sweep / ".packs").is_dir() == (per_round > 1)  # 1 a round: solo jobs
    finished: list[list[float]] = []  # the val_best curves of the trials finished so far
    pruned = []
    for first in range(0, 6, per_round):
        before = list(finished)
        for t in trials[first : first + per_round]:
            folder = sweep / str(t.number)
            values, record = val_best(folder), results(folder)
            stop = next(
                (
                    e
                    for e in range(3)
                    if len(before) >= 3 and values[e] < statistics.median(v[e] for v in before)
                ),
                None,
            )
            if stop is None:
                assert record["status"] == "finished" and t.state == TrialState.COMPLETE
                assert len(values) == 3
                finished.append(values)
                continue
            pruned.append(t.number)
            assert record["status"] == "pruned" and t.state == TrialState.PRUNED
            assert record["pruned"]["epoch"] == record["epochs"] == len(values) == stop + 1
            assert "test/acc" in record["metrics"]  # tested, as an early-stopped run
            assert torch.load(folder / "checkpoints" / "last.ckpt")["epoch"] == stop
            assert t.intermediate_values == dict(enumerate(values, 1))
    assert 0 < len(pruned) < 3, pruned  # the test sees both outcomes
    # The search's trials table marks them, with the epoch they stopped after.
    rows = trials_csv(sweep)
    for t in trials:
        record = results(sweep / str(t.number))
        assert rows[t.number]["state"] == t.state.name.lower()
        stopped = rows[t.number]["pruned at epoch"]
        assert stopped == (str(record["pruned"]["epoch"]) if t.number in pruned else "")
    # The sweep's table says which were pruned, and not that they did not finish.
    assert f"{len(pruned)} trial(s) pruned by the search: {', '.join(map(str, pruned))}" in out
    assert "did not finish" not in out


def test_a_grid_of_intervals_is_refused_and_a_timeout_starts_no_round(tmp_path: Path) -> None:
    status, _, err = here_exit(*SEARCH, "hydra.sweeper.sampler=grid", f"hydra.sweep.dir={tmp_path}")
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: hydra.sweeper.sampler=grid needs every key a choice or a range, but "
        "model.act.negative_slope is an interval: write choice(...) or range(...), or use "
        "sampler=tpe."
    )
    here(*SEARCH, "hydra.sweeper.timeout=0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert study(tmp_path / "sweep").trials == []
    assert not [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]


@pytest.mark.parametrize("factor", [2, 4])
def test_halving_keeps_the_best_1_over_its_reduction_factor_after_the_first_epoch(
    tmp_path: Path, factor: int
) -> None:
    """PackSearch with the sweeper's halving settings: after epoch 1 (step 1, the first rung),
    a fourth trial, second best of the 4 at that rung, goes on with a factor of 2 (the best 2 of
    4 go on) and is pruned with a factor of 4 (the best 1 goes on)."""
    storage = f"sqlite:///{tmp_path}/study.db"
    made = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for _ in range(4):
        made.ask()
    rule = {"name": "halving", "warmup_epochs": 1, "reduction_factor": factor}
    prune = PackSearch(storage, "s", rule, {str(n): "val/acc" for n in range(4)})
    for n, acc in enumerate([0.4, 0.3, 0.2]):
        prune(str(n), 1, {"val/acc": acc})
    assert prune("3", 1, {"val/acc": 0.35}) == (factor == 4)
    assert made.trials[3].intermediate_values == {1: 0.35}


def test_a_reduction_factor_below_2_is_refused(tmp_path: Path) -> None:
    args = [*SEARCH, "hydra.sweeper.pruner=halving", "hydra.sweeper.pruner_reduction_factor=1"]
    status, _, err = here_exit(*args, f"hydra.sweep.dir={tmp_path}")
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: hydra.sweeper.pruner_reduction_factor=1: give an integer >= 2."
    )


@pytest.mark.slow
def test_a_pruning_search_refills_its_pack_and_a_refilled_trial_is_its_solo_job(
    tmp_path: Path,
) -> None:
    """Halving prunes members of the round's one pack after each rung: the study's next trials
    take their slots in that pack (one launch for all 10), each told as it leaves the stack,
    and one that joined later trains as its solo job does, from its own first epoch."""
    sweep = tmp_path / "sweep"
    here(
        *SEARCH,
        "trainer.max_epochs=3",
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.members_per_round=4",
        "hydra.sweeper.n_startup_trials=3",
        "hydra.sweeper.pruner=halving",
        "hydra.sweeper.pruner_reduction_factor=2",
        "trainer.log_every_n_steps=3",  # not a divisor of an epoch's 4 steps
        f"hydra.sweep.dir={sweep}",
    )
    trials = study(sweep).get_trials()
    assert len(trials) == 10 and not any(t.state == TrialState.RUNNING for t in trials)
    assert [p.name for p in (sweep / ".packs").iterdir()] == ["pack-0"]
    listed = yaml.safe_load((sweep / ".packs" / "pack-0" / "members.yaml").read_text())
    assert sorted(int(m["hydra"]["job"]["num"]) for m in listed) == list(range(10))
    joined = {}
    for t in trials:
        record = results(sweep / str(t.number))
        assert record["pack"]["id"] == "pack-0" and record["pack"]["size"] == 4
        assert t.user_attrs["status"] == record["status"]
        expected = {"finished": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
        assert t.state == expected[record["status"]], t.number
        if record["status"] == "finished":
            assert t.value == record["metrics"]["val/acc_best"] and record["epochs"] == 3
        if "joined_epoch" in record["pack"]:
            assert t.number >= 4
            joined[t.number] = record
    late = [
        n for n, r in joined.items() if r["status"] == "finished" and r["pack"]["joined_epoch"] > 1
    ]
    assert late, joined  # the test sees a trial that joined after a rung and trained on
    n = late[0]
    member = sweep / str(n)
    solo = tmp_path / "solo"
    overrides = yaml.safe_load((member / ".hydra" / "overrides.yaml").read_text())
    here(*overrides, "hydra.mode=RUN", f"hydra.run.dir={solo}")
    s, p = results(solo), joined[n]
    assert s["status"] == "finished"
    for key in ("val/acc_best", "test/acc", "val/loss", "train/loss_epoch"):
        assert p["metrics"][key] == pytest.approx(s["metrics"][key], abs=1e-5), key
    ws, wp = (net_weights(f / "checkpoints" / "last.ckpt") for f in (solo, member))
    for key in ws:
        torch.testing.assert_close(wp[key], ws[key], atol=1e-5, rtol=0)
    own, theirs = (torch.load(f / "checkpoints" / "last.ckpt") for f in (member, solo))
    assert (own["epoch"], own["global_step"]) == (theirs["epoch"], theirs["global_step"])
    for key, count in (("val/acc", 3), ("train/loss", 4)):  # each 3rd step of its own
        rows = [(r["epoch"], r["step"], float(r[key])) for r in metric_rows(member) if r[key]]
        alone = [(r["epoch"], r["step"], float(r[key])) for r in metric_rows(solo) if r[key]]
        assert len(rows) == count and [r[:2] for r in rows] == [r[:2] for r in alone], key
        assert [r[2] for r in rows] == pytest.approx([r[2] for r in alone], abs=1e-5), key
    # Had the pack been killed outright (SIGKILL, a lost node), its launcher's fail_unended
    # would find the trials that joined in the members.yaml that each join appended to.
    started, never = sweep / "0", sweep / str(max(joined))
    write_json(started / "results.json", {**results(started), "status": "running"})
    (never / "results.json").unlink()
    shutil.rmtree(never / ".hydra")
    error = "the pack's process was killed"
    assert pack.fail_unended(sweep / ".packs" / "pack-0", error, "lost") == ["0", never.name]
    assert results(started)["status"] == "lost" and results(never)["status"] == "failed"
    assert results(never)["error"] == error and (never / ".hydra" / "overrides.yaml").is_file()
