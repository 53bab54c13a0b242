"""The pieces `make bench` compares must do the same work: same minibatches, same updates."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from actlab.data import MNISTDataModule, SyntheticSource, batch_order
from actlab.model import MLPClassifier
from actlab.nets import MLP
from benchmarks.bench import (
    PerSampleDataModule,
    main,
    measure_pack_sizes,
    measure_search,
    paired_ratio,
    plain_epoch,
    round_ratios,
    table,
    targets,
)


def test_the_main_jobs_ratio_is_taken_round_by_round() -> None:
    """Each round's ratio pairs the two processes of that round (the slow third round is slow
    for both); a round only one side ran in is left out; the headline is their median."""
    job = [{"round": 0, "wall_s": 30.0}, {"round": 1, "wall_s": 33.0}, {"round": 2, "wall_s": 60.0}]
    plain = [
        {"round": 2, "wall_s": 50.0},
        {"round": 0, "wall_s": 25.0},
        {"round": 3, "wall_s": 9.0},
        {"round": 1, "wall_s": 30.0},
    ]
    assert round_ratios(job, plain, "wall_s") == pytest.approx([1.2, 1.1, 1.2])
    assert paired_ratio(job, plain, "wall_s") == pytest.approx(1.2)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _bare_trainer(max_epochs: int, **kwargs) -> L.Trainer:
    """A Trainer with nothing but the loop: no logger, checkpoints, bar, summary or sanity check."""
    return L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **kwargs,
    )


def test_project_epoch_makes_the_same_updates_as_the_plain_loop(tmp_path):
    """One project epoch (Lightning, manual optimization) equals one plain-PyTorch epoch.

    Same initial weights, same minibatch order: the weights after the epoch and the epoch's
    mean training loss must agree, so the bench's ratio compares two loops doing one SGD step
    per minibatch, nothing more and nothing less.
    """
    torch.manual_seed(0)
    dm = MNISTDataModule(
        SyntheticSource(n_train=700, n_test=100), str(tmp_path), batch_size=64, val_size=100, seed=3
    )
    model = MLPClassifier(MLP(784, [32], 10, nn.ReLU), optimizer=_sgd)
    net = copy.deepcopy(model.net)

    trainer = _bare_trainer(1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)

    x, y = dm.train
    order = batch_order(dm.seed, 0, len(x))
    loss, acc = plain_epoch(net, _sgd(net.parameters()), x, y, 64, order)

    assert trainer.global_step == -(-len(x) // 64)
    for p, q in zip(model.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(trainer.callback_metrics["train/loss_epoch"], loss)
    torch.testing.assert_close(trainer.callback_metrics["train/acc_epoch"], acc)


def test_per_sample_path_serves_the_same_data(tmp_path):
    """The per-sample DataLoader path sees the same split and the same normalised images,
    through torchvision's own MNIST, ToTensor and Normalize, as the reference templates."""
    datasets = pytest.importorskip("torchvision.datasets")
    from torchvision import transforms

    source = SyntheticSource(n_train=300, n_test=50)
    tensors = MNISTDataModule(source, str(tmp_path), val_size=40)
    per_sample = PerSampleDataModule(source, str(tmp_path), val_size=40)
    tensors.setup()
    per_sample.setup()
    for split in ("train", "val", "test"):
        x, y = getattr(tensors, split)
        ds = getattr(per_sample, split)
        assert type(ds) is datasets.MNIST
        steps = [type(t) for t in ds.transform.transforms]
        assert steps[:2] == [transforms.ToTensor, transforms.Normalize]
        assert len(ds) == len(x)
        for i in (0, len(ds) // 2, len(ds) - 1):
            xi, yi = ds[i]
            torch.testing.assert_close(xi, x[i])
            assert yi == int(y[i])


def test_bench_without_torchvision_ends_with_one_error_line(monkeypatch):
    """The lean install (no torchvision): the per-sample row cannot run, so the bench says so
    before it measures anything."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "torchvision" else find_spec(n, *a)
    )
    with pytest.raises(SystemExit) as e:
        main(["--rounds", "1"])
    assert str(e.value).startswith("error: ") and "--rounds 0" in str(e.value)


def test_epoch_scheduler_steps_once_per_epoch(tmp_path):
    """Manual optimization steps an epoch-interval scheduler itself: once per epoch, as before."""
    from functools import partial

    dm = MNISTDataModule(SyntheticSource(n_train=300, n_test=50), str(tmp_path), val_size=40)
    model = MLPClassifier(
        MLP(784, [16], 10, nn.ReLU),
        optimizer=_sgd,
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = _bare_trainer(3)
    trainer.fit(model, datamodule=dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05 * 0.5**3


def test_pack_sizes_section_measures_a_pack_against_solo_jobs(tmp_path):
    """The section a GPU session runs (`--pack-sizes 1 8 64 256`), here small on the CPU."""
    out = measure_pack_sizes([2], 1, tmp_path, lambda msg: None, data="synthetic")
    assert out["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    solo, pack = out["one job per config"], out["pack K=2"]
    assert solo["jobs"] == 4 and pack["jobs"] == 2
    for way in (solo, pack):
        assert way["member_epochs_per_s_wall"] == pytest.approx(way["jobs"] / way["wall_s"], 0.02)
        assert way["member_epochs_per_s_fit"] > way["member_epochs_per_s_wall"]
    assert (tmp_path / "pack_K2" / ".packs" / "pack-0" / "members.yaml").is_file()
    printed = table({"pack_sizes": out})
    assert "| pack K=2 | 2 |" in printed and "| one job per config | 4 |" in printed


@pytest.mark.slow
def test_search_section_times_a_packed_pruned_search_against_one_trial_at_a_time(tmp_path):
    """The section `--search-seeds` runs, here 4 trials of 2 epochs on synthetic data: each
    search's best is its best finished trial; packed, the trials are one pack and the pruned ones
    are Optuna's pruned trials; one at a time, solo jobs, none pruned."""
    import optuna

    from actlab.results import read_results

    out = measure_search(1, 4, 2, tmp_path, lambda msg: None, data="synthetic")
    for name, folder in (("packed", "0-packed"), ("one at a time", "0-one_at_a_time")):
        sweep = tmp_path / "search" / folder
        records = [read_results(sweep / str(n)) for n in range(4)]
        study = optuna.load_study(study_name="slope_optuna", storage=f"sqlite:///{sweep}/study.db")
        pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
        (seed,) = out[name]
        assert seed["pruned"] == len(pruned) == sum(r["status"] == "pruned" for r in records)
        finished = [r["metrics"]["val/acc_best"] for r in records if r["status"] == "finished"]
        assert seed["best"] == max(finished)
        assert [r.get("pack", {}).get("size") for r in records] == (
            [4] * 4 if name == "packed" else [1] * 4  # one at a time: packs of one
        )
    assert out["one at a time"][0]["pruned"] == 0
    walls = [out[name][0]["wall_s"] for name in ("one at a time", "packed")]
    assert out["one at a time / packed wall"] == walls[0] / walls[1]
    printed = table({"search": out})
    assert f"| mean | {walls[1]:.1f} | {walls[0]:.1f} | {walls[0] / walls[1]:.2f}x |" in printed
    assert [t[0] for t in targets({"search": out})] == [
        "search wall, one at a time / packed",
        "search mean best, packed - one at a time (points)",
    ]


@pytest.mark.mnist
@pytest.mark.slow
def test_the_plain_script_trains_the_main_jobs_network(tmp_path):
    """benchmarks/plain_sweep.py, the floor the main job is measured against, trains what
    `python train.py` trains: same split, start, batch order and updates (1 epoch, ReLU)."""
    import json
    import sys

    from conftest import CPU, run_command, run_train

    from actlab import ROOT
    from actlab.results import read_results

    proc = run_train("logger=csv", "trainer.max_epochs=1", *CPU, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    project = read_results(tmp_path)["metrics"]
    script = ROOT / "benchmarks" / "plain_sweep.py"
    proc = run_command([sys.executable, script, "--epochs=1", "--acts", "relu"])
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout)["relu"]
    for key in ("val/acc_best", "test/acc"):
        assert plain[key] == pytest.approx(project[key], abs=0.002), key


@pytest.mark.slow
def test_pack_sizes_flag_prints_each_sizes_overhead_per_member(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`bench.py --pack-sizes 1 2` at tiny sizes: a row per K with the fit's and the seconds
    outside the training steps per member-epoch, each from its pack's record (K=1: a job of its
    own, a pack of one)."""
    from benchmarks.bench import main

    main(
        [
            *("--rounds", "0", "--startup-rounds", "0", "--main-job-rounds", "0"),
            *("--sweep-epochs", "0", "--sweep-data", "synthetic", "--pack-epochs", "1"),
            *("--pack-sizes", "1", "2", "--pack-overrides", "model.net.hidden_sizes=[8]"),
            *("--out", str(tmp_path / "out")),
        ]
    )
    rows = {
        cells[0]: cells
        for line in capsys.readouterr().out.splitlines()
        if (cells := [c.strip() for c in line.strip("|").split("|")])[0].startswith("pack K=")
    }
    assert set(rows) == {"pack K=1", "pack K=2"}
    for cells in rows.values():
        fit, outside = float(cells[6]), float(cells[7])
        assert 0 < outside < fit
