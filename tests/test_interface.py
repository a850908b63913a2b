"""The residual-stream interface: every primitive of ``run()`` against manual composition of
``embed``/``block``/``readout``, on random backbones, plus hand-built models with known answers."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lab.data.text import collate_text
from lab.models.backbone import Backbone
from lab.models.interface import knockout_keys, patch_positions
from tasks.retrieval import RetrievalTask

ENCODINGS = ["rope", "learned", "none"]
N_LAYERS = 3
EXACT = dict(rtol=0, atol=1e-10)  # float64: equal up to summation order


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 3), ood_objects=(4, 5),
                         noise_tokens=(1, 3), eval_size=8, seed=0)


@pytest.fixture(scope="module")
def batch(task):
    """Six prompts of different lengths (so there is right padding), with noise tokens."""
    samples = task.train_batch(0, 6, noise=True)
    assert len({len(s.tokens) for s in samples}) > 1 and all(s.noise_positions for s in samples)
    return collate_text(samples, task.vocab.pad_id), samples


def random_backbone(vocab_size: int, pos_encoding: str, seed: int = 0) -> Backbone:
    """A backbone with O(1) random weights (the default init is near-identity, which would make
    many of these checks pass trivially), in float64."""
    torch.manual_seed(seed)
    model = Backbone(vocab_size, n_layers=N_LAYERS, d_model=16, n_heads=2, d_ff=32, max_len=64, pos_encoding=pos_encoding)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
    return model.double().eval()


@pytest.fixture(scope="module", params=ENCODINGS)
def model(request, task):
    return random_backbone(len(task.vocab), request.param)


def manual(model, batch, skip=(), until=None, edit=None):
    """Compose embed/block/readout by hand; returns (h_l list, logits)."""
    stream = model.embed(batch)
    h, hs = stream.h, []
    until = model.n_layers if until is None else until
    for layer in range(until):
        if edit is not None and edit[0] == layer:
            h = edit[1](h)
        hs.append(h)
        if layer not in skip:
            h = model.block(layer, stream.with_h(h))
    hs.append(h)
    return hs, model.readout(h)


# ------------------------------------------------------------------------------------ run/forward
def test_run_equals_forward_and_manual(model, batch):
    b, _ = batch
    full = model(b)
    assert full.shape == (*b["tokens"].shape, model.head.out_features)
    torch.testing.assert_close(model.run(b).logits, full, **EXACT)
    torch.testing.assert_close(manual(model, b)[1], full, **EXACT)
    at_answer = full[torch.arange(len(full)), b["answer_pos"]]
    torch.testing.assert_close(model.answer_logits(b), at_answer, **EXACT)
    torch.testing.assert_close(model.run(b, positions=b["answer_pos"]).logits, at_answer, **EXACT)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_skip_equals_manual_composition(model, batch, layer):
    b, _ = batch
    skipped = model.run(b, skip=[layer]).logits
    torch.testing.assert_close(skipped, manual(model, b, skip=[layer])[1], **EXACT)
    assert not torch.allclose(skipped, model(b), atol=1e-3)  # the block does something
    both = model.run(b, skip=[layer, (layer + 1) % N_LAYERS]).logits
    torch.testing.assert_close(both, manual(model, b, skip=[layer, (layer + 1) % N_LAYERS])[1], **EXACT)


def test_skipping_every_block_is_the_readout_of_the_embedding(model, batch):
    b, _ = batch
    out = model.run(b, skip=range(N_LAYERS))
    torch.testing.assert_close(out.logits, model.readout(model.embed(b).h), **EXACT)


def test_capture_returns_the_residual_stream(model, batch):
    b, _ = batch
    hs, _ = manual(model, b)
    out = model.run(b, capture=range(N_LAYERS + 1))
    assert sorted(out.captured) == list(range(N_LAYERS + 1))
    for layer, h in enumerate(hs):
        torch.testing.assert_close(out.captured[layer], h, **EXACT)
    torch.testing.assert_close(out.stream.h, hs[-1], **EXACT)
    # Captures with a skip: h_{l+1} == h_l when block l is removed.
    out = model.run(b, skip=[1], capture=[1, 2])
    torch.testing.assert_close(out.captured[2], out.captured[1], **EXACT)


@pytest.mark.parametrize("layer", range(N_LAYERS + 1))
def test_start_from_cached_stream_reproduces_logits(model, batch, layer):
    b, _ = batch
    full = model.run(b, capture=[layer])
    cached = full.stream.with_h(full.captured[layer])
    torch.testing.assert_close(model.run(stream=cached, start=layer).logits, full.logits, **EXACT)
    if layer < N_LAYERS:  # ablating block l from a cached prefix == ablating it from scratch
        torch.testing.assert_close(
            model.run(stream=cached, start=layer, skip=[layer]).logits, model.run(b, skip=[layer]).logits, **EXACT
        )


@pytest.mark.parametrize("layer", range(N_LAYERS + 1))
def test_stop_is_the_logit_lens(model, batch, layer):
    b, _ = batch
    hs, _ = manual(model, b)
    torch.testing.assert_close(model.run(b, stop=layer).logits, model.readout(hs[layer]), **EXACT)


def test_run_needs_a_batch_or_stream(model):
    with pytest.raises(ValueError, match="needs a batch"):
        model.run()


# ---------------------------------------------------------------------------------------- patching
@pytest.mark.parametrize("layer", [0, 1, N_LAYERS])
def test_patch_changes_only_later_positions(model, batch, layer):
    b, _ = batch
    B = b["tokens"].shape[0]
    pos = torch.full((B,), 4)
    values = torch.randn(B, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    edit = patch_positions(pos, values)
    full = model(b)
    out = model.run(b, edits={layer: edit}, capture=[layer])
    torch.testing.assert_close(out.captured[layer][:, 4], values, **EXACT)  # capture sees the edit
    torch.testing.assert_close(out.logits, manual(model, b, edit=(layer, edit))[1] if layer < N_LAYERS
                               else model.readout(edit(manual(model, b)[0][-1])), **EXACT)
    torch.testing.assert_close(out.logits[:, :4], full[:, :4], **EXACT)  # causality: earlier positions untouched
    assert (out.logits[:, 4] - full[:, 4]).abs().amax(-1).min() > 1e-3  # the patched position changes
    if layer < N_LAYERS:  # later positions read the patched one (when it is attendable)
        attendable = b["attend"][:, 4]
        later = (out.logits[:, 5:] - full[:, 5:]).abs().amax((-1, -2))
        assert (later[attendable] > 1e-4).all()
    else:  # patching the final stream is local to the position
        torch.testing.assert_close(out.logits[:, 5:], full[:, 5:], **EXACT)


def test_patch_does_not_modify_its_input(model, batch):
    b, _ = batch
    h = model.embed(b).h
    before = h.clone()
    patch_positions(torch.zeros(len(h), dtype=torch.long), torch.zeros(len(h), 16, dtype=h.dtype))(h)
    torch.testing.assert_close(h, before, **EXACT)


# ---------------------------------------------------------------------------------------- knockout
def key_mask(b, samples, which: str):
    """[B, T] mask of one key per sample: the queried object's colour or shape position."""
    keys = torch.zeros_like(b["attend"])
    for i, s in enumerate(samples):
        colour_pos, shape_pos = s.object_positions[s.query_object]
        keys[i, colour_pos if which == "colour" else shape_pos] = True
    return keys


