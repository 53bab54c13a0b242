"""Every way a user can get the input wrong ends in one clear message, nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from conftest import CPU, here_exit, run_command, run_train, script_env
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from actlab.data import IDXSource, MNISTDataModule, SyntheticSource, md5, read_idx, write_idx
from actlab.errors import UserError
from actlab.loggers import announce, wandb_logger
from actlab.results import write_json
from actlab.runs import check_output_dirs
from actlab.train import CONFIG_DIR
from actlab.validation import validate
from actlab.wandb_runs import wandb_api_key_configured

ROOT = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def rejected(*overrides: str) -> str:
    with pytest.raises(UserError) as e:
        validate(composed(*overrides))
    return str(e.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 must be a number > 0"),
        ("optimizer.lr=nan", "optimizer.lr=nan must be a number > 0"),
        ("data.val_size=0", "data.val_size=0 must be an integer >= 1"),
        (
            "model.net.hidden_sizes=[256,0]",
            "model.net.hidden_sizes=[256, 0] must be a list of integers",
        ),
        ("model.net.dropout=1.0", "model.net.dropout=1.0 must be a number in [0, 1)"),
        ("model.act._target_=torch.nn.Swish", "torch.nn.Swish cannot be imported"),
    ],
)
def test_nonsense_values_name_the_key_and_the_rule(override: str, expected: str) -> None:
    assert expected in rejected(override)


def test_all_problems_are_reported_in_one_line() -> None:
    message = rejected("data.batch_size=0", "optimizer.lr=-1")
    assert "data.batch_size" in message and "optimizer.lr" in message
    assert "\n" not in message


def test_negative_slope_on_an_activation_without_one() -> None:
    # Without `+` Hydra refuses the key itself; with it the validator names what ReLU takes.
    with pytest.raises(ConfigCompositionException, match="negative_slope"):
        composed("model.act=relu", "model.act.negative_slope=0.1")
    message = rejected("model.act=relu", "+model.act.negative_slope=0.1")
    assert "torch.nn.ReLU takes no 'negative_slope'" in message


def test_misspelled_key_is_refused_by_hydra() -> None:
    with pytest.raises(ConfigCompositionException, match="negative_slop"):
        composed("model.act=leaky", "model.act.negative_slop=0.1")


@pytest.mark.parametrize("override", ["model.act=swish", "optimizer=adamw", "debug=nope"])
def test_unknown_group_option_lists_the_available_ones(override: str) -> None:
    with pytest.raises(MissingConfigException, match="Available options"):
        composed(override)


def test_empty_hidden_sizes_is_a_linear_model() -> None:
    cfg = composed("model.net.hidden_sizes=[]")
    validate(cfg)
    model = instantiate(cfg.model)
    assert [type(m).__name__ for m in model.net] == ["Linear"]
    assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_val_split_larger_than_the_data() -> None:
    dm = MNISTDataModule(SyntheticSource(n_train=100, n_test=10), "unused", val_size=200)
    with pytest.raises(UserError, match="data.val_size=200 .* do not fit the 100 training images"):
        dm.setup()


@pytest.fixture
def idx_source(tmp_path: Path) -> IDXSource:
    """A tiny IDX dataset with its true MD5s, as `data/mnist.yaml` describes MNIST."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28)),
        "train_labels": rng.integers(0, 10, 20),
        "test_images": rng.integers(0, 256, (5, 28, 28)),
        "test_labels": rng.integers(0, 10, 5),
    }
    files = {}
    for key, array in arrays.items():
        path = tmp_path / "tiny" / key
        write_idx(path, array)
        files[key] = [key, md5(path)]
    return IDXSource(name="tiny", files=files, mirrors=[])


def test_idx_source_loads_good_files(idx_source: IDXSource, tmp_path: Path) -> None:
    assert idx_source.load(tmp_path)[0].shape == (20, 28, 28)


def test_missing_data_folder(idx_source: IDXSource, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"train_images \(absent\).*make data"):
        idx_source.load(tmp_path / "elsewhere")


