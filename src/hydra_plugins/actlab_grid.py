"""`hydra/sweeper=basic` (one job per configuration; configs/hydra/sweeper/basic.yaml shadows
Hydra's own): Hydra's basic sweeper, except that identical jobs run once.

A grid that names one job twice (`seed=0,0`, or `optimizer.lr=0.1,1e-1`) would train it twice,
into one folder or into two. Here a job whose composed config (all but `hydra`) is an earlier
job's is left out, with one log line; the packed sweeper, the default, does the same before it
packs.

Composing a job's config costs a few hundred ms (Hydra reads and merges every config file), so a
grid's jobs are composed once per selection of config groups: `seed=0,1,2` or `optimizer.lr=...`
composes once, and each job gets its values applied as Hydra applies them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def composed(
    jobs: Sequence[Sequence[str]],
    loader: Any,
    config: DictConfig,
    bases: dict[tuple[str, ...], DictConfig] | None = None,
) -> Iterator[DictConfig]:
    """Each job's config, exactly as `loader.load_sweep_config(config, job)` gives it.

    Hydra composes in two steps (ConfigLoaderImpl._load_configuration_impl): the overrides of
    config groups choose the files it merges, then the task's other overrides (`key=value`,
    `+key=...`, `~key`) are applied, in order, to the merged config. Jobs that share their group
    overrides share the first step here, and each gets the second, by Hydra's own function. A
    job alone in its choice of groups, a job that overrides `hydra`, a config that extends the
    search path (groups the loader's repository may not see), and a job the short way fails for
    are composed in full: a user sees Hydra's own error. `bases` keeps the first steps for later
    calls (a search composes its trials a few at a time).
    """
    short = isinstance(loader, ConfigLoaderImpl) and not config.hydra.searchpath
    parser = OverridesParser.create()
    splits = [_split(list(job), parser, loader) if short else None for job in jobs]
    shared = Counter(s[0] for s in splits if s)
    bases = {} if bases is None else bases
    for job, split in zip(jobs, splits, strict=True):
        cfg = None
        if split and (shared[split[0]] > 1 or split[0] in bases):
            with contextlib.suppress(Exception):
                cfg = _applied(*split, loader, config, bases)
        yield cfg if cfg is not None else loader.load_sweep_config(config, list(job))


def _split(
    job: list[str], parser: OverridesParser, loader: ConfigLoaderImpl
) -> tuple[tuple[str, ...], list[Override], list[Override]] | None:
    """(The job's group overrides, its other overrides, all of them), or None: compose it all."""
    try:
        overrides = parser.parse_overrides(job)
    except Exception:
        return None
    groups, others = [], []
    for o in overrides:
        if o.key_or_group.split(".")[0].split("/")[0] == "hydra" or o.is_sweep_override():
            return None
        # Hydra's own test (defaults_list.Overrides): the others are applied after merging.
        is_group = loader.repository.group_exists(o.key_or_group)
        (others if isinstance(o.value(), dict) or not is_group else groups).append(o)
    return tuple(str(o.input_line) for o in groups), others, overrides


def _applied(
    groups: tuple[str, ...],
    others: list[Override],
    overrides: list[Override],
    loader: ConfigLoaderImpl,
    config: DictConfig,
    bases: dict[tuple[str, ...], DictConfig],
) -> DictConfig:
    if groups not in bases:
        bases[groups] = loader.load_sweep_config(config, list(groups))
    cfg = pickle.loads(pickle.dumps(bases[groups]))  # a copy, in half deepcopy's time
    ConfigLoaderImpl._apply_overrides_to_config(others, cfg)
    cfg.hydra.overrides.task = [o.input_line for o in overrides]
    dirname = cfg.hydra.job.config.override_dirname
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=overrides,
        kv_sep=dirname.kv_sep,
        item_sep=dirname.item_sep,
        exclude_keys=dirname.exclude_keys,
    )
    # The multirun's resolved `${now:...}` as it is now, as load_sweep_config copies it.
    OmegaConf.copy_cache(from_config=config, to_config=cfg)
    return cfg


def distinct_jobs(
    jobs: Sequence[Sequence[str]], loader: Any, config: DictConfig
) -> list[tuple[list[str], DictConfig]]:
    """Each job's overrides with its composed config, in the grid's order, duplicates left out."""
    seen: dict[str, str] = {}
    kept = []
    for job, cfg in zip(jobs, composed(jobs, loader, config), strict=True):
        task = OmegaConf.to_container(cfg, resolve=False)
        task.pop("hydra")
        key = json.dumps(task, sort_keys=True, default=str)
        name = str(cfg.hydra.job.override_dirname)
        if key in seen:
            same = "is in the grid more than once" if name == seen[key] else f"is {seen[key]}"
            log.info("job %s %s: it runs once", name or "(no overrides)", same)
            continue
        seen[key] = name
        kept.append((list(job), cfg))
    return kept


class GridSweeper(BasicSweeper):
    def split_arguments(  # type: ignore[override]  # Hydra's is static; this one composes
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        assert self.hydra_context is not None and self.config is not None
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        kept = distinct_jobs(jobs, self.hydra_context.config_loader, self.config)
        return list(self.split_overrides_to_chunks([job for job, _ in kept], max_batch_size))

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Nothing left to check: split_arguments composed every job's config already."""