@pytest.mark.parametrize("which", ["colour", "shape"])
def test_knockout_equals_unattendable_key(model, batch, which):
    b, samples = batch
    keys = key_mask(b, samples, which)
    knocked = model.run(b, knockout=knockout_keys(b["attend"], keys)).logits
    unattendable = model({**b, "attend": b["attend"] & ~keys})
    torch.testing.assert_close(knocked, unattendable, **EXACT)
    assert not torch.allclose(knocked, model(b), atol=1e-4)


def test_knockout_in_some_layers_only(model, batch):
    b, samples = batch
    ko = knockout_keys(b["attend"], key_mask(b, samples, "colour"))
    stream = model.embed(b)
    h = stream.h
    for layer in range(N_LAYERS):
        state = replace(stream, h=h, knockout=ko if layer == 1 else None)
        h = model.block(layer, state)
    torch.testing.assert_close(model.run(b, knockout=ko, knockout_layers=[1]).logits, model.readout(h), **EXACT)


def test_knockout_from_chosen_queries_only(model, batch):
    b, samples = batch
    B, T = b["attend"].shape
    queries = torch.zeros(B, T, dtype=torch.bool)
    queries[torch.arange(B), b["answer_pos"]] = True
    ko = knockout_keys(b["attend"], key_mask(b, samples, "shape"), queries=queries)
    out = model.run(b, knockout=ko).logits
    full = model(b)
    others = b["attend"] & ~queries  # the other prompt tokens (padding after the query reads it)
    torch.testing.assert_close(out[others], full[others], **EXACT)  # nobody else is affected
    assert (out[queries] - full[queries]).abs().amax(-1).min() > 1e-4


