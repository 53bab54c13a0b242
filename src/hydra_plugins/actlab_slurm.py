"""`hydra/launcher=slurm`: submitit's SLURM launcher that survives a job SLURM killed.

It lives here because Hydra loads launcher classes only from the `hydra_plugins` package.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)
from omegaconf import OmegaConf

from actlab.results import RESULTS, describe, read_results, write_json

log = logging.getLogger(__name__)


class SlurmLauncher(_SubmititSlurmLauncher):
    """submitit's SLURM launcher, except that a job SLURM killed does not end the sweep.

    A job cancelled, timed out or killed for memory writes no result; submitit raises for it and
    the stock launcher gives up on the whole sweep. Here the job is recorded as failed in its
    folder (results.json) and the other jobs' results are kept, as under the local launchers.
    """

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"),
            cluster="slurm",
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"slurm_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("SLURM sweep of %d jobs, output dir: %s", len(job_overrides), sweep_dir)
        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        args = [
            (list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
            for o, n in zip(job_overrides, nums, strict=True)
        ]
        jobs = executor.map_array(self, *zip(*args, strict=True))
        return [self.settle(o, j) for o, j in zip(job_overrides, jobs, strict=True)]

    def settle(self, overrides: Sequence[str], job: Any) -> JobReturn:
        """The job's return, or, for a job that wrote none, a failed record in its folder."""
        try:
            return job.results()[0]
        except Exception as e:  # submitit's UncompletedJobError: killed, cancelled, timed out
            assert self.hydra_context is not None and self.config is not None
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            out = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
            state = job.state
            record = read_results(out) or {
                "job": {"name": out.name, "overrides": list(overrides)},
                "config": describe(cfg, cfg.hydra.runtime.choices),
            }
            if not (out / ".hydra").is_dir():  # killed before it started: list it in the summary
                (out / ".hydra").mkdir(parents=True)
                OmegaConf.save(list(overrides), out / ".hydra" / "overrides.yaml")
            if record.get("status") != "finished":
                error = (
                    f"SLURM job {job.job_id} ended {state} without a result ({type(e).__name__})"
                )
                record.update(status="failed", error=error)
                write_json(out / RESULTS, record)
            log.error("SLURM job %s (%s) ended %s", job.job_id, out.name, state)
            return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
