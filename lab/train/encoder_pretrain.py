"""Encoder pretraining: read each object's colour and shape off rendered canvases.

The lab's offline stand-in for an ImageNet-pretrained encoder. Canvases with 1..N objects (N =
the task's largest object count) are rendered on the fly; every image token (cell of the encoder's
feature grid) predicts, through a linear head, the colour and the shape of the object whose box
covers the cell centre, or "empty". The encoder thus learns local, position-independent object
identity, which is what the retrieval task needs from image tokens; it never sees items,
associations or queries, so it cannot learn the binding itself.

The checkpoint is cached by a hash of everything that determines it (encoder architecture,
render settings, number of colours/shapes, pretraining settings) under
``<encoder.cache_dir>/<encoder.name>-<hash>/`` with ``encoder.safetensors``, ``config.yaml``
and ``metrics.json``. ``python pretrain_encoder.py encoder=resnet`` writes it explicitly; image
runs with ``encoder.weights=lab`` train it on first use when ``encoder.auto_pretrain=true``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lab.errors import LabError
from lab.models.visual import VisualEncoder, build_encoder
from tasks.render import Renderer

log = logging.getLogger(__name__)

WEIGHTS_FILE = "encoder.safetensors"
_EVAL_STREAM = 1


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def render_settings(cfg) -> dict:
    """The render config of a run (``cfg.render``) as a plain dict."""
    if cfg.get("render") is None:
        raise LabError("image runs need render settings: add render=cpu (or render=paper) to the config")
    return _plain(cfg.render)


def max_objects(cfg) -> int:
    return int(max(cfg.task.id_objects[1], cfg.task.ood_objects[1]))


def make_renderer(cfg) -> Renderer:
    r = render_settings(cfg)
    return Renderer(
        n_colors=int(cfg.task.n_colors),
        n_shapes=int(cfg.task.n_shapes),
        canvas_size=int(r["canvas_size"]),
        object_size=int(r["object_size"]),
        gap=int(r.get("gap", 2)),
        max_objects=max_objects(cfg),
        background=tuple(r.get("background", (0, 0, 0))),
        min_shape_difference=float(r.get("min_shape_difference", 0.06)),
    )


def pretrain_spec(cfg) -> dict:
    """Everything that determines the pretrained encoder (hashed into its cache key)."""
    enc = cfg.encoder
    return {
        "version": 1,
        "encoder": {
            "name": str(enc.name),
            "layer": enc.get("layer"),
            "input_size": int(enc.input_size),
            "model_kwargs": _plain(enc.get("model_kwargs") or {}),
            **({"pool": int(enc.pool)} if int(enc.get("pool") or 1) > 1 else {}),
        },
        "render": render_settings(cfg),
        "task": {"n_colors": int(cfg.task.n_colors), "n_shapes": int(cfg.task.n_shapes), "max_objects": max_objects(cfg)},
        "pretrain": _plain(enc.pretrain),
    }


def encoder_dir(cfg) -> Path:
    spec = pretrain_spec(cfg)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(str(cfg.encoder.get("cache_dir") or "checkpoints/encoders")) / f"{spec['encoder']['name']}-{digest}"


def pretrain_command(cfg) -> str:
    """The command that writes this config's encoder checkpoint."""
    overrides = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if o.split("=")[0].lstrip("+~").split(".")[0]
                     in ("encoder", "render", "task")]
    except Exception:  # noqa: BLE001 - not inside a Hydra app: describe the encoder explicitly
        overrides = [f"encoder.name={cfg.encoder.name}", f"encoder.layer={cfg.encoder.get('layer')}"]
    return " ".join(["python pretrain_encoder.py", *overrides])


def encoder_arguments(enc) -> dict:
    """The plain arguments of :func:`lab.models.visual.build_encoder` from a config's ``encoder`` node."""
    from omegaconf import OmegaConf

    model_kwargs = enc.get("model_kwargs")
    return {"name": str(enc.name), "layer": enc.get("layer"), "input_size": int(enc.get("input_size") or 48),
            "model_kwargs": OmegaConf.to_container(model_kwargs, resolve=True) if model_kwargs else {},
            "pool": int(enc.get("pool") or 1)}


