"""`hydra/sweeper=basic` (one job per configuration; configs/hydra/sweeper/basic.yaml shadows
Hydra's own): Hydra's basic sweeper, except that identical jobs run once.

A grid that names one job twice (`seed=0,0`, or `optimizer.lr=0.1,1e-1`) would train it twice,
into one folder or into two. Here a job whose composed config (all but `hydra`) is an earlier
job's is left out, with one log line; the packed sweeper, the default, does the same before it
packs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def distinct_jobs(
    jobs: Sequence[Sequence[str]], loader: Any, config: DictConfig
) -> list[tuple[list[str], DictConfig]]:
    """Each job's overrides with its composed config, in the grid's order, duplicates left out."""
    seen: dict[str, str] = {}
    kept = []
    for job in jobs:
        cfg = loader.load_sweep_config(config, list(job))
        composed = OmegaConf.to_container(cfg, resolve=False)
        composed.pop("hydra")
        key = json.dumps(composed, sort_keys=True, default=str)
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