# ------------------------------------------------------------------------------------------ noise
def test_noise_and_padding_tokens_are_not_attendable(batch):
    b, samples = batch
    for i, s in enumerate(samples):
        assert not b["attend"][i, s.noise_positions].any()
        assert not b["attend"][i, len(s.tokens):].any()
        real = [p for p in range(len(s.tokens)) if p not in s.noise_positions]
        assert b["attend"][i, real].all()
        assert int(b["answer_pos"][i]) == s.query_position and int(b["targets"][i]) == s.answer


def test_noise_token_ids_do_not_change_other_positions(model, batch, task):
    b, samples = batch
    noise = ~b["attend"]  # noise and padding
    scrambled = b["tokens"].clone()
    g = torch.Generator().manual_seed(0)
    scrambled[noise] = torch.randint(0, len(task.vocab), (int(noise.sum()),), generator=g)
    assert (scrambled != b["tokens"]).any()
    out, full = model({**b, "tokens": scrambled}), model(b)
    torch.testing.assert_close(out[b["attend"]], full[b["attend"]], **EXACT)
    assert not torch.allclose(out[noise], full[noise])  # the noise positions themselves do change
    # Control: a real context token does change the answer logits.
    changed = b["tokens"].clone()
    for i, s in enumerate(samples):
        changed[i, s.object_positions[0][1]] = task.vocab["shape_0"] if s.shapes[0] else task.vocab["shape_1"]
    assert not torch.allclose(model.answer_logits({**b, "tokens": changed}), model.answer_logits(b), atol=1e-4)


