"""Binding left to the model: initialisations, the association-only token shift and its fade,
init_from across tasks of one vocabulary, counterfactual pairs on drawn contexts, the recipes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_cfg

from lab.errors import LabError
from lab.models.backbone import Backbone, ModelConfigError
from lab.train.module import TrainingModule
from lab.train.objectives import linear_fade
from lab.train.run import train
from tasks.retrieval import RetrievalTask

SMALL = dict(vocab_size=12, n_layers=2, d_model=16, n_heads=2, d_ff=32, pos_encoding="none")


# ---------------------------------------------------------------------------- initialisation
def test_gpt2_init_is_unchanged_draw_for_draw(monkeypatch):
    """model.init=gpt2 (the old and still default scheme) gives the weights the backbone drew
    before the option existed: N(0, 0.02), residual writes N(0, 0.02 / sqrt(2 L)), same seed."""
    torch.manual_seed(0)
    model = Backbone(**SMALL, init="gpt2")
    monkeypatch.setattr("lab.models.backbone.initialise", lambda *args: None)
    torch.manual_seed(0)
    reference = Backbone(**SMALL)  # modules built, then initialised as the backbone did before
    reference.apply(_old_init_weights)
    for name, p in reference.named_parameters():
        if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * SMALL["n_layers"]))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def _old_init_weights(module):
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


@pytest.mark.parametrize("init, emb_std, qkv_std", [
    ("gpt2", 0.02, 0.02),
    ("torch", 1.0, 1 / math.sqrt(3 * 128)),   # kaiming-uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    ("scaled", 1.0, 1 / math.sqrt(128)),
])
def test_each_init_draws_the_documented_scales(init, emb_std, qkv_std):
    torch.manual_seed(0)
    model = Backbone(vocab_size=400, d_model=128, n_layers=4, init=init)
    assert model.tok_emb.weight.std().item() == pytest.approx(emb_std, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(qkv_std, rel=0.05)
    write = model.blocks[0].attn.proj.weight.std().item()
    expected_write = {"gpt2": 0.02 / math.sqrt(8), "torch": 1 / math.sqrt(3 * 128), "scaled": 1 / math.sqrt(128 * 8)}
    assert write == pytest.approx(expected_write[init], rel=0.05)


def test_unknown_init_and_shift_are_refused():
    with pytest.raises(ModelConfigError, match="model.init='xavier' is unknown"):
        Backbone(**SMALL, init="xavier")
    with pytest.raises(ModelConfigError, match="model.token_shift='context' is unknown"):
        Backbone(**SMALL, token_shift="context")


# ----------------------------------------------------------------------- association shift
def _roles_batch(tokens, attend, ctx_end):
    return {"tokens": torch.tensor(tokens), "attend": torch.tensor(attend), "roles": {"ctx_end": torch.tensor(ctx_end)}}


def test_association_shift_acts_only_from_ctx_end_on():
    """What each position receives, by hand: before [CTX_END] only its own embedding; at and
    after it, also W e(previous attendable token) (noise skipped, as for the full shift)."""
    torch.manual_seed(0)
    model = Backbone(**SMALL, token_shift="associations")
    tokens = [[1, 5, 6, 2, 7, 8, 4, 9], [1, 5, 2, 7, 8, 3, 9, 0]]
    attend = [[True] * 8, [True, True, True, True, False, True, True, False]]  # row 1: noise at 4, pad at 7
    h = model.embed(_roles_batch(tokens, attend, [[3], [2]])).h
    e, W = model.tok_emb.weight, model.shift.weight
    shifted = lambda t, prev: e[t] + e[prev] @ W.T  # noqa: E731
    row0 = [e[1], e[5], e[6], shifted(2, 6), shifted(7, 2), shifted(8, 7), shifted(4, 8), shifted(9, 4)]
    row1 = [e[1], e[5], shifted(2, 5), shifted(7, 2), shifted(8, 7), shifted(3, 7), shifted(9, 3), shifted(0, 9)]
    torch.testing.assert_close(h[0], torch.stack(row0))
    torch.testing.assert_close(h[1], torch.stack(row1))
    full = Backbone(**SMALL, token_shift=True)
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full.embed(_roles_batch(tokens, attend, [[3], [2]])).h[0, 1], e[5])  # the full shift acts there


def test_association_shift_needs_the_ctx_end_role():
    model = Backbone(**SMALL, token_shift="associations")
    with pytest.raises(ModelConfigError, match="needs the batch's ctx_end role"):
        model.embed({"tokens": torch.tensor([[1, 2, 3]]), "attend": torch.ones(1, 3, dtype=torch.bool)})


def test_association_shift_on_real_prompts_leaves_the_context_alone():
    """On the task's own batches: every context colour/shape position gets exactly its token
    embedding; association items get their shape's."""
    from lab.data.datamodule import TextDataModule

    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 4), ood_objects=(5, 6), seed=1)
    batch = TextDataModule(task, batch_size=8).train_batch(0)
    torch.manual_seed(0)
    model = Backbone(vocab_size=len(task.vocab), d_model=16, n_heads=2, d_ff=32, n_layers=1, pos_encoding="none",
                     token_shift="associations")
    h, e = model.embed(batch).h, model.tok_emb(batch.tokens)
    context = batch.role_mask("context_color", "context_shape")
    torch.testing.assert_close(h[context], e[context])
    items = batch.role_mask("association_item")
    assert (h[items] - e[items]).abs().amax(-1).min() > 0


