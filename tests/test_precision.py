"""trainer.precision and matmul_precision (issue 19): solo jobs and packs, the probes' gradients.

The CPU runs 32-true and bf16-mixed. 16-mixed (float16 with a GradScaler) is what a GPU runs; on
a CPU a job refuses it. Its gradient path is still tested here: Lightning's MixedPrecision plugin
given by hand runs float16 autocast and a real GradScaler on the CPU. The last tests run it on a
GPU, where one is visible.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import (
    FAST,
    LIGHTNING_LOOP,
    QUICK,
    compose_train,
    here,
    here_exit,
    recorded_with,
    run_command,
    run_train,
)
from hydra.utils import instantiate
from lightning.pytorch.plugins import MixedPrecision

from actlab import packing
from actlab.diagnostics import DeadUnitMonitor
from actlab.errors import UserError
from actlab.eval import main as eval_main
from actlab.results import read_results
from actlab.validation import validate

# QUICK without its trainer flag, which a pack does not honour.
SMALL = [*(a for a in QUICK if not a.startswith("++trainer.")), "logger=csv"]
CPU = [*SMALL, "trainer=cpu"]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU is visible")


def _sweep(folder: Path, *args: str) -> dict[str, dict]:
    # Jobs in numbered folders: their override names would be too long for a folder's name.
    proc = run_train(
        "-m", *args, f"hydra.sweep.dir={folder}", "hydra.sweep.subdir=${hydra.job.num}"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {p.parent.name: read_results(p.parent) for p in folder.glob("*/.hydra")}


def _by(records: dict[str, dict], *keys: str) -> dict[tuple, dict]:
    """The records by the values of config keys (`trainer.precision`, `seed`)."""

    def value(r: dict, key: str) -> object:
        node = r["composed_config"]
        for part in key.split("."):
            node = node[part]
        return node

    return {tuple(value(r, k) for k in keys): r for r in records.values()}


# --- the config check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("trainer.precision=16-mixed", "use trainer.precision=bf16-mixed on a CPU"),
        (
            "trainer.precision=half",
            "trainer.precision=half must be 32-true, bf16-mixed or 16-mixed",
        ),
        ("matmul_precision=low", "matmul_precision=low must be highest, high or medium"),
    ],
)
def test_a_precision_the_cpu_cannot_run_ends_with_one_error_line(
    tmp_path: Path, override: str, says: str
) -> None:
    status, out, err = here_exit(*CPU, override, f"hydra.run.dir={tmp_path}/run")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_16_mixed_is_refused_on_a_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_train(*FAST, "trainer.accelerator=auto", "trainer.precision=16-mixed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(cfg)  # a GPU would run it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="16-mixed needs a GPU"):
        validate(cfg)


def test_precision_is_part_of_the_pack_key_and_16_mixed_runs_solo() -> None:
    keys = {
        p: packing.pack_key(compose_train(*FAST, f"trainer.precision={p}"))
        for p in ("32-true", "bf16-mixed")
    }
    assert keys["32-true"] != keys["bf16-mixed"]
    assert packing.solo_reason(compose_train(*FAST, "trainer.precision=bf16-mixed")) is None
    why = packing.solo_reason(compose_train(*FAST, "trainer=gpu", "trainer.precision=16-mixed"))
    assert why is not None and "16-mixed" in why


# --- 16-mixed's gradients: what the probe and clipping see -------------------------------------


def _one_step(plugin: MixedPrecision | None, clip: float) -> tuple[float, torch.Tensor]:
    """The logged grad_norm/output and the change of the read-out's weight after one step."""
    cfg = compose_train(*QUICK, f"model.gradient_clip_val={clip}")
    L.seed_everything(0, verbose=False)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    before = model.net[-1].weight.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=[plugin] if plugin else None,
        callbacks=[DeadUnitMonitor()],
        max_steps=1,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    norm = float(trainer.callback_metrics["grad_norm/output"])
    return norm, model.net[-1].weight.detach() - before


def test_grad_norms_and_clipping_see_unscaled_gradients_under_16_mixed() -> None:
    scale = 2.0**12
    # float16 autocast and a real GradScaler, on the CPU: what 16-mixed runs on a GPU.
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    half = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    clip = 1e-3  # below the first step's gradient norm: clipping acts
    norm32, step32 = _one_step(None, clip)
    norm16, step16 = _one_step(half, clip)
    assert norm32 > 10 * clip
    # float16 rounding apart, the same gradients: not `scale` times larger.
    assert norm16 == pytest.approx(norm32, rel=0.02)
    # The step was taken (finite gradients) and clipped to the norm asked for, as in float32.
    # (Its size is compared: each element is a weight's change, near the weight's rounding.)
    assert float(step16.norm()) == pytest.approx(float(step32.norm()), rel=0.02)


# --- bf16-mixed on the CPU, solo and packed; what the records say ------------------------------