def test_prompt_alone_gives_the_same_answer_logits(model, batch):
    """Padding is invisible: each prompt run alone gives the logits of the padded batch."""
    b, samples = batch
    from lab.data.text import collate_text as collate

    batched = model.answer_logits(b)
    for i, s in enumerate(samples):
        alone = model.answer_logits(collate([s], pad_id=0))
        torch.testing.assert_close(alone[0], batched[i], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------- hand-built models
def zero_blocks(model: Backbone) -> Backbone:
    """Make every block the identity: all attention/MLP writes are zero."""
    with torch.no_grad():
        for block in model.blocks:
            for p in list(block.attn.parameters()) + list(block.mlp.parameters()):
                p.zero_()
    return model


def test_hand_built_skip_changes_the_answer():
    """Every token embeds to e=[1,-1,0,0]; block 1 adds b=[0,0,3,-3] everywhere; token A reads e,
    token B reads b. With block 1 the answer is B; without it (or with only it) we know the logits."""
    model = zero_blocks(Backbone(vocab_size=2, n_layers=3, d_model=4, n_heads=1, d_ff=4, max_len=8,
                                 pos_encoding="none")).double()
    with torch.no_grad():
        model.tok_emb.weight[:] = torch.tensor([1.0, -1.0, 0.0, 0.0])
        model.blocks[1].mlp[2].bias[:] = torch.tensor([0.0, 0.0, 3.0, -3.0])
        model.head.weight[:] = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])
    b = {"tokens": torch.zeros(1, 3, dtype=torch.long), "attend": torch.ones(1, 3, dtype=torch.bool),
         "answer_pos": torch.tensor([2])}
    eps = model.ln_f.eps
    # LayerNorm of [1,-1,3,-3] (mean 0, variance 5) -> head logits A = 2/sqrt(5), B = 6/sqrt(5).
    expect_full = torch.tensor([2.0, 6.0], dtype=torch.float64) / (5 + eps) ** 0.5
    expect_skip = torch.tensor([2.0, 0.0], dtype=torch.float64) / (0.5 + eps) ** 0.5  # LN of [1,-1,0,0]: variance 1/2
    torch.testing.assert_close(model.answer_logits(b)[0], expect_full)
    torch.testing.assert_close(model.answer_logits(b, skip=[1])[0], expect_skip)
    torch.testing.assert_close(model.answer_logits(b, skip=[0, 2])[0], expect_full)  # identity blocks
    assert model.answer_logits(b).argmax(-1).item() == 1 and model.answer_logits(b, skip=[1]).argmax(-1).item() == 0
    # Logit lens: after block 0 the stream still reads A; after block 1 it reads B.
    assert model.run(b, stop=1, positions=b["answer_pos"]).logits.argmax(-1).item() == 0
    assert model.run(b, stop=2, positions=b["answer_pos"]).logits.argmax(-1).item() == 1


def test_hand_built_uniform_attention_and_knockout():
    """One block whose attention is uniform (q = k = 0) and copies values (v = proj = identity):
    h_1[t] = e[t] + mean of LN(e[k]) over attendable keys k <= t (and t itself). Knockout and
    unattendable keys drop out of that mean."""
    D, T = 4, 5
    model = zero_blocks(Backbone(vocab_size=T, n_layers=1, d_model=D, n_heads=1, d_ff=4, max_len=8,
                                 pos_encoding="none")).double()
    emb = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.tok_emb.weight[:] = emb
        model.blocks[0].attn.qkv.weight[2 * D :] = torch.eye(D)  # v = x; q = k = 0
        model.blocks[0].attn.proj.weight[:] = torch.eye(D)
    tokens = torch.arange(T)[None]  # token t at position t
    attend = torch.tensor([[True, True, False, True, True]])
    b = {"tokens": tokens, "attend": attend}
    values = F.layer_norm(emb, (D,), eps=model.blocks[0].ln1.eps)

    def expected(allowed):  # allowed[t][k]: may query t read key k
        rows = [emb[t] + values[[k for k in range(T) if allowed(t, k)]].mean(0) for t in range(T)]
        return torch.stack(rows)[None]

    base = lambda t, k: k == t or (k <= t and bool(attend[0, k]))  # noqa: E731
    h1 = model.run(b, capture=[1]).captured[1]
    torch.testing.assert_close(h1, expected(base))
    # Knock out key 1 for every query: position 1 still reads itself.
    keys = torch.zeros(1, T, dtype=torch.bool)
    keys[0, 1] = True
    h1 = model.run(b, knockout=knockout_keys(attend, keys), capture=[1]).captured[1]
    torch.testing.assert_close(h1, expected(lambda t, k: base(t, k) and (k != 1 or t == 1)))
    # Knock out key 0 only from the last query.
    keys = torch.zeros(1, T, dtype=torch.bool)
    keys[0, 0] = True
    queries = torch.zeros(1, T, dtype=torch.bool)
    queries[0, T - 1] = True
    h1 = model.run(b, knockout=knockout_keys(attend, keys, queries), capture=[1]).captured[1]
    torch.testing.assert_close(h1, expected(lambda t, k: base(t, k) and not (t == T - 1 and k == 0)))