def pretrained_encoder_path(cfg, must_exist: bool = True) -> Path:
    """Where the lab-pretrained encoder of ``cfg`` is cached; refuses a missing one (naming the
    command that writes it) unless ``must_exist=False``."""
    path = encoder_dir(cfg) / WEIGHTS_FILE
    if must_exist and not path.is_file():
        raise LabError(f"no pretrained encoder at {path} (encoder.weights=lab); train.py pretrains it before "
                       f"training, or write it with: {pretrain_command(cfg)}")
    return path


def ensure_pretrained_encoder(cfg) -> Path:
    """Path of the lab-pretrained encoder for ``cfg``; trains it first if missing (and allowed)."""
    out = encoder_dir(cfg)
    path = out / WEIGHTS_FILE
    if path.is_file():
        return path
    if not cfg.encoder.get("auto_pretrain", True):
        raise LabError(
            f"no pretrained encoder at {path} (encoder.weights=lab). Write it with:\n  {pretrain_command(cfg)}\n"
            "or set encoder.auto_pretrain=true to train it automatically, or use encoder.weights=random"
        )
    with _lock(out), torch.random.fork_rng():  # the caller's RNG state is the same with or without a cache
        if not path.is_file():  # another process may have written it while we waited
            log.info("no cached encoder at %s: pretraining it now (command: %s)", out, pretrain_command(cfg))
            pretrain_encoder(cfg, out)
    return path