def test_bf16_mixed_trains_solo_and_packed_on_the_cpu(tmp_path: Path) -> None:
    args = [*CPU, "trainer.max_epochs=1", "matmul_precision=high", "seed=0,1"]
    solo = _by(
        # Lightning's own bf16-mixed: the reference the packs' autocast is held to.
        _sweep(
            tmp_path / "solo",
            *args,
            "trainer.precision=bf16-mixed",
            "hydra/sweeper=basic",
            LIGHTNING_LOOP,
        ),
        "seed",
    )
    packed = _by(
        _sweep(
            tmp_path / "packed",
            *args,
            "trainer.precision=32-true,bf16-mixed",
            "hydra/sweeper=packed",
        ),
        "trainer.precision",
        "seed",
    )
    assert len(solo) == 2 and len(packed) == 4
    assert all("pack" not in r for r in solo.values())  # Lightning's own loop, not a pack
    for r in [*solo.values(), *packed.values()]:
        assert r["status"] == "finished"
        assert r["matmul_precision"] == "high"
    # One pack per precision: members of different precision never share one.
    for precision in ("32-true", "bf16-mixed"):
        members = [packed[precision, seed] for seed in (0, 1)]
        assert all(r["precision"] == precision for r in members)
        assert all(r["pack"]["size"] == 2 for r in members)
        assert members[0]["pack"]["id"] == members[1]["pack"]["id"]
    assert packed["32-true", 0]["pack"]["id"] != packed["bf16-mixed", 0]["pack"]["id"]
    for seed in (0, 1):
        s, p, p32 = solo[(seed,)], packed["bf16-mixed", seed], packed["32-true", seed]
        assert s["precision"] == "bf16-mixed" and "pack" not in s
        # A member trains as its solo job, in bfloat16's rounding (its matmuls are batched).
        for key in ("val/acc_best", "test/acc"):
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.03, (seed, key)
        assert p["metrics"]["val/loss"] == pytest.approx(s["metrics"]["val/loss"], rel=0.02)
        # ... and in bfloat16: its loss is not the float32 member's to float32 rounding.
        assert p["metrics"]["val/loss"] != pytest.approx(p32["metrics"]["val/loss"], rel=1e-5)


def test_matmul_precision_reaches_torch_during_training(tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    proc = run_train(
        *CPU,
        "matmul_precision=medium",
        "+callbacks.seen._target_=probes.MatmulPrecisionSeen",
        f"+callbacks.seen.path={seen}",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen.read_text() == "medium"
    record = read_results(tmp_path / "run")
    assert record["matmul_precision"] == "medium" and record["precision"] == "32-true"


def test_eval_of_a_16_mixed_run_on_a_cpu_says_what_to_add(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    here(*QUICK, "trainer=cpu", "logger=csv", "trainer.max_epochs=1", f"hydra.run.dir={folder}")
    recorded_with(folder, precision="16-mixed")
    best = read_results(folder)["best_checkpoint"]
    status, _, err = here_exit(f"ckpt_path={best}", main=eval_main)
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "error: run trained with trainer.precision=16-mixed, which needs a GPU: add "
        "precision=32-true (or bf16-mixed) to test it on the CPU."
    )
    here(f"ckpt_path={best}", "precision=bf16-mixed", main=eval_main)
    assert (folder / f"eval_{Path(best).stem}.json").is_file()


# --- the figure: real MNIST, 1 epoch --------------------------------------------------


@pytest.mark.mnist
@pytest.mark.slow
def test_bf16_mixed_is_within_half_a_point_of_fp32_on_mnist(tmp_path: Path) -> None:
    assert run_command([sys.executable, "-m", "actlab.data"]).returncode == 0
    args = [
        "trainer.max_epochs=1",
        "trainer=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
        "trainer.precision=32-true,bf16-mixed",
        # One thread: where other processes share the cores, 2 threads each wait on the other.
        "threads=1",
    ]
    # Packed only: a member trains as its solo job (test_bf16_mixed_trains_solo_and_packed...).
    packed = _by(
        _sweep(tmp_path / "packed", *args, "seed=0,1", "hydra/sweeper=packed"),
        "trainer.precision",
        "seed",
    )
    for fp32, bf16 in [(packed["32-true", s], packed["bf16-mixed", s]) for s in (0, 1)]:
        assert fp32["status"] == bf16["status"] == "finished"
        assert bf16["precision"] == "bf16-mixed" and fp32["precision"] == "32-true"
        assert abs(bf16["metrics"]["test/acc"] - fp32["metrics"]["test/acc"]) <= 0.005
    assert all(packed[p, s]["pack"]["size"] == 2 for p in ("32-true", "bf16-mixed") for s in (0, 1))


# --- 16-mixed where it runs: a GPU --------------------------------------------------------------


@GPU
def test_16_mixed_trains_a_solo_job_on_a_gpu(tmp_path: Path) -> None:
    proc = run_train(
        *SMALL,
        "trainer=gpu",
        "trainer.precision=16-mixed",
        "model.gradient_clip_val=1.0",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_results(tmp_path / "run")
    assert record["status"] == "finished" and record["precision"] == "16-mixed"
    assert record["device"].startswith("cuda")
    # The probe reads unscaled gradients: a loss scale of 2**16 would make them far larger.
    assert 0 < record["metrics"]["grad_norm/output"] < 100


@GPU
def test_a_16_mixed_packed_sweep_runs_its_jobs_solo_and_bf16_packs_on_a_gpu(
    tmp_path: Path,
) -> None:
    args = [*SMALL, "trainer=gpu", "seed=0,1", "hydra/sweeper=packed"]
    half = _sweep(tmp_path / "half", *args, "trainer.precision=16-mixed")
    assert len(half) == 2
    for r in half.values():
        assert r["status"] == "finished" and r["precision"] == "16-mixed" and "pack" not in r
    bf16 = _sweep(tmp_path / "bf16", *args, "trainer.precision=bf16-mixed")
    assert len(bf16) == 2
    for r in bf16.values():
        assert r["status"] == "finished" and r["precision"] == "bf16-mixed"
        assert r["pack"]["size"] == 2 and r["device"].startswith("cuda")
