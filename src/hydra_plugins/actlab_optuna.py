"""`hydra/sweeper=packed_optuna`: an Optuna search whose trials are asked K at a time and trained
as packs.

The search space is `hydra.sweeper.params` (and sweeps on the command line), written as for a
grid: `interval(a, b)`, `tag(log, interval(a, b))`, `tag(int, interval(a, b))`, `choice(...)`
(list-valued choices too), `range(...)`; other overrides hold for every trial. Each round asks
`members_per_round` trials (at most `max_members`), composes them and hands them to the launcher
in one launch, packed as the packed sweeper packs a grid (actlab_packed.plan): trials that differ
only in member keys share a pack, the others run solo. Trial n is the job folder `<sweep>/n`; its
`results.json` gives the value told to Optuna (`optimized_metric`), and a trial that did not
finish (failed, diverged) is told failed. With `pruner` set, each pack's members and each solo
trial report to their trials after each epoch (the job folder's trials.yaml names `pack_pruner`
by `_target_`, and the job calls what it returns); a pruned member leaves the pack's stack, a
pruned solo trial stops after that epoch, and both are recorded `pruned` and told so. The study
is `<sweep>/study.db` (Optuna's RDB storage on sqlite): `+resume=true` continues it, with the
trials a killed search left running told failed (their folders set aside) unless their job had
ended. A search that ends writes its summary, the trials table and Optuna's plots, into
`<sweep>/search/` (actlab.report.write_search).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict

from actlab.errors import UserError
from actlab.report import SEARCH_DIR, STUDY, study_storage, write_search
from actlab.results import SEARCH, read_results
from actlab.runs import set_aside
from hydra_plugins.actlab_grid import distinct_jobs
from hydra_plugins.actlab_packed import PACKS, _default_members, jobs_at_once, members_limit, plan

log = logging.getLogger(__name__)
BEST = "optimization_results.yaml"
INSTALL = "pip install -e '.[search]'"
PRUNERS = ("none", "median", "halving", "hyperband")


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(
            f"hydra/sweeper=packed_optuna (hparams_search) needs Optuna, not installed: {INSTALL}"
        ) from None
    return optuna


class Space:
    """The search space: each key's Optuna distribution, and how a sampled value is written back
    as an override (a list-valued choice is one of Optuna's categories by its override text)."""

    def __init__(self, overrides: list[Override]) -> None:
        optuna = _optuna()
        dist = optuna.distributions
        self.fixed: list[str] = []
        self.distributions: dict[str, Any] = {}
        self.texts: dict[str, dict[Any, str]] = {}
        for o in overrides:
            if not o.is_sweep_override():
                self.fixed.append(o.input_line or f"{o.get_key_element()}={o.value()}")
                continue
            key, value = o.get_key_element(), o.value()
            if isinstance(value, IntervalSweep):
                log_scale = "log" in value.tags
                if "int" in value.tags:
                    d = dist.IntDistribution(int(value.start), int(value.end), log=log_scale)
                else:
                    d = dist.FloatDistribution(value.start, value.end, log=log_scale)
            elif isinstance(value, RangeSweep | ChoiceSweep):
                values = list(o.sweep_iterator())
                texts = list(o.sweep_iterator(transformer=Transformer.encode))
                step = value.step if isinstance(value, RangeSweep) else None
                if all(type(v) is int for v in values) and type(step) is int and step > 0:
                    d = dist.IntDistribution(values[0], values[-1], step=step)
                else:
                    texts = list(map(str, texts))
                    categories = [v if _plain(v) else t for v, t in zip(values, texts, strict=True)]
                    self.texts[key] = dict(zip(categories, texts, strict=True))
                    d = dist.CategoricalDistribution(categories)
            else:
                raise UserError(f"{o.input_line}: a search key takes interval, choice or range.")
            self.distributions[key] = d

    def overrides(self, params: dict[str, Any]) -> list[str]:
        texts = {k: self.texts[k][v] if k in self.texts else repr(v) for k, v in params.items()}
        return self.fixed + [f"{k}={text}" for k, text in texts.items()]

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space: every key a choice or a range."""
        grid = {}
        for key, d in self.distributions.items():
            if hasattr(d, "choices"):
                grid[key] = list(d.choices)
            elif d.step is not None and type(d.low) is int:
                grid[key] = list(range(d.low, d.high + 1, d.step))
            else:
                raise UserError(
                    f"hydra.sweeper.sampler=grid needs every key a choice or a range, but {key} "
                    "is an interval: write choice(...) or range(...), or use sampler=tpe."
                )
        return grid


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


class PackedOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: str = "tpe",
        seed: int | None = None,
        n_startup_trials: int = 10,
        direction: str = "maximize",
        study_name: str = "search",
        n_trials: int = 20,
        timeout: float | None = None,
        members_per_round: int = 8,
        max_members: int | None = None,
        params: dict[str, str] | None = None,
        pruner: str = "none",
        pruner_startup_trials: int = 4,
        pruner_warmup_epochs: int = 1,
        pruner_reduction_factor: int = 4,
    ) -> None:
        if pruner not in PRUNERS:
            raise UserError(f"hydra.sweeper.pruner={pruner}: choose {', '.join(PRUNERS)}.")
        if sampler not in ("tpe", "random", "grid"):
            raise UserError(f"hydra.sweeper.sampler={sampler}: choose tpe, random or grid.")
        if direction not in ("maximize", "minimize"):
            raise UserError(f"hydra.sweeper.direction={direction}: choose maximize or minimize.")
        for name, n, least in (
            ("n_trials", n_trials, 1),
            ("members_per_round", members_per_round, 1),
            ("pruner_reduction_factor", pruner_reduction_factor, 2),
        ):
            if type(n) is not int or n < least:
                raise UserError(f"hydra.sweeper.{name}={n}: give an integer >= {least}.")
        self.sampler, self.seed, self.n_startup_trials = sampler, seed, n_startup_trials
        self.direction, self.study_name = direction, study_name
        self.n_trials, self.timeout = n_trials, timeout
        self.members_per_round = members_per_round
        self.max_members = members_limit(max_members)
        self.params = params or {}
        self.pruning = {
            "name": pruner,
            "startup_trials": pruner_startup_trials,
            "warmup_epochs": pruner_warmup_epochs,
            "reduction_factor": pruner_reduction_factor,
        }
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs each trial itself
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        lines = [f"{k}={v}" for k, v in self.params.items()] + arguments
        space = Space(parser.parse_overrides(lines))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = self._study(optuna, sweep_dir, space)
        n_trials = self.n_trials
        if self.sampler == "grid":
            n_trials = min(n_trials, math.prod(len(v) for v in space.grid().values()))
        per_round = min(self.members_per_round, self.max_members or _default_members(self.config))
        start = time.monotonic()
        rounds = []
        while (left := n_trials - _counted(study)) > 0:
            if self.timeout is not None and time.monotonic() - start >= self.timeout:
                log.info("search: hydra.sweeper.timeout=%s s reached", self.timeout)
                break
            trials = [study.ask(space.distributions) for _ in range(min(per_round, left))]
            rounds.append(self._round(study, trials, space, sweep_dir))
            _write_best(study, sweep_dir)
        log.info("search: %d trial(s) of %d in %s", _counted(study), n_trials, sweep_dir / STUDY)
        if not (sweep_dir / BEST).exists():
            log.warning("search: no trial finished (see their results.json), so no %s", BEST)
        if (search := write_search(sweep_dir)) is not None:
            log.info("search: %s %s", search.headline, sweep_dir / SEARCH_DIR / "summary.md")
        return rounds

    def _study(self, optuna: Any, sweep_dir: Path, space: Space) -> Any:
        samplers = optuna.samplers
        if self.sampler == "tpe":
            sampler = samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials)
        elif self.sampler == "random":
            sampler = samplers.RandomSampler(seed=self.seed)
        else:
            sampler = samplers.GridSampler(space.grid(), seed=self.seed)
        study = optuna.create_study(
            storage=study_storage(sweep_dir),
            study_name=self.study_name,
            sampler=sampler,
            direction=self.direction,
            load_if_exists=True,
        )
        trials = study.get_trials(deepcopy=False)
        if trials and not self.config.get("resume"):
            raise UserError(
                f"{sweep_dir} holds the study {self.study_name} ({len(trials)} trials): add "
                "+resume=true to continue it, or choose another hydra.sweep.dir."
            )
        if study.direction.name.lower() != self.direction:
            raise UserError(
                f"the study in {sweep_dir} is to {study.direction.name.lower()}, not to "
                f"{self.direction}: resume it with hydra.sweeper.direction="
                f"{study.direction.name.lower()}, or choose another hydra.sweep.dir."
            )
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        for frozen in running:  # left so by a search that was killed
            trial = optuna.trial.Trial(study, frozen._trial_id)
            folder = sweep_dir / str(frozen.number)
            record = read_results(folder) or {}
            if record.get("status") in ("finished", "pruned"):  # ended before the search did
                _tell(study, trial, folder, frozen.user_attrs.get("metric", "val/acc_best"))
                continue
            kept = set_aside(folder)
            trial.set_user_attr("stopped", record.get("status", "not started"))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.info(
                "trial %d: %s when the search stopped: recorded failed%s",
                frozen.number,
                record.get("status", "not started"),
                f" (its attempt is kept in {kept})" if kept else "",
            )
        if trials:
            log.info("search: continues the study %s (%d trials)", self.study_name, len(trials))
        return study

    def _round(self, study: Any, trials: list[Any], space: Space, sweep_dir: Path) -> Any:
        loader = self.hydra_context.config_loader
        overrides = [space.overrides(t.params) for t in trials]
        composed = distinct_jobs(overrides, loader, self.config)
        kept = {tuple(job): cfg for job, cfg in composed}
        jobs: list[Any] = []
        twins: dict[tuple[str, ...], Any] = {}  # a round's trials of one config train once
        for trial, job in zip(trials, overrides, strict=True):
            twin = twins.setdefault(tuple(job), trial)
            folder = sweep_dir / str(twin.number)
            trial.set_user_attr("job", str(folder))
            if twin is not trial:
                trial.set_user_attr("same_as", twin.number)
                continue
            cfg = kept.get(tuple(job))
            if cfg is None:  # another trial's config, written otherwise: told failed
                continue
            with open_dict(cfg):
                cfg.hydra.sweep.subdir = str(trial.number)
            trial.set_user_attr("metric", str(cfg.get("optimized_metric") or "val/acc_best"))
            jobs.append((trial.number, job, cfg))
        first = trials[0].number
        batch, solo, sizes = plan(jobs, sweep_dir, self.launcher, self.max_members, first)
        solo_jobs = [[*job, f"hydra.sweep.subdir={num}"] for num, job, _ in solo]
        if self.pruning["name"] != "none":  # each pack's members report each epoch, and stop
            search = {
                "_target_": f"{__name__}.pack_pruner",  # the pack instantiates it
                "storage": study_storage(sweep_dir),
                "study": self.study_name,
                "rule": self.pruning,
                "trials": {str(t.number): t.user_attrs.get("metric") for t in trials},
            }
            folders = [sweep_dir / PACKS / f"pack-{i}" for i in range(first, first + len(batch))]
            for folder in [*folders, *(sweep_dir / str(num) for num, _, _ in solo)]:
                folder.mkdir(parents=True, exist_ok=True)  # plan's packs have theirs already
                OmegaConf.save(search, folder / SEARCH)
        log.info(
            "search: trials %d-%d as %d pack(s) and %d solo job(s) (members per pack: %s; "
            "%d job(s) at once)",
            first,
            trials[-1].number,
            len(batch),
            len(solo),
            ",".join(map(str, sizes)) or "-",
            jobs_at_once(self.launcher),
        )
        results = self.launcher.launch(batch + solo_jobs, initial_job_idx=first)
        for r in results:
            _ = r.return_value  # an interrupted job stops the search (resume continues it)
        for trial, job in zip(trials, overrides, strict=True):
            twin = twins[tuple(job)]
            metric = twin.user_attrs.get("metric", "val/acc_best")
            _tell(study, trial, Path(trial.user_attrs["job"]), metric)
        return results


def _tell(study: Any, trial: Any, folder: Path, metric: str) -> None:
    """Tell Optuna the trial's value, read from its job's results.json; failed unless finished."""
    from optuna.trial import TrialState

    record = read_results(folder) or {}
    status = record.get("status", "no record")
    value = (record.get("metrics") or {}).get(metric)
    trial.set_user_attr("status", status)
    if status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d: pruned after %s epoch(s) (%s)", trial.number, record["epochs"], folder)
    elif status == "finished" and isinstance(value, int | float) and math.isfinite(value):
        study.tell(trial, value)
        log.info("trial %d: %s=%.4f (%s)", trial.number, metric, value, folder)
    else:
        study.tell(trial, state=TrialState.FAIL)
        log.info("trial %d: %s, recorded failed (%s)", trial.number, status, folder)


def _counted(study: Any) -> int:
    """Trials that count towards n_trials: those that ended, in this attempt or an earlier one,
    but not those a killed search stopped."""
    return sum("status" in t.user_attrs for t in study.get_trials(deepcopy=False))


def _write_best(study: Any, sweep_dir: Path) -> None:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    best = study.best_trial
    OmegaConf.save(
        OmegaConf.create(
            {
                "name": study.study_name,
                "direction": study.direction.name.lower(),
                "best_trial": best.number,
                "best_params": best.params,
                "best_value": best.value,
                "best_job": best.user_attrs.get("job"),
                "trials": len(study.get_trials(deepcopy=False)),
            }
        ),
        sweep_dir / BEST,
    )


def pack_pruner(
    storage: str, study: str, rule: dict[str, Any], trials: dict[str, str | None]
) -> Callable[[str, int, dict[str, float]], bool]:
    """For a pack job (actlab.pack, from its trials.yaml): each member, by its folder's name (its
    trial's number), reports its metric (`trials`) to its trial after each epoch, with the epochs
    it has trained as the step (so `warmup_epochs` and halving's first rung count epochs), and
    stops where the study's pruner (`rule`: the sweeper's pruner settings) says so."""
    optuna = _optuna()
    pruners = optuna.pruners
    if rule["name"] == "median":
        chosen = pruners.MedianPruner(rule["startup_trials"], n_warmup_steps=rule["warmup_epochs"])
    else:
        rungs = {
            "min_resource": max(1, rule["warmup_epochs"]),
            "reduction_factor": rule["reduction_factor"],
        }
        halving = rule["name"] == "halving"
        chosen = (pruners.SuccessiveHalvingPruner if halving else pruners.HyperbandPruner)(**rungs)
    loaded = optuna.load_study(study_name=study, storage=storage, pruner=chosen)
    ids = {t.number: t._trial_id for t in loaded.get_trials(deepcopy=False)}
    members = {name: optuna.trial.Trial(loaded, ids[int(name)]) for name in trials}

    def prune(name: str, epochs: int, metrics: dict[str, float]) -> bool:
        metric = trials.get(name)
        if name not in members or metrics.get(metric) is None:
            return False
        members[name].report(metrics[metric], epochs)
        return members[name].should_prune()

    return prune
