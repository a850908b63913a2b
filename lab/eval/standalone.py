"""Evaluate a model that has no run directory: a Hugging Face causal LM (``model=hf``) or a
hand-built model such as the snowball construction (``experiment=snowball``).

Data, in order of precedence:

- ``data.text_file=<file>``: next-token accuracy on windows of a local text file
  (:mod:`tasks.text_file`);
- ``task=retrieval`` (or another task config): the lab's task, text modality, token ids used
  as they are (the model's vocabulary must cover the task's; meaningful for models that use the
  lab's token ids);
- the model's own ``evaluation_data()`` (the snowball model has one).

Outputs go to ``out_dir`` (default ``eval_out/<model name>``): ``<evaluator>.json|.csv|.png``
and TensorBoard logs under ``<out_dir>/tensorboard``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from lab.build import build, build_task
from lab.errors import LabError
from lab.eval.base import EvalContext, check_evaluators_fit, run_evaluators
from lab.models.interface import ResidualModel


def _data(cfg: DictConfig, model):
    data_cfg = cfg.get("data") or {}
    batch_size = int(cfg.batch_size)
    if data_cfg.get("text_file"):
        from lab.data.text import FixedLengthData
        from tasks.text_file import TextFileTask

        task = TextFileTask(
            data_cfg.text_file, seq_len=data_cfg.get("seq_len", 64), stride=data_cfg.get("stride"),
            n_samples=data_cfg.get("n_samples", 512), tokenizer=data_cfg.get("tokenizer", "auto"),
            hf_tokenizer=getattr(model, "tokenizer", None), vocab_size=getattr(model, "vocab_size", 2**31),
        )
        return task, {"text": FixedLengthData(task, batch_size)}
    if cfg.get("task") is not None:
        from lab.data.datamodule import TextDataModule

        task = build_task(cfg)
        vocab = getattr(model, "vocab_size", None)
        if vocab is not None and len(task.vocab) > vocab:
            raise LabError(f"the task's {len(task.vocab)} tokens do not fit the model's vocabulary of {vocab}")
        return task, {"text": TextDataModule(task, batch_size=1, eval_batch_size=batch_size)}
    if hasattr(model, "evaluation_data"):
        return model.evaluation_data(batch_size)
    raise LabError("no evaluation data: pass data.text_file=<local text file> or task=retrieval")


def evaluate_model(cfg: DictConfig, evaluators: list) -> dict:
    """Run ``evaluators`` on the model of ``cfg.model`` (no run directory) and its data."""
    model = build(cfg.model, "model")
    if not isinstance(model, ResidualModel):
        raise LabError(f"model={cfg.model.get('_target_')} does not build a residual-stream model")
    task, data = _data(cfg, model)
    check_evaluators_fit(evaluators, task)
    name = Path(str(getattr(model, "source", "") or type(model).__name__)).name.removesuffix(".json")
    out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else Path("eval_out") / name
    device = torch.device(cfg.device)
    from torch.utils.tensorboard import SummaryWriter

    ctx = EvalContext(
        model=model.to(device).eval(), task=task, data=data, out_dir=out_dir, device=device,
        writer=SummaryWriter(str(out_dir / "tensorboard")),
        info={"model": str(getattr(model, "source", type(model).__name__)), "task": task.name,
              "data": dict(cfg.get("data") or {}) if cfg.get("data", {}).get("text_file") else None},
    )
    return run_evaluators(ctx, evaluators)
