"""Rebuild a trained run from its directory and run the chosen evaluators on it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from lab import runs
from lab.errors import LabError
from lab.eval.base import EvalContext

log = logging.getLogger(__name__)


def eval_data(run_cfg: DictConfig, task, batch_size: int, model=None) -> dict:
    """Evaluation data per modality for a run: the modality it was configured with, plus those its
    regime trained on. Image data encodes its pictures with ``model``'s visual encoder."""
    from lab.models.visual import image_data_kwargs

    regime = run_cfg.get("regime") or {}
    data = {}
    for node in [run_cfg.modality, *((regime.get("data") or {}).values())]:
        datamodule = runs.build(
            node, "modality", task=task, batch_size=1, eval_batch_size=batch_size, **image_data_kwargs(node, model)
        )
        data.setdefault(datamodule.modality, datamodule)
    return data


def build_evaluators(cfg: DictConfig) -> list:
    selected = cfg.get("evaluators") or {}
    if not selected:
        raise LabError("no evaluators selected; pass e.g. evaluators=[accuracy]")
    return [runs.build(node, f"evaluator {name!r}") for name, node in selected.items()]


def evaluate_run(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.run`` (a run directory) with ``cfg.evaluators``; returns results by name.

    Without a run directory, ``model=<hf|snowball|...>`` evaluates a model built from its config
    (see :mod:`lab.eval.standalone`).
    """
    if cfg.get("model") is not None:
        if cfg.get("run"):
            raise LabError("pass either run=<run dir> or model=<...>, not both")
        from lab.eval.standalone import evaluate_model

        return evaluate_model(cfg, build_evaluators, run_evaluators)
    if not cfg.get("run"):
        raise LabError("pass the run directory to evaluate: run=checkpoints/<task>/<run>")
    run_dir = Path(cfg.run)
    evaluators = build_evaluators(cfg)
    run_cfg, task, model, step = runs.load_trained_run(run_dir, cfg.checkpoint)
    device = torch.device(cfg.device)
    ctx = EvalContext(
        model=model.to(device),
        task=task,
        data=eval_data(run_cfg, task, cfg.batch_size, model),
        out_dir=run_dir / "eval",
        device=device,
        writer=_writer(run_dir),
        step=step,
        info={"run": str(run_dir), "checkpoint": str(cfg.checkpoint), "step": step},
    )
    return run_evaluators(ctx, evaluators)


def run_evaluators(ctx: EvalContext, evaluators: list) -> dict:
    results = {}
    try:
        for evaluator in evaluators:
            log.info("running evaluator %s", evaluator.name)
            results[evaluator.name] = evaluator(ctx)
            log.info("wrote %s/%s.json", ctx.out_dir, evaluator.name)
    finally:
        if ctx.writer is not None:
            ctx.writer.close()
    return results


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard" / "eval"))
