"""The Hugging Face adapter equals the HF model's own forward, for each supported family."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.errors import LabError
from lab.models.hf import PRESETS, HFModel
from lab.models.interface import knockout_keys

ROOT = Path(__file__).resolve().parents[1]


def _batch(vocab=128, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (B, T), generator=g)
    attend = torch.ones(B, T, dtype=torch.bool)
    attend[1, 9:] = False  # right padding
    attend[2, 5:] = False
    return {"tokens": tokens, "attend": attend}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def family(request):
    return request.param, HFModel.from_path(request.param)


def _close_on_real_tokens(a, b, attend, atol=1e-5):
    for i in range(a.shape[0]):
        torch.testing.assert_close(a[i, attend[i]], b[i, attend[i]], atol=atol, rtol=1e-5)


@torch.no_grad()
def test_run_equals_hf_forward(family):
    name, model = family
    batch = _batch()
    ref = model.hf(input_ids=batch["tokens"], attention_mask=batch["attend"].long()).logits
    out = model.run(batch).logits
    _close_on_real_tokens(out, ref, batch["attend"])
    # T=12 > the tiny Mistral's sliding window of 8: the window is honoured.
    assert model.n_layers == 3


@torch.no_grad()
def test_prefix_cache_and_skip(family):
    _, model = family
    batch = _batch()
    full = model.run(batch, capture=range(model.n_layers + 1))
    for l in range(model.n_layers + 1):
        resumed = model.run(stream=full.stream.with_h(full.captured[l]), start=l).logits
        torch.testing.assert_close(resumed, full.logits, atol=1e-5, rtol=1e-5)
    skipped = model.run(batch, skip=[1]).logits
    by_hand = model.run(stream=model.embed(batch).with_h(full.captured[1]), start=2).logits
    torch.testing.assert_close(skipped, by_hand, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_knockout_matches_masking_the_key_in_hf(family):
    _, model = family
    batch = _batch()
    batch["attend"][:] = True
    keys = torch.zeros_like(batch["attend"])
    keys[:, 3] = True
    out = model.run(batch, knockout=knockout_keys(batch["attend"], keys)).logits
    mask = batch["attend"].long().clone()
    mask[:, 3] = 0
    ref = model.hf(input_ids=batch["tokens"], attention_mask=mask).logits
    keep = torch.ones_like(batch["attend"])
    keep[:, 3] = False  # position 3's own query differs by construction (it may attend to itself)
    _close_on_real_tokens(out, ref, keep)
    assert not torch.allclose(out[:, 4:], model.run(batch).logits[:, 4:])


@torch.no_grad()
def test_eager_attention_also_matches():
    model = HFModel.from_path("tiny-llama", attn_implementation="eager")
    batch = _batch()
    ref = model.hf(input_ids=batch["tokens"], attention_mask=batch["attend"].long()).logits
    _close_on_real_tokens(model.run(batch).logits, ref, batch["attend"])


@torch.no_grad()
def test_local_folder_and_config_file_round_trip(tmp_path):
    model = HFModel.from_path("tiny-gpt_neox", seed=3)
    model.hf.save_pretrained(tmp_path / "neox")
    loaded = HFModel.from_path(tmp_path / "neox")
    batch = _batch()
    torch.testing.assert_close(loaded.run(batch).logits, model.run(batch).logits)
    assert loaded.tokenizer is None
    config = tmp_path / "llama.yaml"
    config.write_text("model_type: llama\nvocab_size: 64\nhidden_size: 16\nnum_hidden_layers: 2\n"
                      "num_attention_heads: 2\nintermediate_size: 32\nbos_token_id: 0\neos_token_id: 0\n")
    m = HFModel.from_path(config)
    assert m.n_layers == 2 and m.vocab_size == 64


def test_bad_inputs_are_lab_errors(tmp_path):
    with pytest.raises(LabError, match="neither a local model folder"):
        HFModel.from_path(tmp_path / "missing")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LabError, match="not supported"):
        HFModel.from_path(tmp_path / "bert.json")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LabError, match="no config.json"):
        HFModel.from_path(tmp_path / "folder")
    model = HFModel.from_path("tiny-gpt2")
    with pytest.raises(LabError, match="vocabulary"):
        model.embed({"tokens": torch.full((1, 4), 500), "attend": torch.ones(1, 4, dtype=torch.bool)})


def test_evaluate_hf_on_a_text_file(tmp_path):
    from hydra import compose, initialize_config_dir

    from lab.eval.run import evaluate_run

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 60)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=hf", "model.path=tiny-llama", f"data.text_file={text}", "data.seq_len=16",
            "data.n_samples=40", "evaluators=[accuracy,layer_relevance,pruning]",
            "evaluators.layer_relevance.n_boot=10", "evaluators.layer_relevance.plots=false",
            "evaluators.pruning.random_repeats=1", f"out_dir={tmp_path / 'out'}",
        ])
    results = evaluate_run(cfg)
    lr = results["layer_relevance"]["text"]["text"]
    assert len(lr["similarity"]["cosine_all"]) == 3 and lr["n_calibration"] == 20
    assert (tmp_path / "out" / "pruning.json").is_file()
    info = json.loads((tmp_path / "out" / "accuracy.json").read_text())["info"]
    assert info["model"] == "tiny-llama" and info["task"] == "text_file"


def test_evaluate_hf_on_the_retrieval_task(tmp_path):
    from hydra import compose, initialize_config_dir

    from lab.eval.run import evaluate_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=hf", "model.path=tiny-gpt2", "task=retrieval", "task.eval_size=16", "task.n_colors=16",
            "task.n_shapes=16", "evaluators=[layer_relevance]", "evaluators.layer_relevance.n_boot=0",
            "evaluators.layer_relevance.plots=false", "evaluators.layer_relevance.operators=[skip]",
            f"out_dir={tmp_path}",
        ])
    results = evaluate_run(cfg)
    assert set(results["layer_relevance"]["text"]) == {"id", "ood"}


@pytest.mark.slow  # a fresh interpreter importing torch + transformers + hydra
def test_cli_reports_a_missing_model_folder_as_one_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "model=hf", f"model.path={tmp_path / 'nope'}", f"out_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
