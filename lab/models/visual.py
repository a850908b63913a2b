"""Visual encoders (any timm model) + projector, and the vision-text model.

- :class:`VisualEncoder`: a timm trunk whose feature map becomes tokens. CNN maps [B, C, h, w]
  become [B, h*w, C]; ViT tokens lose their class/prefix tokens. ``layer`` picks an intermediate
  feature map (timm ``forward_intermediates`` index, e.g. 2 = ResNet ``layer2``, stride 8) and
  prunes everything after it; ``layer=None`` uses the final features (``forward_features``).
- :class:`Projector`: linear or MLP from the encoder width to the backbone width.
- :class:`VisionTextModel`: a :class:`ResidualModel` wrapping a backbone. ``embed`` turns
  ``batch['images']`` (or precomputed ``batch['image_features']``, the encoder output before the
  projector) into image tokens and writes them at the ``[IMG]`` placeholder positions; text-only
  batches pass straight to the backbone.
- :func:`build_encoder`: a :class:`VisualEncoder` from plain arguments (``lab.build.encoder_arguments``);
  the run's model is put together by :func:`lab.build.build_model`.

Encoder weights (``encoder.weights``): ``lab`` (default; the lab's own encoder pretraining,
see :mod:`lab.train.encoder_pretrain`, resolved by :mod:`lab.build`), ``random``, ``timm`` (timm's pretrained weights, only if
already on this machine: nothing is downloaded) or a path to a local ``.safetensors`` / torch file.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from lab.errors import LabError
from lab.models.interface import ResidualModel, Stream

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("lab", "random", "timm")
ALTERNATIVES = (
    "encoder.weights=lab (the lab's own encoder pretraining, works offline; the default), "
    "encoder.weights=random, or encoder.weights=/path/to/weights.safetensors (or a torch file)"
)


class EncoderConfigError(LabError, ValueError):
    """An encoder setting that cannot build an encoder."""


# ------------------------------------------------------------------------------------ timm trunks
def _timm():
    import timm

    return timm


def check_encoder_name(name: str) -> None:
    """Raise the unknown-name error (with close timm names) unless timm knows ``name``."""
    if not _timm().is_model(name):
        create_trunk(name)


def create_trunk(name: str, model_kwargs: Mapping | None = None, pretrained_file: str | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``; unknown names get a clear error with suggestions."""
    timm = _timm()
    kwargs = dict(model_kwargs or {})
    if not timm.is_model(name):
        stem = re.match(r"[A-Za-z]*", name).group(0) or name
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        family = timm.list_models(f"{stem}*")[:10]
        raise EncoderConfigError(
            f"encoder.name={name!r} is not a timm model. Close names: {close or 'none'}; "
            f"timm models matching '{stem}*': {family or 'none'} (list them with timm.list_models('{stem}*'))"
        )
    try:
        if pretrained_file is not None:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file}, num_classes=0, **kwargs
            )
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as error:
        raise EncoderConfigError(f"timm cannot build {name!r} with encoder.model_kwargs={kwargs}: {error}") from None