def test_unreadable_data_file(idx_source: IDXSource, tmp_path: Path) -> None:
    path = tmp_path / "tiny" / "train_labels"
    path.unlink()
    path.mkdir()  # unreadable as a file, even for root (chmod would not stop root)
    with pytest.raises(UserError, match=r"train_labels \(unreadable"):
        idx_source.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_idx_file(idx_source: IDXSource, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "tiny" / "test_images"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    else:
        raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"test_images \(MD5 mismatch"):
        idx_source.load(tmp_path)
    if damage == "truncate":  # read directly, the header's shape does not match the bytes either
        with pytest.raises(UserError, match="is truncated"):
            read_idx(path)


def test_data_folder_that_cannot_be_created(idx_source: IDXSource, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to the data folder"):
        idx_source.prepare(blocker / "data")


def test_full_disk_leaves_the_old_results_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"status": "running"})

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        write_json(path, {"status": "finished", "metrics": {"test/acc": 0.9}})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_log_folder_check(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not a folder you can write to"):
        check_output_dirs([f"hydra.sweep.dir={blocker}/sweep"])
    check_output_dirs([f"paths.log_dir={tmp_path}/not/yet/made"])


def test_wandb_online_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(UserError, match="mode=online but no W&B API key"):
        wandb_logger(str(tmp_path), "actlab", mode="online")


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    return run_train(
        f"paths.log_dir={tmp_path}/logs", *CPU, *args, cwd=tmp_path, env=script_env(**(env or {}))
    )


def exit_message(monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """The one line `python train.py ARGS` prints as it exits, run in this process."""
    status, _, err = here_exit(*args)
    assert status in (1, 2), err
    return err.strip().splitlines()[-1]


def test_user_error_is_one_line_and_a_failed_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["data=synthetic", "logger=csv", "data.batch_size=0", f"paths.log_dir={tmp_path}/logs"]
    message = exit_message(monkeypatch, *args)  # one line, exit status 2
    assert message == "error: invalid config: data.batch_size=0 must be an integer >= 1"
    (results,) = (tmp_path / "logs" / "runs").glob("*/results.json")
    assert json.loads(results.read_text())["status"] == "failed"


def test_unwritable_log_folder_stops_before_hydra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = exit_message(monkeypatch, "data=synthetic", f"paths.log_dir={blocker}")
    assert message.startswith(f"error: cannot create the run folder under {blocker}")


def test_wandb_key_without_network_fails_fast_and_clearly(tmp_path: Path) -> None:
    env = {
        "WANDB_API_KEY": "x" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # the discard port: nothing listens there
        "HOME": str(tmp_path),
    }
    proc = cli(tmp_path, "data=synthetic", "logger=wandb", "logger.wandb.init_timeout=3", env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: W&B could not start the run") and "mode=offline" in last
    assert "Traceback" not in proc.stderr


class _Unstartable:
    """A logger whose W&B run fails to start with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    @property
    def experiment(self):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError("Timed out waiting for the run to start"),
        wandb.Error("network error"),
        # What W&B raises when its service process starts slowly (an internal class of wandb).
        pytest.importorskip("wandb.sdk.lib.service.service_token").WandbServiceConnectionError(
            "Failed to connect to internal service"
        ),
    ],
    ids=type,
)
def test_every_way_wandb_fails_to_start_is_one_line(error: Exception) -> None:
    with pytest.raises(UserError) as e:
        announce(_Unstartable(error))
    message = str(e.value)
    assert message.startswith(f"W&B could not start the run ({type(error).__name__}: ")
    assert "mode=offline" in message and "\n" not in message


def test_the_wandb_key_is_looked_up_where_wandb_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$NETRC when set (as W&B does), else ~/.netrc: a test's NETRC hides a `wandb login` key."""
    entry = "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n"
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.write_text(entry)
    (home / ".netrc").write_text(entry)
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    assert not wandb_api_key_configured()
    monkeypatch.setenv("NETRC", str(elsewhere))
    assert wandb_api_key_configured()
    monkeypatch.delenv("NETRC")
    assert wandb_api_key_configured()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["seed=-3"], "error: invalid config: seed=-3 must be an integer in [0, 2**32 - 1]"),
        (["threads=-1"], "error: invalid config: threads=-1 must be null (all usable cores)"),
        (["threads=0"], "error: invalid config: threads=0 must be null (all usable cores)"),
        (
            ["data=regression"],
            "error: invalid config: the data (actlab.data.RegressionSource) needs "
            "model.task=regression",
        ),
        (
            ["trainer.gradient_clip_val=1.0"],
            "error: invalid config: trainer.gradient_clip_val=1.0 must be null",
        ),
        (
            ["model.act=relu", "model.act.negative_slope=0.1"],
            "error: 'model.act.negative_slope' is not a key of this config",
        ),
        (
            ["logger=wandb", "logger.wandb.mode=online"],
            "error: logger.wandb.mode=online but no W&B API key is configured",
        ),
    ],
)
def test_each_mistake_ends_in_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    message = exit_message(
        monkeypatch, "data=synthetic", "logger=csv", f"paths.log_dir={tmp_path}/logs", *args
    )
    assert message.startswith(expected)
    assert "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_trainer_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = exit_message(
        monkeypatch, "data=synthetic", "trainer=gpu", f"paths.log_dir={tmp_path}"
    )
    assert (
        message
        == "error: invalid config: trainer.accelerator=gpu but no GPU is visible: use trainer=cpu"
    )


