"""Where a sweep's jobs run: device slots for parallel sweeps on one machine.

A machine with G visible GPUs and `jobs_per_gpu=k` has G*k slots; without GPUs it has one slot per
`cpus_per_job` cores. A job takes the lowest free slot when it starts, by an exclusive `flock` on
`<lock_dir>/slot-<i>.lock`, and holds it until it ends: the kernel drops the lock when the process
dies, so a crashed job frees its slot and no instant ever has more than k jobs on one GPU. The GPU
is chosen in code (`Trainer(devices=[i])`): a `CUDA_VISIBLE_DEVICES` set for a job has no effect
in a process that has initialised CUDA before.

The parallel launcher is `hydra_plugins.actlab_parallel.ParallelLauncher` (a process per job),
SLURM sweeps use `hydra_plugins.actlab_slurm.SlurmLauncher` (Hydra loads launchers only from the
`hydra_plugins` package).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from actlab.errors import UserError
from actlab.results import config_differences, read_results

log = logging.getLogger(__name__)

# Simulates this many GPUs for the slot logic only (tests, machines without GPUs): jobs still
# train on the CPU, and results.json says the device was simulated.
FAKE_GPUS_ENV = "ACTLAB_FAKE_GPUS"
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def visible_gpus() -> tuple[int, bool]:
    """(number of GPUs, simulated?)."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        if not fake.isdigit():
            raise UserError(f"{FAKE_GPUS_ENV}={fake!r}: set it to a number of GPUs, e.g. 2.")
        return int(fake), True
    import torch

    return torch.cuda.device_count(), False


