"""Grounding loss for image batches, an objective part (off by default: ``objective.grounding.weight=0``).

Both directions of the colour/shape <-> image-token correspondence, per object:

- image -> text: from the residual stream h_l (``objective.grounding.layer``) at the image token
  under the object's centre, linear heads predict the object's colour and shape (cross-entropy);
- text -> image: from the token embeddings of the object's colour and shape, a linear map predicts
  that image token's input embedding h_0 (the projected encoder feature; loss 1 - cosine, target
  detached so the image side is not pulled towards the text side).

The loss is the mean of the three terms. It reads the model only through the interface
(``token_embedding()``, ``image_grid``, captured h_l) and the batch's roles and objects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.errors import LabError
from lab.train.objectives import LabelledRun, Objective


def centre_cells(corners: Tensor, object_size: int, canvas_size: int, grid: tuple[int, int]) -> Tensor:
    """Index (row-major) of the grid cell under each object's centre; -1 where ``corners`` is -1."""
    h, w = grid
    centre = corners.float() + object_size / 2
    rows = (centre[..., 0] * h / canvas_size).long().clamp(0, h - 1)
    cols = (centre[..., 1] * w / canvas_size).long().clamp(0, w - 1)
    return torch.where(corners[..., 0] >= 0, rows * w + cols, torch.full_like(rows, -1))


class GroundingLoss(Objective):
    """Colour/shape <-> image-token grounding of every drawn object (see module docstring)."""

    needs_images = True  # refused for runs without an image stream

    def __init__(self, model, task, weight: float = 1.0, layer: int = 0, object_size: int = 10,
                 canvas_size: int = 48, anneal=None, start: int = 0) -> None:
        super().__init__(weight, anneal, "grounding", start)
        grid = getattr(model, "image_grid", None)
        if grid is None or grid[0] * grid[1] != model.n_image_tokens:
            raise LabError("objective.grounding needs an image run whose encoder has a spatial token grid (e.g. encoder=resnet)")
        if not 0 <= layer <= model.n_layers:
            raise LabError(f"objective.grounding.layer={layer} must be in 0..{model.n_layers}")
        d = model.token_embedding().shape[1]
        self.grid, self.layer = tuple(grid), int(layer)
        self.layers = (0, self.layer)
        self.object_size, self.canvas_size = int(object_size), int(canvas_size)
        self.color0, self.shape0 = task.color_token(0), task.shape_token(0)
        self.color_head = nn.Linear(d, task.n_colors)
        self.shape_head = nn.Linear(d, task.n_shapes)
        self.to_image = nn.Linear(d, d)

    def applies(self, batch) -> bool:
        return batch.has_image

    def loss(self, model, batch, out: LabelledRun) -> Tensor:
        return self.loss_at(model, batch, out.captured)

    def loss_at(self, model, batch, captured: dict[int, Tensor]) -> Tensor:
        objects = batch.objects
        cells = centre_cells(objects["corners"], self.object_size, self.canvas_size, self.grid)
        valid = cells >= 0
        b = torch.arange(len(cells), device=cells.device)[:, None].expand_as(cells)[valid]
        image_start = batch.roles["image"][:, 0]
        positions = image_start[:, None].expand_as(cells)[valid] + cells[valid]
        colors, shapes = objects["colors"][valid], objects["shapes"][valid]
        h = captured[self.layer][b, positions]
        image_to_text = F.cross_entropy(self.color_head(h), colors) + F.cross_entropy(self.shape_head(h), shapes)
        embedding = model.token_embedding()
        text = embedding[self.color0 + colors] + embedding[self.shape0 + shapes]
        target = captured[0][b, positions].detach()
        text_to_image = (1 - F.cosine_similarity(self.to_image(text), target, dim=-1)).mean()
        return (image_to_text + text_to_image) / 3
