"""Run directories made without training (config + a checkpoint of freshly built weights), in the
layout train.py writes; for tests that need a run of a given architecture in a second."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from conftest import tiny_cfg
from lab import runs
from lab.build import build_model, build_task


def make_run(run_dir: Path, *overrides: str, seed: int = 0, edit=None) -> Path:
    """A run of the tiny config with ``overrides``; ``edit(model)`` may change its weights first."""
    cfg = tiny_cfg(*overrides)
    task = build_task(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, task)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    run_dir.mkdir(parents=True)
    runs.save_config(run_dir, cfg)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lab_meta": runs.checkpoint_meta(task), "global_step": 0}, run_dir / "last.ckpt")
    return run_dir


def copy_run(source: Path, dest: Path) -> Path:
    """A private copy of a run's config and checkpoints (evaluate.py writes into the run)."""
    dest.mkdir(parents=True)
    for path in source.glob("*.ckpt"):
        shutil.copy(path, dest / path.name)
    shutil.copy(source / runs.CONFIG_FILE, dest / runs.CONFIG_FILE)
    return dest
