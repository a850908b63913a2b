"""Write a run's model as a Hugging Face folder: ``config.json`` + ``model.safetensors``
(GPT-NeoX), the lab's vocabulary as a tokenizer, and ``lab_export.json`` (where it came from,
the check it passed and the ``evaluate.py`` command that reads it back on the run's task)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from lab.build import load_trained
from lab.export.gpt_neox import ExportError, to_hf_model
from lab.export.tokenizer import save_tokenizer
from lab.export.verify import evaluation_batches, float32_error, max_logit_diff
from lab.models.lora import LoRALinear
from tasks.vocab import BOS

log = logging.getLogger(__name__)

INFO_FILE = "lab_export.json"


def check_out(out: str | Path | None) -> Path:
    """``out`` as a path, refused when missing or when it exists and is not an empty folder."""
    if not out:
        raise ExportError("pass the folder to write: out=<new folder>")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"out={out} already exists and is not empty; nothing is overwritten, pass a new folder")
    return out


def task_overrides(cfg) -> list[str]:
    """The ``evaluate.py`` overrides that rebuild the run's task (and its seed)."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    target = str(task.pop("_target_", ""))
    name = target.rsplit(".", 2)[-2] if "." in target else target
    values = [f"task.{k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}" for k, v in task.items()]
    return [f"task={name}", *values, f"seed={cfg.get('seed', 0)}"]


def export_run(run: str | Path, out: str | Path, checkpoint: str = "last", text_only: bool = False,
               tolerance: float = 1e-5) -> Path:
    """Export the model of run directory ``run`` (checkpoint ``checkpoint``) into the new folder
    ``out``; returns ``out``. Nothing is written unless the model converts and its logits on the
    run's evaluation prompts are within ``tolerance`` of the lab's."""
    out = check_out(out)
    cfg, task, model, step = load_trained(run, checkpoint)
    vocab = task.vocab
    hf = to_hf_model(model, text_only, pad_id=vocab.pad_id, bos_id=vocab.index.get(BOS))
    batches = evaluation_batches(task)
    diff, rounding = max_logit_diff(model, hf, batches), float32_error(model, batches)
    if not diff <= tolerance:
        raise ExportError(f"the exported model's logits differ from the lab's by {diff:.3g} (> tolerance={tolerance:g}), "
                          f"while the lab model's own float32 rounding error on these prompts is {rounding:.3g}; nothing "
                          "is written (if the two are alike, pass a larger tolerance=)")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with _quiet_progress():
            hf.save_pretrained(partial)
        _add_legacy_rope_keys(partial / "config.json", hf.config)
        save_tokenizer(list(vocab.tokens), hf.config.max_position_embeddings, partial)
        info = {
            "format": "GPTNeoXForCausalLM",
            "run": str(Path(run).resolve()), "checkpoint": str(checkpoint), "step": step,
            "task": task.name, "seed": int(cfg.get("seed", 0)),
            "task_config": OmegaConf.to_container(cfg.task, resolve=True),
            "model_config": OmegaConf.to_container(cfg.model, resolve=True),
            "lora_merged": any(isinstance(m, LoRALinear) for m in model.modules()),
            "text_only": bool(text_only),
            "vocab": list(vocab.tokens),
            "check": {"prompts": sum(len(b) for b in batches), "max_abs_logit_diff": diff, "tolerance": tolerance,
                      "lab_float32_error": rounding,
                      "compared": "logits at every real (attendable) token of the run's evaluation prompts, float32; "
                                  "lab_float32_error: the lab model's own float32 vs float64 logits"},
            "evaluate": " ".join(["python evaluate.py model=hf", f"model.path={out}", *task_overrides(cfg)]),
        }
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # an empty folder (checked above)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("exported %s (%s, step %d) to %s; max |logit diff| %.2g on %d prompts (the lab's own float32 error: %.2g)",
             run, checkpoint, step, out, diff, info["check"]["prompts"], rounding)
    return out


@contextlib.contextmanager
def _quiet_progress():
    """No transformers progress bar on the console while saving (a one-file model)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _add_legacy_rope_keys(path: Path, config) -> None:
    """The rotary settings also under the names transformers 4.x reads (rotary_pct, rotary_emb_base)."""
    data = json.loads(path.read_text())
    rope = config.rope_parameters
    data.setdefault("rotary_pct", rope["partial_rotary_factor"])
    data.setdefault("rotary_emb_base", rope["rope_theta"])
    path.write_text(json.dumps(data, indent=2) + "\n")