def usable_cores() -> int:
    """The cores this process may run on: its affinity (a SLURM allocation, taskset) where the
    platform has one (Linux), else all the machine's cores (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: int | None
    threads: int
    simulated: bool = False
    _fd: int | None = field(default=None, repr=False, compare=False)
    _slots: DeviceSlots | None = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"

    @property
    def sharing(self) -> int:
        """How many slots share this slot's memory: a GPU's `jobs_per_gpu`; the machine's RAM, all
        CPU slots (and simulated GPUs': their jobs train on the CPU)."""
        if self._slots is None:
            return 1
        return (
            self._slots.jobs_per_gpu
            if self.gpu is not None and not self.simulated
            else len(self._slots)
        )

    def info(self) -> dict[str, Any]:
        """What results.json and the loggers' config record about where the job ran."""
        return {
            "slot": self.index,
            "device": self.device,
            "simulated": self.simulated,
            "threads": self.threads,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def trainer_kwargs(self) -> dict[str, Any]:
        if self.gpu is None:
            return {"accelerator": "cpu"}
        if self.simulated:
            return {}
        return {"accelerator": "gpu", "devices": [self.gpu]}

    def callbacks(self) -> list[L.Callback]:
        """What the job's trainer adds: CPU jobs take the cores of idle slots as they free up,
        unless `launch.share_idle_cores=false` keeps their threads fixed (and results bitwise
        reproducible)."""
        if self.gpu is None and self._slots is not None and self._slots.share_idle_cores:
            return [ShareIdleCores(self._slots)]
        return []

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock


class DeviceSlots:
    """The slots of one machine; `acquire()` blocks until one is free and returns it held.

    enabled: "auto" holds a slot only under `hydra/launcher=parallel`; true/false force it.
    cpus: cores to share among CPU slots (null: all usable cores).
    accelerator: the trainer's; "cpu" makes CPU slots even where GPUs are visible.
    share_idle_cores: CPU jobs grow their threads into idle slots (faster; the thread count then
    depends on the other jobs, and with it the float rounding of the results).
    """

    def __init__(
        self,
        lock_dir: str,
        jobs_per_gpu: int = 1,
        cpus_per_job: int = 1,
        cpus: int | None = None,
        accelerator: str = "auto",
        enabled: bool | str = "auto",
        share_idle_cores: bool = True,
        poll_seconds: float = 0.2,
    ) -> None:
        if jobs_per_gpu < 1 or cpus_per_job < 1 or (cpus is not None and cpus < 1):
            raise UserError(
                "launch.jobs_per_gpu, launch.cpus_per_job and launch.cpus must be at least 1."
            )
        self.lock_dir = Path(lock_dir)
        self.jobs_per_gpu, self.cpus_per_job = jobs_per_gpu, cpus_per_job
        self.cpus = cpus or usable_cores()
        self.enabled, self.poll_seconds = enabled, poll_seconds
        self.share_idle_cores = share_idle_cores
        self.wants_gpu = accelerator in ("gpu", "cuda")
        self.gpus, self.simulated = (
            visible_gpus() if accelerator in GPU_ACCELERATORS else (0, False)
        )

    def __len__(self) -> int:
        if self.gpus:
            return self.gpus * self.jobs_per_gpu
        return max(1, self.cpus // self.cpus_per_job)

    @property
    def active(self) -> bool:
        if self.enabled == "auto":
            hc = HydraConfig.get() if HydraConfig.initialized() else None
            return hc is not None and hc.runtime.choices.get("hydra/launcher") == "parallel"
        return bool(self.enabled)

    def _slot(self, index: int, fd: int) -> Slot:
        # Slot i is on GPU i % G: the lowest free slots spread the jobs over all GPUs first.
        gpu = index % self.gpus if self.gpus else None
        threads = max(1, self.cpus // len(self))
        return Slot(index, gpu, threads, self.simulated, fd, self)

    def busy(self) -> int:
        """How many slots running jobs hold now (this job's included)."""
        held = 0
        for i in range(len(self)):
            fd = os.open(self.lock_dir / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held += 1
            finally:
                os.close(fd)  # drops the lock if it was free and we just took it
        return held

    def try_acquire(self) -> Slot | None:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self)):
            fd = os.open(self.lock_dir / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return self._slot(i, fd)
        return None

    def acquire(self) -> Slot | None:
        """The held slot, with the job's torch threads set to its share; None when inactive."""
        if not self.active:
            return None
        if self.wants_gpu and not self.gpus:
            raise UserError(
                "trainer.accelerator=gpu but no GPU is visible: use trainer=cpu (or "
                f"{FAKE_GPUS_ENV}=N to simulate N GPUs for the slot logic)."
            )
        t0 = time.monotonic()
        slot = self.try_acquire()
        if slot is None:
            log.info("all %d device slots are busy: waiting for one to free", len(self))
        while slot is None:
            time.sleep(self.poll_seconds)
            slot = self.try_acquire()
        import torch

        try:
            torch.set_num_threads(slot.threads)
            if slot.gpu is not None and not slot.simulated:
                torch.cuda.set_device(slot.gpu)
        except BaseException:
            slot.release()  # else no later job could take this slot
            raise
        log.info(
            "device slot %d/%d: %s%s, %d thread(s), after %.1fs waiting",
            slot.index,
            len(self),
            slot.device,
            " (simulated)" if slot.simulated else "",
            slot.threads,
            time.monotonic() - t0,
        )
        return slot


class ShareIdleCores(L.Callback):
    """At each epoch start a CPU job sets its torch threads to cpus // (slots held now).

    Without it, the last job of a sweep of 3 on 2 one-core slots trains on one core while the
    other idles. Threads only grow into slots no job holds, so running jobs never fight; a job
    that starts later takes its slot's share and the others give theirs back at their next epoch.
    `threads` lists the count of each epoch (results.json: `launch.threads_per_epoch`).
    """

    def __init__(self, slots: DeviceSlots) -> None:
        self.slots = slots
        self.threads: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        self.threads.append(max(1, self.slots.cpus // max(1, self.slots.busy())))
        torch.set_num_threads(self.threads[-1])


def finished_before(job_dir: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The job's record if it already finished (a resumed sweep skips it), else None.

    `record` is what this attempt would write. A finished run of another config, by any key that
    can change a result (`results.NOT_COMPARED` lists those that cannot), is refused, naming them.
    """
    earlier = read_results(job_dir)
    if not earlier or earlier.get("status") != "finished":
        return None
    # Records written before the whole config was kept hold only the summary keys.
    key = "composed_config" if "composed_config" in earlier else "config"
    differing = config_differences(earlier.get(key) or {}, record[key])
    if differing:
        raise UserError(
            f"{job_dir} holds a finished run of another config ({'; '.join(differing)}): "
            "resume a sweep with the command that started it, or give a new hydra.sweep.dir."
        )
    return earlier


def n_slots(launch: Any) -> int:
    """`${actlab.n_slots:${launch}}`: the parallel launcher's default n_jobs."""
    keys = ("jobs_per_gpu", "cpus_per_job", "cpus", "accelerator")
    return len(DeviceSlots(".", **{k: launch[k] for k in keys if k in launch}))


def slurm_gpus(accelerator: str) -> int | None:
    """`${actlab.slurm_gpus:${trainer.accelerator}}`: one GPU per SLURM job when asked for."""
    return 1 if accelerator in ("gpu", "cuda") else None


OmegaConf.register_new_resolver("actlab.n_slots", n_slots, replace=True)
OmegaConf.register_new_resolver("actlab.slurm_gpus", slurm_gpus, replace=True)
