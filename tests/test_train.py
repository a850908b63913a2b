"""Training composed in-process with Hydra: run directory, refusal to overwrite, learning,
determinism, exact resume, config errors (in-process and through train.py)."""
from __future__ import annotations

import hashlib
import json
import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import InitRecorder, LossRecorder, error_lines, run_script, tiny_cfg
from lab.errors import LabError
from lab.runs import load_checkpoint
from lab.train.run import train


def snapshot(run_dir):
    """Bytes and mtime of every file under a directory."""
    return {
        str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def metrics_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, which="last") -> dict:
    return load_checkpoint(run_dir / f"{which}.ckpt")["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------- run dir
def test_run_directory_holds_everything(tiny_run):
    d = tiny_run.dir
    for name in ("config.yaml", "best.ckpt", "last.ckpt", "metrics.jsonl", "metrics.json"):
        assert (d / name).is_file(), name
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))

    saved = OmegaConf.load(d / "config.yaml")
    assert saved.model.d_model == 32 and saved.model.n_layers == 2 and saved.task.n_items == 8
    assert saved.train.max_steps == 60 and saved.seed == 0
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(tiny_run.cfg, resolve=True)

    lines = metrics_lines(d)
    assert [r["step"] for r in lines] == [10, 20, 30, 40, 50, 60]
    assert {"val/text_id_acc", "val/text_ood_acc", "val_n/text_id_n02", "val_n/text_ood_n05"} <= lines[-1].keys()
    assert json.loads((d / "metrics.json").read_text()) == lines[-1]
    assert tiny_run.metrics["step"] == 60
    assert tiny_run.metrics["val/text_id_acc"] == pytest.approx(lines[-1]["val/text_id_acc"], abs=1e-6)

    # last.ckpt is the final state; best.ckpt the first validation with the highest ID accuracy.
    last, best = load_checkpoint(d / "last.ckpt"), load_checkpoint(d / "best.ckpt")
    assert last["global_step"] == 60
    scores = [r["val/text_id_acc"] for r in lines]
    assert best["global_step"] == lines[scores.index(max(scores))]["step"]
    assert last["lab_meta"]["task"] == "retrieval" and len(last["lab_meta"]["vocab"]) == 6 + 8 + 8 + 8


def test_training_metrics_reach_tensorboard(tiny_run):
    """train/loss, train/acc, train/lr are written every trainer.log_every_n_steps (25) steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run.dir / "tensorboard"))
    events.Reload()
    for tag in ("train/loss", "train/acc", "train/lr"):
        assert [e.step for e in events.Scalars(tag)] == [25, 50], tag
    # Steps count optimizer steps done (as in metrics.jsonl): step 25 shows the 25th step's loss.
    assert events.Scalars("train/loss")[0].value == pytest.approx(tiny_run.losses[24], rel=1e-6)


def test_existing_run_directory_is_refused_untouched(tiny_run):
    before = snapshot(tiny_run.dir)
    with pytest.raises(LabError, match="already holds a run.*resume="):
        train(tiny_cfg(), tiny_run.dir)
    assert snapshot(tiny_run.dir) == before


# ------------------------------------------------------------------------------------ learning
def test_loss_goes_down(tiny_run):
    losses = tiny_run.losses
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 2.5  # about log(vocab) at initialisation
    assert last < 0.7 * first, (first, last)


@pytest.mark.slow
def test_longer_run_learns_to_read_the_context(tmp_path):
    """Below log(n_items) the model must be using the prompt: knowing only that the answer is an
    item gives log(8) = 2.08; picking among the 2-3 items present gives about log(2.5) = 0.92."""
    losses = LossRecorder()
    train(tiny_cfg("train.max_steps=200", "train.val_every=100"), tmp_path / "longer", extra_callbacks=[losses])
    late = sum(losses.losses[-20:]) / 20
    assert late < 0.85 * math.log(8), late


@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_same_seed_same_run(tiny_run, tmp_path):
    torch.rand(1000)  # disturb the global RNG: the run must not depend on it
    init = InitRecorder()
    metrics = train(tiny_cfg(), tmp_path / "again", extra_callbacks=[init])
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == (tiny_run.dir / "metrics.jsonl").read_bytes()
    assert metrics == tiny_run.metrics
    assert_same_weights(init.state, tiny_run.init)
    assert_same_weights(weights(tmp_path / "again"), weights(tiny_run.dir))


def test_seed_changes_the_initial_weights(tiny_run, tmp_path):
    init = InitRecorder()
    train(tiny_cfg("seed=1", "train.max_steps=10"), tmp_path / "seed1", extra_callbacks=[init])
    differs = [k for k in init.state if not torch.equal(init.state[k], tiny_run.init[k])]
    assert "model.tok_emb.weight" in differs and "model.blocks.0.attn.qkv.weight" in differs


# -------------------------------------------------------------------------------------- resume
class Interrupted(RuntimeError):
    pass


class InterruptAt(L.Callback):
    """Crash when step ``step`` is about to be trained (after the validation and checkpoints of
    the previous step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"simulated crash at step {self.step}")