def timm_pretrained_file(name: str) -> str:
    """Local path of timm's pretrained weights for ``name`` if already downloaded; else a LabError."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    looked = []
    if cfg is not None:
        if cfg.hf_hub_id:
            try:
                from huggingface_hub import try_to_load_from_cache

                for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                    path = try_to_load_from_cache(cfg.hf_hub_id, filename)
                    looked.append(f"HF cache {cfg.hf_hub_id}/{filename}")
                    if isinstance(path, str) and os.path.isfile(path):
                        return path
            except ImportError:  # pragma: no cover - huggingface_hub ships with timm
                pass
        if cfg.url:
            path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
            looked.append(str(path))
            if path.is_file():
                return str(path)
        if cfg.file and os.path.isfile(cfg.file):
            return cfg.file
    raise EncoderConfigError(
        f"timm's pretrained weights for {name!r} are not available offline (looked in: {looked or 'no source known'}) "
        f"and nothing is downloaded at run time. Alternatives: {ALTERNATIVES}"
    )


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderConfigError(f"encoder weights file {path} does not exist. Alternatives: {ALTERNATIVES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read is the user's file
        raise EncoderConfigError(f"cannot read encoder weights {path}: {str(error)[:200]}") from None
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EncoderConfigError(f"{path} does not hold a state dict of tensors")
    return state


class VisualEncoder(nn.Module):
    """A timm trunk turned into a token encoder: images [B, 3, H, W] in [0, 1] -> [B, N, C]."""

    def __init__(
        self,
        name: str,
        layer: int | None = None,
        input_size: int = 48,
        model_kwargs: Mapping | None = None,
        pretrained_file: str | None = None,
        pool: int = 1,
    ) -> None:
        super().__init__()
        self.name, self.layer, self.input_size, self.pool = name, layer, int(input_size), int(pool)
        if self.pool < 1:
            raise EncoderConfigError(f"encoder.pool must be >= 1, got {pool}")
        self.model_kwargs = dict(model_kwargs or {})
        self.trunk = create_trunk(name, self.model_kwargs, pretrained_file)
        self.num_prefix_tokens = int(getattr(self.trunk, "num_prefix_tokens", 0))
        if layer is not None:
            if not hasattr(self.trunk, "forward_intermediates"):
                raise EncoderConfigError(f"timm model {name!r} has no forward_intermediates; use encoder.layer=null")
            try:
                self.trunk.prune_intermediate_layers(indices=[int(layer)], prune_head=True, prune_norm=True)
            except (AssertionError, IndexError, ValueError) as error:
                raise EncoderConfigError(f"encoder.layer={layer} is not a feature index of {name!r}: {error}") from None
        cfg = getattr(self.trunk, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            was = self.trunk.training
            self.trunk.eval()
            fmap = self._raw_map(torch.zeros(1, 3, self.input_size, self.input_size))
            self.trunk.train(was)
        self._token_grid = None
        if fmap.dim() == 3:  # token models: the patch grid, when the trunk has one
            grid = getattr(getattr(self.trunk, "patch_embed", None), "grid_size", None)
            if grid is not None and int(grid[0]) * int(grid[1]) == fmap.shape[1]:
                self._token_grid = (int(grid[0]), int(grid[1]))
            elif self.pool > 1:
                raise EncoderConfigError(f"encoder.pool={pool} needs a spatial token grid, which {name!r} lacks")
        with torch.no_grad():
            fmap = self.feature_map(torch.zeros(1, 3, self.input_size, self.input_size))
        self.grid = tuple(fmap.shape[-2:]) if fmap.dim() == 4 else self._token_grid
        self.n_tokens = fmap.shape[2] * fmap.shape[3] if fmap.dim() == 4 else fmap.shape[1]
        self.dim = fmap.shape[1] if fmap.dim() == 4 else fmap.shape[2]

    def feature_map(self, images: Tensor) -> Tensor:
        """[B, C, h, w] for spatial maps, or [B, N, C] tokens (prefix removed) for token models;
        with ``pool > 1`` the grid is average-pooled by that factor (always [B, C, h, w])."""
        fmap = self._raw_map(images)
        if self.pool == 1:
            return fmap
        if fmap.dim() == 3:
            h, w = self._token_grid
            fmap = fmap.transpose(1, 2).reshape(fmap.shape[0], fmap.shape[2], h, w)
        return torch.nn.functional.avg_pool2d(fmap, self.pool, ceil_mode=True)

    def _raw_map(self, images: Tensor) -> Tensor:
        x = (images - self.mean) / self.std
        if self.layer is not None:
            return self.trunk.forward_intermediates(x, indices=[int(self.layer)], intermediates_only=True)[0]
        out = self.trunk.forward_features(x)
        if out.dim() == 3:
            return out[:, self.num_prefix_tokens :]
        return out

    def forward(self, images: Tensor) -> Tensor:
        fmap = self.feature_map(images)
        if fmap.dim() == 4:
            return fmap.flatten(2).transpose(1, 2)
        return fmap

    def describe(self) -> dict:
        """What identifies this encoder's architecture (for cache keys)."""
        return {"name": self.name, "layer": self.layer, "input_size": self.input_size, "model_kwargs": self.model_kwargs,
                "pool": self.pool}

    def weights_hash(self) -> str:
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def load_trunk_weights(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load a (possibly full-model) state dict into the possibly pruned trunk."""
        state = {k.removeprefix("trunk."): v for k, v in state.items()}
        own = self.trunk.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise EncoderConfigError(
                f"{source} does not fit encoder {self.name!r}: {len(missing)} weights missing (e.g. {missing[:3]})"
            )
        wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise EncoderConfigError(
                f"{source} does not fit encoder {self.name!r}: {k} has shape {tuple(state[k].shape)}, "
                f"expected {tuple(own[k].shape)}"
            )
        self.trunk.load_state_dict({k: state[k] for k in own})


class Projector(nn.Module):
    """Encoder width -> backbone width: ``linear`` or ``mlp`` (Linear-GELU-Linear), LayerNorm first.

    ``out_std``: initialise the output layer with this standard deviation (zero bias), so image
    tokens start on the scale of the backbone's token embeddings (0.02 there). ``None`` keeps
    PyTorch's default initialisation (image tokens then start several times longer than text
    tokens, and grew to ~25x in trained image runs, docs/learning.md).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden: int | None = None,
                 out_std: float | None = None) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise EncoderConfigError(f"encoder.projector={kind!r} is unknown; choose linear or mlp")
        if out_std is not None and not out_std > 0:
            raise EncoderConfigError(f"encoder.projector_init_std must be > 0 or null, got {out_std}")
        self.norm = nn.LayerNorm(in_dim)
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            hidden = hidden or 2 * out_dim
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        if out_std is not None:
            last = self.net if kind == "linear" else self.net[-1]
            nn.init.normal_(last.weight, std=float(out_std))
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


