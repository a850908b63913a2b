"""Shared fixtures: tiny configs composed with Hydra's compose API, one tiny trained run per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

torch.set_num_threads(1)  # 2 shared cores: keep every test single-threaded


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="also run the slow convergence checks (marked slow; CI and the README's test command do)")


def pytest_configure(config):
    if config.getoption("--all"):
        config.option.markexpr = ""  # pyproject's default `-m "not slow"` is lifted

# Small enough to train in a few seconds on one core, big enough to learn something.
TINY = [
    "recipe=plain",  # generic machinery is tested on the paper's recipe; the aids have their own tests
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "task.n_colors=8",
    "task.n_shapes=8",
    "task.n_items=8",
    "task.id_objects=[2,3]",
    "task.ood_objects=[4,5]",
    "task.eval_size=32",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.lr=3e-3",
    "train.warmup_steps=10",
    "train.max_steps=60",
    "train.val_every=10",
    "train.stop.threshold=1.0",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def compose_cfg(name: str = "train", overrides=()):
    """Compose ``conf/<name>.yaml`` in-process (no Hydra run directory, no working-dir change)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def tiny_cfg(*overrides):
    return compose_cfg("train", [*TINY, *overrides])


class LossRecorder(L.Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class InitRecorder(L.Callback):
    """Keeps a copy of the weights the model starts training from."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class TrainedRun:
    def __init__(self, run_dir: Path, metrics: dict, losses: list[float], init: dict, cfg) -> None:
        self.dir, self.metrics, self.losses, self.init, self.cfg = run_dir, metrics, losses, init, cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TrainedRun:
    """One tiny run (60 steps, validation every 10), trained once and shared. Tests must not
    modify its directory (except evaluate's eval/ outputs); copy it first."""
    from lab.train.run import train

    cfg = tiny_cfg()
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    losses, init = LossRecorder(), InitRecorder()
    metrics = train(cfg, run_dir, extra_callbacks=[losses, init])
    return TrainedRun(run_dir, metrics, losses.losses, init.state, cfg)


def run_script(*args: str, cwd: Path = ROOT, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one of the entry points (``train.py``/``evaluate.py``) as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def random_eval_context(out_dir: Path, eval_size: int = 64):
    """An EvalContext over a seeded, untrained 2-block model on the retrieval task (text only):
    for evaluator plumbing tests whose answers do not depend on training."""
    from lab.data.datamodule import TextDataModule
    from lab.eval.base import EvalContext
    from lab.models.backbone import Backbone
    from tasks.retrieval import RetrievalTask

    torch.manual_seed(0)
    task = RetrievalTask(eval_size=eval_size)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64)
    return EvalContext(model=model, task=task, data={"text": TextDataModule(task, eval_batch_size=64)}, out_dir=out_dir)
