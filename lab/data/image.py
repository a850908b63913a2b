"""Image-modality batches: the retrieval context as a picture, associations and query as text.

``[BOS] [IMG] x P [CTX_END] s_a i_a ... [QUE] c_q`` where the P ``[IMG]`` placeholders receive
the projected image tokens inside :class:`lab.models.visual.VisionTextModel`.

Same interface as :class:`lab.data.datamodule.TextDataModule` (``modality``, ``val_names``,
``train_stream``, ``eval_batches(split)``, ``train_dataloader()``, ``val_dataloader()``) plus
``train_batch(index)``: training batch number ``index`` as a pure function of (task seed, index).

Frozen encoders: batches carry ``image_features`` [B, P, C] (the encoder output before the
projector). Training pictures come from a fixed pool (``pool_size`` per object count) whose
features are computed once (batched, no grad) and kept in memory, and on disk under
``feature_cache_dir`` keyed by the encoder weights, render settings, task and pool; evaluation
pictures likewise. Trainable encoders: batches carry ``images`` [B, 3, H, W] float in [0, 1].
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lab.data.batch import Batch
from lab.data.datamodule import Batched, StepStream, _loader
from lab.data.text import collate_text
from lab.errors import LabError
from tasks.image_retrieval import ImageRetrieval, ImageRetrievalSample
from tasks.render import Renderer

log = logging.getLogger(__name__)

_FEATURE_CHUNK = 128
_CACHE_VERSION = 1


class ImageStepBatches(StepStream):
    """Infinite stream of image training batches."""

    def __init__(self, datamodule: "ImageDataModule") -> None:
        super().__init__()
        self.datamodule = datamodule

    def batch(self, index: int, noise: bool | None = None) -> Batch:
        return self.datamodule.train_batch(index, noise)


class ImageDataModule(L.LightningDataModule):
    """Image-context batches for the retrieval task: one training stream, one validation set per split.

    ``encoder`` is the run model's :class:`~lab.models.visual.VisualEncoder` (it fixes the number
    of image tokens and, when ``frozen``, computes the cached features); ``render`` holds the
    :class:`tasks.render.Renderer` settings (canvas_size, object_size, gap, ...). ``noise`` is
    accepted for interface parity with text; image contexts have no noise tokens.
    """

    modality = "image"

    def __init__(
        self,
        task,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        noise: bool = True,
        *,
        encoder=None,
        frozen: bool = True,
        render=None,
        pool_size: int = 256,
        feature_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if encoder is None:
            raise LabError(
                "ImageDataModule needs the run model's visual encoder: build the model with "
                "lab.build.build_model(cfg, task) and pass encoder=model.encoder, frozen=model.frozen"
            )
        render = dict(render or {})  # plain settings (conf/modality/image.yaml converts them: _convert_: all)
        canvas = int(render.get("canvas_size", 48))
        if int(encoder.input_size) != canvas:
            raise LabError(
                f"encoder.input_size={encoder.input_size} but render.canvas_size={canvas}; they must match "
                "(set encoder.input_size=${render.canvas_size})"
            )
        renderer = Renderer(task.n_colors, task.n_shapes, max_objects=task.max_objects, **render)
        self.task, self.batch_size, self.eval_batch_size, self.noise = task, batch_size, eval_batch_size, noise
        self.encoder, self.frozen, self.render = encoder, bool(frozen), render
        self.images = ImageRetrieval(task, renderer, encoder.n_tokens, pool_size)
        self.feature_cache_dir = Path(feature_cache_dir) if feature_cache_dir else None
        self.train_stream = ImageStepBatches(self)
        self.val_names = [f"{self.modality}_{split}" for split in task.splits]
        self._groups: dict[str, torch.Tensor] = {}   # group -> features [K, P, C] or uint8 images [K, H, W, 3]
        self._pair_contexts: dict[str, list] = {}     # counterfactual-pair group -> its contexts
        self._eval: dict[str, Batched] = {}
        self._cache_key: str | None = None

    # ------------------------------------------------------------------------- public API
    @property
    def n_image_tokens(self) -> int:
        return self.images.n_image_tokens

    @property
    def max_prompt_len(self) -> int:
        return self.images.max_prompt_len

    def train_batch(self, index: int, noise: bool | None = None) -> Batch:
        """Training batch number ``index``: a pure function of (task seed, index).

        ``noise`` is accepted like :meth:`TextDataModule.train_batch`; image contexts have no noise tokens.
        """
        return self.collate(self.images.train_batch(index, self.batch_size))

    def eval_batches(self, split: str) -> Batched:
        """Fixed, clean evaluation batches of a split (the task's evaluation samples as pictures)."""
        if split not in self._eval:
            self._eval[split] = Batched(self.images.eval_set(split), self.eval_batch_size, self.collate)
        return self._eval[split]

    def pairs(self, split: str, n: int, seed: int = 0, n_objects: int | None = None):
        """Counterfactual pairs with drawn contexts (:meth:`ImageRetrieval.counterfactual_pairs`):
        (specs, base batch, counterfactual batch), the pictures encoded like evaluation pictures."""
        group = f"pairs_{split}_s{seed}_n{n}" + (f"_k{n_objects}" if n_objects else "")
        specs = self.images.counterfactual_pairs(split, n, seed, n_objects, group=group)
        for role in ("base", "counterfactual"):
            self._pair_contexts[f"{group}_{role}"] = [getattr(p, role).context for p in specs]
        return specs, self.collate([p.base for p in specs]), self.collate([p.counterfactual for p in specs])

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_stream)

    def val_dataloader(self) -> list[DataLoader]:
        return [_loader(self.eval_batches(split)) for split in self.task.splits]

    # ------------------------------------------------------------------------- collation
    def collate(self, samples: list[ImageRetrievalSample]) -> Batch:
        """Token batch (roles and objects included, ``corners`` among them) plus the pictures:
        encoder features when the encoder is frozen, else the images themselves."""
        batch = collate_text(samples, self.task.vocab.pad_id)
        if self.frozen:
            batch.image_features = torch.stack([self._lookup(s.context_key, features=True) for s in samples])
        else:
            images = np.stack([self._lookup(s.context_key, features=False) for s in samples])
            batch.images = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        return batch

    def _lookup(self, key: tuple, features: bool):
        group, index = _group_of(key)
        return self.group(group, features)[index]

    def group(self, group: str, features: bool = True):
        """All pictures of a group (``pool_<n>``, ``id``, ``ood``): features [K, P, C] or uint8 images."""
        name = group if features else f"{group}/images"
        if name not in self._groups:
            images = np.stack([self.images.image(c) for c in self._contexts(group)])
            self._groups[name] = self._features(group, images) if features else images
        return self._groups[name]

    def _contexts(self, group: str):
        if group in self._pair_contexts:
            return self._pair_contexts[group]
        if group.startswith("pool_"):
            return self.images.pool(int(group.removeprefix("pool_")))
        return [s.context for s in self.images.eval_set(group)]

    # ------------------------------------------------------------------------- features
    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Encoder features [K, P, C] (float32, CPU) of uint8 pictures [K, H, W, 3], no cache."""
        encoder = self.encoder
        device = next(encoder.parameters()).device
        was_training = encoder.training
        encoder.eval()
        out = []
        try:
            for i in range(0, len(images), _FEATURE_CHUNK):
                x = torch.from_numpy(images[i : i + _FEATURE_CHUNK]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
                out.append(encoder(x).float().cpu())
        finally:
            encoder.train(was_training)
        return torch.cat(out)

    def cache_key(self) -> str:
        if self._cache_key is None:
            t = self.task
            spec = {
                "version": _CACHE_VERSION,
                "encoder": self.encoder.weights_hash(),
                "render": self.render,
                "task": [t.n_colors, t.n_shapes, t.n_items, list(t.id_objects), list(t.ood_objects), t.eval_size, t.seed],
                "pool_size": self.images.pool_size,
            }
            self._cache_key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._cache_key

    def _features(self, group: str, images: np.ndarray) -> torch.Tensor:
        path = self.feature_cache_dir / self.cache_key() / f"{group}.safetensors" if self.feature_cache_dir else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                features = load_file(str(path))["features"]
                if features.shape[:2] == (len(images), self.n_image_tokens):
                    return features
            except Exception as error:  # noqa: BLE001 - a damaged cache file is recomputed
                log.warning("ignoring unreadable feature cache %s (%s)", path, error)
        features = self.encode(images)
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"features": features.contiguous()}, str(tmp))
            os.replace(tmp, path)
        return features


def _group_of(key: tuple) -> tuple[str, int]:
    if key[0] == "pool":
        return f"pool_{key[1]}", key[2]
    return str(key[0]), int(key[1])
