"""Run directories: ``checkpoints/<task>/<run>/`` with config.yaml, best/last.ckpt, tensorboard/,
metrics.jsonl and eval/. Everything needed to rebuild a trained model from the directory alone."""
from __future__ import annotations

import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab.errors import LabError
from tasks.retrieval import TaskConfigError

CONFIG_FILE = "config.yaml"
CHECKPOINTS = ("best", "last")


def _one_line(error: Exception, limit: int = 200) -> str:
    """An exception's text on one line (user errors are printed as a single ``error:`` line)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unwrap_instantiation(error: Exception) -> Exception:
    """Hydra wraps constructor errors; return the user's real error if there is one."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def build(node: DictConfig, what: str, **kwargs):
    """``instantiate`` with config errors turned into one clear :class:`LabError`."""
    try:
        return instantiate(node, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised below unless it is a config error
        cause = unwrap_instantiation(error)
        if isinstance(cause, (LabError, TaskConfigError)):
            raise LabError(str(cause)) from None
        if isinstance(cause, (TypeError, InstantiationException)):
            raise LabError(f"cannot build the {what} from its config: {cause}") from None
        raise


def build_task(cfg: DictConfig):
    return build(cfg.task, "task", seed=cfg.seed)


def build_model(cfg: DictConfig, vocab_size: int, min_len: int):
    """Instantiate ``cfg.model`` for a vocabulary, checking it fits the longest prompt."""
    model = build(cfg.model, "model", vocab_size=vocab_size)
    if getattr(model, "max_len", min_len) < min_len:
        raise LabError(f"model.max_len={model.max_len} is shorter than the longest prompt ({min_len} tokens); raise it")
    return model


def prepare_new_run(run_dir: Path) -> None:
    """Refuse to reuse a directory that already holds a run."""
    if (run_dir / CONFIG_FILE).exists():
        raise LabError(
            f"run directory {run_dir} already holds a run; pick another run_name=..., "
            f"or continue it with resume={run_dir}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


def discard_unused_run_dir(run_dir: Path) -> None:
    """Remove a new run directory that a refused config left holding nothing but Hydra's log."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"train.log"}:
        shutil.rmtree(run_dir)


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def load_config(run_dir: str | Path) -> DictConfig:
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise LabError(f"run directory {run_dir} does not exist; pass run=checkpoints/<task>/<run>")
    if not path.is_file():
        raise LabError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the folder train.py created")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, UnicodeDecodeError) as error:
        raise LabError(f"{path} is corrupt ({_one_line(error)}); restore it from the original run") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "task" not in cfg:
        raise LabError(f"{path} is not a lab run config (it lacks model/task sections)")
    return cfg


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """A checkpoint of the run by name (``best``, ``last``, ``phase1_image``...) or an explicit path."""
    named = Path(run_dir) / f"{which}.ckpt"
    path = named if which in CHECKPOINTS or named.is_file() else Path(which)
    if not path.is_file():
        found = sorted(p.name for p in Path(run_dir).glob("*.ckpt")) if Path(run_dir).is_dir() else []
        raise LabError(f"checkpoint {path} not found; checkpoints in {run_dir}: {found or 'none'}")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol notes: the message below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The safe unpickler names the global (class or function) it refused; any other failure
        # means the bytes are not a checkpoint at all (random data, a truncated legacy pickle).
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise LabError(f"checkpoint {path} is corrupt or truncated (not a readable checkpoint); use another checkpoint") from None
        raise LabError(
            f"{path} holds objects other than tensors and plain containers ({refused.group(1)}), so it is not "
            "loaded (weights_only=True); only checkpoints written by this lab are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        detail = f" ({_one_line(error, 160)})" if str(error) else ""
        raise LabError(f"checkpoint {path} is corrupt or truncated{detail}; use another checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise LabError(f"{path} is not a lab checkpoint (no state_dict)")
    return checkpoint


def checkpoint_meta(task) -> dict:
    """What a checkpoint records about the task it was trained on."""
    return {"task": task.name, "vocab": list(task.vocab.tokens)}


def check_checkpoint_matches(checkpoint: dict, task, path) -> None:
    meta = checkpoint.get("lab_meta")
    if meta is None:
        raise LabError(f"{path} has no lab metadata; it was not written by this lab's train.py")
    if meta["task"] != task.name or list(meta["vocab"]) != list(task.vocab.tokens):
        raise LabError(
            f"{path} was trained on task {meta['task']!r} with a {len(meta['vocab'])}-token vocabulary, but the run "
            f"config describes task {task.name!r} with {len(task.vocab)} tokens; use the checkpoint of this run"
        )


def load_trained_model(run_dir: str | Path, which: str = "best"):
    """Rebuild (cfg, task, model) from a run directory; the model is in eval mode on CPU."""
    cfg, task, model, _ = load_trained_run(run_dir, which)
    return cfg, task, model


def load_trained_run(run_dir: str | Path, which: str = "best"):
    """Like :func:`load_trained_model`, plus the global step the checkpoint was saved at."""
    cfg = load_config(run_dir)
    task = build_task(cfg)
    path = checkpoint_path(run_dir, which)
    checkpoint = load_checkpoint(path)
    check_checkpoint_matches(checkpoint, task, path)
    model = build_model(cfg, len(task.vocab), 1)
    from lab.models.visual import build_vision_model, uses_images

    if uses_images(cfg):  # encoder weights come from the checkpoint below
        model = build_vision_model(cfg, model, task, load_weights=False)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise LabError(
            f"{path} does not fit the model described by {run_dir}/{CONFIG_FILE}: {_one_line(error, 300)}"
        ) from None
    return cfg, task, model.eval(), int(checkpoint.get("global_step", 0))
