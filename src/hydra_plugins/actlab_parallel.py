"""`hydra/launcher=parallel`: each job of a sweep in a fresh process of its own, `n_jobs` at a time.

A job's process forks from a server process that has imported the project once (multiprocessing's
forkserver), so it starts in milliseconds without importing torch again, and CUDA is safe in it:
CUDA must not be initialised before a fork, and the server never does (the sweep process may, to
count the GPUs). A job process killed outright (kill -9, the OOM killer) ends only its own job,
recorded `lost` in its folder, and the sweep goes on with the others. SIGTERM or SIGINT to the
sweep is passed on to every running job, each records itself `interrupted`, and the sweep exits
128 + the signal's number once they have. Device slots (actlab.launch) work as before.

It lives here because Hydra loads launcher classes only from the `hydra_plugins` package.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside
# sys.modules, where a dataclass cannot resolve string annotations.
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from actlab.errors import Interrupted, UserError, stop_on_signals
from actlab.pack import MANIFEST, fail_unended
from actlab.results import (
    RESULTS,
    last_heartbeat,
    lost_error,
    read_results,
    record_lost,
    write_json,
)

log = logging.getLogger(__name__)


@dataclass
class ParallelConf:
    _target_: str = "hydra_plugins.actlab_parallel.ParallelLauncher"
    # Jobs running at once (configs/hydra/launcher/parallel.yaml: one per device slot).
    n_jobs: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="actlab_parallel", node=ParallelConf, provider="actlab"
)


def _run_one(payload: bytes, num: int, overrides: list[str], result: Connection) -> None:
    """A job's process: run the job as Hydra's launchers do, send its JobReturn back."""
    with stop_on_signals():
        try:
            hydra_context, config, task_function, singleton_state = pickle.loads(payload)
            setup_globals()
            Singleton.set_state(singleton_state)
            cfg = _job_config(hydra_context, config, overrides, num)
            HydraConfig.instance().set_config(cfg)
            ret = run_job(
                hydra_context=hydra_context,
                config=cfg,
                task_function=task_function,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        except Interrupted as e:  # its record says `interrupted` (actlab.train)
            sys.exit(128 + e.signum)
    # Plain values: its typed nodes hold classes of this module as Hydra's plugin scan loaded it.
    ret.hydra_cfg = OmegaConf.create(OmegaConf.to_container(ret.hydra_cfg))
    result.send(ret)


def _job_config(
    hydra_context: HydraContext, config: DictConfig, overrides: list[str], num: int
) -> DictConfig:
    cfg = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(cfg):
        cfg.hydra.job.id = f"{cfg.hydra.job.name}_{num}"
        cfg.hydra.job.num = num
    return cfg


def _context() -> Any:
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["actlab.train"])  # torch and Lightning, imported once
    return ctx


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return f"was killed by {name} (kill -9, or the OOM killer: memory ran out)"
        return f"was killed by {name}"
    return f"ended with exit status {exitcode} without recording an end"


class ParallelLauncher(Launcher):
    def __init__(self, n_jobs: int = 1) -> None:
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise UserError(f"hydra.launcher.n_jobs={n_jobs}: give the number of jobs at once.")
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "Launching %d jobs, %d at a time, each in a process of its own; sweep output dir: %s",
            len(job_overrides),
            self.n_jobs,
            sweep_dir,
        )
        for i, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
        ctx = _context()
        # cloudpickle: the task function is the one under @hydra.main, not importable by name.
        state = (self.hydra_context, self.config, self.task_function, Singleton.get_state())
        payload = cloudpickle.dumps(state)
        pending = deque((initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides))
        running: dict[int, _Job] = {}
        returns: dict[int, JobReturn] = {}
        try:
            while pending or running:
                while pending and len(running) < self.n_jobs:
                    num, overrides = pending.popleft()
                    running[num] = _Job.start(ctx, payload, num, overrides)
                ready = wait([w for job in running.values() for w in job.watched()])
                for num, job in list(running.items()):
                    if job.reader in ready:  # read it as it comes: a full pipe would block it
                        job.receive()
                    if job.proc.sentinel in ready:
                        job.end()
                        returned = job.returned
                        returns[num] = returned if returned is not None else self._lost(job)
                        del running[num]
        except Interrupted as stop:
            self._stop(running, stop)
            raise
        return [returns[n] for n in sorted(returns)]

    def _lost(self, job: "_Job") -> JobReturn:
        """For a job whose process ended without a JobReturn: its record ended as `lost`."""
        if error := self.record_lost(job, _how(job.proc.exitcode)):
            log.error("job #%d: %s: recorded lost", job.num, error)
        return JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED)

    def _stop(self, running: dict[int, "_Job"], stop: Interrupted) -> None:
        """Pass the signal on to every running job and wait until each has recorded itself."""
        log.info("%s: stopping %d running job(s)", stop, len(running))
        for job in running.values():
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(job.proc.pid, stop.signum)
        for job in running.values():
            job.end()
            # One that could not record itself (killed before it could take the signal).
            self.record_lost(job, _how(job.proc.exitcode))

    def record_lost(self, job: "_Job", how: str) -> str | None:
        """Record `lost` in the folder of a job whose process ended without recording an end (for
        a pack, each member left running); returns the error recorded, None if none was."""
        assert self.config is not None and self.hydra_context is not None
        with contextlib.suppress(ProcessLookupError):
            # Still there: the forkserver, not the job, died (SIGTERM to the whole process
            # group); the job records its own end.
            os.kill(job.proc.pid, 0)
            return None
        cfg = _job_config(self.hydra_context, self.config, job.overrides, job.num)
        out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        process = {"pid": job.proc.pid, "host": socket.gethostname()}
        if (out / MANIFEST).exists():
            first = OmegaConf.load(out / MANIFEST)[0].hydra.runtime.output_dir
            error = lost_error(process, last_heartbeat(Path(first)), how)
            return error if fail_unended(out, error, status="lost") else None
        record = read_results(out)
        if record is None:  # it died before its record: list it in the sweep table all the same
            record = {"status": "running", "job": {"name": out.name, "num": job.num}}
            record["job"]["overrides"] = list(cfg.hydra.overrides.task)
            write_json(out / RESULTS, record)
            if not (out / ".hydra" / "overrides.yaml").exists():
                (out / ".hydra").mkdir(parents=True, exist_ok=True)
                OmegaConf.save(cfg.hydra.overrides.task, out / ".hydra" / "overrides.yaml")
        error = lost_error(record.get("process") or process, last_heartbeat(out), how)
        return error if record_lost(out, error) else None


@dataclass
class _Job:
    """A job's process, and the pipe on which it sends its JobReturn."""

    num: int
    overrides: list[str]
    proc: Any
    reader: Connection
    returned: JobReturn | None = None

    @classmethod
    def start(cls, ctx: Any, payload: bytes, num: int, overrides: list[str]) -> "_Job":
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_run_one, args=(payload, num, overrides, writer), name=f"job-{num}"
        )
        proc.start()
        writer.close()  # the child holds its end: EOF here once it has exited
        return cls(num, overrides, proc, reader)

    def watched(self) -> list[Any]:
        return [self.proc.sentinel] + ([] if self.reader.closed else [self.reader])

    def receive(self) -> None:
        with contextlib.suppress(EOFError, OSError):  # it exited without sending
            self.returned = self.reader.recv()
        self.reader.close()

    def end(self) -> None:
        self.proc.join()
        if not self.reader.closed and self.reader.poll():
            self.receive()
