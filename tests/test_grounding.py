"""The optional grounding objective: colour/shape <-> image tokens on image batches."""
from __future__ import annotations

import pytest
import torch
from conftest import LossRecorder, tiny_cfg
from test_visual import image_cfg

from lab.errors import LabError
from lab.runs import load_checkpoint
from lab.train.grounding import centre_cells
from lab.build import build_training as compose
from lab.train.run import train


def test_centre_cells_by_hand():
    corners = torch.tensor([[[0, 0], [38, 20], [-1, -1]]])
    # 48 px canvas, 10 px objects, 6x6 grid of 8 px cells: centres (5,5) and (43,25)
    assert centre_cells(corners, 10, 48, (6, 6)).tolist() == [[0, 5 * 6 + 3, -1]]


def test_grounding_is_off_by_default_and_refused_without_images():
    _, _, module, _ = compose(tiny_cfg())
    assert list(module.objectives) == ["answer"]
    with pytest.raises(LabError, match="needs image data"):
        compose(tiny_cfg("objective.grounding.weight=1.0"))
    with pytest.raises(LabError, match="must be >= 0"):
        compose(tiny_cfg("objective.grounding.weight=-1"))


def test_each_objects_centre_lies_in_its_cell(tmp_path):
    _, datamodule, module, _ = compose(image_cfg(tmp_path, "objective.grounding.weight=1.0"))
    aux = module.objectives["grounding"]
    batch = datamodule.data["image"].train_stream.batch(0)
    assert batch.objects["corners"].shape[:2] == batch.objects["colors"].shape
    cells = centre_cells(batch.objects["corners"], aux.object_size, aux.canvas_size, aux.grid)
    h, w = aux.grid
    checked = 0
    for cell_row, corner_row in zip(cells, batch.objects["corners"]):
        for cell, (r, c) in zip(cell_row.tolist(), corner_row.tolist()):
            if cell < 0:
                continue
            cy, cx = r + aux.object_size / 2, c + aux.object_size / 2
            ch, cw = aux.canvas_size / h, aux.canvas_size / w
            assert (cell // w) * ch <= cy < (cell // w + 1) * ch and (cell % w) * cw <= cx < (cell % w + 1) * cw
            checked += 1
    assert checked >= len(cells) * 2


def test_grounding_loss_trains_heads_and_text_embeddings(tmp_path):
    losses = []

    class AuxSpy(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics.get("train/grounding_loss", float("nan"))))

    cfg = image_cfg(tmp_path, "objective.grounding.weight=1.0", "objective.grounding.layer=1", "trainer.log_every_n_steps=1")
    run_dir = tmp_path / "run"
    train(cfg, run_dir, extra_callbacks=[AuxSpy()])
    assert all(torch.isfinite(torch.tensor(losses)))
    state = load_checkpoint(run_dir / "last.ckpt")["state_dict"]
    assert {f"objectives.grounding.{k}.weight" for k in ("color_head", "shape_head", "to_image")} <= set(state)
    _, datamodule, module, _ = compose(cfg)
    batch = datamodule.data["image"].train_stream.batch(0)
    out = module.model.run(batch, positions=batch["answer_pos"], capture=[0, 1])
    grounding = module.objectives["grounding"]
    grounding.loss_at(module.model, batch, out.captured).backward()
    assert grounding.color_head.weight.grad.abs().sum() > 0
    assert module.model.backbone.tok_emb.weight.grad.abs().sum() > 0
