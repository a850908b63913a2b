"""Probes of the residual-stream interface (lab/models/probe.py) on random backbones and the HF
adapter: per-head + MLP writes add up to each block's update, the slow attention path equals the
fast one, alpha = 1 changes nothing, alpha = 0 equals the knockout, the frozen-norm readout is
exact; and the families that cannot give per-head writes say so."""
from __future__ import annotations

import pytest
import torch

from lab.data.text import collate_text
from lab.errors import LabError
from lab.models.binding_toy import BindingToyModel
from lab.models.hf import PRESETS, HFModel
from lab.models.interface import knockout_keys
from lab.models.linear_readout import frozen_readout
from lab.models.probe import AttentionScale
from tasks.retrieval import RetrievalTask
from test_interface import random_backbone

EXACT = dict(rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 3), ood_objects=(4, 5),
                         noise_tokens=(1, 3), eval_size=8, seed=0)


@pytest.fixture(scope="module")
def batch(task):
    return collate_text(task.train_batch(0, 6, noise=True), task.vocab.pad_id)


@pytest.fixture(scope="module", params=["rope", "learned"])
def model(request, task):
    return random_backbone(len(task.vocab), request.param)


def _hf_batch(B=3, T=12):
    tokens = torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(0))
    attend = torch.ones(B, T, dtype=torch.bool)
    attend[1, 9:] = False
    return {"tokens": tokens, "attend": attend, "answer_pos": torch.tensor([11, 8, 11])}


def _check_writes_add_up(model, batch, atol):
    out = model.run(batch, record=["heads", "writes"], capture=range(model.n_layers + 1))
    for layer in range(model.n_layers):
        rec = out.records[layer]
        torch.testing.assert_close(rec["heads"].sum(2) + rec["attn_bias"], rec["attn"], atol=atol, rtol=0)
        update = out.captured[layer + 1] - out.captured[layer]
        torch.testing.assert_close(rec["attn"] + rec["mlp"], update, atol=atol, rtol=0)
    return out


def _key_pairs(batch, key: int):
    keys = torch.zeros_like(batch["attend"])
    keys[:, key] = True
    return knockout_keys(batch["attend"], keys)


# ------------------------------------------------------------------------------------- backbone
def test_backbone_writes_add_up_and_records_change_nothing(model, batch):
    out = _check_writes_add_up(model, batch, atol=1e-10)
    torch.testing.assert_close(out.logits, model(batch), **EXACT)
    assert out.records[0]["heads"].shape == (*batch.tokens.shape, 2, 16)