# ------------------------------------------------------------------------------ vision-text model
class VisionTextModel(ResidualModel):
    """Backbone + visual encoder + projector behind the residual-stream interface.

    Blocks and readout are the backbone's, so every evaluator works unchanged; only ``embed``
    differs, and only for batches that carry ``images`` or ``image_features``.
    """

    def __init__(self, backbone: ResidualModel, encoder: VisualEncoder, projector: nn.Module, img_token_id: int,
                 frozen: bool = True) -> None:
        super().__init__()
        self.backbone, self.encoder, self.projector = backbone, encoder, projector
        self.img_token_id, self.frozen = int(img_token_id), bool(frozen)
        self.n_layers = backbone.n_layers
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def max_len(self) -> int:
        return getattr(self.backbone, "max_len", 10**9)

    @property
    def n_image_tokens(self) -> int:
        return self.encoder.n_tokens

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # frozen: BatchNorm statistics and dropout stay fixed
        return self

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the image tokens when they form a spatial grid, else None."""
        return self.encoder.grid

    def token_embedding(self) -> Tensor | None:
        return self.backbone.token_embedding()

    @property
    def supports_probe(self) -> bool:
        return self.backbone.supports_probe

    def readout_parts(self):
        return self.backbone.readout_parts()

    def image_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Projected image tokens [B, P, D] from precomputed features or from images."""
        if batch.get("image_features") is not None:
            features = batch["image_features"]
        elif self.frozen:
            with torch.no_grad():
                features = self.encoder(batch["images"])
        else:
            features = self.encoder(batch["images"])
        return self.projector(features)

    def embed(self, batch: Mapping[str, Tensor]) -> Stream:
        if batch.get("image_features") is None and batch.get("images") is None:
            return self.backbone.embed(batch)
        inject = self.image_tokens(batch)
        mask = batch["tokens"] == self.img_token_id
        counts = mask.sum(1)
        if not bool((counts == inject.shape[1]).all()):
            raise LabError(
                f"image batch has {counts.tolist()[:4]}... [IMG] tokens per sample but the encoder gives "
                f"{inject.shape[1]} image tokens; build image batches with lab.data.image.ImageDataModule"
            )
        return self.backbone.embed(batch, inject=(inject, mask))

    def block(self, layer: int, stream: Stream) -> Tensor:
        return self.backbone.block(layer, stream)

    def readout(self, h: Tensor) -> Tensor:
        return self.backbone.readout(h)


# ------------------------------------------------------------------------------------ construction
def build_encoder(name: str, layer: int | None = None, input_size: int = 48, model_kwargs: Mapping | None = None,
                  pool: int = 1, weights: str = "random") -> VisualEncoder:
    """A :class:`VisualEncoder` with ``random``/``timm``/file weights (plain arguments; the run
    config's ``encoder`` node is turned into them by :func:`lab.build.encoder_arguments`, and
    ``lab`` weights are resolved there too, since they depend on the render and the task)."""
    weights = str(weights)
    kwargs = dict(name=str(name), layer=layer, input_size=int(input_size), model_kwargs=dict(model_kwargs or {}),
                  pool=int(pool))
    if weights == "timm":
        check_encoder_name(kwargs["name"])
        return VisualEncoder(**kwargs, pretrained_file=timm_pretrained_file(kwargs["name"]))
    encoder = VisualEncoder(**kwargs)
    if weights not in WEIGHT_SOURCES:
        encoder.load_trunk_weights(load_weights_file(weights), f"encoder weights {weights}")
    return encoder