# --------------------------------------------------------------------------------- fade
def test_shift_fade_scale_and_a_faded_model_is_the_plain_one():
    assert [linear_fade((10, 20), s) for s in (0, 10, 15, 20, 30)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    torch.manual_seed(0)
    shifted = Backbone(**SMALL, token_shift=True)
    plain = Backbone(**SMALL)
    plain.load_state_dict({k: v for k, v in shifted.state_dict().items() if not k.startswith("shift")})
    batch = {"tokens": torch.tensor([[1, 2, 3, 4]]), "attend": torch.ones(1, 4, dtype=torch.bool)}
    module = TrainingModule(shifted, shift_fade=(0, 1))
    assert module.aid_fading(0) and not module.aid_fading(1)
    shifted.shift_scale.fill_(0.0)
    torch.testing.assert_close(shifted(batch), plain(batch))
    # a checkpoint written before shift_scale existed loads with the shift at full strength
    state = {k: v for k, v in shifted.state_dict().items() if k != "shift_scale"}
    shifted.load_state_dict(state)
    assert shifted.shift_scale.item() == 1.0


def test_shift_fade_trains_to_zero_and_is_saved(tmp_path):
    """train.shift_fade=[10,30]: the shift is off by the end, and the checkpoint carries it off,
    so evaluation rebuilds the faded model."""
    from lab.build import load_trained

    run = tmp_path / "fade"
    train(tiny_cfg("model.token_shift=true", "train.shift_fade=[10,30]", "train.max_steps=40"), run)
    _, _, model, _ = load_trained(run, "last")
    assert model.shift_scale.item() == 0.0


def test_shift_fade_without_a_shift_is_refused(tmp_path):
    with pytest.raises(LabError, match="model.token_shift is false"):
        train(tiny_cfg("train.shift_fade=[10,30]"), tmp_path / "x")
    with pytest.raises(LabError, match="train.shift_fade="):
        train(tiny_cfg("model.token_shift=true", "train.shift_fade=[30,10]"), tmp_path / "y")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ------------------------------------------------------------------- init_from across tasks
def test_init_from_a_one_hop_run_into_the_two_hop_task(tmp_path):
    """task=one_hop shares the retrieval vocabulary token for token, so its weights start a
    retrieval run; a run of another vocabulary is refused with the reason."""
    from lab.build import load_trained

    hop = tmp_path / "hop"
    train(tiny_cfg("task=one_hop", "task.n_colors=8", "task.n_shapes=8", "task.n_items=8", "task.id_objects=[2,3]",
                   "task.ood_objects=[4,5]", "task.eval_size=32", "train.max_steps=20"), hop)
    _, _, source, _ = load_trained(hop, "last")
    two = tmp_path / "two"
    cfg = tiny_cfg(f"init_from={hop}", "train.max_steps=10", "train.lr=1e-12", "train.warmup_steps=0")
    train(cfg, two)
    _, _, started, _ = load_trained(two, "last")
    torch.testing.assert_close(started.tok_emb.weight, source.tok_emb.weight, atol=1e-6, rtol=0)
    with pytest.raises(LabError, match="init_from needs the same vocabulary"):
        train(tiny_cfg(f"init_from={hop}", "task.n_items=7"), tmp_path / "bad")


# ------------------------------------------------------------------- drawn counterfactuals
def _pixel_objects(renderer, image, corners):
    """(colour index, shape index) of the object drawn in each box, read back from the pixels."""
    size, out = renderer.object_size, []
    for r, c in corners:
        box = image[r:r + size, c:c + size].astype(int)
        lit = (box != np.array(renderer.background)).any(-1)
        colour = box[lit].max(0)  # fully covered pixels; edges are blended towards the black background
        colour_index = int(np.argmin(np.abs(renderer.colours.astype(int) - colour).sum(-1)))
        shape_index = int(np.argmin([np.logical_xor(m > 0, lit).sum() for m in renderer.shapes.masks]))
        out.append((colour_index, shape_index))
    return out


def test_image_pairs_predictions_follow_from_the_pixels():
    """Each drawn pair's predictions re-derived from the two pictures alone: find C's query
    colour in C's picture, take its box; positional = B's item of the object in that box of B's
    picture; symbolic = B's item of the object drawn with C's queried shape."""
    from tasks.image_retrieval import ImageRetrieval
    from tasks.render import Renderer

    task = RetrievalTask(n_colors=12, n_shapes=12, n_items=12, id_objects=(3, 6), ood_objects=(7, 9), seed=2)
    renderer = Renderer(12, 12, canvas_size=48, object_size=10, gap=2, max_objects=9)
    images = ImageRetrieval(task, renderer, n_image_tokens=4)
    pairs = images.counterfactual_pairs("id", 24, seed=1)
    for p in pairs:
        base, counter = p.base, p.counterfactual
        assert len(base.tokens) == len(counter.tokens) and base.context.corners == counter.context.corners
        boxes = list(base.context.corners)
        seen_b = _pixel_objects(renderer, images.image(base.context), boxes)
        seen_c = _pixel_objects(renderer, images.image(counter.context), boxes)
        query_colour = counter.tokens[-1] - task.vocab["color_0"]
        box = [colour for colour, _ in seen_c].index(query_colour)
        shape = seen_c[box][1]
        item_of = lambda colour_shape: base.items[base.colors.index(colour_shape[0])]  # noqa: E731
        assert p.predictions["positional"] == task.item_token(item_of(seen_b[box]))
        symbol = next(o for o in seen_b if o[1] == shape)
        assert p.predictions["symbolic"] == task.item_token(item_of(symbol))
        assert p.predictions["answer_copy"] == counter.answer and p.predictions["no_effect"] == base.answer
        assert len(set(p.predictions.values())) == 4


# --------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", ["free_binding", "positional_control"])
def test_recipes_compose(recipe):
    cfg = compose_cfg("train", [f"recipe={recipe}"])
    model = cfg.model
    assert model.token_shift in (False, "associations") and model.init in ("torch", "scaled")
    cfg_image = compose_cfg("train", [f"recipe={recipe}", "experiment=image_text"])
    assert cfg_image.model.token_shift == model.token_shift


def test_slot_labels_name_the_queried_objects_context_slot():
    """objective.slot's targets: at the evaluated query, the queried object's index in the
    context; at every follow-up query, the slot of the object that query asks for."""
    from lab.data.datamodule import TextDataModule
    from lab.train.intermediate import SlotSupervision

    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 5), ood_objects=(6, 7), train_queries=3, seed=4)
    batch = TextDataModule(task, batch_size=16).train_batch(0)
    model = Backbone(vocab_size=len(task.vocab), d_model=16, n_heads=2, d_ff=32, n_layers=2)
    part = SlotSupervision(model=model, task=task)
    labels = part.slot_labels(batch)
    rows = torch.arange(len(batch))
    assert labels[rows, batch.answer_pos].tolist() == batch.objects["query_object"].tolist()
    color0 = task.vocab["color_0"]
    for b, t in (labels != -100).nonzero().tolist():  # each query's colour token sits at its position
        slot = labels[b, t].item()
        assert batch.tokens[b, t].item() - color0 == batch.objects["colors"][b, slot].item()
    assert (labels != -100).sum() > len(batch)  # follow-ups are labelled too


