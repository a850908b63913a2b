"""Visual encoders (timm families), weights sources, the vision-text model, and an image run."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lab.errors import LabError
from lab.models.backbone import Backbone
from lab.models.visual import (
    EncoderConfigError,
    Projector,
    VisionTextModel,
    VisualEncoder,
    build_encoder,
)
from lab.build import build_vision_model, encoder_arguments
from lab.train import encoder_pretrain
from tasks.retrieval import RetrievalTask
from tasks.vocab import IMG, SPECIAL_TOKENS

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "name,layer,size,kwargs,grid,dim",
    [
        ("resnet18", 2, 32, {}, (4, 4), 128),          # CNN intermediate map, stride 8
        ("resnet18", None, 64, {}, (2, 2), 512),       # CNN final map, stride 32
        ("convnext_atto", 1, 32, {}, (4, 4), 80),      # ConvNeXt stage 1, stride 8
        ("vit_tiny_patch16_224", None, 32, {"img_size": 32, "patch_size": 8, "depth": 1}, (4, 4), 192),  # cls dropped
        ("vit_tiny_patch16_224", 0, 32, {"img_size": 32, "patch_size": 8, "depth": 2}, (4, 4), 192),     # block 0
    ],
)
def test_token_shapes(name, layer, size, kwargs, grid, dim):
    enc = VisualEncoder(name, layer, size, kwargs).eval()
    with torch.no_grad():
        tokens = enc(torch.rand(3, 3, size, size))
    assert tokens.shape == (3, grid[0] * grid[1], dim)
    assert (enc.n_tokens, enc.dim, enc.grid) == (grid[0] * grid[1], dim, grid)


def test_token_pooling():
    enc = VisualEncoder("vit_tiny_patch16_224", None, 32, {"img_size": 32, "patch_size": 4, "depth": 1}, pool=2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
        raw = enc._raw_map(x)                                   # [B, 64, C] on an 8x8 grid
    assert enc.grid == (4, 4) and tokens.shape == (2, 16, 192)
    grid = raw.transpose(1, 2).reshape(2, 192, 8, 8)
    assert torch.allclose(tokens[:, 0], grid[:, :, :2, :2].mean((-1, -2)), atol=1e-6)


def test_cnn_tokens_are_flattened_feature_map():
    enc = VisualEncoder("resnet18", 2, 32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        fmap = enc.feature_map(x)             # [B, C, h, w]
        tokens = enc(x)
    assert torch.equal(tokens[:, 5], fmap[:, :, 1, 1])  # row-major: token 5 = (row 1, col 1) of a 4x4 grid


def test_unknown_name_suggests_alternatives():
    with pytest.raises(EncoderConfigError, match="not a timm model.*resnet18"):
        VisualEncoder("resnet18x", None, 32)


def test_timm_weights_missing_offline_names_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = OmegaConf.create({"name": "resnet18", "layer": 2, "input_size": 32, "weights": "timm"})
    with pytest.raises(EncoderConfigError, match="not available offline.*encoder.weights=lab.*encoder.weights=random"):
        build_encoder(**encoder_arguments(cfg), weights="timm")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(tmp_path, suffix):
    from safetensors.torch import save_file

    cfg = OmegaConf.create({"name": "convnext_atto", "layer": 1, "input_size": 32})
    a = build_encoder(**encoder_arguments(cfg), weights="random")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in a.trunk.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    torch.manual_seed(123)
    b = build_encoder(**encoder_arguments(cfg), weights=str(path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(a.eval()(x), b.eval()(x))
    with pytest.raises(EncoderConfigError, match="does not exist"):
        build_encoder(**encoder_arguments(cfg), weights=str(tmp_path / "nope.safetensors"))
    wrong = OmegaConf.create({"name": "resnet18", "layer": 2, "input_size": 32})
    with pytest.raises(EncoderConfigError, match="does not fit"):
        build_encoder(**encoder_arguments(wrong), weights=str(path))


def _vision_model(frozen=True):
    backbone = Backbone(vocab_size=40, n_layers=2, d_model=32, n_heads=2, d_ff=64)
    enc = VisualEncoder("convnext_atto", 1, 32)
    return VisionTextModel(backbone, enc, Projector(enc.dim, 32, "mlp"), SPECIAL_TOKENS.index(IMG), frozen=frozen)


def test_embed_injects_image_tokens_at_img_positions():
    model = _vision_model().eval()
    img = SPECIAL_TOKENS.index(IMG)
    P = model.n_image_tokens
    tokens = torch.tensor([[1] + [img] * P + [2, 10, 11, 3, 12]] * 2)
    batch = {"tokens": tokens, "attend": torch.ones_like(tokens, dtype=torch.bool), "images": torch.rand(2, 3, 32, 32)}
    stream = model.embed(batch)
    with torch.no_grad():
        projected = model.projector(model.encoder(batch["images"]))
        text = model.backbone.embed({"tokens": tokens, "attend": batch["attend"]})
    assert torch.allclose(stream.h[:, 1 : 1 + P], projected)
    assert torch.equal(stream.h[:, 0], text.h[:, 0]) and torch.equal(stream.h[:, P + 1 :], text.h[:, P + 1 :])
    # precomputed features give the same stream
    feats = {**batch, "image_features": model.encoder(batch["images"]).detach()}
    del feats["images"]
    assert torch.allclose(model.embed(feats).h, stream.h, atol=1e-6)
    # text-only batches pass straight to the backbone
    text_batch = {"tokens": tokens[:, P:], "attend": batch["attend"][:, P:]}
    assert torch.equal(model.embed(text_batch).h, model.backbone.embed(text_batch).h)
    assert model.n_layers == model.backbone.n_layers
    assert model(text_batch).shape == (2, tokens.shape[1] - P, 40)


def test_placeholder_count_mismatch_is_a_clear_error():
    model = _vision_model()
    img = SPECIAL_TOKENS.index(IMG)
    tokens = torch.tensor([[1, img, img, 2]])
    with pytest.raises(LabError, match="IMG"):
        model.embed({"tokens": tokens, "attend": torch.ones_like(tokens, dtype=torch.bool), "images": torch.rand(1, 3, 32, 32)})


def test_frozen_encoder_stays_frozen():
    model = _vision_model(frozen=True)
    model.train()
    assert not model.encoder.training and model.backbone.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())
    trainable = _vision_model(frozen=False).train()
    assert trainable.encoder.training and all(p.requires_grad for p in trainable.encoder.parameters())


def test_build_vision_model_lab_weights_missing_gives_command(tmp_path):
    cfg = OmegaConf.create({
        "task": {"n_colors": 8, "n_shapes": 8, "id_objects": [2, 3], "ood_objects": [4, 5]},
        "render": {"canvas_size": 32, "object_size": 8, "gap": 1},
        "encoder": {"name": "convnext_atto", "layer": 1, "input_size": 32, "weights": "lab", "auto_pretrain": False,
                    "cache_dir": str(tmp_path), "pretrain": {"steps": 2, "batch_size": 4, "lr": 1e-3, "seed": 0}},
    })
    backbone = Backbone(vocab_size=40, n_layers=1, d_model=32, n_heads=2, d_ff=64)
    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=[2, 3], ood_objects=[4, 5])
    with pytest.raises(LabError, match="python pretrain_encoder.py"):
        encoder_pretrain.ensure_pretrained_encoder(cfg)   # auto_pretrain=false: the command, nothing trained
    cfg.encoder.auto_pretrain = True
    cfg.encoder.pretrain.eval_size = 8
    with pytest.raises(LabError, match="train.py pretrains it before training.*python pretrain_encoder.py"):
        build_vision_model(cfg, backbone, task)           # building a model never pretrains as a side effect
    assert not list(tmp_path.glob("convnext_atto-*/encoder.safetensors"))
    encoder_pretrain.ensure_pretrained_encoder(cfg)        # the explicit step (lab.build.prepare_encoder) trains 2 steps
    model = build_vision_model(cfg, backbone, task)
    files = list(tmp_path.glob("convnext_atto-*/encoder.safetensors"))
    assert len(files) == 1 and (files[0].parent / "metrics.json").is_file()
    again = build_vision_model(cfg, Backbone(vocab_size=40, n_layers=1, d_model=32, n_heads=2, d_ff=64), task)
    for (k, a), b in zip(model.encoder.state_dict().items(), again.encoder.state_dict().values()):
        assert torch.equal(a, b), k


def image_cfg(tmp_path, *overrides):
    from conftest import tiny_cfg

    return tiny_cfg(
        "modality=image",
        "encoder=convnext",
        "render.canvas_size=32",
        "render.object_size=8",
        "render.gap=1",
        "encoder.pretrain.steps=3",
        "encoder.pretrain.batch_size=4",
        "encoder.pretrain.eval_size=8",
        f"encoder.cache_dir={tmp_path / 'encoders'}",
        f"modality.feature_cache_dir={tmp_path / 'features'}",
        "modality.pool_size=16",
        "train.max_steps=10",
        "train.val_every=5",
        "train.stop.monitor=val/image_id_acc",
        *overrides,
    )


def test_image_run_end_to_end(tmp_path):
    """modality=image: auto-pretrained frozen encoder, 10 training steps, evaluate.py-style reload."""
    from lab.build import build_streams, load_trained
    from lab.train.run import train

    cfg = image_cfg(tmp_path)
    run_dir = tmp_path / "run"
    metrics = train(cfg, run_dir)
    assert metrics["step"] == 10 and "val/image_id_acc" in metrics and "val/image_ood_acc" in metrics
    assert list((tmp_path / "encoders").glob("convnext_atto-*/encoder.safetensors"))
    run_cfg, task, model, _ = load_trained(run_dir, "last")
    assert isinstance(model, VisionTextModel)
    data, _ = build_streams(run_cfg, task, model, eval_batch_size=64)
    assert "image" in data
    batch = next(iter(data["image"].eval_batches("id")))
    logits = model.answer_logits(batch)
    assert logits.shape == (len(batch["targets"]), len(task.vocab))


def test_projector_init_std_puts_image_tokens_on_the_token_embedding_scale():
    torch.manual_seed(0)
    features = torch.randn(4, 36, 128) * 3 + 1
    default = Projector(128, 64, "mlp")(features).std().item()
    small = Projector(128, 64, "mlp", out_std=0.02)
    assert torch.count_nonzero(small.net[-1].bias) == 0
    scaled = small(features).std().item()
    assert scaled < default / 2, (scaled, default)
    linear = Projector(128, 64, "linear", out_std=0.02)
    assert abs(linear.net.weight.std().item() - 0.02) < 0.002
    with pytest.raises(EncoderConfigError, match="projector_init_std"):
        Projector(128, 64, "mlp", out_std=0.0)
