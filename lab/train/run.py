"""Compose a training run from a config: task, data, model, trainer, run directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lab import runs
from lab.errors import LabError
from lab.data.curriculum import CurriculumDataModule
from lab.models.visual import build_vision_model, image_data_kwargs, uses_images
from lab.train.aux import AuxiliaryObjective
from lab.train.intermediate import IntermediateSupervision
from lab.train.callbacks import DataStepSync, MetricsFile
from lab.train.regime import PhaseController, match_steps, parse_regime, phase_lr_factor
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


def build_data(cfg: DictConfig, task, model=None) -> tuple[dict, str]:
    """One data module per modality (the primary ``cfg.modality`` plus those the regime names),
    and the primary modality's name. Image data gets ``model``'s visual encoder."""
    def make(node):
        return runs.build(
            node, "modality", task=task, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
            **image_data_kwargs(node, model),
        )

    primary = make(cfg.modality)
    data = {primary.modality: primary}
    for name, node in (cfg.regime.get("data") or {}).items():
        if name not in data:
            data[name] = make(node)
    return dict(sorted(data.items(), key=lambda kv: kv[0] != "text")), primary.modality  # text first


def compose(cfg: DictConfig, run_dir: str | Path = "."):
    """Build (task, datamodule, module, controller) from a config, validating everything first."""
    _validate(cfg)
    task = runs.build_task(cfg)
    model = runs.build_model(cfg, len(task.vocab), task.max_prompt_len)
    if uses_images(cfg):  # image data anywhere: backbone + visual encoder + projector
        model = build_vision_model(cfg, model, task)
    data, primary = build_data(cfg, task, model)
    regime = parse_regime(cfg, primary, list(data))
    if cfg.regime.get("match_steps_of"):
        regime = match_steps(regime, cfg.regime.match_steps_of, cfg.train.val_every)
    controller = PhaseController(regime, run_dir, cfg.train.stop.threshold, cfg.train.stop.patience)
    datamodule = CurriculumDataModule(data, controller, cfg.seed)
    module = RetrievalModule(
        model,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        betas=cfg.train.betas,
        lr_factor=phase_lr_factor(controller, cfg.train.warmup_steps, cfg.train.lr),
        aux=_auxiliary(cfg, model, task),
        aux_weight=cfg.train.aux.weight,
        intermediate=_intermediate(cfg, model),
        val_names=datamodule.val_names,
        decoder=task.vocab.decode,
        meta=runs.checkpoint_meta(task),
    )
    regime.best_monitor = cfg.train.stop.monitor or regime.phases[-1].until or f"val/{primary}_id_acc"
    monitors = [f"val/{n}_acc" for n in datamodule.val_names]
    for where, metric in [("train.stop.monitor", regime.best_monitor)] + [
        (f"phase {p.name!r} until", p.until) for p in regime.phases if p.until
    ]:
        if metric not in monitors:
            raise LabError(f"{where}={metric!r} is not a validation metric; choose one of {monitors}")
    log.info("regime %s: %s", regime.name, " -> ".join(f"{p.name}{p.mix}" for p in regime.phases))
    return task, datamodule, module, controller


def _auxiliary(cfg: DictConfig, model, task):
    """The optional colour/shape <-> image-token objective, when ``train.aux.weight > 0``."""
    if cfg.train.aux.weight < 0:
        raise LabError(f"train.aux.weight must be >= 0, got {cfg.train.aux.weight}")
    if cfg.train.aux.weight == 0:
        return None
    if not uses_images(cfg):
        raise LabError("train.aux.weight > 0 needs image data (modality=image or an image regime)")
    return AuxiliaryObjective(model, task, cfg.render, cfg.train.aux.layer)


def _intermediate(cfg: DictConfig, model):
    """The optional queried-shape supervision, when ``train.intermediate.weight > 0``."""
    node = cfg.train.get("intermediate")
    if node is None or node.weight == 0:
        return None
    n_layers = getattr(model, "backbone", model).n_layers
    layer = n_layers // 2 if node.get("layer") is None else node.layer
    return IntermediateSupervision(layer, node.weight, n_layers, node.get("anneal"), node.get("space", "readout"))


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
        MetricsFile(run_dir),
        *extra_callbacks,
    ]
    logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
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
        task, datamodule, module, controller = compose(cfg, run_dir)
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
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


