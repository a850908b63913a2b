"""Compose a training run from a config: task, data, model, trainer, run directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lab import runs
from lab.errors import LabError
from lab.train.callbacks import DataStepSync, MetricsFile, SaturationStop
from lab.train.module import RetrievalModule

log = logging.getLogger(__name__)


def _validate(cfg: DictConfig) -> None:
    t = cfg.train
    checks = [
        (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
        (t.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
        (t.val_every >= 1, f"train.val_every must be >= 1, got {t.val_every}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (0 < t.stop.threshold <= 1, f"train.stop.threshold must be in (0, 1], got {t.stop.threshold}"),
    ]
    for ok, message in checks:
        if not ok:
            raise LabError(message)


class LabModule(RetrievalModule):
    """RetrievalModule that stamps its checkpoints with the task they belong to."""

    def __init__(self, *args, meta: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta = meta

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lab_meta"] = self.meta


def compose(cfg: DictConfig):
    """Build (task, datamodule, module) from a config, validating everything before training."""
    _validate(cfg)
    task = runs.build_task(cfg)
    datamodule = runs.build(
        cfg.modality, "modality", task=task, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size
    )
    model = runs.build_model(cfg, len(task.vocab), task.max_prompt_len)
    module = LabModule(
        model,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        betas=cfg.train.betas,
        warmup_steps=cfg.train.warmup_steps,
        total_steps=cfg.train.max_steps,
        val_names=datamodule.val_names,
        decoder=task.vocab.decode,
        meta=runs.checkpoint_meta(task),
    )
    if cfg.train.stop.monitor.removeprefix("val/").removesuffix("_acc") not in datamodule.val_names:
        raise LabError(
            f"train.stop.monitor={cfg.train.stop.monitor!r} is not a validation metric; "
            f"choose one of {[f'val/{n}_acc' for n in datamodule.val_names]}"
        )
    return task, datamodule, module


def make_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=()) -> L.Trainer:
    best = ModelCheckpoint(
        dirpath=run_dir,
        filename="best",
        monitor=cfg.train.stop.monitor,
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning's save_last=True only refreshes last.ckpt when the top-k checkpoint changed, so a
    # resume would go back to the best step; a separate unmonitored callback saves every validation.
    last = ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    callbacks = [
        best,
        last,  # after ``best``, so last.ckpt records the updated best score
        SaturationStop(cfg.train.stop.monitor, cfg.train.stop.threshold, cfg.train.stop.patience),
        DataStepSync(),
        MetricsFile(run_dir),
        *extra_callbacks,
    ]
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        max_steps=cfg.train.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.train.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
    )


def train(cfg: DictConfig, run_dir: str | Path, extra_callbacks=()) -> dict:
    """Train a new run into ``run_dir`` (or continue it when ``cfg.resume`` is set).

    Returns the final validation metrics. ``extra_callbacks`` is for tests and tools.
    """
    run_dir = Path(run_dir)
    ckpt_path = checkpoint = None
    if cfg.get("resume"):
        run_dir = Path(cfg.resume)
        cfg = runs.load_config(run_dir)
        ckpt_path = runs.checkpoint_path(run_dir, "last")
        checkpoint = runs.load_checkpoint(ckpt_path)  # refuses anything but a safe, intact checkpoint
        log.info("resuming %s from %s", run_dir, ckpt_path)
    else:
        runs.prepare_new_run(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model is built: seeds its init
    task, datamodule, module = compose(cfg)
    if ckpt_path is None:
        runs.save_config(run_dir, cfg)
    else:
        runs.check_checkpoint_matches(checkpoint, task, ckpt_path)
    trainer = make_trainer(cfg, run_dir, extra_callbacks)
    if ckpt_path is None:
        trainer.logger.log_hyperparams(_flat_hparams(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    metrics = {"step": trainer.global_step, **module.last_val_metrics}
    log.info("finished at step %d: %s", trainer.global_step, json.dumps(_headline(metrics)))
    return metrics


def _headline(metrics: dict) -> dict:
    return {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/") or k == "step"}


def _flat_hparams(cfg: DictConfig) -> dict:
    flat = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(OmegaConf.to_container(cfg, resolve=True))
    return flat