def test_slow_path_equals_fast_path(model, batch):
    fast = model.run(batch).logits
    out = model.run(batch, record=["patterns"])
    torch.testing.assert_close(out.logits, fast, rtol=0, atol=1e-9)
    weights = out.records[1]["patterns"]
    assert weights.shape == (len(batch), 2, batch.tokens.shape[1], batch.tokens.shape[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert (weights.triu(1) == 0).all()  # causal
    at = model.run(batch, record=["patterns", "heads"], record_at=batch.answer_pos).records[1]
    rows = torch.arange(len(batch))
    torch.testing.assert_close(at["patterns"], weights[rows, :, batch.answer_pos], **EXACT)
    assert at["heads"].shape == (len(batch), 2, 16)


@pytest.mark.parametrize("mode", ["pre", "post", "post_renorm"])
def test_alpha_one_changes_nothing(model, batch, mode):
    scale = AttentionScale(_key_pairs(batch, 2), alpha=1.0, mode=mode)
    torch.testing.assert_close(model.run(batch, scale=scale).logits, model(batch), rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["pre", "post_renorm"])
def test_alpha_zero_renormalised_is_the_knockout(model, batch, mode):
    pairs = _key_pairs(batch, 2)
    knocked = model.run(batch, knockout=pairs).logits
    scaled = model.run(batch, scale=AttentionScale(pairs, alpha=0.0, mode=mode)).logits
    torch.testing.assert_close(scaled, knocked, rtol=0, atol=1e-9)
    # one layer only: as knockout_layers
    one = model.run(batch, scale=AttentionScale(pairs, 0.0, mode, heads={1: None})).logits
    torch.testing.assert_close(one, model.run(batch, knockout=pairs, knockout_layers=[1]).logits, rtol=0, atol=1e-9)


def test_post_without_renormalisation_scales_the_key_alone(model, batch):
    """post, alpha: the head output moves by (alpha - 1) * w_qk * v_k, nothing else."""
    pairs = _key_pairs(batch, 2)
    clean = model.run(batch, record=["patterns"]).records[0]["patterns"]
    out = model.run(batch, scale=AttentionScale(pairs, 0.5, "post", heads={0: [1]}), record=["patterns"])
    w = out.records[0]["patterns"]
    torch.testing.assert_close(w[:, 0], clean[:, 0], **EXACT)             # head 0 untouched
    torch.testing.assert_close(w[:, 1, 3:, 2], 0.5 * clean[:, 1, 3:, 2], **EXACT)
    torch.testing.assert_close(w[:, 1, :, 3:], clean[:, 1, :, 3:], **EXACT)
    torch.testing.assert_close(w[:, 1, 2, 2], clean[:, 1, 2, 2], **EXACT)  # the key's own query keeps itself
    pre = model.run(batch, scale=AttentionScale(pairs, 3.0, "pre")).logits
    torch.testing.assert_close(pre, model.run(batch, scale=AttentionScale(pairs, 3.0, "post_renorm")).logits,
                               rtol=0, atol=1e-9)


def test_frozen_readout_is_exact(model, batch):
    out = model.run(batch, record=["heads", "writes"], capture=[0], record_at=batch.answer_pos)
    rows = torch.arange(len(batch))
    h_final = out.stream.h[rows, batch.answer_pos]
    readout = frozen_readout(model, h_final)
    torch.testing.assert_close(readout(h_final) + readout.offset, model.readout(h_final), rtol=0, atol=1e-9)
    parts = readout(out.captured[0][rows, batch.answer_pos]) + readout.offset
    for rec in out.records.values():
        parts = parts + readout(rec["heads"]).sum(1) + readout(rec["attn_bias"].expand_as(h_final)) + readout(rec["mlp"])
    torch.testing.assert_close(parts, model.readout(h_final), rtol=0, atol=1e-9)


def test_bad_requests_are_lab_errors(model, batch, task):
    with pytest.raises(LabError, match="unknown record"):
        model.run(batch, record=["weights"])
    with pytest.raises(LabError, match="mode"):
        AttentionScale(_key_pairs(batch, 2), 0.5, "logits")
    with pytest.raises(LabError, match="head 5"):
        model.run(batch, scale=AttentionScale(_key_pairs(batch, 2), 0.5, heads={0: [5]}))
    with pytest.raises(LabError, match="does not"):
        BindingToyModel(task).run(batch, record=["patterns"])


# ------------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module", params=sorted(PRESETS))
def hf(request):
    return HFModel.from_path(request.param)


@torch.no_grad()
def test_hf_probes(hf):
    batch = _hf_batch()
    fast = hf.run(batch).logits
    if hf.model_type == "olmo2":
        with pytest.raises(LabError, match="olmo2"):
            hf.run(batch, record=["heads"])
        out = hf.run(batch, record=["writes"], capture=range(hf.n_layers + 1))
        for layer, rec in out.records.items():
            torch.testing.assert_close(rec["attn"] + rec["mlp"], out.captured[layer + 1] - out.captured[layer],
                                       atol=1e-5, rtol=0)
    else:
        _check_writes_add_up(hf, batch, atol=1e-5)
    out = hf.run(batch, record=["patterns"])
    torch.testing.assert_close(out.logits, fast, atol=1e-5, rtol=1e-5)        # slow path == fast path
    assert hf.hf.config._attn_implementation != "lab_probe"                   # switched back
    weights = out.records[0]["patterns"]
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    pairs = _key_pairs(batch, 3)
    for mode in ("pre", "post", "post_renorm"):
        torch.testing.assert_close(hf.run(batch, scale=AttentionScale(pairs, 1.0, mode)).logits, fast,
                                   atol=1e-5, rtol=1e-5)
    knocked = hf.run(batch, knockout=pairs).logits
    torch.testing.assert_close(hf.run(batch, scale=AttentionScale(pairs, 0.0, "post_renorm")).logits, knocked,
                               atol=1e-5, rtol=1e-5)
    h = out.stream.h[:, -1]
    readout = frozen_readout(hf, h)
    torch.testing.assert_close(readout(h) + readout.offset, hf.readout(h), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_hf_eager_model_also_probes():
    model = HFModel.from_path("tiny-gpt2", attn_implementation="eager")
    batch = _hf_batch()
    torch.testing.assert_close(model.run(batch, record=["patterns"]).logits, model.run(batch).logits,
                               atol=1e-5, rtol=1e-5)
    assert model.hf.config._attn_implementation == "eager"