@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_resume_matches_uninterrupted_run(tiny_run, tmp_path):
    run_dir = tmp_path / "crashed"
    first = LossRecorder()
    with pytest.raises(Interrupted):
        train(tiny_cfg(), run_dir, extra_callbacks=[InterruptAt(20), first])
    assert load_checkpoint(run_dir / "last.ckpt")["global_step"] == 20
    assert [r["step"] for r in metrics_lines(run_dir)] == [10, 20]

    second = LossRecorder()
    metrics = train(tiny_cfg(f"resume={run_dir}"), tmp_path / "unused", extra_callbacks=[second])
    assert not (tmp_path / "unused").exists()
    assert first.losses + second.losses == tiny_run.losses
    assert (run_dir / "metrics.jsonl").read_bytes() == (tiny_run.dir / "metrics.jsonl").read_bytes()
    assert (run_dir / "metrics.json").read_bytes() == (tiny_run.dir / "metrics.json").read_bytes()
    assert metrics == tiny_run.metrics
    assert_same_weights(weights(run_dir, "last"), weights(tiny_run.dir, "last"))
    assert_same_weights(weights(run_dir, "best"), weights(tiny_run.dir, "best"))


def test_resume_of_a_missing_run_is_a_lab_error(tmp_path):
    with pytest.raises(LabError, match="does not exist"):
        train(tiny_cfg(f"resume={tmp_path / 'nope'}"), tmp_path / "x")


# -------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_heads=3", r"model\.d_model=32 must be divisible by model\.n_heads=3"),
        ("model.pos_encoding=alibi", r"model\.pos_encoding='alibi' is unknown"),
        ("model.max_len=8", r"model\.max_len=8 is shorter than the longest prompt \(24 tokens\)"),
        ("train.lr=-1", r"train\.lr must be > 0, got -1"),
        ("train.lr=0", r"train\.lr must be > 0"),
        ("train.batch_size=0", r"train\.batch_size must be >= 1"),
        ("train.stop.monitor=val/text_test_acc", r"train\.stop\.monitor='val/text_test_acc' is not a validation metric"),
        ("task.ood_objects=[3,5]", r"overlap"),
        ("task.n_items=4", r"task\.n_items=4"),
    ],
)
def test_config_errors_are_raised_before_training(tmp_path, override, message):
    run_dir = tmp_path / "run"
    with pytest.raises(LabError, match=message):
        train(tiny_cfg(override), run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())  # no config, checkpoint, log or metrics


@pytest.mark.slow
def test_train_cli_reports_a_bad_value_in_one_line(tmp_path):
    run_dir = tmp_path / "cli_run"
    result = run_script("train.py", "model.n_heads=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert lines == ["error: model.d_model=128 must be divisible by model.n_heads=3 (with an even head size for RoPE)"]
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(run_dir.glob("*.ckpt")) and not (run_dir / "config.yaml").exists()


def test_a_refused_config_leaves_no_empty_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("what Hydra logged before the error\n")
    with pytest.raises(LabError, match="train.lr"):
        train(tiny_cfg("train.lr=-1"), run_dir)
    assert not run_dir.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("the user's own file")
    with pytest.raises(LabError, match="train.lr"):
        train(tiny_cfg("train.lr=-1"), kept)
    assert (kept / "notes.txt").read_text() == "the user's own file"


def test_tensorboard_steps_match_the_metrics_file(tiny_run):
    """A validation shows at the same step in TensorBoard as in metrics.jsonl (optimizer steps done)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run.dir / "tensorboard"))
    events.Reload()
    board = [e.step for e in events.Scalars("val/text_id_acc")]
    lines = [json.loads(l)["step"] for l in (tiny_run.dir / "metrics.jsonl").read_text().splitlines() if l]
    assert board == lines == list(range(10, 61, 10))
