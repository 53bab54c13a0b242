"""The training entry point: compose the config, fit, test the best checkpoint, record results."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from actlab import CONFIG_DIR
from actlab import loggers as actlab_loggers
from actlab.checkpoints import SafeCheckpointIO
from actlab.errors import (
    Diverged,
    UserError,
    exit_with,
    interruption,
    one_line_errors,
    stop_on_signals,
    user_error,
)
from actlab.launch import ShareIdleCores, Slot, finished_before, usable_cores
from actlab.pack import train_one, train_pack
from actlab.packing import solo_reason
from actlab.results import (
    RESULTS,
    SEARCH,
    Heartbeat,
    logged_config,
    provenance,
    read_results,
    running_record,
    write_json,
)
from actlab.runs import (
    check_before_run,
    check_output_dirs,
    checkpoint_arg,
    checkpoint_metrics,
    drop_rows_after,
    keep_attempt,
    load_weights,
    nothing_to_train,
    origin_of,
    put_earlier_aside,
    refuse_moved,
    require_checkpoint,
    resume_args,
    resumed_here,
    trained_epochs,
)
from actlab.validation import check_net, validate

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then test the best-by-val checkpoint; returns the record written to results.json."""
    if cfg.get("pack") is not None:  # a job of `hydra/sweeper=packed`: several runs as one
        return train_pack(cfg)
    hc = HydraConfig.get()
    out = Path(cfg.paths.output_dir)
    if (reason := solo_reason(cfg, alone=True)) is None:
        return train_one(cfg)
    log.info("%s: trains under Lightning's loop alone, not as a pack of one: %s", out.name, reason)
    record = running_record(
        out.name,
        hc.job.get("num"),
        list(hc.overrides.task),
        cfg,
        hc.runtime.choices,
        OmegaConf.to_container(cfg, resolve=False),
    )
    if cfg.get("resume") and (done := finished_before(out, record)):
        log.info("%s: finished before, skipped (resume=true)", out.name)
        return done
    origin = origin_of(cfg.get("ckpt_path"), bool(cfg.get("resume")), out, record)
    if origin.here and (done := _nothing_to_train(out, origin.epoch, cfg)):
        return done
    # Under DDP every rank runs this function; the job's folder and record are rank 0's alone.
    primary = rank_zero_only.rank == 0

    def save() -> None:
        if primary:
            write_json(out / RESULTS, record)

    if primary and (earlier := put_earlier_aside(out, origin)):
        log.info("%s: the earlier attempt is kept in %s", out.name, earlier)
    # A continuation's record starts from the metrics its checkpoint was saved with.
    metrics_before = checkpoint_metrics(origin.ckpt) if origin.ckpt else {}
    record.update(provenance(), **origin.record)
    save()
    heartbeat = Heartbeat([out] if primary else [])
    heartbeat.start()
    start = time.perf_counter()
    loggers: list = []
    trainer: L.Trainer | None = None
    slot = None
    try:
        validate(cfg)
        torch.set_num_threads(cfg.get("threads") or usable_cores())
        torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
        # Under the parallel launcher the job holds a device slot (and its share of the cores).
        slot = instantiate(cfg.launch).acquire() if cfg.get("launch") else None
        if slot:
            record["launch"] = slot.info()
            save()
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, model, trainer = build(cfg, slot)
        trainer.callbacks.append(_EpochBeat(heartbeat))
        pruner = _Pruner(out) if (out / SEARCH).exists() else None  # a search's trial
        if pruner:
            trainer.callbacks.append(pruner)
        if origin.weights:
            load_weights(model, origin.weights)
        loggers = trainer.loggers
        for lg in loggers if origin.here else []:
            if isinstance(lg, CSVLogger):  # the epochs after the checkpoint's are logged again
                drop_rows_after(Path(lg.log_dir) / "metrics.csv", origin.epoch - 1)
        launch_info = {f"launch.{k}": v for k, v in record.get("launch", {}).items()}
        for lg in loggers:
            if isinstance(lg, WandbLogger):
                actlab_loggers.announce(lg)  # starts the W&B run: fails here, not mid-training
            lg.log_hyperparams({**logged_config(cfg, hc.runtime.choices), **launch_info})

        trainer.fit(model, datamodule=datamodule, ckpt_path=origin.ckpt)
        fit_seconds = time.perf_counter() - start
        metrics = {**metrics_before, **{k: v.item() for k, v in trainer.callback_metrics.items()}}
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt and ckpt.best_model_path else None
        if cfg.get("test", True):
            tested = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            metrics.update(tested[0])
        if pruner and pruner.pruned:
            record["pruned"] = pruner.pruned
        record.update(
            status="pruned" if pruner and pruner.pruned else "finished",
            metrics=metrics,
            epochs=trainer.current_epoch,
            seconds=round(time.perf_counter() - start, 2),
            # This attempt's time over this attempt's epochs (a resumed run starts later).
            seconds_per_epoch=round(fit_seconds / max(trainer.current_epoch - origin.epoch, 1), 3),
            best_checkpoint=best,
            device=str(trainer.strategy.root_device),
            threads=torch.get_num_threads(),
            precision=trainer.precision,
            matmul_precision=torch.get_float32_matmul_precision(),
        )
        for cb in trainer.callbacks:
            if isinstance(cb, ShareIdleCores):
                record["launch"]["threads_per_epoch"] = cb.threads
        save()
        log.info(
            "%s: test/acc=%.4f val/acc_best=%.4f epochs=%d %.1fs -> %s",
            out.name,
            metrics.get("test/acc", float("nan")),
            metrics.get("val/acc_best", float("nan")),
            trainer.current_epoch,
            record["seconds"],
            out,
        )
        return record
    except BaseException as raised:
        e = user_error(raised) or raised
        if (stop := interruption(e)) is not None:  # SIGTERM, SIGINT (Ctrl-C)
            record.update(status="interrupted", error=str(stop))
            record["last_checkpoint"] = _last_checkpoint(trainer)
        else:
            status = "diverged" if isinstance(e, Diverged) else "failed"
            record.update(status=status, error=f"{type(e).__name__}: {e}")
        record["seconds"] = round(time.perf_counter() - start, 2)
        with contextlib.suppress(UserError):  # a full disk must not hide the original error
            save()
        if stop is not None and stop is not e:  # Lightning's stand-in: exit 128 + the signal
            raise stop from e
        if e is not raised:  # the user's mistake, not Hydra's "Error in call to target"
            raise e from None
        raise
    finally:
        heartbeat.stop()
        if slot:
            slot.release()
        # Without finish() the next job of a multirun in this process would log into this run.
        if any(isinstance(lg, WandbLogger) for lg in loggers):
            actlab_loggers.finish_wandb(record["status"])


