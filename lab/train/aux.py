"""Optional auxiliary objective for image batches (off by default: ``train.aux.weight=0``).

Both directions of the colour/shape <-> image-token correspondence, per object:

- image -> text: from the residual stream h_l (``train.aux.layer``) at the image token under the
  object's centre, linear heads predict the object's colour and shape (cross-entropy);
- text -> image: from the token embeddings of the object's colour and shape, a linear map predicts
  that image token's input embedding h_0 (the projected encoder feature; loss 1 - cosine, target
  detached so the image side is not pulled towards the text side).

The loss is the mean of the three terms; it is added to the answer loss with weight ``weight``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.errors import LabError


def centre_cells(corners: Tensor, object_size: int, canvas_size: int, grid: tuple[int, int]) -> Tensor:
    """Index (row-major) of the grid cell under each object's centre; -1 where ``corners`` is -1."""
    h, w = grid
    centre = corners.float() + object_size / 2
    rows = (centre[..., 0] * h / canvas_size).long().clamp(0, h - 1)
    cols = (centre[..., 1] * w / canvas_size).long().clamp(0, w - 1)
    return torch.where(corners[..., 0] >= 0, rows * w + cols, torch.full_like(rows, -1))


class AuxiliaryObjective(nn.Module):
    def __init__(self, model, task, render, layer: int = 0) -> None:
        super().__init__()
        grid = getattr(getattr(model, "encoder", None), "grid", None)
        if grid is None or grid[0] * grid[1] != model.n_image_tokens:
            raise LabError("train.aux needs an image run whose encoder has a spatial token grid (e.g. encoder=resnet)")
        if not 0 <= layer <= model.n_layers:
            raise LabError(f"train.aux.layer={layer} must be in 0..{model.n_layers}")
        d = model.backbone.d_model
        self.grid, self.layer = tuple(grid), int(layer)
        self.object_size, self.canvas_size = int(render.object_size), int(render.canvas_size)
        self.color0, self.shape0 = task.vocab["color_0"], task.vocab["shape_0"]
        self.color_head = nn.Linear(d, task.n_colors)
        self.shape_head = nn.Linear(d, task.n_shapes)
        self.to_image = nn.Linear(d, d)

    def loss(self, model, batch: dict, captured: dict[int, Tensor]) -> Tensor:
        cells = centre_cells(batch["object_corners"], self.object_size, self.canvas_size, self.grid)
        valid = cells >= 0
        b = torch.arange(len(cells), device=cells.device)[:, None].expand_as(cells)[valid]
        positions = batch["image_start"][:, None].expand_as(cells)[valid] + cells[valid]
        colors, shapes = batch["colors"][valid], batch["shapes"][valid]
        h = captured[self.layer][b, positions]
        image_to_text = F.cross_entropy(self.color_head(h), colors) + F.cross_entropy(self.shape_head(h), shapes)
        embed = model.backbone.tok_emb
        text = embed(self.color0 + colors) + embed(self.shape0 + shapes)
        target = captured[0][b, positions].detach()
        text_to_image = (1 - F.cosine_similarity(self.to_image(text), target, dim=-1)).mean()
        return (image_to_text + text_to_image) / 3
