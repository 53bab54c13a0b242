"""A resume never destroys the run it resumes (issue 17, item 5).

A resume refused before training leaves every file of the run folder as it was, `.hydra/`
included (the checks run before Hydra writes anything); one that fails later has kept the
earlier attempt's record and config in `attempts/`. The commands run in this process through
`main()` (conftest.here), to pay Lightning's import once.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICK, here, here_exit, results

from actlab.eval import main as eval_main


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of a 32-unit MLP that finished its one epoch."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    args = [*QUICK, "logger=csv", "model.net.hidden_sizes=[32]", "trainer.max_epochs=1"]
    here(*args, f"hydra.run.dir={folder}")
    assert results(folder)["status"] == "finished"
    return folder


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, str | None]:
    """Every path under the folder (hidden ones too), with the SHA-256 of each file's bytes."""
    return {
        p.relative_to(folder).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        )
        for p in folder.rglob("*")
    }


def refused(*args: str) -> str:
    """The one line a refused `python train.py ARGS` ends with: exit status 2, or 1 for a mistake
    Hydra finds in the command line, as Hydra's own."""
    code, _, err = here_exit(*args)
    message = err.strip()
    usage = "is not a key of this config" in message
    assert code == (1 if usage else 2), (code, err)
    assert message.startswith("error: ") and "\n" not in message, err
    return message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model.net.hidden_sizes=[64]", "trainer.max_epochs=3"],
            "error: checkpoint has net.0.weight [32, 784], the config builds [64, 784] (and 2 "
            "more): a resume continues the model its run trained, so drop the model.* overrides",
        ),
        (
            ["model.act=prelu", "trainer.max_epochs=3"],
            "error: checkpoint has no net.1.weight, the config builds net.1.weight [1]: ",
        ),
        (["model.act.negative_slope=0.1"], "error: 'model.act.negative_slope' is not a key"),
        (
            ["+model.act.negative_slope=0.1", "trainer.max_epochs=3"],
            "error: invalid config: model.act.negative_slope: torch.nn.ReLU takes no",
        ),
        (["trainer.max_epochs=0"], "error: invalid config: trainer.max_epochs=0 must be"),
    ],
    ids=["wider", "prelu", "unknown-key", "added-key", "zero-epochs"],
)
def test_a_resume_that_does_not_fit_leaves_the_run_folder_as_it_was(
    finished_run: Path, tmp_path: Path, overrides: list[str], expected: str
) -> None:
    folder = copy_of(finished_run, tmp_path)
    before = snapshot(folder)
    assert ".hydra/config.yaml" in before and "results.json" in before
    message = refused(f"ckpt_path={folder}/checkpoints/last.ckpt", *overrides)
    assert message.startswith(expected)
    assert snapshot(folder) == before
    # The run's own checkpoint still evaluates with the config it was trained with.
    best = Path(results(folder)["best_checkpoint"]).name
    here(f"ckpt_path={folder}/checkpoints/{best}", main=eval_main)
    assert (folder / f"eval_{Path(best).stem}.json").is_file()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda b: b[: len(b) // 2], "is not a checkpoint torch can read (RuntimeError)"),
        (lambda b: bytes(reversed(b)), "is not a checkpoint torch can read (RuntimeError)"),
        (None, "is not a training checkpoint"),
    ],
    ids=["truncated", "garbage", "no-epoch"],
)
def test_an_unreadable_checkpoint_leaves_the_run_folder_as_it_was(
    finished_run: Path, tmp_path: Path, damage, expected: str
) -> None:
    folder = copy_of(finished_run, tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    if damage is None:  # a file torch reads that training did not write
        torch.save({"weights": torch.zeros(2)}, last)
    else:
        last.write_bytes(damage(last.read_bytes()))
    before = snapshot(folder)
    assert expected in refused(f"ckpt_path={last}", "trainer.max_epochs=3")
    assert snapshot(folder) == before


def test_a_resume_with_no_epoch_left_leaves_the_run_folder_as_it_was(
    finished_run: Path, tmp_path: Path
) -> None:
    folder = copy_of(finished_run, tmp_path)
    before = snapshot(folder)
    out = here(f"ckpt_path={folder}/checkpoints/last.ckpt")  # the same trainer.max_epochs=1
    assert "run: already trained 1 epochs (trainer.max_epochs=1), nothing to do" in out
    assert snapshot(folder) == before


def test_a_resume_that_fails_in_training_keeps_the_earlier_record_and_config(
    finished_run: Path, tmp_path: Path
) -> None:
    folder = copy_of(finished_run, tmp_path)
    earlier = {
        name: (folder / path).read_bytes()
        for name, path in [
            ("results.json", "results.json"),
            ("config.yaml", ".hydra/config.yaml"),
            ("overrides.yaml", ".hydra/overrides.yaml"),
        ]
    }
    fail = tmp_path / "fail"
    fail.touch()
    probe = ["+callbacks.fail._target_=probes.FailAtEpoch", "+callbacks.fail.epoch=1"]
    with pytest.raises(RuntimeError, match="FailAtEpoch"):
        here(
            f"ckpt_path={folder}/checkpoints/last.ckpt",
            "trainer.max_epochs=3",
            *probe,
            f"+callbacks.fail.fail={fail}",
        )
    assert results(folder)["status"] == "failed"
    assert "max_epochs: 3" in (folder / ".hydra" / "config.yaml").read_text()
    kept = folder / "attempts" / "1-finished"
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.name in earlier} == earlier
    assert not (kept / ".hydra").exists()  # the sweep table would take it for a job


def test_weights_that_do_not_fit_a_new_run_are_refused_before_its_folder_exists(
    finished_run: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "shared" / "weights.ckpt"
    weights.parent.mkdir()
    shutil.copy(finished_run / "checkpoints" / "last.ckpt", weights)
    new = tmp_path / "new"
    message = refused(
        *QUICK,
        "logger=csv",
        "model.net.hidden_sizes=[64]",
        f"ckpt_path={weights}",
        f"hydra.run.dir={new}",
    )
    assert message == (
        "error: checkpoint has net.0.weight [32, 784], the config builds [64, 784] (and 2 more): "
        "give the model.* settings it was trained with."
    )
    assert not new.exists()
