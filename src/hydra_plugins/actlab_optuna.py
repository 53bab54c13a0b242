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
trial report to their trials after each epoch (the job folder's trials.yaml names `PackSearch`
by `_target_`, and the job calls it); a pruned member leaves the pack's stack, a pruned solo
trial stops after that epoch, and both are recorded `pruned` and told so. A round that is one
pack refills the slots its members free with new trials (PackSearch.refill), told as they leave
the stack, until the study holds `n_trials`: the search is then one launch. The study
is `<sweep>/study.db` (Optuna's RDB storage on sqlite): `+resume=true` continues it, with the
trials a killed search left running told failed (their folders set aside) unless their job had
ended. A search that ends writes its summary, the trials table and Optuna's plots, into
`<sweep>/search/` (actlab.report.write_search).
"""

from __future__ import annotations

import logging
import math
import pickle
import time
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
from actlab.packing import pack_key, solo_reason
from actlab.report import SEARCH_DIR, STUDY, study_storage, write_search
from actlab.results import SEARCH, read_results
from actlab.runs import set_aside
from hydra_plugins.actlab_grid import composed, distinct_jobs
from hydra_plugins.actlab_packed import (
    PACKS,
    _default_members,
    jobs_at_once,
    member_config,
    members_limit,
    plan,
)

log = logging.getLogger(__name__)
BEST = "optimization_results.yaml"
COMPOSE = "compose.pkl"  # a refilling pack's config loader, master config and search space
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
        self.sampling = {"name": sampler, "seed": seed, "n_startup_trials": n_startup_trials}
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
        start = time.time()
        rounds = []
        while (left := n_trials - _counted(study)) > 0:
            if self.timeout is not None and time.time() - start >= self.timeout:
                log.info("search: hydra.sweeper.timeout=%s s reached", self.timeout)
                break
            # Trials a pack asked for a free slot but could not take (another pack's config).
            trials = _deferred(study)[: min(per_round, left)]
            trials += [
                study.ask(space.distributions) for _ in range(min(per_round, left) - len(trials))
            ]
            deadline = None if self.timeout is None else start + self.timeout
            refill = {
                "up_to": len(study.get_trials(deepcopy=False)) + left - len(trials),
                "deadline": deadline,
            }
            rounds.append(self._round(study, trials, space, sweep_dir, refill))
            _write_best(study, sweep_dir)
        log.info("search: %d trial(s) of %d in %s", _counted(study), n_trials, sweep_dir / STUDY)
        if not (sweep_dir / BEST).exists():
            log.warning("search: no trial finished (see their results.json), so no %s", BEST)
        if (search := write_search(sweep_dir)) is not None:
            log.info("search: %s %s", search.headline, sweep_dir / SEARCH_DIR / "summary.md")
        return rounds

    def _study(self, optuna: Any, sweep_dir: Path, space: Space) -> Any:
        study = optuna.create_study(
            storage=study_storage(sweep_dir),
            study_name=self.study_name,
            sampler=make_sampler(self.sampling, space),
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
        running = [
            t
            for t in trials
            if t.state == optuna.trial.TrialState.RUNNING and not t.user_attrs.get("deferred")
        ]
        for frozen in running:  # left so by a search that was killed (a deferred one waits)
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

    def _round(
        self, study: Any, trials: list[Any], space: Space, sweep_dir: Path, refill: dict[str, Any]
    ) -> Any:
        """One launch: `trials` as packs and solo jobs. Where they make one pack and the pruner
        frees slots in it, the pack refills them with new trials (`refill`: the number of
        trials in the study it stops at, and the search's deadline) as PackSearch.refill asks
        them."""
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
            trial.set_user_attr("deferred", False)
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
        folders = [sweep_dir / PACKS / f"pack-{i}" for i in range(first, first + len(batch))]
        if self.pruning["name"] != "none":  # each pack's members report each epoch, and stop
            search: dict[str, Any] = {
                "_target_": f"{__name__}.PackSearch",  # the job instantiates it
                "storage": study_storage(sweep_dir),
                "study": self.study_name,
                "rule": self.pruning,
                "trials": {str(t.number): t.user_attrs.get("metric") for t in trials},
            }
            for folder in [*folders, *(sweep_dir / str(num) for num, _, _ in solo)]:
                folder.mkdir(parents=True, exist_ok=True)  # plan's packs have theirs already
                OmegaConf.save(search, folder / SEARCH)
            if (
                len(batch) == 1
                and not solo
                and refill["up_to"] > len(study.get_trials(deepcopy=False))
            ):
                # What the pack needs to ask and compose trials as the sweeper does.
                with open(folders[0] / COMPOSE, "wb") as f:
                    pickle.dump((loader, self.config, space), f)
                more = {
                    **refill,
                    "round": first,
                    "sampler": self.sampling,
                    "sweep_dir": str(sweep_dir),
                    "compose": str(folders[0] / COMPOSE),
                }
                OmegaConf.save({**search, "refill": more}, folders[0] / SEARCH)
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
        for frozen in _refilled(study, first):  # a pack told each as it left: not one it lost
            trial = _optuna().trial.Trial(study, frozen._trial_id)
            _tell(study, trial, Path(frozen.user_attrs["job"]), frozen.user_attrs["metric"])
        return results


def _tell(study: Any, trial: Any, folder: Path, metric: str) -> None:
    """Tell Optuna the trial's value, read from its job's results.json; failed unless finished.
    A trial told already (by the pack it trained in) is left as it is."""
    from optuna.trial import TrialState

    if study._storage.get_trial(trial._trial_id).state.is_finished():
        return
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


def _deferred(study: Any) -> list[Any]:
    """The trials a pack asked but left to a later round, to run first there."""
    optuna = _optuna()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [optuna.trial.Trial(study, t._trial_id) for t in running if t.user_attrs.get("deferred")]


def _refilled(study: Any, first: int) -> list[Any]:
    """The trials the pack of round `first` asked and trained (not those it deferred)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("round") == first and not t.user_attrs.get("deferred")
    ]


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


def make_sampler(sampling: dict[str, Any], space: Space, seed: int | None = None) -> Any:
    """The sweeper's sampler (`sampling`: its name, seed, n_startup_trials), seeded with `seed`
    where given."""
    samplers = _optuna().samplers
    seed = sampling["seed"] if seed is None else seed
    if sampling["name"] == "tpe":
        return samplers.TPESampler(seed=seed, n_startup_trials=sampling["n_startup_trials"])
    if sampling["name"] == "random":
        return samplers.RandomSampler(seed=seed)
    return samplers.GridSampler(space.grid(), seed=seed)


def make_pruner(rule: dict[str, Any]) -> Any:
    """The study's pruner from the sweeper's settings, the epochs a trial trained as its steps
    (so `warmup_epochs` and halving's first rung count epochs)."""
    pruners = _optuna().pruners
    if rule["name"] == "median":
        return pruners.MedianPruner(rule["startup_trials"], n_warmup_steps=rule["warmup_epochs"])
    rungs = {
        "min_resource": max(1, rule["warmup_epochs"]),
        "reduction_factor": rule["reduction_factor"],
    }
    halving = rule["name"] == "halving"
    return (pruners.SuccessiveHalvingPruner if halving else pruners.HyperbandPruner)(**rungs)


class PackSearch:
    """A search's job (a pack, or a solo trial), linked to its study by its trials.yaml.

    Called with a member's folder name (its trial's number), the epochs it trained and its
    metrics, it reports the metric (`trials` names each trial's) to the trial and says whether
    the pruner stops it. With `refill` (a round that is one pack), the pack tells each trial as
    its member leaves the stack (`tell`) and asks new trials for the free slots (`refill`).
    """

    def __init__(
        self,
        storage: str,
        study: str,
        rule: dict[str, Any],
        trials: dict[str, str | None],
        refill: dict[str, Any] | None = None,
    ) -> None:
        optuna = _optuna()
        self.storage, self.rule, self.trials = storage, rule, dict(trials)
        self.study = optuna.load_study(study_name=study, storage=storage, pruner=make_pruner(rule))
        self.refill_rule = refill
        self.refills = refill is not None
        self.bases: dict[tuple[str, ...], DictConfig] = {}  # actlab_grid.composed's first steps
        self._compose: tuple[Any, DictConfig, Space] | None = None
        self._key: str | None = None  # the pack's packing.pack_key
        self._ids: dict[str, int] = {}  # each trial's id in the storage, by its number

    def _trial(self, name: str) -> Any:
        if name not in self._ids:
            storage, study_id = self.study._storage, self.study._study_id
            self._ids[name] = storage.get_trial_id_from_study_id_trial_number(study_id, int(name))
        return _optuna().trial.Trial(self.study, self._ids[name])

    def __call__(self, name: str, epochs: int, metrics: dict[str, float]) -> bool:
        metric = self.trials.get(name)
        if metric is None or metrics.get(metric) is None:
            return False
        trial = self._trial(name)
        trial.report(metrics[metric], epochs)
        return trial.should_prune()

    def tell(self, folder: Path) -> None:
        """The trial of this job folder is told its result (actlab_optuna._tell)."""
        if folder.name in self.trials:
            _tell(self.study, self._trial(folder.name), folder, self.trials[folder.name] or "")

    def refill(self, free: int, like: DictConfig) -> list[DictConfig]:
        """Up to `free` new trials' configs that can join the pack of `like` (a member's): asked
        of the study while it holds fewer trials than the sweeper's `up_to` and the search's
        deadline has not passed, composed as the sweeper composes them. A trial whose config
        cannot join (another pack key, or one that runs solo) is left to the sweeper's next
        round (`deferred`), and the pack asks no more."""
        rule = self.refill_rule
        if rule is None or not self.refills:
            return []
        if self._compose is None:
            with open(rule["compose"], "rb") as f:
                self._compose = pickle.load(f)
        loader, config, space = self._compose
        count = len(self.study.get_trials(deepcopy=False))
        n = min(free, rule["up_to"] - count)
        if n <= 0 or (rule["deadline"] is not None and time.time() >= rule["deadline"]):
            return []
        # Its own seed from the next trial's number: the sweeper's sampler draws on unrepeated.
        seed = rule["sampler"]["seed"]
        own = None if seed is None else seed * 100_003 + count
        self.study.sampler = make_sampler(rule["sampler"], space, own)
        asked = [self.study.ask(space.distributions) for _ in range(n)]
        sweep_dir = Path(rule["sweep_dir"])
        if self._key is None:
            self._key = pack_key(like)
        overrides = [space.overrides(t.params) for t in asked]
        fulls = []
        for trial, cfg in zip(asked, composed(overrides, loader, config, self.bases), strict=True):
            folder = sweep_dir / str(trial.number)
            metric = str(cfg.get("optimized_metric") or "val/acc_best")
            for attr, value in (("job", str(folder)), ("metric", metric), ("round", rule["round"])):
                trial.set_user_attr(attr, value)
            if solo_reason(cfg) or pack_key(cfg) != self._key:
                trial.set_user_attr("deferred", True)
                log.info("trial %d: cannot join this pack, left to the next round", trial.number)
                self.refills = False
                continue
            with open_dict(cfg):
                cfg.hydra.sweep.subdir = str(trial.number)
            self.trials[str(trial.number)] = metric
            fulls.append(member_config(cfg, trial.number, sweep_dir))
        log.info(
            "search: trial(s) %s join the pack",
            ",".join(f.hydra.sweep.subdir for f in fulls) or "-",
        )
        return fulls