def _nothing_to_train(out: Path, epochs: int, cfg: DictConfig) -> dict[str, Any] | None:
    """The finished record of a run resumed with no epoch left to train, else None."""
    done = nothing_to_train(out, epochs, cfg.trainer.get("max_epochs"))
    if done is None:
        return None
    log.info(done)
    return read_results(out)


# Lightning adds a callback of each kind where the callbacks have none, unless told not to: here
# the callbacks group alone decides (`callbacks=none` means no checkpoint, no bar, no summary).
_LIGHTNING_DEFAULTS = {
    "enable_checkpointing": ModelCheckpoint,
    "enable_progress_bar": ProgressBar,
    "enable_model_summary": ModelSummary,
}


def build(
    cfg: DictConfig, slot: Slot | None = None
) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The run's data, model and trainer (with its callbacks and loggers), as configured."""
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_net(model.net, cfg.data.in_features, cfg.data.num_classes)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks += slot.callbacks() if slot else []
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    flags = {
        flag: any(isinstance(c, kind) for c in callbacks)
        for flag, kind in _LIGHTNING_DEFAULTS.items()
        if flag not in cfg.trainer
    }
    callbacks.append(MetricsInCheckpoints())
    device = slot.trainer_kwargs() if slot else {}
    # Lightning reads `ckpt_path=` of fit and test with the project's safe loader, and writes
    # each checkpoint atomically.
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        plugins=[SafeCheckpointIO()],
        **flags,
        **device,
    )
    return datamodule, model, trainer


