"""evaluate.py end to end on the tiny run: accuracy.json/csv/png against an independent
recomputation, and every broken input refused with exit code 2 and one ``error:`` line."""
from __future__ import annotations

import csv
import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, error_lines, run_script
from lab.cli import user_errors_exit
from lab.eval.run import evaluate_run
from lab.models.backbone import Backbone
from tasks.retrieval import RetrievalTask


# ------------------------------------------------------------------------------------- helpers
def copy_run(tiny_run, dest):
    """A private copy of the shared run (config and checkpoints only)."""
    dest.mkdir(parents=True)
    for name in ("config.yaml", "best.ckpt", "last.ckpt"):
        shutil.copy(tiny_run.dir / name, dest / name)
    return dest


def recompute_accuracy(run_dir, which: str) -> dict:
    """Accuracy from scratch: the model and task rebuilt by hand from config.yaml and the raw
    checkpoint, each prompt run alone (no padding, no batching, no lab evaluation code)."""
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    task_kw = {k: v for k, v in cfg["task"].items() if k != "_target_"}
    task = RetrievalTask(**task_kw, seed=cfg["seed"])
    model_kw = {k: v for k, v in cfg["model"].items() if k != "_target_"}
    model = Backbone(vocab_size=len(task.vocab), **model_kw)
    state = torch.load(run_dir / f"{which}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.eval()
    out = {}
    with torch.no_grad():
        for split in ("id", "ood"):
            hits, counts = [], []
            for s in task.eval_set(split, noise=False):
                tokens = torch.tensor([s.tokens])
                logits = model({"tokens": tokens, "attend": torch.ones_like(tokens, dtype=torch.bool)})
                hits.append(int(logits[0, -1].argmax()) == s.answer)
                counts.append(s.n_objects)
            hits, counts = np.array(hits, dtype=float), np.array(counts)
            out[split] = {
                "accuracy": hits.mean(),
                "n": len(hits),
                "chance": np.mean(1.0 / counts),
                "per_objects": {str(n): hits[counts == n].mean() for n in sorted(set(counts.tolist()))},
            }
    return out


def check_outputs(run_dir, which: str) -> dict:
    eval_dir = run_dir / ("eval" if which == "last" else f"eval_{which}")
    report = json.loads((eval_dir / "accuracy.json").read_text())
    ckpt = torch.load(run_dir / f"{which}.ckpt", map_location="cpu", weights_only=True)

    # Schema (lab/eval/accuracy.py): {"info", "results": {modality: {split: {accuracy, n, chance, per_objects}}}}
    assert set(report) == {"info", "results"}
    assert report["info"]["step"] == ckpt["global_step"]
    assert report["info"]["checkpoint"] == which
    assert "text" in report["results"]
    text = report["results"]["text"]
    assert set(text) == {"id", "ood"}
    for split, entry in text.items():
        assert set(entry) == {"accuracy", "n", "chance", "per_objects"}
        assert isinstance(entry["n"], int) and 0 <= entry["accuracy"] <= 1

    expected = recompute_accuracy(run_dir, which)
    for split in ("id", "ood"):
        got, want = text[split], expected[split]
        assert got["n"] == want["n"] == 32
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)
        assert got["chance"] == pytest.approx(want["chance"], abs=1e-9)
        assert got["per_objects"].keys() == want["per_objects"].keys()
        for n, acc in want["per_objects"].items():
            assert got["per_objects"][n] == pytest.approx(acc, abs=1e-6)

    with (eval_dir / "accuracy.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"modality", "split", "n_objects", "accuracy"}
    as_json = {(m, s, n): a for m, splits in report["results"].items() for s, e in splits.items()
               for n, a in e["per_objects"].items()}
    assert {(r["modality"], r["split"], r["n_objects"]): float(r["accuracy"]) for r in rows} == pytest.approx(as_json)

    assert (eval_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard" / "eval").glob("events.out.tfevents.*"))
    return report


def evaluate_in_process(run, *overrides):
    return evaluate_run(compose_cfg("evaluate", [f"run={run}", "evaluators=[accuracy]", *overrides]))


# -------------------------------------------------------------------------------------- success
def test_evaluate_in_process(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    results = evaluate_in_process(run_dir, "checkpoint=last")
    report = check_outputs(run_dir, "last")
    assert json.loads(json.dumps(results["accuracy"], default=float)) == report["results"]


def test_another_checkpoint_is_evaluated_beside_the_last(tiny_run, tmp_path):
    """checkpoint=best writes eval_best/, so it never overwrites the last checkpoint's eval/."""
    run_dir = copy_run(tiny_run, tmp_path / "run")
    evaluate_in_process(run_dir, "checkpoint=last")
    before = (run_dir / "eval" / "accuracy.json").read_text()
    evaluate_in_process(run_dir, "checkpoint=best")
    check_outputs(run_dir, "best")
    assert (run_dir / "eval" / "accuracy.json").read_text() == before


def test_evaluated_accuracy_matches_training_validation(tiny_run, tmp_path):
    """The last checkpoint's accuracy equals the run's final validation metrics."""
    run_dir = copy_run(tiny_run, tmp_path / "run")
    text = evaluate_in_process(run_dir, "checkpoint=last")["accuracy"]["text"]
    final = json.loads((tiny_run.dir / "metrics.json").read_text())
    assert text["id"]["accuracy"] == pytest.approx(final["val/text_id_acc"], abs=1e-6)
    assert text["ood"]["accuracy"] == pytest.approx(final["val/text_ood_acc"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    result = run_script("evaluate.py", f"run={run_dir}", "evaluators=[accuracy]")
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(run_dir, compose_cfg("evaluate").checkpoint)  # the default checkpoint


# --------------------------------------------------------------------------------- broken inputs
class Payload:
    """Unpickling this creates ``path``: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class PlainObject:
    pass


def break_run(kind: str, tiny_run, tmp_path):
    """Build a broken run directory; returns (run dir, expected message regex, sentinel or None)."""
    run_dir = tmp_path / kind
    sentinel = None
    if kind == "missing_dir":
        return run_dir, r"run directory .*missing_dir does not exist", None
    if kind == "not_a_run":
        run_dir.mkdir()
        return run_dir, r"is not a run directory \(no config.yaml\)", None
    copy_run(tiny_run, run_dir)
    best = run_dir / "best.ckpt"
    if kind == "missing_checkpoint":
        best.unlink()
        (run_dir / "last.ckpt").unlink()
        message = r"checkpoint .*best.ckpt not found; checkpoints in .*: none"
    elif kind == "truncated":
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
        message = r"checkpoint .*best.ckpt is corrupt or truncated"
    elif kind == "garbage":
        best.write_bytes(np.random.default_rng(0).bytes(4096))
        message = r"checkpoint .*best.ckpt is corrupt or truncated"
    elif kind == "empty":
        best.write_bytes(b"")
        message = r"checkpoint .*best.ckpt is corrupt or truncated; use another checkpoint"
    elif kind == "plain_pickle":  # a pickle, but not a torch checkpoint
        best.write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))
        message = r"checkpoint .*best.ckpt is corrupt or truncated"
    elif kind == "pickled_code":
        sentinel = tmp_path / f"{kind}_was_unpickled"
        torch.save({"state_dict": {}, "payload": Payload(sentinel)}, best)
        message = r"best.ckpt holds objects other than tensors and plain containers \((io|builtins)\.open\), so it is not loaded \(weights_only=True\)"
    elif kind == "pickled_object":
        torch.save({"state_dict": {}, "payload": PlainObject()}, best)
        message = r"best.ckpt holds objects other than tensors and plain containers \(test_evaluate\.PlainObject\)"
    elif kind == "other_task":  # the run's config now describes a task with one more item
        cfg = OmegaConf.load(run_dir / "config.yaml")
        cfg.task.n_items = 9
        OmegaConf.save(cfg, run_dir / "config.yaml")
        message = r"trained on task 'retrieval' with a 30-token vocabulary, .* describes task 'retrieval' with 31 tokens"
    elif kind == "other_model":  # same task, but the config describes a wider model
        cfg = OmegaConf.load(run_dir / "config.yaml")
        cfg.model.d_model = 64
        OmegaConf.save(cfg, run_dir / "config.yaml")
        message = r"best.ckpt does not fit the model described by"
    elif kind == "config_not_a_mapping":
        (run_dir / "config.yaml").write_text("- model\n- task\n")
        message = r"config.yaml is not a lab run config"
    elif kind == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(3)}, best)
        message = r"best.ckpt is not a lab checkpoint \(no state_dict\)"
    elif kind == "foreign_checkpoint":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, best)
        message = r"best.ckpt has no lab metadata"
    elif kind == "corrupt_config":
        (run_dir / "config.yaml").write_text("model: [unclosed\n  : :")
        message = r"config.yaml is corrupt"
    else:  # pragma: no cover
        raise ValueError(kind)
    return run_dir, message, sentinel


BROKEN = ["missing_dir", "not_a_run", "missing_checkpoint", "truncated", "garbage", "empty", "plain_pickle", "pickled_code",
          "pickled_object", "other_task", "other_model", "not_a_checkpoint", "foreign_checkpoint", "corrupt_config",
          "config_not_a_mapping"]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_input_exits_2_with_one_error_line(kind, tiny_run, tmp_path, capsys):
    """What evaluate.py's main does, in-process: ``user_errors_exit(evaluate_run)``."""
    run_dir, message, sentinel = break_run(kind, tiny_run, tmp_path)
    cfg = compose_cfg("evaluate", [f"run={run_dir}", "evaluators=[accuracy]", "checkpoint=best"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(evaluate_run)(cfg)
    assert exit_info.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines[0]
    if sentinel is not None:
        assert not sentinel.exists(), "the checkpoint was unpickled"
    assert not (run_dir / "eval").exists() and not (run_dir / "eval_best").exists()


def test_run_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(evaluate_run)(compose_cfg("evaluate", []))
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: pass the run directory to evaluate: run=checkpoints/<task>/<run>"
    ]


# Runs evaluate.py as __main__ (hydra.main, argument parsing, user_errors_exit) once per broken
# run directory inside one interpreter, so the slow start-up (torch, lightning) is paid once.
CLI_DRIVER = r"""
import json, os, runpy, sys, tempfile
from hydra.core.global_hydra import GlobalHydra
for run_dir in sys.argv[1:]:
    sys.argv = ["evaluate.py", f"run={run_dir}", "evaluators=[accuracy]", "checkpoint=best"]
    GlobalHydra.instance().clear()
    with tempfile.TemporaryFile(mode="w+") as err:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            runpy.run_path("evaluate.py", run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException as error:
            code = repr(error)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        print("RESULT " + json.dumps({"run": run_dir, "code": code, "stderr": err.read()}), flush=True)
"""


@pytest.mark.slow
def test_evaluate_cli_refuses_broken_inputs(tiny_run, tmp_path):
    kinds = ["missing_dir", "missing_checkpoint", "truncated", "garbage", "pickled_code", "other_task"]
    cases = {str(run_dir): (kind, message, sentinel)
             for kind in kinds for run_dir, message, sentinel in [break_run(kind, tiny_run, tmp_path)]}
    result = run_script("-c", CLI_DRIVER, *cases)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["run"] for r in reports] == list(cases)
    for report in reports:
        kind, message, sentinel = cases[report["run"]]
        assert report["code"] == 2, (kind, report)
        lines = error_lines(report["stderr"])
        assert len(lines) == 1 and lines[0].startswith("error: "), (kind, lines)
        assert re.search(message, lines[0]), (kind, lines[0])
        if sentinel is not None:
            assert not sentinel.exists(), "the checkpoint was unpickled"