@contextmanager
def _lock(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ data
def canvas_batch(renderer: Renderer, rng: np.random.Generator, batch_size: int, most: int, grid, n_colors: int,
                 n_shapes: int):
    """Random canvases with per-cell colour/shape labels and each object's centre cell."""
    h, w = grid
    size = renderer.canvas_size
    images = np.empty((batch_size, size, size, 3), np.uint8)
    color_lab = np.full((batch_size, h, w), n_colors, np.int64)   # n_colors = empty
    shape_lab = np.full((batch_size, h, w), n_shapes, np.int64)
    centre_cells = []   # (sample, cell index, colour, shape) per object
    cy = (np.arange(h) + 0.5) * size / h
    cx = (np.arange(w) + 0.5) * size / w
    for b in range(batch_size):
        n = int(rng.integers(1, most + 1))
        colors = rng.choice(renderer.colours.shape[0], n, replace=False)
        shapes = rng.choice(len(renderer.shapes.masks), n, replace=False)
        images[b], layout = renderer.render(rng, colors, shapes)
        s = renderer.object_size
        for colour, shape, (r, c) in zip(colors, shapes, layout.corners):
            rows = (cy >= r) & (cy < r + s)
            cols = (cx >= c) & (cx < c + s)
            color_lab[b][np.ix_(rows, cols)] = colour
            shape_lab[b][np.ix_(rows, cols)] = shape
            i = min(h - 1, int((r + s / 2) * h / size))
            j = min(w - 1, int((c + s / 2) * w / size))
            color_lab[b, i, j], shape_lab[b, i, j] = colour, shape
            centre_cells.append((b, i * w + j, int(colour), int(shape)))
    return images, color_lab.reshape(batch_size, -1), shape_lab.reshape(batch_size, -1), centre_cells


def to_tensor_images(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


class PretrainHead(torch.nn.Module):
    def __init__(self, dim: int, n_colors: int, n_shapes: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.color = torch.nn.Linear(dim, n_colors + 1)
        self.shape = torch.nn.Linear(dim, n_shapes + 1)

    def forward(self, tokens):
        x = self.norm(tokens)
        return self.color(x), self.shape(x)


@torch.no_grad()
def evaluate(encoder: VisualEncoder, head: PretrainHead, batches) -> dict:
    encoder.eval()
    head.eval()
    hits_c = hits_s = hits_both = total = 0
    for images, _, _, centres in batches:
        lc, ls = head(encoder(to_tensor_images(images)))
        pc, ps = lc.argmax(-1), ls.argmax(-1)
        for b, cell, colour, shape in centres:
            ok_c, ok_s = int(pc[b, cell]) == colour, int(ps[b, cell]) == shape
            hits_c += ok_c
            hits_s += ok_s
            hits_both += ok_c and ok_s
            total += 1
    return {"color_acc": hits_c / total, "shape_acc": hits_s / total, "object_acc": hits_both / total, "n_objects": total}


# -------------------------------------------------------------------------------------- training
def pretrain_encoder(cfg, out_dir: str | Path | None = None) -> dict:
    """Pretrain ``cfg.encoder`` on the colour/shape task and save it; returns the final metrics."""
    out = Path(out_dir) if out_dir is not None else encoder_dir(cfg)
    p = cfg.encoder.pretrain
    steps, batch_size, lr, seed = int(p.steps), int(p.batch_size), float(p.lr), int(p.seed)
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise LabError("encoder.pretrain needs steps >= 1, batch_size >= 1 and lr > 0")
    renderer = make_renderer(cfg)
    torch.manual_seed(seed)
    init = str(cfg.encoder.get("pretrain_init") or "random")
    encoder = build_encoder(**encoder_arguments(cfg.encoder), weights=init)
    if encoder.grid is None:
        raise LabError(f"encoder {encoder.name!r} has no spatial token grid, so it cannot be pretrained per cell")
    n_colors, n_shapes, most = int(cfg.task.n_colors), int(cfg.task.n_shapes), max_objects(cfg)
    head = PretrainHead(encoder.dim, n_colors, n_shapes)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    eval_rng = np.random.default_rng([seed, _EVAL_STREAM])
    eval_size = int(p.get("eval_size", 256))
    eval_batches = [canvas_batch(renderer, eval_rng, min(64, eval_size - i), most, encoder.grid, n_colors, n_shapes)
                    for i in range(0, eval_size, 64)]
    out.mkdir(parents=True, exist_ok=True)
    history = out / "metrics.jsonl"
    history.write_text("")
    log_every = max(1, steps // 10)
    start = time.time()
    log.info("pretraining encoder %s (%d tokens x %d) for %d steps -> %s", encoder.name, encoder.n_tokens,
             encoder.dim, steps, out)
    for step in range(steps):
        encoder.train()
        head.train()
        rng = np.random.default_rng([seed, 0, step])
        images, color_lab, shape_lab, _ = canvas_batch(renderer, rng, batch_size, most, encoder.grid, n_colors, n_shapes)
        lc, ls = head(encoder(to_tensor_images(images)))
        loss = F.cross_entropy(lc.flatten(0, 1), torch.from_numpy(color_lab).flatten()) + F.cross_entropy(
            ls.flatten(0, 1), torch.from_numpy(shape_lab).flatten()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "loss": round(loss.item(), 5), "seconds": round(time.time() - start, 1)}
            if step + 1 == steps or (step + 1) % (log_every * 5) == 0:
                record.update(evaluate(encoder, head, eval_batches))
            log.info("encoder pretraining %s", record)
            with history.open("a") as f:
                f.write(json.dumps(record) + "\n")
    metrics = {**evaluate(encoder, head, eval_batches), "steps": steps, "seconds": round(time.time() - start, 1)}
    _save(encoder, out, cfg, metrics)
    log.info("encoder pretraining done: %s", metrics)
    return metrics


def _save(encoder: VisualEncoder, out: Path, cfg, metrics: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in encoder.trunk.state_dict().items()}
    tmp = out / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(state, str(tmp), metadata={"lab": "encoder_pretrain", "encoder": str(cfg.encoder.name)})
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(pretrain_spec(cfg))))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / WEIGHTS_FILE)  # the weights file appears last, complete


def run_pretraining(cfg) -> dict:
    """Entry point: pretrain into the cache directory (skipped if present, unless ``force``)."""
    out = encoder_dir(cfg)
    if (out / WEIGHTS_FILE).is_file() and not cfg.get("force", False):
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        log.info("encoder already pretrained at %s (%s); pass force=true to retrain", out, metrics)
        print(out / WEIGHTS_FILE)
        return metrics
    with _lock(out):
        metrics = pretrain_encoder(cfg, out)
    print(out / WEIGHTS_FILE)
    return metrics
