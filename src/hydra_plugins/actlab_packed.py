"""`hydra/sweeper=packed`, the default: Hydra's basic sweeper, except that jobs that can train
together do.

The grid is expanded as the basic sweeper does (`hydra.sweeper.params` included). Each job's
config is composed; jobs whose configs differ only in `actlab.packing.MEMBER_KEYS` can share a pack.
They are split into balanced packs, as many as the launcher runs jobs at once (`parallel`: its
`n_jobs`, one per device slot; `slurm`: the array's `array_parallelism`; any other launcher: one),
none larger than `max_members`. Each pack is written to `<sweep>/.packs/pack-<i>/members.yaml` and
handed to the launcher as ONE job (`+pack=<i>`), so the basic, parallel and SLURM launchers all
run packs. A job that cannot pack runs as an ordinary job of the same sweep, with one log line
saying why; so does a job alone in its pack.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from actlab.errors import UserError
from actlab.pack import MANIFEST
from actlab.packing import pack_key, solo_reason
from hydra_plugins.actlab_grid import distinct_jobs

log = logging.getLogger(__name__)
PACKS = ".packs"
T = TypeVar("T")
Job = tuple[int, list[str], DictConfig]  # its number in the sweep, its overrides, its config


def members_limit(max_members: Any) -> int | None:
    """`hydra.sweeper.max_members`, checked: null (the device's default) or an integer >= 1."""
    if max_members is not None and (
        type(max_members) is not int or max_members < 1  # bool is an int, too
    ):
        raise UserError(
            f"hydra.sweeper.max_members={max_members}: give an integer >= 1, or null for "
            "the default (32 on a CPU, 256 on a GPU)."
        )
    return max_members


class PackedSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        max_members: int | None = None,
    ) -> None:
        super().__init__(max_batch_size=None, params=params)
        self.max_members = members_limit(max_members)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        overrides = parser.parse_overrides(self._parse_config() + arguments)
        jobs = distinct_jobs(self.split_arguments(overrides, None)[0], loader, self.config)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        numbered = [(num, job, cfg) for num, (job, cfg) in enumerate(jobs)]
        batch, solo, sizes = plan(numbered, sweep_dir, self.launcher, self.max_members)
        log.info(
            "packed sweep: %d jobs as %d pack(s) and %d solo job(s) (members per pack: %s; "
            "%d job(s) at once)",
            len(jobs),
            len(batch),
            len(solo),
            ",".join(map(str, sizes)) or "-",
            jobs_at_once(self.launcher),
        )
        # Packs' members carry the sweep's job numbers; solo jobs are numbered after them, or,
        # where no job packs, as the grid numbers them.
        solo_jobs = [job for _, job, _ in sorted(solo, key=lambda j: j[0])]
        first = len(jobs) if batch else 0
        results = self.launcher.launch(batch + solo_jobs, initial_job_idx=first)
        for r in results:
            _ = r.return_value
        return [results]


def plan(
    jobs: list[Job],
    sweep_dir: Path,
    launcher: Any,
    max_members: int | None,
    first_pack: int = 0,
) -> tuple[list[list[str]], list[Job], list[int]]:
    """The composed jobs as packs and solo jobs: writes each pack's members.yaml (pack-<first_pack
    + i>), returns the packs' job overrides, the solo jobs and the packs' sizes."""
    groups: dict[str, list[Job]] = {}
    solo: list[Job] = []
    for num, job, cfg in jobs:
        reason = solo_reason(cfg)
        if reason:
            log.info("%s runs as a solo job: %s", cfg.hydra.job.override_dirname, reason)
            solo.append((num, job, cfg))
        else:
            groups.setdefault(pack_key(cfg), []).append((num, job, cfg))
    batch: list[list[str]] = []
    sizes: list[int] = []
    at_once = jobs_at_once(launcher)
    packable = sum(len(members) for members in groups.values())
    for members in groups.values():
        limit = max_members or _default_members(members[0][2])
        # This group's share of the packs the launcher runs at once.
        share = max(1, round(at_once * len(members) / packable))
        for chunk in balanced(members, share, limit):
            if len(chunk) == 1:
                solo.append(chunk[0])
                continue
            batch.append(write_pack(first_pack + len(batch), chunk, sweep_dir))
            sizes.append(len(chunk))
    return batch, solo, sizes


def write_pack(index: int, members: list[Job], sweep_dir: Path) -> list[str]:
    """Write the members' configs for pack `index`; returns the pack job's overrides."""
    folder = sweep_dir / PACKS / f"pack-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    fulls = [member_config(cfg, num, sweep_dir) for num, _, cfg in members]
    OmegaConf.save(OmegaConf.create(fulls), folder / MANIFEST)
    return [
        *members[0][1],
        f"+pack={index}",
        f"hydra.sweep.subdir={PACKS}/pack-{index}",
        "hydra.output_subdir=null",
    ]


def member_config(cfg: DictConfig, num: int, sweep_dir: Path) -> DictConfig:
    """`cfg` (job `num` of the sweep, its hydra.sweep.subdir set) with the hydra keys that Hydra
    sets as it launches a job, which a pack's member does not go through."""
    with open_dict(cfg):
        cfg.hydra.job.num = num
        cfg.hydra.job.id = str(num)
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.runtime.output_dir = str(sweep_dir / str(cfg.hydra.sweep.subdir))
    return cfg


def jobs_at_once(launcher: Any) -> int:
    """How many jobs the launcher runs at once: the parallel launcher's `n_jobs` (by default its
    device slots, actlab.launch), a SLURM array's `array_parallelism`, else 1 (one by one)."""
    n = getattr(launcher, "n_jobs", None)
    if n is None:
        n = (getattr(launcher, "params", None) or {}).get("array_parallelism")
    return n if type(n) is int and n >= 1 else 1


def balanced(members: list[T], packs: int, limit: int) -> list[list[T]]:
    """`members` in order, cut into at least `packs` (at most one per member) and as few more as
    keep each within `limit`; their sizes differ by one at most."""
    n = len(members)
    count = min(n, max(packs, -(-n // limit)))
    size, bigger = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        stop = start + size + (i < bigger)
        out.append(members[start:stop])
        start = stop
    return out


def _default_members(cfg: DictConfig) -> int:
    import torch

    from actlab.pack import max_members
    from actlab.packing import device

    return max_members(torch.device(device(cfg)))
