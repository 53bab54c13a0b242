"""Data sets through torchvision (actlab.data.TorchvisionSource): loaded once into the data
module's tensors, normalised per channel, trained solo and packed; one error line where a set
cannot be fetched or torchvision cannot be imported; MNIST read by torchvision = the IDX reader."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU, compose_train, here, here_exit, make_env, run_train
from hydra.utils import instantiate

from actlab import ROOT
from actlab.data import IDXSource, MNISTDataModule, TorchvisionSource
from actlab.data import main as data_main
from actlab.errors import UserError
from actlab.results import read_results

KMNIST_FILES = ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fake_colour(size: int = 300, channels: int = 3) -> TorchvisionSource:
    return TorchvisionSource(
        "torchvision.datasets.FakeData",
        "fake",
        kwargs={"image_size": (channels, 6, 5), "num_classes": 4},
        train={"size": size},
        test={"size": 40, "random_offset": 10_000},
    )


def per_channel_stats(source: TorchvisionSource, dm: MNISTDataModule) -> tuple[list, list]:
    """Mean and std of each channel over the training split's pixels (scaled to [0, 1])."""
    x_train = source.load("unused")[0]
    pixels = x_train[dm.split_indices(len(x_train))[0]] / 255.0
    return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()


def test_colour_images_are_normalised_per_channel_on_the_training_split() -> None:
    source = fake_colour()
    probe = MNISTDataModule(source, "unused", in_features=90, val_size=50)
    mean, std = per_channel_stats(source, probe)
    dm = MNISTDataModule(source, "unused", in_features=90, val_size=50, mean=mean, std=std)
    dm.prepare_data()
    dm.setup()
    x = dm.train[0].view(len(dm.train[0]), 3, -1)
    torch.testing.assert_close(x.mean(dim=(0, 2)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2), correction=0), torch.ones(3), atol=1e-4, rtol=0)


