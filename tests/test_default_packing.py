"""Packing is the default: `python train.py -m` packs, `hydra/sweeper=basic` (`make sweep PACK=0`)
runs one job per configuration, packs fill the launcher's slots, old sweeps resume."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, compose_train, make_env, results, run_train, script_env
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from actlab import ROOT
from actlab.packing import pack_key, solo_reason
from hydra_plugins.actlab_packed import balanced, jobs_at_once

SWEEP = [*FAST, "logger=csv"]
ACTS = "model.act=relu,leaky,none"
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def _sweep(folder: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = run_train("-m", *SWEEP, *args, f"hydra.sweep.dir={folder}", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _jobs(folder: Path) -> dict[str, dict]:
    return {p.parent.name: results(p.parent) for p in folder.glob("*/results.json")}


@pytest.mark.slow
def test_the_default_sweep_packs_and_basic_runs_a_job_each(tmp_path: Path) -> None:
    _sweep(tmp_path / "default", ACTS)
    packed = _jobs(tmp_path / "default")
    assert len(packed) == 3 and all(r["status"] == "finished" for r in packed.values())
    assert {r["pack"]["id"] for r in packed.values()} == {"pack-0"}
    assert sorted(r["pack"]["member"] for r in packed.values()) == [0, 1, 2]

    out = _sweep(tmp_path / "basic", ACTS, "hydra/sweeper=basic")
    solo = _jobs(tmp_path / "basic")
    assert sorted(solo) == sorted(packed)
    # Each job its own process and a pack of one.
    assert all(r["status"] == "finished" and r["pack"]["size"] == 1 for r in solo.values())
    assert sorted(r["job"]["num"] for r in solo.values()) == [0, 1, 2]
    assert not (tmp_path / "basic" / ".packs").exists() and "packed sweep" not in out


@pytest.mark.slow
def test_members_are_split_into_one_pack_per_device_slot(tmp_path: Path) -> None:
    # 6 members on 3 simulated GPUs (one slot each): 3 packs of 2, run side by side.
    # Slots for GPUs only where the trainer may use one; a GPU of this machine stays hidden.
    env = script_env(ACTLAB_FAKE_GPUS="3", CUDA_VISIBLE_DEVICES="")
    args = [ACTS, "seed=0,1", "hydra/launcher=parallel", "trainer.accelerator=auto"]
    out = _sweep(tmp_path, *args, env=env)
    assert (
        "6 jobs as 3 pack(s) and 0 solo job(s) (members per pack: 2,2,2; 3 job(s) at once)" in out
    )
    jobs = _jobs(tmp_path)
    assert len(jobs) == 6 and all(r["status"] == "finished" for r in jobs.values())
    packs = {r["pack"]["id"] for r in jobs.values()}
    assert packs == {"pack-0", "pack-1", "pack-2"}
    assert all(r["pack"]["size"] == 2 for r in jobs.values())
    assert len({r["launch"]["slot"] for r in jobs.values()}) == 3  # each pack held its own slot


@pytest.mark.slow
def test_a_member_whose_folder_fails_it_fails_alone(tmp_path: Path) -> None:
    """As its solo job would: a file where its checkpoints go fails it at its first epoch's end."""
    names = {act: ",".join(sorted([*SWEEP, f"model.act={act}"])) for act in ("relu", "leaky")}
    (tmp_path / names["leaky"]).mkdir()
    (tmp_path / names["leaky"] / "checkpoints").write_text("in the way")
    proc = run_train("-m", *SWEEP, "model.act=relu,leaky", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a job did not finish
    relu, leaky = (results(tmp_path / names[act]) for act in ("relu", "leaky"))
    assert leaky["status"] == "failed" and leaky["error"].startswith("FileExistsError")
    assert relu["status"] == "finished" and relu["pack"]["size"] == 2
    assert relu["epochs"] == 1 and "test/acc" in relu["metrics"]


def test_balanced_packs_fill_the_slots_within_max_members() -> None:
    def sizes(n: int, packs: int, limit: int) -> list[int]:
        chunks = balanced(list(range(n)), packs, limit)
        assert [m for c in chunks for m in c] == list(range(n))  # each member once, in order
        return [len(c) for c in chunks]

    assert sizes(30, 3, 32) == [10, 10, 10]  # 30 members on 3 slots
    assert sizes(31, 3, 32) == [11, 10, 10]
    assert sizes(30, 3, 4) == [4, 4, 4, 4, 4, 4, 3, 3]  # max_members caps them: more packs
    assert sizes(3, 16, 32) == [1, 1, 1]  # more slots than members: each alone (a solo job)
    assert sizes(40, 1, 32) == [20, 20]  # the basic launcher: one pack, or as few as fit


def test_packs_fill_a_slurm_array_and_the_basic_launcher_runs_one() -> None:
    slurm = compose_train("hydra/launcher=slurm").hydra.launcher
    assert jobs_at_once(instantiate(slurm)) == slurm.array_parallelism == 32
    wider = compose_train("hydra/launcher=slurm", "hydra.launcher.array_parallelism=5")
    assert jobs_at_once(instantiate(wider.hydra.launcher)) == 5
    assert jobs_at_once(BasicLauncher()) == 1  # Hydra's own, the default: one job at a time


def _make_sweep(tmp_path: Path, *variables: str) -> list[str]:
    """The train.py arguments `make sweep VARIABLES` runs: `make -n` prints the commands and runs
    none (no venv built, nothing installed), from a copy of the Makefile in an empty folder."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "sweep", *variables],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=make_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "pyproject.toml"]
    *_, line = proc.stdout.strip().splitlines()
    head, _, args = line.partition(" train.py -m ")
    assert head == ".venv/bin/python", line
    return shlex.split(args)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_sweep_packs_unless_pack_is_0(tmp_path: Path) -> None:
    sweepers = []
    for i, variables in enumerate([[], ["PACK=1"], ["PACK=0"]]):
        (tmp_path / str(i)).mkdir()
        args = _make_sweep(tmp_path / str(i), *variables)
        assert "model.act=relu,leaky,none" in args
        single = [a for a in args if "," not in a]  # compose() takes no sweep
        sweepers.append(compose_train(*single).hydra.sweeper)
    default, pack_1, pack_0 = (s._target_ for s in sweepers)
    assert default == pack_1 == "hydra_plugins.actlab_packed.PackedSweeper"
    assert pack_0 == "hydra_plugins.actlab_grid.GridSweeper"


@pytest.mark.slow
def test_a_basic_sweep_resumed_with_the_default_skips_its_finished_jobs(tmp_path: Path) -> None:
    """A sweep folder made before packing was the default (one solo job per configuration)."""
    _sweep(tmp_path, ACTS, "hydra/sweeper=basic")
    jobs = {p.name: p for p in tmp_path.glob("*model.act=*")}
    kept = {n: p for n, p in jobs.items() if "model.act=none" not in n}
    before = {n: (p / "results.json").read_bytes() for n, p in kept.items()}
    ckpts = {n: (p / "checkpoints" / "last.ckpt").stat().st_mtime_ns for n, p in kept.items()}
    (lost,) = set(jobs) - set(kept)
    shutil.rmtree(jobs[lost])  # never ran

    out = _sweep(tmp_path, ACTS, "+resume=true")
    assert (tmp_path / ".packs" / "pack-0" / "members.yaml").is_file(), out
    for name, folder in kept.items():
        assert f"{name}: finished before, skipped (resume=true)" in out
        assert (folder / "results.json").read_bytes() == before[name]  # not trained again
        assert (folder / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpts[name]
        assert not (folder / "attempts").exists()
    record = results(jobs[lost])
    assert record["status"] == "finished" and record["pack"]["size"] == 1


def _grid(name: str) -> list[list[str]]:
    """Each job's overrides of `python train.py -m experiment=NAME`, as its sweep expands them."""
    params = compose_train(f"experiment={name}").hydra.sweeper.params or {}
    parser = OverridesParser.create()
    jobs: list[list[str]] = [[]]
    for key, values in params.items():
        (override,) = parser.parse_overrides([f"{key}={values}"])
        choices = (
            list(override.sweep_string_iterator()) if override.is_sweep_override() else [values]
        )
        jobs = [[*job, f"{key}={value}"] for job in jobs for value in choices]
    return [[f"experiment={name}", *job] for job in jobs]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_packs_whole(name: str) -> None:
    cfgs = {" ".join(job): compose_train(*job) for job in _grid(name)}
    solo = {job: why for job, c in cfgs.items() if (why := solo_reason(c))}
    assert not solo
    # One pack, as many members as max_members allows; PReLU's slopes are stacked per member,
    # so its members (act_all) are a pack of their own.
    keys = {pack_key(c) for job, c in cfgs.items() if "model.act=prelu" not in job}
    assert len(keys) == 1
