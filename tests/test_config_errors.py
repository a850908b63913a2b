"""Every config mistake a new user makes is one ``error:`` line, exit code 2, and nothing written:
driven through the real entry points (``train.py``/``evaluate.py`` as subprocesses) where Hydra
would otherwise answer, in-process where the lab's own checks answer."""
from __future__ import annotations

import errno

import lightning as L
import pytest

from conftest import ROOT, compose_cfg, error_lines, run_script, tiny_cfg
from lab.build import check_fine_tune_source
from lab.errors import LabError
from lab.eval.run import evaluate_run
from lab.overrides import check_overrides
from lab.train.run import train


def refused(script: str, *args: str, tmp_path=None) -> str:
    """Run the entry point; assert exit 2, one stderr line starting with ``error:``, no run dir."""
    run_dir = None
    if tmp_path is not None and script == "train.py":
        run_dir = tmp_path / "run"
        args = (*args, f"hydra.run.dir={run_dir}")
    result = run_script(script, *args)
    lines = error_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    if run_dir is not None:
        assert not run_dir.exists()
    return lines[0]


# ------------------------------------------------------------------ what Hydra used to answer
@pytest.mark.parametrize("args, expected", [
    (["task=retrievl"], r"unknown task 'retrievl' \(did you mean retrieval\?\); choose one of: fewshot, one_hop, retrieval"),
    (["modality=audio"], r"unknown modality 'audio'; choose one of: image, noisy_text, text"),
    (["task.n_items=abc"], r"task.n_items='abc': expected an integer \(default 16\)"),
    (["train.lr=abc"], r"train.lr='abc': expected a number \(default 0.001\)"),
    (["train.foo=1"], r"unknown key 'train.foo'; close keys: "),
    (["+train.foo=1"], r"\+train.foo: the lab has no setting 'train.foo', so adding it would change nothing"),
    (["+render.canvas=16"], r"close keys: render.canvas_size"),
    (["trainer.max_steps=-5"], r"unknown key 'trainer.max_steps'; close keys: train.max_steps"),
])
def test_train_py_refuses_config_mistakes_in_one_line(tmp_path, args, expected):
    import re

    assert re.search(expected, refused("train.py", *args, tmp_path=tmp_path))


def test_evaluate_py_lists_the_evaluators_for_an_unknown_one():
    line = refused("evaluate.py", "run=nowhere", "evaluators=[accuracy,nope]")
    assert "unknown evaluators 'nope'" in line
    for name in ("accuracy", "interventions", "knockout", "probes"):
        assert name in line


def test_a_folder_that_is_not_a_run_is_refused_as_resume_and_left_untouched(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    line = refused("train.py", f"resume={folder}")
    assert "not a run directory" in line
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    missing = tmp_path / "typo"
    assert "no such run directory" in refused("train.py", f"++resume={missing}")
    assert not missing.exists()


# ---------------------------------------------------------------- the checker, in-process
def test_plus_may_add_only_what_a_target_accepts():
    check_overrides("train", ["+trainer.enable_model_summary=false", "+trainer.gradient_clip_val=1.0"])
    with pytest.raises(LabError, match=r"\+trainer.gradient_clip=1.0|no setting 'trainer.gradient_clip'"):
        check_overrides("train", ["+trainer.gradient_clip=1.0"])


def test_valid_overrides_and_sweeps_pass(tmp_path):
    check_overrides("train", ["task=one_hop", "model.init=torch", "train.lr=3e-3", "train.max_steps=100",
                              "objective.intermediate.anneal=null", "task.id_objects=[2,4]",
                              "seed=0,1,2", f"hydra.run.dir={tmp_path}"])
    check_overrides("evaluate", ["run=x", "evaluators=[accuracy,probes]", "batch_size=64"])
    with pytest.raises(LabError, match="batch_size='many': expected an integer"):
        check_overrides("evaluate", ["batch_size=many"])


def test_fine_tuning_preset_needs_init_from_or_an_explicit_none():
    with pytest.raises(LabError, match="init_from=<pretraining run dir>.*init_from=none"):
        check_fine_tune_source(compose_cfg("train", ["experiment=fewshot_sft"]))
    with pytest.raises(LabError, match="adapter= trains adapters on a frozen model"):
        check_fine_tune_source(compose_cfg("train", ["adapter=lora"]))
    check_fine_tune_source(compose_cfg("train", ["experiment=fewshot_sft", "init_from=none"]))  # the control, on purpose


def test_sft_without_init_from_writes_nothing(tmp_path):
    with pytest.raises(LabError, match="no init_from was given"):
        train(compose_cfg("train", ["experiment=fewshot_sft"]), tmp_path / "sft")
    assert not (tmp_path / "sft").exists()


# ------------------------------------------------------------------- failures during a run
def test_a_run_that_diverges_before_its_first_checkpoint_leaves_nothing_behind(tmp_path):
    cfg = tiny_cfg("train.lr=1e6", "train.warmup_steps=0", "train.val_every=30")
    with pytest.raises(LabError, match="before the first checkpoint.*was removed, so the same command may be rerun"):
        train(cfg, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


class FullDisk(L.Callback):
    """Raises the error a full disk gives once the run has written its first checkpoint."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step >= 20:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_the_last_checkpoint_is_kept(tmp_path):
    run_dir = tmp_path / "full"
    with pytest.raises(LabError, match=r"cannot write to .*No space left on device.*resume="):
        train(tiny_cfg(), run_dir, extra_callbacks=[FullDisk()])
    assert (run_dir / "last.ckpt").is_file()


def test_an_evaluator_that_does_not_fit_the_task_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "hop"
    train(tiny_cfg("task=one_hop", "train.max_steps=10"), run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    for name in ("probes", "interventions"):
        cfg = compose_cfg("evaluate", [f"run={run_dir}", f"evaluators=[{name}]"])
        with pytest.raises(LabError, match=f"evaluator {name} needs a run of task retrieval.*task is 'one_hop'.*drop {name}"):
            evaluate_run(cfg)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