class StoredChannelsLast:
    """fake_colour's images stored as CIFAR10 stores its own: one N x H x W x C uint8 array in
    `.data`, the labels a list in `.targets`."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        from torchvision import datasets

        fake = fake_colour()
        images = datasets.FakeData(**fake.kwargs, **(fake.train if train else fake.test))
        self.data = np.stack([np.asarray(images[i][0]) for i in range(len(images))])
        self.targets = [images[i][1] for i in range(len(images))]


@pytest.mark.parametrize("stored", ["images", "channels_last_array"])
def test_rows_are_what_totensor_and_normalize_make_of_each_image(stored: str) -> None:
    """C x H x W order, each channel with its own mean and std, as torchvision's transforms,
    from a set of PIL images (FakeData) and from one array stored H x W x C (as CIFAR's)."""
    from torchvision import datasets, transforms

    mean, std = [0.2, 0.5, 0.7], [0.3, 0.25, 0.1]
    source = fake_colour()
    if stored == "channels_last_array":
        source = TorchvisionSource(f"{__name__}.StoredChannelsLast", "hwc", channels_last=True)
    dm = MNISTDataModule(source, "unused", in_features=90, val_size=50, mean=mean, std=std)
    dm.setup()
    fake = fake_colour()
    images = datasets.FakeData(**fake.kwargs, **fake.test)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    expected = torch.stack([reference(images[i][0]).flatten() for i in range(len(images))])
    torch.testing.assert_close(dm.test[0], expected, atol=1e-6, rtol=0)
    assert dm.test[1].tolist() == [images[i][1] for i in range(len(images))]


def test_a_mean_per_channel_must_match_the_images_channels() -> None:
    source = fake_colour(channels=1)
    dm = MNISTDataModule(source, "unused", in_features=30, val_size=50, mean=[0.5, 0.5, 0.5])
    with pytest.raises(UserError, match="data.mean and data.std have 3 values but the images"):
        dm.setup()


@pytest.mark.slow
def test_a_colour_data_set_trains_solo_and_packed(tmp_path: Path) -> None:
    """data=fakedata (3 x 8 x 8): a solo job, and a 2-member sweep that packs, whose ReLU
    member ends where the solo ReLU job does."""
    base = [
        "data=fakedata",
        "data.source.train.size=600",
        "data.source.test.size=100",
        "data.val_size=100",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.progress_bar=null",  # (trainer.enable_progress_bar would make each job solo)
        "callbacks.model_summary=null",
        *CPU,
    ]
    solo = tmp_path / "solo"
    here(*base, f"hydra.run.dir={solo}")
    proc = run_train("-m", *base, "model.act=relu,leaky", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 jobs as 1 pack(s) and 0 solo job(s)" in proc.stdout + proc.stderr
    members = {p.parent.name: read_results(p.parent) for p in (tmp_path / "sweep").glob("*/.hydra")}
    assert len(members) == 2
    s = read_results(solo)
    assert s["status"] == "finished" and s["composed_config"]["data"]["in_features"] == 192
    for record in members.values():
        assert record["status"] == "finished" and record["pack"]["size"] == 2
    (relu,) = (r for r in members.values() if r["config"]["act"] == "relu")
    for key in ("val/loss", "test/loss"):
        assert relu["metrics"][key] == pytest.approx(s["metrics"][key], abs=1e-4), key


def test_a_data_set_that_cannot_be_fetched_says_which_files_go_where(tmp_path: Path) -> None:
    """No network here: torchvision's download fails, and one line names KMNIST's files and the
    folder torchvision reads them from, from `python train.py` and from `make data`."""
    proc = run_train("data=kmnist", f"paths.data_dir={tmp_path}", "logger=csv", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [last]
    assert f"{tmp_path}/kmnist/KMNIST/raw/" in last
    assert all(name in last for name in KMNIST_FILES)
    status, _, err = here_exit("data=kmnist", f"paths.data_dir={tmp_path}", main=data_main)
    assert status == 2 and err.strip() == last


def test_python_m_actlab_data_prepares_the_data_set_named() -> None:
    out = here("data=fakedata", main=data_main)
    assert out.strip() == "fakedata: torchvision.datasets.FakeData made in memory"
    status, _, err = here_exit("data=nosuch", main=data_main)
    assert status == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_data_passes_its_args(tmp_path: Path) -> None:
    """`make -n` prints the command and runs none, from the Makefile copied to an empty folder."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "data", "ARGS=data=cifar10 paths.data_dir=/d"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=make_env(),
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == ".venv/bin/python -m actlab.data data=cifar10 paths.data_dir=/d"


def test_without_torchvision_only_its_data_sets_stop(
    monkeypatch: pytest.MonkeyPatch, idx_dataset
) -> None:
    """As on an install that leaves torchvision out: one line saying to install the pair; the
    IDX data sets (MNIST, Fashion-MNIST) still prepare and load."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    status, _, err = here_exit("data=fakedata", main=data_main)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: data.source.dataset=torchvision.datasets.FakeData cannot be")
    assert "make install" in err
    source, data_dir, arrays = idx_dataset
    source.prepare(data_dir)
    assert np.array_equal(source.load(data_dir)[0], arrays["train_images"])


@pytest.mark.mnist
def test_torchvision_mnist_gives_the_idx_readers_tensors_bit_for_bit(tmp_path: Path) -> None:
    """data=mnist's verified files read by torchvision.datasets.MNIST (from <root>/MNIST/raw/,
    linked here: nothing is downloaded) give the same split, normalised tensors."""
    here(main=data_main)  # verified (fetched, where they are not there yet)
    cfg = compose_train("data=mnist")
    idx = instantiate(cfg.data)
    assert isinstance(idx.source, IDXSource)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for fname, _ in idx.source.files.values():
        (raw / fname).symlink_to(idx.source.folder(cfg.paths.data_dir) / fname)
    same = {k: v for k, v in cfg.data.items() if k not in ("_target_", "source", "data_dir")}
    tv = MNISTDataModule(
        TorchvisionSource("torchvision.datasets.MNIST", "tv"), str(tmp_path), **same
    )
    for dm in (idx, tv):
        dm.prepare_data()
        dm.setup()
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(idx, split), getattr(tv, split), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), split
    assert sorted(p.name for p in raw.iterdir()) == sorted(f for f, _ in idx.source.files.values())
