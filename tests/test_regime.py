"""Regimes: phase parsing, modality mixing, phase transitions, per-phase checkpoints, resume
across a phase boundary, the step-matched control, and a short image curriculum end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from conftest import LossRecorder, tiny_cfg

from lab.errors import LabError
from lab.runs import load_checkpoint
from lab.train.regime import Phase, PhaseController, Regime, parse_regime, phase_lr_factor
from lab.build import build_training as compose
from lab.train.run import train
from test_train import InterruptAt, Interrupted

TWO_PHASES = (
    "regime.phases=[{name:noisy,mix:{text:1},max_steps:20,until:null,noise:true},"
    "{name:clean,mix:{text:1},max_steps:20,until:null}]"
)


def phases(run_dir):
    return json.loads((run_dir / "phases.json").read_text())


def test_phase_modality_follows_the_mix_and_is_seeded():
    phase = Phase(name="mix", mix={"image": 0.2, "text": 0.8}, max_steps=10)
    draws = [phase.modality_at(seed=0, step=s) for s in range(4000)]
    assert draws == [phase.modality_at(seed=0, step=s) for s in range(4000)]
    assert draws != [phase.modality_at(seed=1, step=s) for s in range(4000)]
    assert abs(draws.count("image") / len(draws) - 0.2) < 0.03
    assert {Phase("t", {"text": 1.0}, 10).modality_at(0, s) for s in range(50)} == {"text"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("regime.phases=[{name:a,mix:{text:1},max_steps:15}]", "multiple of train.val_every"),
        ("regime.phases=[{name:a,mix:{audio:1},max_steps:20}]", "unknown modality"),
        ("regime.phases=[{name:a,mix:{text:-1},max_steps:20}]", "mix weights"),
        ("regime.phases=[]", "no phases"),
        ("regime.phases=[{name:a,mix:{text:1},max_steps:20,until:val/nope_acc}]", "not a validation metric"),
        ("regime.phases=[{name:a,mix:{text:1},max_steps:20,threshold:0.5}]", "phases take no threshold of their own"),
    ],
)
def test_bad_regimes_are_refused_before_training(override, message):
    with pytest.raises(LabError, match=message):
        compose(tiny_cfg(override))


def test_default_regime_is_one_phase_on_the_primary_modality():
    cfg = tiny_cfg()
    regime = parse_regime(cfg, "text", ["text"])
    assert [(p.name, p.mix, p.max_steps, p.until) for p in regime.phases] == [
        ("main", {"text": 1.0}, 60, "val/text_id_acc")
    ]


def test_learning_rate_restarts_at_each_phase():
    regime = Regime("r", [Phase("a", {"text": 1.0}, 100), Phase("b", {"text": 1.0}, 100, lr=0.5)])
    controller = PhaseController(regime, ".", threshold=0.99, patience=1)
    factor = phase_lr_factor(controller, warmup_steps=10, base_lr=1.0)
    first = [factor(s) for s in range(100)]
    controller.index, controller.start = 1, 100
    second = [factor(s) for s in range(100, 200)]
    assert first[0] == pytest.approx(0.1) and max(first) == pytest.approx(1.0)
    assert np.allclose(second, 0.5 * np.array(first))


def test_phases_end_on_budget_and_checkpoint_each_phase(tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(tiny_cfg(TWO_PHASES, "task.noise_tokens=[1,3]"), run_dir)
    got = phases(run_dir)
    assert [(p["name"], p["start"], p["end"], p["reason"]) for p in got] == [
        ("noisy", 0, 20, "budget"),
        ("clean", 20, 40, "budget"),
    ]
    assert metrics["step"] == 40
    for i, p in enumerate(got):
        ckpt = load_checkpoint(run_dir / f"phase{i}_{p['name']}.ckpt")
        assert ckpt["global_step"] == p["end"]


def test_a_saturated_phase_ends_early(tmp_path):
    run_dir = tmp_path / "run"
    # A threshold of 1e-6 is met at the first validation; patience 1 ends the phase there.
    train(tiny_cfg(TWO_PHASES.replace("until:null,noise", "until:val/text_id_acc,noise"),
                   "train.stop.threshold=1e-6", "train.stop.patience=1"), run_dir)
    assert [(p["name"], p["end"], p["reason"]) for p in phases(run_dir)] == [
        ("noisy", 10, "saturated"),
        ("clean", 30, "budget"),
    ]


def test_saturation_is_one_rule_per_stream():
    """A phase may restate its stream's threshold (configs saved before the rule was the only one)
    but not set its own: saturation is read from train.stop in one place."""
    restated = TWO_PHASES.replace("until:null,noise", "until:val/text_id_acc,threshold:0.99,noise")
    regime = parse_regime(tiny_cfg(restated, "train.stop.threshold=0.99"), "text", ["text"])
    assert [p.threshold for p in regime.phases] == [0.99, None]
    own = TWO_PHASES.replace("until:null,noise", "until:val/text_id_acc,threshold:0.5,noise")
    with pytest.raises(LabError, match="phases take no threshold of their own.*train.stop.image_threshold"):
        parse_regime(tiny_cfg(own, "train.stop.threshold=0.99"), "text", ["text"])


def test_image_phases_saturate_at_the_image_threshold():
    for regime in ("image_text", "noise_image_text", "joint"):
        regime_ = parse_regime(tiny_cfg(f"regime={regime}", "train.stop.image_threshold=0.9"), "text",
                               ["text", "noisy_text", "image"])
        image = [p for p in regime_.phases if p.until == "val/image_id_acc"]
        assert [p.threshold for p in image] == [0.9]
        assert all(p.threshold == 1.0 for p in regime_.phases if p.until not in (None, "val/image_id_acc"))  # TINY: train.stop.threshold=1.0


def test_noise_only_in_the_noisy_phase(tmp_path):
    seen = []

    class Spy(LossRecorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            noise_id = trainer.datamodule.data["text"].task.vocab["[NOISE]"]
            seen.append(bool((batch["tokens"] == noise_id).any()))

    train(tiny_cfg(TWO_PHASES, "task.noise_tokens=[1,3]"), tmp_path / "run", extra_callbacks=[Spy()])
    assert seen[:20] == [True] * 20 and seen[20:] == [False] * 20


@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_resume_across_a_phase_boundary_matches_an_uninterrupted_run(tmp_path):
    cfg = (TWO_PHASES, "task.noise_tokens=[1,3]")
    straight, straight_losses = tmp_path / "straight", LossRecorder()
    expected = train(tiny_cfg(*cfg), straight, extra_callbacks=[straight_losses])

    crashed, first, second = tmp_path / "crashed", LossRecorder(), LossRecorder()
    with pytest.raises(Interrupted):
        train(tiny_cfg(*cfg), crashed, extra_callbacks=[InterruptAt(20), first])
    assert load_checkpoint(crashed / "last.ckpt")["global_step"] == 20
    metrics = train(tiny_cfg(*cfg, f"resume={crashed}"), tmp_path / "unused", extra_callbacks=[second])
    assert first.losses + second.losses == straight_losses.losses
    assert metrics == expected
    assert phases(crashed) == phases(straight)


def test_step_matched_control_takes_the_other_runs_step_count(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "metrics.json").write_text(json.dumps({"step": 23}))
    cfg = tiny_cfg("regime=text_control", f"regime.match_steps_of={reference}")
    _, _, _, controller = compose(cfg)
    [phase] = controller.regime.phases
    assert (phase.max_steps, phase.until) == (30, None)  # rounded up to whole validation intervals
    with pytest.raises(LabError, match="no metrics.json"):
        compose(tiny_cfg("regime=text_control", f"regime.match_steps_of={tmp_path / 'missing'}"))


def test_step_matched_control_refuses_a_run_still_in_progress(tmp_path):
    reference = tmp_path / "running"
    reference.mkdir()
    (reference / "metrics.json").write_text(json.dumps({"step": 23}))
    (reference / "config.yaml").write_text(OmegaConf.to_yaml(tiny_cfg("regime=image_text"), resolve=False))
    (reference / "phases.json").write_text(json.dumps([{"phase": 0, "name": "text"}]))
    with pytest.raises(LabError, match="finished 1 of its 3 phases"):
        compose(tiny_cfg("regime=text_control", f"regime.match_steps_of={reference}"))


@pytest.mark.parametrize("experiment, noise", [("image_text", [0, 0]), ("noise_image_text", [0, 16]), ("noise_text", [0, 16])])
def test_regime_presets_carry_noise_and_the_measured_budgets(experiment, noise):
    from conftest import compose_cfg

    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.regime.name == experiment
    assert list(cfg.task.noise_tokens) == noise
    if "image" in experiment:  # the budgets of the measured CPU sweep, not a 20000-step mix
        assert (cfg.train.max_steps, cfg.train.val_every, cfg.regime.mix_steps) == (2400, 50, 300)


@pytest.mark.parametrize("regime, text_stream", [("image_text", "text"), ("noise_image_text", "noisy_text")])
def test_image_phase_keeps_text_unless_told_otherwise(regime, text_stream):
    streams = ["text", "noisy_text", "image"]
    mixes = lambda *extra: [p.mix for p in parse_regime(tiny_cfg(f"regime={regime}", *extra), "text", streams).phases]
    assert mixes()[1] == {"image": 1.0, text_stream: 1.0}                  # default: half the steps are text
    assert mixes("regime.keep_text=0.25")[1] == {"image": 1.0, text_stream: 0.25}
    assert mixes("regime.keep_text=0")[1] == {"image": 1.0}                # the paper's image-only phase


@pytest.mark.slow
def test_image_text_curriculum_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(
        "experiment=image_text", "encoder.weights=random", "regime.data.image.feature_cache_dir=null",
        "regime.data.image.pool_size=8", "train.max_steps=10", "regime.mix_steps=20",
    )
    kinds = []

    class Spy(LossRecorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            kinds.append("image" if "image_features" in batch or "images" in batch else "text")

    metrics = train(cfg, run_dir, extra_callbacks=[Spy()])
    got = phases(run_dir)
    assert [p["name"] for p in got] == ["text", "image", "mix"]
    assert kinds[:10] == ["text"] * 10 and "image" in kinds[10:20]  # the image phase keeps text (keep_text)
    assert set(kinds[20:]) == {"text", "image"}
    for record in got:  # every phase validates text and image, ID and OOD
        assert {"val/text_id_acc", "val/text_ood_acc", "val/image_id_acc", "val/image_ood_acc"} <= set(record)
    assert metrics["step"] == 40


def test_noisy_text_is_its_own_stream(tmp_path):
    """regime=noise_text trains on the noisy_text stream and validates on the clean text stream."""
    from lab.build import build_training

    cfg = tiny_cfg("regime=noise_text", "task.noise_tokens=[1,3]")
    task, datamodule, _, controller = build_training(cfg, tmp_path)
    assert set(datamodule.data) == {"text", "noisy_text"}
    assert datamodule.val_names == ["text_id", "text_ood"]           # noisy_text only trains
    assert controller.phase.mix == {"noisy_text": 1.0} and controller.phase.noise is None
    noise_id = task.vocab["[NOISE]"]
    train = [datamodule.train_stream.batch(step) for step in range(3)]
    assert all(bool((b["tokens"] == noise_id).any()) for b in train)
    assert not any(bool((b["tokens"] == noise_id).any()) for b in datamodule.data["text"].eval_batches("id"))
    clean = datamodule.data["text"].train_batch(0)                    # the text stream itself is clean
    assert not bool((clean["tokens"] == noise_id).any())
