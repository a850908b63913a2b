"""Run directories: ``checkpoints/<task>/<run>/`` with config.yaml, best/last.ckpt, tensorboard/,
metrics.jsonl and eval/: reading and writing them safely. Rebuilding the model of a run from its
directory is :func:`lab.build.load_trained`."""
from __future__ import annotations

import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lab.errors import LabError

CONFIG_FILE = "config.yaml"
CHECKPOINTS = ("best", "last")


def one_line(error: Exception, limit: int = 200) -> str:
    """An exception's text on one line (user errors are printed as a single ``error:`` line)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def discard_run_without_checkpoint(run_dir: Path) -> bool:
    """Remove a new run's directory when it ended before writing any checkpoint (nothing in it can
    be resumed or evaluated, and a rerun under the same name would be refused). True if removed."""
    if run_dir.is_dir() and not any(run_dir.glob("*.ckpt")):
        shutil.rmtree(run_dir)
        return True
    return False


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
        raise LabError(f"{path} is corrupt ({one_line(error)}); restore it from the original run") from None
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
        detail = f" ({one_line(error, 160)})" if str(error) else ""
        raise LabError(f"checkpoint {path} is corrupt or truncated{detail}; use another checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise LabError(f"{path} is not a lab checkpoint (no state_dict)")
    return checkpoint


def checkpoint_meta(task) -> dict:
    """What a checkpoint records about the task it was trained on."""
    return {"task": task.name, "vocab": list(task.vocab.tokens)}


def check_checkpoint_matches(checkpoint: dict, task, path, same_task: bool = True) -> None:
    """Refuse a checkpoint of another task or vocabulary. ``same_task=False`` (``init_from``)
    accepts another task whose vocabulary is the same token for token (e.g. one_hop -> retrieval)."""
    meta = checkpoint.get("lab_meta")
    if meta is None:
        raise LabError(f"{path} has no lab metadata; it was not written by this lab's train.py")
    same_vocab = list(meta["vocab"]) == list(task.vocab.tokens)
    if same_vocab and (meta["task"] == task.name or not same_task):
        return
    if not same_task:
        raise LabError(
            f"{path} was trained on task {meta['task']!r} with a {len(meta['vocab'])}-token vocabulary that differs "
            f"from this run's (task {task.name!r}, {len(task.vocab)} tokens); init_from needs the same vocabulary "
            "token for token (the same n_colors, n_shapes and n_items)"
        )
    raise LabError(
        f"{path} was trained on task {meta['task']!r} with a {len(meta['vocab'])}-token vocabulary, but the run "
        f"config describes task {task.name!r} with {len(task.vocab)} tokens; use the checkpoint of this run"
    )
