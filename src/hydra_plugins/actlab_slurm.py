"""`hydra/launcher=slurm`: submitit's SLURM launcher that survives a job SLURM killed, refuses a
request the cluster cannot run, gives up on jobs that can never start, and continues a job SLURM
requeued (time limit near, preemption) from its last checkpoint in its own folder.

It lives here because Hydra loads launcher classes only from the `hydra_plugins` package.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where a dataclass cannot resolve string annotations.
import logging
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)
from omegaconf import OmegaConf, open_dict

from actlab.errors import UserError
from actlab.pack import MANIFEST, fail_unended
from actlab.results import RESULTS, describe, read_results, record_lost, write_json
from actlab.runs import quote

log = logging.getLogger(__name__)

# Why SLURM keeps a job pending when waiting will not help: the request exceeds what the
# partition, account or QOS allows, or someone holds the job.
HOPELESS = {
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "DependencyNeverSatisfied",
    "JobHeldUser",
    "JobHeldAdmin",
}
POLL_SECONDS = 2.0


@dataclass
class ActlabSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.actlab_slurm.SlurmLauncher"
    # A job held, or pending for a reason in HOPELESS, this long is cancelled and recorded failed.
    unrunnable_after_s: float = 60.0


ConfigStore.instance().store(
    group="hydra/launcher", name="actlab_slurm", node=ActlabSlurmConf, provider="actlab"
)


def _slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _minutes(limit: str) -> float:
    """A time limit as sinfo prints it ([D-]HH:MM:SS, MM:SS, infinite) in minutes."""
    if not limit[:1].isdigit():
        return float("inf")
    days, _, clock = limit.rpartition("-")
    hours, minutes, seconds = ([0, 0, 0] + [int(p) for p in clock.split(":")])[-3:]
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def check_request(params: dict[str, Any]) -> None:
    """Raise a UserError, before anything is submitted, for a request no node of the partition
    can run (SLURM would keep such a job pending for ever). Without `sinfo` nothing is checked."""
    partition = params.get("partition")
    try:
        proc = _slurm("sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l")
    except (OSError, subprocess.SubprocessError):
        return
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 4]
    if proc.returncode != 0 or not rows:
        return
    if partition is None:
        partition = next((p[:-1] for p, *_ in rows if p.endswith("*")), None)
    nodes = [r for r in rows if r[0].rstrip("*") == partition]
    if not nodes:
        known = sorted({r[0].rstrip("*") for r in rows})
        raise UserError(
            f"hydra.launcher.partition={partition} is not a SLURM partition here: choose one of "
            + ", ".join(known)
        )
    cpus = max(int(r[1].rstrip("+")) for r in nodes)
    mem_mb = max(int(r[2].rstrip("+")) for r in nodes)
    gpus = max(sum(int(n) for n in re.findall(r"gpu(?::\w+)?:(\d+)", r[3])) for r in nodes)
    limit = _minutes(nodes[0][4])
    asked_cpus = (params.get("cpus_per_task") or 1) * (params.get("tasks_per_node") or 1)
    problems = []
    if asked_cpus > cpus:
        problems.append(f"cpus_per_task={params.get('cpus_per_task')} (its nodes have {cpus} CPUs)")
    if (params.get("mem_gb") or 0) * 1024 > mem_mb:
        problems.append(f"mem_gb={params['mem_gb']} (its nodes have {mem_mb / 1024:.1f} GB)")
    if (params.get("gpus_per_node") or 0) > gpus:
        problems.append(f"gpus_per_node={params['gpus_per_node']} (its nodes have {gpus} GPUs)")
    if params.get("timeout_min", 0) > limit:
        problems.append(f"timeout_min={params['timeout_min']} (its limit is {nodes[0][4]})")
    if problems:
        raise UserError(
            f"SLURM partition {partition} cannot run a job that asks for "
            + ", ".join(f"hydra.launcher.{p}" for p in problems)
            + ": ask for less (README: On a cluster)"
        )


def _queue(array_id: str) -> dict[str, tuple[str, str]] | None:
    """{task id: (state, reason)} of the array's tasks still queued or running; None when
    squeue could not answer (ask again later)."""
    proc = _slurm("squeue", "-h", "-r", "-j", array_id, "-o", "%i|%T|%r")
    if proc.returncode != 0:
        # Once every task has left the queue, SLURM forgets the id.
        return {} if "Invalid job id" in proc.stderr else None
    rows = [line.split("|", 2) for line in proc.stdout.splitlines() if line.count("|") == 2]
    return {i: (state, reason) for i, state, reason in rows}


def _final_state(job_id: str) -> str:
    """What the accounting says became of a task. A task that never started may be listed only
    under its array: `5_[0-2%3]` or plain `5` (`CANCELLED by 0`)."""
    array_id, _, index = job_id.partition("_")
    proc = _slurm("sacct", "-n", "-P", "-X", "-j", array_id, "-o", "JobID,State")
    states = dict(line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)
    if job_id in states:
        return states[job_id].split()[0]
    for jid, state in states.items():
        m = re.fullmatch(rf"{array_id}(?:_\[([\d,-]+)(?:%\d+)?\])?", jid)
        parts = m.group(1).split(",") if m and m.group(1) else []
        if m and (not parts or any(_within(index, p) for p in parts)):
            return state.split()[0]
    return "unknown"


def _within(index: str, span: str) -> bool:
    low, _, high = span.partition("-")
    return int(low) <= int(index) <= int(high or low)


class SlurmLauncher(_SubmititSlurmLauncher):
    """submitit's SLURM launcher, except that no job's fate ends or stalls the sweep.

    A job cancelled, timed out or killed for memory writes no result; submitit raises for it and
    the stock launcher gives up on the whole sweep. A job that can never start (held, or pending
    for a reason in HOPELESS) is waited on for ever. Here each such job is recorded as failed in
    its folder (results.json) with the reason, and the other jobs' results are kept, as under the
    local launchers. A request that no node can satisfy is refused before submission.

    A job signalled before its time limit or on preemption (USR2, `signal_delay_s` ahead) is
    requeued by submitit, as often as `max_num_timeout` allows for time limits; meanwhile its
    record says `interrupted`, with its last checkpoint, as after Ctrl-C, and that it was
    requeued. Started again, it continues from its last checkpoint in its folder.
    """

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Singleton],
    ) -> JobReturn:
        """The job, on its SLURM node. SLURM counts its starts: a restarted job continues."""
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        _, self.folder = self.job_config(sweep_overrides, job_num)
        self.signalled: list[Path] = []
        requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        overrides = continued(sweep_overrides, self.folder) if requeues else list(sweep_overrides)
        try:
            returned = super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)
        finally:
            if self.signalled:  # submitit's signal handler called checkpoint()
                self.after_signal(requeues)
        if requeues and not self.signalled and submitit.JobEnvironment().global_rank == 0:
            for folder in records(self.folder):
                if record := read_results(folder):
                    write_json(folder / RESULTS, {**record, "requeues": requeues})
        return returned

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit requeues on USR2: the same call, which continues where the job stopped
        (see __call__). The records still running now are those the signal stops."""
        folder = getattr(self, "folder", None)  # None: signalled before the job began
        self.signalled = (
            [f for f in records(folder) if (read_results(f) or {}).get("status") == "running"]
            if folder
            else []
        )
        return super().checkpoint(*args, **kwargs)

    def after_signal(self, requeues: int) -> None:
        """Say in each stopped record whether it was requeued or, its requeues used up, failed."""
        import submitit

        env = submitit.JobEnvironment()
        # submitit saved the call it requeues with its time-outs left: negative once used up.
        delayed = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
        requeued = delayed._timeout_countdown >= 0
        for folder in self.signalled:
            last = folder / "checkpoints" / "last.ckpt"
            record = read_results(folder) or {}
            record["last_checkpoint"] = str(last) if last.is_file() else None
            if requeued:
                record.update(
                    status="interrupted",
                    requeues=requeues + 1,
                    error=f"SLURM job {env.job_id} was requeued (time limit near, or preempted): "
                    f"it continues from {record['last_checkpoint'] or 'the start'}",
                )
            else:  # stopped from outside, as by Ctrl-C: +resume=true continues it
                record.update(
                    status="interrupted",
                    requeues=requeues,
                    error=f"SLURM job {env.job_id} reached its time limit "
                    f"(hydra.launcher.timeout_min={self.params['timeout_min']}) with its requeues "
                    f"used up (hydra.launcher.max_num_timeout={self.params['max_num_timeout']}): "
                    "+resume=true continues it from its last checkpoint",
                )
            write_json(folder / RESULTS, record)
            log.warning("%s: %s", folder.name, record["error"])

    def job_config(self, overrides: Sequence[str], num: int) -> tuple[Any, Path]:
        """A job's composed config and its folder (`hydra.sweep.subdir` may name its number)."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return cfg, Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        params = dict(self.params)
        self.unrunnable_after_s = params.pop("unrunnable_after_s", 60.0)
        check_request(params)
        # SLURM sets it only in a job it restarted: a job would inherit the submitter's (a sweep
        # started from a requeued job) and take itself for restarted.
        os.environ.pop("SLURM_RESTART_COUNT", None)
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
        return self.collect(job_overrides, jobs, initial_job_idx)

    def collect(
        self, job_overrides: Sequence[Sequence[str]], jobs: list[Any], first_num: int
    ) -> list[JobReturn]:
        """Each job's return once it has left the queue; a job that can never start is cancelled
        after `unrunnable_after_s` and recorded failed."""
        returns: dict[int, JobReturn] = {}
        seen: dict[int, tuple[str, str]] = {}
        stuck_since: dict[int, float] = {}
        cancelled: dict[int, str] = {}
        array_id = jobs[0].job_id.partition("_")[0] if jobs else ""
        while len(returns) < len(jobs):
            queued = _queue(array_id)
            if queued is None:
                time.sleep(POLL_SECONDS)
                continue
            for i, (overrides, job) in enumerate(zip(job_overrides, jobs, strict=True)):
                if i in returns:
                    continue
                if job.job_id in queued:
                    seen[i] = state, reason = queued[job.job_id]
                    if state == "PENDING" and reason in HOPELESS:
                        since = stuck_since.setdefault(i, time.monotonic())
                        if time.monotonic() - since >= self.unrunnable_after_s:
                            _slurm("scancel", job.job_id)
                            cancelled[i] = reason
                    else:
                        stuck_since.pop(i, None)
                    continue
                # Left the queue. SLURM creates a job's output file when it starts.
                if Path(job.paths.stdout).exists() or Path(job.paths.result_pickle).exists():
                    returns[i] = self.settle(overrides, job, first_num + i)
                elif i in cancelled:
                    returns[i] = self.record_failed(
                        overrides,
                        f"SLURM job {job.job_id} could not start: pending for {cancelled[i]} for "
                        f"{self.unrunnable_after_s:g} s (hydra.launcher.unrunnable_after_s), "
                        "then cancelled",
                        first_num + i,
                    )
                else:
                    state, reason = seen.get(i, ("PENDING", "?"))
                    returns[i] = self.record_failed(
                        overrides,
                        f"SLURM job {job.job_id} ended {_final_state(job.job_id)} before it "
                        f"started (last seen {state}, reason {reason})",
                        first_num + i,
                    )
            if len(returns) < len(jobs):
                time.sleep(POLL_SECONDS)
        return [returns[i] for i in range(len(jobs))]

    def settle(self, overrides: Sequence[str], job: Any, num: int) -> JobReturn:
        """The return of a job that has left the queue, or a failed record in its folder.

        A job writes its result before it ends, so one without a result was killed (cancelled,
        timed out, out of memory). Its state comes from the accounting; submitit's own wait is
        not used for it, as it waits for ever where `sacct` cannot answer.
        """
        if Path(job.paths.result_pickle).exists():
            try:
                return job.results()[0]
            except Exception as e:  # the job raised: its folder already records the failure
                return self.record_failed(overrides, f"SLURM job {job.job_id} raised {e!r}", num)
        state = _final_state(job.job_id)
        if state == "TIMEOUT":
            state += f" (its time limit, hydra.launcher.timeout_min={self.params['timeout_min']})"
        error = f"SLURM job {job.job_id} ended {state} without a result"
        return self.record_failed(overrides, error, num)

    def record_failed(self, overrides: Sequence[str], error: str, num: int) -> JobReturn:
        """Record a job that wrote no result in its folder: `lost` if it had started (killed at
        its time limit, for memory, cancelled), `failed` if it never did; a finished one stays."""
        cfg, out = self.job_config(overrides, num)
        record = read_results(out) or {
            "job": {"name": out.name, "overrides": list(overrides)},
            "config": describe(cfg, cfg.hydra.runtime.choices),
        }
        if record.get("status") == "running":  # started, then killed: +resume=true continues it
            record_lost(out, error)
        elif record.get("status") != "finished":
            record.update(status="failed", error=error)
            write_json(out / RESULTS, record)
        log.error("%s (%s)", error, out.name)
        if (out / MANIFEST).exists():  # a pack: its members are the sweep's jobs, listed instead
            for name in fail_unended(out, error, "lost"):
                log.error("%s (%s, a member of %s)", error, name, out.name)
        elif not (out / ".hydra").is_dir():  # killed before it started: list it in the summary
            (out / ".hydra").mkdir(parents=True)
            OmegaConf.save(list(overrides), out / ".hydra" / "overrides.yaml")
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)


def records(folder: Path) -> list[Path]:
    """The folders whose results.json a job writes: its own, or each member's of a pack."""
    if (folder / MANIFEST).exists():
        return [Path(full.hydra.runtime.output_dir) for full in OmegaConf.load(folder / MANIFEST)]
    return [folder]


def continued(overrides: Sequence[str], folder: Path) -> list[str]:
    """The overrides that continue a restarted job where it stopped: a pack's unfinished members
    (`+resume=true`), a solo job from its last.ckpt, or, without one, from the start."""
    if (folder / MANIFEST).exists():
        return [*overrides, "++resume=true"]
    last = folder.absolute() / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return list(overrides)
    kept = [o for o in overrides if o.lstrip("~+").split("=", 1)[0] != "ckpt_path"]
    return [*kept, f"ckpt_path={quote(str(last))}"]
