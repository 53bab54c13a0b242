"""On a GPU: a solo job, a pack, the parallel launcher's GPU slots, and a GPU run tested on the CPU.

Those tests are marked `gpu` and skip, saying why, where torch sees no GPU (tests/conftest.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import CPU, FAST, QUICK, compose_train, results, run_command, run_train, script_env

from actlab import ROOT, packing

ACTS = "model.act=relu,leaky,none"
# The CPU pin left out: these runs are meant for the GPU.
BASE = [*(a for a in FAST if a not in CPU), "logger=csv", "trainer.max_epochs=2"]
GPU = [*BASE, "trainer=gpu"]
# A GPU run against the same run on the CPU: the same float32 training, but cuBLAS adds in another
# order and those rounding differences compound over 2 epochs of SGD (58 steps), so the two are
# not bitwise equal (on one device a pack matches its solo job within 0.001, tests/test_pack.py).
# 10 of the 500 synthetic test samples: far less than a member trained with another member's
# activation, batches or steps would move.
GPU_VS_CPU_ACC = 0.02
# The same weights tested on another device: only a sample whose two top logits lie within
# float32 rounding can change its answer; one of 500.
EVAL_ACC = 1 / 500 + 1e-9


def _sweep(folder: Path, *args: str) -> dict[str, dict]:
    """`train.py -m ARGS` into `folder`: each job's record by its activation."""
    proc = run_train("-m", *args, f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [results(p.parent) for p in folder.glob("*/results.json")]
    return {r["config"]["act"]: r for r in records}


@pytest.fixture(scope="module")
def cpu_solo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return _sweep(tmp_path_factory.mktemp("cpu"), *BASE, *CPU, "hydra/sweeper=basic", ACTS)


@pytest.fixture(scope="module")
def gpu_solo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_solo")
    proc = run_train(*GPU, "model.act=relu", f"hydra.run.dir={folder}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


def test_the_quick_configs_train_on_the_cpu() -> None:
    """On a GPU machine too: the other tests' tolerances are the CPU's."""
    for quick in (QUICK, FAST):
        cfg = compose_train(*quick)
        assert cfg.trainer.accelerator == "cpu" and packing.device(cfg) == "cpu"


@pytest.mark.gpu
@pytest.mark.slow
def test_a_solo_job_trains_on_the_gpu(gpu_solo: Path, cpu_solo: dict[str, dict]) -> None:
    record = results(gpu_solo)
    assert record["status"] == "finished", record.get("error")
    assert record["device"].startswith("cuda"), record["device"]
    assert record["epochs"] == 2
    acc, on_cpu = record["metrics"]["test/acc"], cpu_solo["relu"]["metrics"]["test/acc"]
    assert acc > 0.5  # 10 classes: chance is 0.1
    assert abs(acc - on_cpu) <= GPU_VS_CPU_ACC, (acc, on_cpu)


@pytest.mark.gpu
@pytest.mark.slow
def test_a_pack_on_the_gpu_matches_its_solo_cpu_jobs(
    tmp_path: Path, cpu_solo: dict[str, dict]
) -> None:
    packed = _sweep(tmp_path, *GPU, "hydra/sweeper=packed", ACTS)
    assert sorted(packed) == sorted(cpu_solo) == ["leaky", "none", "relu"]
    for act, p in packed.items():
        assert p["status"] == "finished", (act, p.get("error"))
        assert p["pack"]["size"] == 3 and p["device"].startswith("cuda"), (act, p["device"])
        for key in ("val/acc_best", "test/acc"):
            got, solo = p["metrics"][key], cpu_solo[act]["metrics"][key]
            assert abs(got - solo) <= GPU_VS_CPU_ACC, (act, key, got, solo)


@pytest.mark.gpu
@pytest.mark.slow
def test_the_parallel_launcher_shares_the_gpu_by_jobs_per_gpu(tmp_path: Path) -> None:
    jobs = _sweep(
        tmp_path,
        *GPU,
        "hydra/sweeper=basic",
        "hydra/launcher=parallel",
        "launch.jobs_per_gpu=2",
        "model.act=relu,leaky,none,elu",
    )
    assert len(jobs) == 4
    for act, r in jobs.items():
        assert r["status"] == "finished", (act, r.get("error"))
        launch = r["launch"]
        # One GPU, two jobs on it at once: slots 0 and 1 (a job takes the lowest free one).
        assert launch["slot"] in (0, 1) and launch["device"] == "cuda:0", (act, launch)
        assert launch["simulated"] is False
        assert r["device"] == "cuda:0"


@pytest.mark.gpu
@pytest.mark.slow
def test_a_gpu_checkpoint_is_tested_on_the_cpu(gpu_solo: Path) -> None:
    """As on a machine without one: the GPU hidden, `accelerator=cpu` tests it on the CPU."""
    record = results(gpu_solo)
    proc = run_command(
        [sys.executable, ROOT / "eval.py", f"ckpt_path='{record['best_checkpoint']}'"]
        + ["accelerator=cpu"],
        env=script_env(CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = gpu_solo.glob("eval_*.json")
    tested = json.loads(path.read_text())["metrics"]["test/acc"]
    assert tested == pytest.approx(record["metrics"]["test/acc"], abs=EVAL_ACC)
