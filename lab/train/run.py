"""Train a run: the run directory, the Trainer and its callbacks, resume (built by :mod:`lab.build`)."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lab import runs
from lab.build import build_training
from lab.errors import LabError
from lab.runs import one_line
from lab.train.module import NonFiniteLossError
from lab.train.callbacks import AttentionProgress, DataStepSync, MetricsFile
from lab.train.regime import PhaseController

log = logging.getLogger(__name__)


class StepAlignedLogger(TensorBoardLogger):
    """TensorBoard at the steps ``metrics.jsonl`` uses: optimizer steps done (``global_step``).

    Lightning logs at the index of the batch just trained (one less), so the validation after 50
    steps would show at step 49 in TensorBoard and at 50 in metrics.jsonl.
    """

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, None if step is None else step + 1)


def make_trainer(cfg: DictConfig, run_dir: Path, controller: PhaseController, extra_callbacks=()) -> L.Trainer:
    best = ModelCheckpoint(
        dirpath=run_dir,
        filename="best",
        monitor=controller.regime.best_monitor,
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
        controller,
        DataStepSync(),
        *([AttentionProgress()] if cfg.train.get("track_attention") else []),  # before MetricsFile, which writes its values
        MetricsFile(run_dir),
        *extra_callbacks,
    ]
    logger = StepAlignedLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        max_steps=controller.regime.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.train.val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
    )


# Write failures that are the disk's, not the lab's: reported in one line, the last checkpoint kept.
DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)


# Command-line overrides that may accompany ``resume=``: they change how a run is displayed, not
# what it computes. Anything else would make the resumed run differ from the one it continues.
RESUME_SAFE_OVERRIDES = ("resume", "trainer.enable_progress_bar")


def check_resume_overrides(overrides) -> None:
    """Refuse config overrides on resume: a resumed run continues with its saved config."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides or ()]
    refused = [k for k in keys if k not in RESUME_SAFE_OVERRIDES and not k.startswith("hydra.")]
    if refused:
        raise LabError(
            f"resume continues a run with the config saved in its directory, so {', '.join(refused)} cannot be "
            "changed on resume (budgets included: the learning-rate schedule depends on them); drop the override, "
            "or start a new run with the settings you want"
        )


def train(cfg: DictConfig, run_dir: str | Path, extra_callbacks=(), overrides=None) -> dict:
    """Train a new run into ``run_dir`` (or continue it when ``cfg.resume`` is set).

    Returns the final validation metrics. ``extra_callbacks`` is for tests and tools;
    ``overrides`` (the command line's ``key=value`` list) is checked on resume.
    """
    run_dir = Path(run_dir)
    ckpt_path = checkpoint = None
    if cfg.get("resume"):
        check_resume_overrides(overrides)
        run_dir = Path(cfg.resume)
        cfg = runs.load_config(run_dir)
        ckpt_path = runs.checkpoint_path(run_dir, "last")
        checkpoint = runs.load_checkpoint(ckpt_path)  # refuses anything but a safe, intact checkpoint
        log.info("resuming %s from %s", run_dir, ckpt_path)
    else:
        runs.prepare_new_run(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model is built: seeds its init
    try:
        task, datamodule, module, controller = build_training(cfg, run_dir)
    except Exception:
        if ckpt_path is None:
            runs.discard_unused_run_dir(run_dir)
        raise
    if ckpt_path is None:
        runs.save_config(run_dir, cfg)
    else:
        runs.check_checkpoint_matches(checkpoint, task, ckpt_path)
    trainer = make_trainer(cfg, run_dir, controller, extra_callbacks)
    if ckpt_path is None:
        trainer.logger.log_hyperparams(_flat_hparams(cfg))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except NonFiniteLossError as error:
        if ckpt_path is None and runs.discard_run_without_checkpoint(run_dir):
            raise LabError(f"{error.problem}, before the first checkpoint; the run directory {run_dir} held nothing to "
                           "keep and was removed, so the same command may be rerun; lower train.lr (or raise "
                           "train.warmup_steps)") from None
        raise
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        raise LabError(f"cannot write to {run_dir} ({error.strerror or one_line(error)}); free disk space or make it "
                       f"writable, then continue with resume={run_dir} (its last checkpoint is kept)") from None
    latest = module.last_val_metrics or _saved_metrics(run_dir)  # a finished run resumed: nothing new ran
    metrics = {"step": trainer.global_step, "phases": controller.history, **latest}
    log.info("finished at step %d: %s", trainer.global_step, json.dumps(_headline(metrics)))
    return metrics


def _saved_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "step"} if path.is_file() else {}


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