class MetricsInCheckpoints(L.Callback):
    """Each checkpoint holds the run's metrics so far: a job killed after its last checkpoint
    and before its record, or whose step metrics were last logged before the checkpoint, is
    continued to the record an uninterrupted run writes."""

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["metrics"] = {k: v.item() for k, v in trainer.callback_metrics.items()}


class _EpochBeat(L.Callback):
    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.heartbeat.beat(trainer.current_epoch + 1)


class _Pruner(L.Callback):
    """A search's trial run solo: after each validation it reports to its trial, by the pruner
    in its folder's trials.yaml (hydra_plugins.actlab_optuna.PackSearch, as a pack member
    does), and stops after the epoch the pruner prunes it at."""

    def __init__(self, out: Path) -> None:
        self.name = out.name
        self.prune = instantiate(OmegaConf.load(out / SEARCH), _convert_="all")
        self.pruned: dict[str, Any] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned:
            return
        epochs = trainer.current_epoch + 1
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if self.prune(self.name, epochs, metrics):
            log.info("%s: pruned after %d epoch(s)", self.name, epochs)
            # As a pruned pack member's record has it (a model of the user's may log no such key).
            name = f"val/{getattr(pl_module, 'metric', 'acc')}"
            self.pruned = {"epoch": epochs, **({name: metrics[name]} if name in metrics else {})}
            trainer.should_stop = True


def _last_checkpoint(trainer: L.Trainer | None) -> str | None:
    """The end-of-epoch last.ckpt an interrupted run resumes from, exactly as if never stopped.

    Nothing is saved at the moment of the interrupt: a mid-epoch state cannot be resumed
    exactly (the epoch's batches would not be the same), and at most one epoch is lost.
    """
    callbacks = trainer.checkpoint_callbacks if trainer is not None else []
    # The checkpoint kept for every epoch is the one with no monitor (configs/callbacks).
    last = next((cb.best_model_path for cb in callbacks if cb.monitor is None), "")
    if last:
        log.info("interrupted; to resume: python train.py ckpt_path=%s", last)
    else:
        log.info("interrupted before a checkpoint was saved: nothing to resume from")
    return last or None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        record = train(cfg)
    except UserError as e:
        if not multirun:
            exit_with(e)  # here: raised, Hydra would print its own line before ours
        log.error("job failed: %s", e)
        return None
    except Exception:
        if not multirun:
            raise
        # One failed job must not stop the sweep: it is recorded as failed in its folder and
        # listed in the sweep's summary.
        log.exception("job failed")
        return None
    return record["metrics"].get(cfg.get("optimized_metric", "val/acc_best"))


def main() -> None:
    """`python train.py [overrides]`; `ckpt_path=<run>/checkpoints/last.ckpt` resumes that run."""
    # Everything a job writes is closed by the time the interpreter exits; its last collection
    # would walk every object torch, Lightning and W&B made: 0.8 s of each process's exit here.
    atexit.register(gc.freeze)
    with one_line_errors(), stop_on_signals():
        refuse_moved(sys.argv[1:])
        ckpt = checkpoint_arg(sys.argv[1:])
        require_checkpoint(ckpt)
        sys.argv[1:] = args = resume_args(sys.argv[1:])
        check_output_dirs(args)
        # Under DDP the other ranks run this again with the same command: rank 0 alone checks.
        cfg = check_before_run(args) if rank_zero_only.rank == 0 else None
        folder = resumed_here(args) if cfg is not None else None
        if folder is not None:
            epochs, max_epochs = trained_epochs(ckpt), cfg.trainer.get("max_epochs")
            if done := nothing_to_train(folder, epochs, max_epochs):
                print(done)  # the folder is left as it was: Hydra has not run
                return
            # Printed, not logged: Hydra sets up logging (in the run folder) only after this.
            kept = keep_attempt(folder, ckpt)
            print(f"{folder.name}: the earlier attempt's record is kept in {kept}")
        run()


if __name__ == "__main__":
    main()