def test_attention_patterns_on_request_match_the_fast_path_and_name_the_targets():
    """The pattern path gives the fast path's output; on a hand-set model whose only layer
    attends uniformly, attention to each target is 1 / (number of attendable keys)."""
    from lab.data.datamodule import TextDataModule
    from lab.train.callbacks import attention_to_targets

    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 4), ood_objects=(5, 6), seed=0)
    batch = TextDataModule(task, batch_size=8).train_batch(0)
    torch.manual_seed(0)
    model = Backbone(vocab_size=len(task.vocab), d_model=16, n_heads=2, d_ff=32, n_layers=2).eval()
    stream = model.embed(batch)
    fast = model.block(0, stream)
    stream.extra["patterns"] = patterns = []
    slow = model.block(0, stream)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    assert patterns[0].shape == (len(batch), 2, batch.tokens.shape[1], batch.tokens.shape[1])
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:32].zero_()  # q = k = 0: uniform attention over the attendable keys
            block.attn.qkv.bias[:32].zero_()
    values = attention_to_targets(model, batch)
    uniform = float((1.0 / (batch.answer_pos + 1).float()).mean())
    for target in ("ctx_color", "ctx_shape", "assoc_shape", "assoc_item"):
        assert values[f"attn/{target}_l0"] == pytest.approx(uniform, abs=1e-5)
        assert values[f"attn/{target}_max"] == pytest.approx(uniform, abs=1e-5)


