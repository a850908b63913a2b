"""Training aids of the learning recipe: the token-shift prior, intermediate (queried-shape)
supervision and its annealing; divergence and resume safeguards of train.py."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import error_lines, run_script, tiny_cfg
from lab.data.text import collate_text
from lab.build import check_recipe
from lab.errors import LabError
from lab.models.backbone import Backbone, previous_attendable
from lab.runs import load_checkpoint
from lab.train.intermediate import IntermediateSupervision
from lab.train.regime import parse_regime, saturation_threshold
from lab.train.run import train
from tasks.retrieval import RetrievalTask


# ---------------------------------------------------------------------------------- token shift
def test_previous_attendable_skips_noise_and_padding():
    attend = torch.tensor([[True, True, False, True, True, False]])
    assert previous_attendable(attend).tolist() == [[-1, 0, 1, 1, 3, 4]]


def test_token_shift_adds_the_previous_attendable_embedding():
    torch.manual_seed(0)
    model = Backbone(vocab_size=10, n_layers=1, d_model=8, n_heads=2, d_ff=16, pos_encoding="none", token_shift=True)
    tokens = torch.tensor([[1, 2, 3, 4]])
    attend = torch.tensor([[True, True, False, True]])  # token 3 is noise: position 3 reads token 2
    h = model.embed({"tokens": tokens, "attend": attend}).h
    e, W = model.tok_emb.weight, model.shift.weight
    expected = torch.stack([e[1], e[2] + e[1] @ W.T, e[3] + e[2] @ W.T, e[4] + e[2] @ W.T])
    torch.testing.assert_close(h[0], expected)


def test_token_shift_is_off_by_default_and_changes_only_the_embedding():
    assert Backbone(vocab_size=10).shift is None
    torch.manual_seed(0)
    plain = Backbone(vocab_size=10, n_layers=2, d_model=8, n_heads=2, d_ff=16)
    torch.manual_seed(0)
    shifted = Backbone(vocab_size=10, n_layers=2, d_model=8, n_heads=2, d_ff=16, token_shift=True)
    shifted.load_state_dict({**plain.state_dict(), "shift.weight": torch.zeros(8, 8)})
    batch = {"tokens": torch.tensor([[1, 2, 3]]), "attend": torch.ones(1, 3, dtype=torch.bool)}
    torch.testing.assert_close(shifted(batch), plain(batch))  # a zero shift is the plain model


# ------------------------------------------------------------------------ intermediate targets
def test_samples_carry_the_queried_shape_for_every_query():
    task = RetrievalTask(train_queries=4, seed=3)
    for s in task.train_batch(0, 16):
        assert task.vocab.decode([s.query_shape]) == [f"shape_{s.shapes[s.query_object]}"]
        sequence = s.tokens + s.followup_tokens
        for (position, answer), shape in zip(s.followup_answers, s.followup_shapes):
            obj = s.colors.index(sequence[position] - task.vocab["color_0"])  # the follow-up's colour
            assert shape == task.vocab["shape_0"] + s.shapes[obj]
            assert answer == task.vocab["item_0"] + s.items[obj]


def test_intermediate_loss_is_cross_entropy_of_the_readout_at_query_positions():
    torch.manual_seed(0)
    task = RetrievalTask(train_queries=3, seed=0)
    batch = collate_text(task.train_batch(0, 4), task.vocab.pad_id)
    model = Backbone(len(task.vocab), n_layers=2, d_model=16, n_heads=2, d_ff=32)
    objective = IntermediateSupervision(layer=1, weight=1.0, n_layers=2)
    h = model.run(batch, capture=[1]).captured[1]
    loss = objective.loss_at(model, batch, h)
    terms = []
    for i, s in enumerate(task.train_batch(0, 4)):  # by hand from the samples: every query, its shape
        pairs = [(s.query_position, s.query_shape)] + [
            (p, shape) for (p, _), shape in zip(s.followup_answers, s.followup_shapes)]
        assert len(pairs) == 3
        for p, t in pairs:
            terms.append(F.cross_entropy(model.readout(h[i, p])[None], torch.tensor([t])))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_intermediate_weight_anneals_linearly_to_zero():
    objective = IntermediateSupervision(layer=2, weight=2.0, n_layers=4, anneal=[100, 300])
    assert [objective.weight_at(s) for s in (0, 100, 200, 299, 300, 5000)] == [2.0, 2.0, 1.0, 0.01, 0.0, 0.0]
    assert IntermediateSupervision(layer=2, weight=0.5, n_layers=4).weight_at(10**6) == 0.5


def test_a_delayed_part_starts_at_its_step_and_counts_as_unfinished_until_its_anneal_ends():
    late = IntermediateSupervision(layer=2, weight=1.0, n_layers=4, start=200, anneal=[400, 600])
    assert [late.weight_at(s) for s in (0, 199, 200, 400, 500, 600)] == [0.0, 0.0, 1.0, 1.0, 0.5, 0.0]
    assert late.fading(0) and late.fading(599) and not late.fading(600)
    assert not IntermediateSupervision(layer=2, n_layers=4, start=200).fading(0)  # no anneal: never fades


def test_intermediate_probe_space_trains_its_own_head_and_leaves_the_readout_alone():
    torch.manual_seed(0)
    task = RetrievalTask(seed=0)
    batch = collate_text(task.train_batch(0, 8), task.vocab.pad_id)
    model = Backbone(len(task.vocab), n_layers=2, d_model=16, n_heads=2, d_ff=32)
    part = IntermediateSupervision(model=model, layer=1, space="probe")
    h = model.run(batch, capture=[1]).captured[1]
    loss = part.loss_at(model, batch, h)
    valid = batch.mid_labels != -100
    torch.testing.assert_close(loss, F.cross_entropy(part.probe(h[valid]), batch.mid_labels[valid]))
    loss.backward()
    assert model.head.weight.grad is None or not model.head.weight.grad.any()  # the readout is not asked
    assert part.probe[1].weight.grad.abs().sum() > 0 and model.tok_emb.weight.grad.abs().sum() > 0


def test_a_part_acts_only_on_the_batches_it_names():
    import dataclasses

    task = RetrievalTask(seed=0)
    text = collate_text(task.train_batch(0, 2), task.vocab.pad_id)
    image = dataclasses.replace(text, image_features=torch.zeros(2, 4, 8))
    acts = {kind: IntermediateSupervision(layer=1, n_layers=2, batches=kind) for kind in ("all", "text", "image")}
    assert [acts[k].applies(text) for k in acts] == [True, True, False]
    assert [acts[k].applies(image) for k in acts] == [True, False, True]


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.intermediate.layer=7", r"objective\.intermediate\.layer=7 must lie in 0\.\.2"),
        ("objective.intermediate.anneal=[50,10]", r"needs 0 <= start <= end"),
        ("objective.intermediate.anneal=soon", r"must be null or \[start, end\]"),
        ("objective.intermediate.space=lens", r"space='lens' is unknown"),
        ("objective.intermediate.start=-5", r"start must be >= 0"),
        ("objective.intermediate.batches=audio", r"batches='audio' is unknown"),
        ("objective.intermediate.start=500 objective.intermediate.anneal=[100,300]", r"begins before"),
    ],
)
def test_bad_intermediate_settings_are_refused(tmp_path, override, message):
    with pytest.raises(LabError, match=message):
        train(tiny_cfg("objective.intermediate.weight=1", *override.split()), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the fast suite stays short; `pytest --all` (CI) runs it
def test_intermediate_supervision_teaches_the_readout_the_shape_at_its_layer(tmp_path):
    """With the aid on, the logit lens at the supervised layer names the queried shape far
    above chance after a short run; the run records the loss in TensorBoard-visible metrics."""
    from lab.build import load_trained

    run_dir = tmp_path / "mid"
    train(tiny_cfg("objective.intermediate.weight=1", "objective.intermediate.layer=1", "model.token_shift=true",
                   "train.max_steps=150", "train.lr=5e-3"), run_dir)
    _, task, model, _ = load_trained(run_dir, "last")
    batch = collate_text(task.eval_set("id"), task.vocab.pad_id)
    with torch.no_grad():
        lens = model.run(batch, stop=1, positions=batch["answer_pos"]).logits
    shapes = torch.tensor([s.query_shape for s in task.eval_set("id")])
    accuracy = (lens.argmax(-1) == shapes).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 1/(2..3 objects) at best


# --------------------------------------------------------------------------------- safeguards
def test_a_diverging_run_stops_with_an_error_and_keeps_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "diverge"
    with pytest.raises(LabError, match="diverged"):
        train(tiny_cfg("train.lr=1e6", "train.warmup_steps=0", "train.max_steps=200"), run_dir)
    for name in ("last", "best"):
        path = run_dir / f"{name}.ckpt"
        if path.exists():
            state = load_checkpoint(path)["state_dict"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


@pytest.mark.slow
def test_train_cli_reports_divergence_in_one_line(tmp_path):
    run_dir = tmp_path / "x"
    result = run_script("train.py", "train.lr=1e6", "train.max_steps=40", "train.val_every=10", "task.eval_size=32",
                        f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in error_lines(result.stderr) if line.startswith("error:")]
    assert len(lines) == 1 and "diverged" in lines[0]


@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_resume_with_the_fast_recipe_matches_an_uninterrupted_run(tmp_path):
    """The aids hold no state of their own (the anneal weight is a function of the step), so an
    interrupted run resumed across the anneal ends bit-identical to an uninterrupted one."""
    from test_train import Interrupted, InterruptAt, assert_same_weights, weights

    cfg = ("recipe=fast", "recipe.measured_on=null", "objective.intermediate.anneal=[10,30]", "train.max_steps=40")
    train(tiny_cfg(*cfg), tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(tiny_cfg(*cfg), tmp_path / "crashed", extra_callbacks=[InterruptAt(20)])
    train(tiny_cfg(*cfg, f"resume={tmp_path / 'crashed'}"), tmp_path / "unused")
    assert (tmp_path / "crashed" / "metrics.jsonl").read_bytes() == (tmp_path / "straight" / "metrics.jsonl").read_bytes()
    assert_same_weights(weights(tmp_path / "crashed"), weights(tmp_path / "straight"))


def test_resume_refuses_config_overrides(tiny_run, tmp_path):
    with pytest.raises(LabError, match=r"train\.max_steps cannot be changed on resume"):
        train(tiny_cfg(f"resume={tiny_run.dir}"), tmp_path / "x", overrides=[f"resume={tiny_run.dir}", "train.max_steps=40"])


@pytest.mark.slow
def test_resume_of_a_mistyped_path_creates_nothing(tmp_path):
    typo = tmp_path / "no_such_run"
    result = run_script("train.py", f"resume={typo}")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"error: resume={typo}: no such run directory; pass a folder train.py created, e.g. resume=checkpoints/retrieval/<run>"
    ]
    assert not typo.exists()


# ----------------------------------------------------------------- recipes: one file, one setting
@pytest.mark.parametrize("overrides, recipe", [
    ([], "fast"),
    (["experiment=image_only"], "fast_image"),          # the image preset selects the image recipe itself
    (["experiment=image_only", "recipe=plain"], "plain"),  # the command line beats the preset
    (["recipe=fast_paper", "model=paper"], "fast_paper"),
    (["experiment=image_text"], "fast"),                # regimes name their streams; the text recipe applies
])
def test_each_recipe_is_one_complete_file_named_in_the_config(overrides, recipe):
    from conftest import compose_cfg

    cfg = compose_cfg("train", overrides)
    assert cfg.recipe.name == recipe
    image = recipe == "fast_image"
    assert (int(cfg.task.one_hop_queries) == 4) == image
    assert (cfg.encoder.projector_init_std == 0.02) == image
    if image:
        assert cfg.objective.intermediate.weight == 0.3 and cfg.objective.intermediate.anneal is None
        assert cfg.model.token_shift and cfg.task.train_queries == 4  # written out in fast_image.yaml too
    if recipe == "fast_paper":
        assert list(cfg.objective.intermediate.anneal) == [600, 1200]
    check_recipe(cfg)  # each measured combination is accepted


@pytest.mark.parametrize("overrides, advice", [
    (["modality=image"], "recipe=fast was measured on contexts=text, n_layers=4, but this run has contexts=image; use recipe=fast_image"),
    (["model=paper"], "this run has n_layers=12; use recipe=fast_paper"),
    (["recipe=free_binding", "model=paper"], "recipe=free_binding was measured on contexts=text, n_layers=4"),
    (["modality=image", "model=paper"], "no recipe was measured there: use recipe=plain"),
])
def test_an_unmeasured_recipe_and_setting_is_refused_with_the_recipe_that_fits(overrides, advice):
    from conftest import compose_cfg

    with pytest.raises(LabError, match=re.escape(advice) + ".*recipe.measured_on=null"):
        check_recipe(compose_cfg("train", overrides))
    check_recipe(compose_cfg("train", [*overrides, "recipe.measured_on=null"]))  # on purpose: accepted


def test_image_phases_saturate_by_the_image_streams_rule():
    from conftest import compose_cfg

    for overrides in (["experiment=image_only"], ["experiment=image_text"]):
        cfg = compose_cfg("train", overrides)
        regime = parse_regime(cfg, "image" if "image_only" in overrides[0] else "text", ["text", "image"])
        for phase in regime.phases:
            if phase.until is not None:
                assert phase.threshold == saturation_threshold(phase.until, cfg.train.stop)
                assert phase.threshold == (0.95 if phase.until.startswith("val/image") else 0.99)


def test_command_line_overrides_beat_the_image_recipe():
    from conftest import compose_cfg

    cfg = compose_cfg("train", ["experiment=image_only", "objective.intermediate.weight=1.0", "task.one_hop_queries=0"])
    assert cfg.objective.intermediate.weight == 1.0 and cfg.task.one_hop_queries == 0


# ------------------------------------------------------------------------------ convergence
@pytest.mark.slow
def test_default_recipe_leaves_the_plateau(tmp_path):
    """The default config (tiny model, full-size task, conf/recipe/fast.yaml) solves the two-hop
    task: ID accuracy >= 0.9 within 800 steps on seed 0, counted only once the annealed
    intermediate loss is off (step 600; measured: 0.99 at step 600). Chance is ~0.25 and the plain
    recipe is still there after 4000 steps (docs/learning.md)."""
    from conftest import compose_cfg

    cfg = compose_cfg("train", ["seed=0", "train.max_steps=800", "train.val_every=50", "train.stop.threshold=0.9",
                                "train.stop.patience=1", "task.eval_size=256", "trainer.enable_progress_bar=false",
                                "+trainer.enable_model_summary=false"])
    assert cfg.model.token_shift and cfg.objective.intermediate.weight > 0 and cfg.task.train_queries > 1
    assert list(cfg.objective.intermediate.anneal) == [300, 600]
    metrics = train(cfg, tmp_path / "default")
    assert metrics["val/text_id_acc"] >= 0.9, metrics
    assert metrics["step"] < 800  # stopped on saturation, not on the budget


@pytest.mark.slow
def test_images_alone_leave_the_plateau_under_the_free_image_recipe(tmp_path):
    """``experiment=image_only recipe=free_binding_image`` (ResNet-18 pretrained offline first)
    leaves the plateau: image ID >= 0.5 within 500 steps on seed 0. Measured on seeds 0, 1 and 2:
    0.32-0.48 at step 200, 0.96 at step 250 on every seed, so the budget is twice the escape step
    of all three (chance among the prompt's items ~0.25). The aided image recipe, fast_image, is
    not used here: its escape moved between steps 400 and 700+ across seeds and machines."""
    from conftest import compose_cfg

    cfg = compose_cfg("train", ["experiment=image_only", "recipe=free_binding_image", "seed=0", "train.max_steps=500",
                                "train.val_every=50", "train.stop.image_threshold=0.5", "train.stop.patience=1",
                                "task.eval_size=256", f"encoder.cache_dir={tmp_path / 'encoders'}",
                                "modality.feature_cache_dir=null", "train.track_attention=false",
                                "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"])
    assert cfg.task.one_hop_queries == 4 and cfg.objective.intermediate.weight == 0.3 and cfg.model.init == "scaled"
    metrics = train(cfg, tmp_path / "images")
    assert metrics["val/image_id_acc"] >= 0.5, metrics
    assert metrics["step"] < 500  # stopped on the threshold, not on the budget


def test_intermediate_loss_in_embedding_space_scores_against_the_input_embeddings():
    torch.manual_seed(0)
    model = Backbone(vocab_size=12, n_layers=2, d_model=8, n_heads=2, d_ff=16)
    h = torch.randn(5, 8)
    objective = IntermediateSupervision(layer=1, weight=1.0, n_layers=2, space="embedding")
    expected = F.layer_norm(h, (8,)) @ model.tok_emb.weight.T
    torch.testing.assert_close(objective.logits(model, h), expected)
    torch.testing.assert_close(IntermediateSupervision(layer=1, weight=1.0, n_layers=2).logits(model, h), model.readout(h))
    with pytest.raises(LabError, match="space='logit' is unknown"):
        IntermediateSupervision(layer=1, weight=1.0, n_layers=2, space="logit")
