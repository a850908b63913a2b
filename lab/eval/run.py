"""Rebuild a trained run from its directory and run the chosen evaluators on it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from lab.build import build, build_streams, load_trained
from lab.errors import LabError
from lab.eval.base import EvalContext, check_evaluators_fit, run_evaluators

log = logging.getLogger(__name__)


def build_evaluators(cfg: DictConfig) -> list:
    selected = cfg.get("evaluators") or {}
    if not selected:
        raise LabError("no evaluators selected; pass e.g. evaluators=[accuracy]")
    return [build(node, f"evaluator {name!r}") for name, node in selected.items()]


def evaluate_run(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.run`` (a run directory) with ``cfg.evaluators``; returns results by name.

    Without a run directory, ``model=<hf|snowball|...>`` evaluates a model built from its config
    (see :mod:`lab.eval.standalone`).
    """
    if cfg.get("model") is not None:
        if cfg.get("run"):
            raise LabError("pass either run=<run dir> or model=<...>, not both")
        from lab.eval.standalone import evaluate_model

        return evaluate_model(cfg, build_evaluators(cfg))
    if not cfg.get("run"):
        raise LabError("pass the run directory to evaluate: run=checkpoints/<task>/<run>")
    run_dir = Path(cfg.run)
    evaluators = build_evaluators(cfg)
    run_cfg, task, model, step = load_trained(run_dir, cfg.checkpoint)
    check_evaluators_fit(evaluators, task)  # before the TensorBoard writer creates its event file
    device = torch.device(cfg.device)
    ctx = EvalContext(
        model=model.to(device),
        task=task,
        data=build_streams(run_cfg, task, model, eval_batch_size=cfg.batch_size)[0],
        out_dir=eval_dir(run_dir, str(cfg.checkpoint)),
        device=device,
        writer=_writer(run_dir),
        step=step,
        info={"run": str(run_dir), "checkpoint": str(cfg.checkpoint), "step": step},
    )
    return run_evaluators(ctx, evaluators)


def eval_dir(run_dir: Path, checkpoint: str) -> Path:
    """Where a run's evaluation goes: ``eval/`` for its last checkpoint, ``eval_<name>/`` for any
    other (``best``, a phase checkpoint such as ``phase1_image``), so evaluations of the phases of
    one run sit side by side."""
    name = Path(checkpoint).stem
    return run_dir / ("eval" if name == "last" else f"eval_{name}")


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard" / "eval"))