def test_data_that_fits_the_model_passes() -> None:
    validate(composed("experiment=leaky_regression"))
    validate(composed("data=regression", "model.task=regression"))


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_a_file_that_is_not_a_checkpoint(tmp_path: Path, entry: str) -> None:
    fake = tmp_path / "run" / "checkpoints" / "last.ckpt"
    fake.parent.mkdir(parents=True)
    fake.write_text("hello\n")
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("{}\n")
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("[]\n")
    proc = run_command(
        [sys.executable, ROOT / entry, f"ckpt_path={fake}", "data=synthetic", "logger=csv"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {fake} is not a checkpoint torch can read (RuntimeError): give a .ckpt file "
        "from a run's checkpoints/."
    )


def test_a_user_error_in_a_resolver_stops_a_parallel_sweep_in_one_line(tmp_path: Path) -> None:
    proc = run_train(
        "-m",
        "hydra/launcher=parallel",
        *["launch.jobs_per_gpu=0", "model.act=relu,none", "data=synthetic", "logger=csv"],
        f"paths.log_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: launch.jobs_per_gpu, launch.cpus_per_job and launch.cpus must be at least 1.\n"
    )


def test_unknown_option_lists_the_choices_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = exit_message(monkeypatch, "model.act=swish", f"paths.log_dir={tmp_path}")
    assert message.startswith("error: Could not find 'model.act/swish': choose one of elu, gelu,")
    assert "\n" not in message


def test_search_without_optuna_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails: a base install
    message = exit_message(
        monkeypatch, "-m", "hparams_search=slope_optuna", f"paths.log_dir={tmp_path}"
    )
    assert message == (
        "error: hydra/sweeper=packed_optuna (hparams_search) needs Optuna, not installed: "
        "pip install -e '.[search]'"
    )
    # The sweeper that the project left (hydra-optuna-sweeper's) is named, with its successor.
    message = exit_message(monkeypatch, "-m", "hydra/sweeper=optuna", f"paths.log_dir={tmp_path}")
    assert message == (
        "error: Could not find 'hydra/sweeper/optuna': the search sweeper is "
        "hydra/sweeper=packed_optuna (README, Search)"
    )


def test_no_source_names_what_to_do_first_then_what_was_tried(
    idx_source: IDXSource, tmp_path: Path
) -> None:
    idx_source.mirrors = [(tmp_path / "nowhere").as_uri(), (tmp_path / "nor-here").as_uri()]
    with pytest.raises(UserError) as e:
        idx_source.prepare(tmp_path / "empty")
    first, *tried = str(e.value).splitlines()
    assert first.startswith("could not obtain tiny: place the uncompressed IDX files")
    assert first.endswith("Tried:")
    assert len(tried) == 2 and all(t.startswith("  file://") for t in tried)