def test_init_from_a_text_run_starts_the_language_model_of_an_image_run(tiny_run):
    """A text-only run initialises an image run's backbone (the paper's curriculum continued
    from a converged text model); the encoder and projector keep their own weights."""
    from lab.build import build_model, build_task, init_from_run, load_trained

    cfg = tiny_cfg("experiment=image_text", "encoder.weights=random", "regime.data.image.feature_cache_dir=null",
                   "regime.data.image.pool_size=8")
    task = build_task(cfg)
    model = build_model(cfg, task)
    projector = {k: v.clone() for k, v in model.projector.state_dict().items()}
    init_from_run(model, tiny_run.dir, task)
    _, _, text_model, _ = load_trained(tiny_run.dir, "last")
    for key, value in text_model.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, msg=key)
    for key, value in model.projector.state_dict().items():
        torch.testing.assert_close(value, projector[key])


def test_interventions_run_on_drawn_pairs(tiny_run, tmp_path):
    """The interventions evaluator with modality=image builds drawn pairs through the image
    stream (features of both pictures), patches them like text pairs and writes its outputs."""
    from lab.build import build_model, build_streams, build_task
    from lab.eval.base import EvalContext
    from lab.eval.interventions import InterventionsEvaluator

    cfg = tiny_cfg("experiment=image_text", "encoder.weights=random", "regime.data.image.feature_cache_dir=null",
                   "regime.data.image.pool_size=8", "task.id_objects=[3,4]", "task.ood_objects=[5,6]")
    task = build_task(cfg)
    model = build_model(cfg, task).eval()
    data = build_streams(cfg, task, model)[0]
    ctx = EvalContext(model=model, task=task, data=data, out_dir=tmp_path / "eval")
    specs, base, counter = ctx.pairs("id", 6, modality="image")
    assert base.tokens.shape == counter.tokens.shape and base.image_features.shape == counter.image_features.shape
    assert not torch.equal(base.image_features, counter.image_features)   # different objects in the same boxes
    torch.testing.assert_close(base.tokens[:, :-1][base.tokens[:, :-1] == task.vocab["[IMG]"]],
                               counter.tokens[:, :-1][counter.tokens[:, :-1] == task.vocab["[IMG]"]])
    result = InterventionsEvaluator(n_pairs=6, modality="image", only_correct=False, plots=False)(ctx)
    assert result["modality"] == "image" and result["results"]["id"]["n_pairs"] == 6
    assert (tmp_path / "eval" / "interventions.json").is_file()


def test_attention_measure_does_not_read_scattered_heads_as_a_lookup():
    """Two heads, each attending fully to the queried colour on a random half of the prompts
    and to another colour on the rest, put 0.5 on the target on average: the measure says 0.5
    (a max over heads per prompt would say 1.0)."""
    from lab.data.datamodule import TextDataModule
    from lab.models.interface import Stream
    from lab.train.callbacks import attention_to_targets

    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 4), ood_objects=(5, 6), seed=0)
    batch = TextDataModule(task, batch_size=64).train_batch(0)
    B, T = batch.tokens.shape
    rows = torch.arange(B)
    q = batch.objects["query_object"]
    target = batch.roles["context_color"][rows, q]
    other = batch.roles["context_color"][rows, (q + 1) % batch.n_objects]
    hit = torch.rand(B, generator=torch.Generator().manual_seed(0)) < 0.5
    pattern = torch.zeros(B, 2, T, T)
    pattern[rows, 0, batch.answer_pos, torch.where(hit, target, other)] = 1.0
    pattern[rows, 1, batch.answer_pos, torch.where(hit, other, target)] = 1.0

    class Fixed(torch.nn.Module):
        n_layers = 1

        def embed(self, batch):
            return Stream(h=torch.zeros(B, T, 4), attend=batch.attend, positions=torch.zeros(B, T, dtype=torch.long))

        def block(self, layer, stream):
            stream.extra["patterns"].append(pattern)
            return stream.h

    values = attention_to_targets(Fixed(), batch)
    share = float(hit.float().mean())
    assert values["attn/ctx_color_l0"] == pytest.approx(max(share, 1 - share), abs=1e-6)  # the better head
    assert 0.35 < values["attn/ctx_color_max"] < 0.65


def test_association_shift_on_a_task_without_ctx_end_is_refused_before_training(tmp_path):
    """task=one_hop has no [CTX_END]: refused when the model is built, and the run directory is
    not left behind."""
    run = tmp_path / "hop"
    with pytest.raises(LabError, match="task 'one_hop' has no \\[CTX_END\\] segment"):
        train(tiny_cfg("task=one_hop", "task.n_colors=8", "task.n_shapes=8", "task.n_items=8", "task.id_objects=[2,3]",
                       "task.ood_objects=[4,5]", "model.token_shift=associations"), run)
    assert not run.exists()
