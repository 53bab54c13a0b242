"""The evaluation entry point: test a checkpoint with the config its run was trained with."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from actlab import CONFIG_DIR, packing
from actlab.checkpoints import SafeCheckpointIO
from actlab.errors import UserError, one_line_errors
from actlab.results import provenance, write_json
from actlab.runs import (
    CKPT_ARG,
    checkpoint_arg,
    quote,
    require_checkpoint,
    require_run_dir,
    trained_config,
)
from actlab.validation import missing_accelerator, validate

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path` on the test split; returns the record written to eval_<name>.json."""
    ckpt = Path(cfg.ckpt_path).resolve()
    folder = require_run_dir(ckpt)
    trained = trained_config(folder)
    if cfg.get("data_dir"):
        trained.paths.data_dir = cfg.data_dir
    if cfg.get("accelerator"):
        trained.trainer.accelerator = cfg.accelerator
    elif missing_accelerator(trained):
        raise UserError(
            f"{folder.name} trained with trainer.accelerator={trained.trainer.accelerator} and "
            "no GPU is visible here: add accelerator=cpu to test it on the CPU."
        )
    if cfg.get("precision"):
        trained.trainer.precision = cfg.precision
    elif trained.trainer.get("precision") == "16-mixed" and packing.device(trained) == "cpu":
        raise UserError(
            f"{folder.name} trained with trainer.precision=16-mixed, which needs a GPU: add "
            "precision=32-true (or bf16-mixed) to test it on the CPU."
        )
    validate(trained)
    torch.set_float32_matmul_precision(trained.get("matmul_precision", "highest"))
    start = time.perf_counter()
    datamodule = instantiate(trained.data)
    model = instantiate(trained.model)
    # The run's trainer settings, on one device, writing nothing but the record below.
    trainer: L.Trainer = instantiate(
        trained.trainer,
        devices=1,
        strategy="auto",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_model_summary=False,
        profiler=None,
        plugins=[SafeCheckpointIO()],
    )
    # Lightning asks for the callbacks that wrote the checkpoint; testing does not need them.
    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
    metrics = trainer.test(model, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)[0]
    record = {
        "checkpoint": str(ckpt),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 2),
        **provenance(),
    }
    path = folder / f"eval_{ckpt.stem}.json"
    write_json(path, record)
    log.info("%s -> %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()), path)
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def run(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    """`python eval.py ckpt_path=...`: Hydra's logs go to the checkpoint's run folder."""
    args = sys.argv[1:]
    with one_line_errors():
        if not any(a in args for a in ("--help", "-h", "--hydra-help", "--info")):
            ckpt = checkpoint_arg(args)
            if ckpt is None:
                raise UserError(
                    "which checkpoint? python eval.py ckpt_path=<run>/checkpoints/<x>.ckpt"
                )
            folder = require_run_dir(ckpt)
            require_checkpoint(ckpt)
            args = [a for a in args if not a.startswith(CKPT_ARG)]
            args += [CKPT_ARG + quote(str(ckpt)), f"hydra.run.dir={quote(str(folder))}"]
            sys.argv[1:] = args
        run()
