"""The interop extra: a lab model as a TransformerLens HookedTransformer (the lab's logits, noise
and padding included) and under nnsight, and an interchange intervention done in TransformerLens
that agrees pair for pair with the lab's interventions evaluator. Skipped without the extra
(``pip install -e '.[interop]'``)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")

from lab_runs import make_run  # noqa: E402
from lab.build import load_trained  # noqa: E402
from lab.data.datamodule import TextDataModule  # noqa: E402
from lab.eval.interventions import SITES, intervention_outcomes, site_mask  # noqa: E402
from lab.export.folder import export_run  # noqa: E402
from lab.export.gpt_neox import hf_inputs  # noqa: E402
from lab.export.interop import lab_attention_hooks, resid_hook_name, to_hooked_transformer, to_nnsight  # noqa: E402
from lab.export.verify import evaluation_batches  # noqa: E402
from lab.models.interface import patch_positions  # noqa: E402
from tasks.retrieval import HYPOTHESES  # noqa: E402

NOISY = ["model.init=torch", "task.noise_tokens=[1,3]"]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    run = make_run(root / "run", *NOISY)
    _, task, model, _ = load_trained(run, "last")
    return run, export_run(run, root / "hf"), task, model


@torch.no_grad()
def hooked_logits_diff(ht, model, batches) -> float:
    """Max |lab - TransformerLens| logits over every position, padding and noise rows included."""
    return max(float((model(b) - ht.run_with_hooks(b.tokens, fwd_hooks=lab_attention_hooks(b.attend))).abs().max())
               for b in batches)


@pytest.mark.parametrize("source", ["run", "folder", "model"])
def test_hooked_transformer_has_the_lab_logits(noisy, source):
    run, folder, task, model = noisy
    ht = to_hooked_transformer({"run": run, "folder": folder, "model": model}[source])
    batches = evaluation_batches(task)
    assert any(b.role_mask("noise").any() for b in batches)
    assert hooked_logits_diff(ht, model, batches) <= 1e-4
    # h_l in TransformerLens's cache is the lab's h_l.
    batch = batches[0]
    with ht.hooks(fwd_hooks=lab_attention_hooks(batch.attend)), torch.no_grad():
        _, cache = ht.run_with_cache(batch.tokens)
    lab = model.run(batch, capture=range(model.n_layers + 1)).captured
    for layer in range(model.n_layers + 1):
        torch.testing.assert_close(cache[resid_hook_name(layer, model.n_layers)], lab[layer], atol=1e-4, rtol=0)


def test_hooked_transformer_without_positions(tmp_path):
    run = make_run(tmp_path / "run", *NOISY, "model.pos_encoding=none")
    _, task, model, _ = load_trained(run, "last")
    assert hooked_logits_diff(to_hooked_transformer(run), model, evaluation_batches(task)) <= 1e-4


@torch.no_grad()
def test_interchange_intervention_in_transformer_lens_agrees_with_the_lab(tiny_run):
    """Patch the counterfactual's h_l into the base prompt at each site, in TransformerLens: the
    answers fall in the same outcome as the lab's interventions evaluator gives, pair by pair."""
    _, task, model, _ = load_trained(tiny_run.dir, "last")
    specs, base, counter = TextDataModule(task).pairs("id", 64, seed=0)
    predictions = torch.tensor([[p.predictions[h] for h in HYPOTHESES] for p in specs])
    lab = intervention_outcomes(model, base, counter, predictions, SITES)
    assert len(torch.cat([lab[site].flatten() for site in SITES]).unique()) > 1  # patches change answers

    ht = to_hooked_transformer(tiny_run.dir)
    L = ht.cfg.n_layers
    with ht.hooks(fwd_hooks=lab_attention_hooks(counter.attend)):
        _, counter_cache = ht.run_with_cache(counter.tokens)
    rows = torch.arange(len(base))
    for site in SITES:
        mask = site_mask(base, site)[..., None]
        for layer in range(L + 1):
            name = resid_hook_name(layer, L)

            def patch(h, hook, name=name):
                return torch.where(mask, counter_cache[name], h)

            logits = ht.run_with_hooks(base.tokens, fwd_hooks=[*lab_attention_hooks(base.attend), (name, patch)])
            answer = logits[rows, base.answer_pos].argmax(-1)
            match = answer[:, None] == predictions
            outcome = torch.where(match.any(1), match.float().argmax(1), len(HYPOTHESES))
            assert torch.equal(outcome, lab[site][layer]), (site, layer)


@torch.no_grad()
def test_nnsight_reads_and_patches_the_lab_model(noisy):
    _, folder, task, model = noisy
    base, counter = evaluation_batches(task)[:2]
    n = min(len(base), len(counter))
    base, counter = base.rows(torch.arange(n)), counter.rows(torch.arange(n))
    rows, pos = torch.arange(n), base.answer_pos
    lab = model.run(base, capture=[1])
    source = model.run(counter, capture=[1]).captured[1][rows, counter.answer_pos]

    wrapped = to_nnsight(model)
    with wrapped.trace(base):
        h1 = wrapped.blocks[0].output.save()   # block 0's output is h_1
        logits = wrapped.output.save()
    torch.testing.assert_close(h1, lab.captured[1], atol=0, rtol=0)
    torch.testing.assert_close(logits, model(base), atol=0, rtol=0)

    with wrapped.trace(base):
        wrapped.blocks[0].output[rows, pos] = source
        patched = wrapped.output.save()
    expected = model.run(base, edits={1: patch_positions(pos, source)}).logits
    torch.testing.assert_close(patched, expected, atol=1e-6, rtol=0)

    on_hf = to_nnsight(folder)
    with on_hf.trace(**hf_inputs(base)):
        out = on_hf.output.save()
    real = base.attend
    assert float((out.logits[real] - model(base)[real]).abs().max()) <= 1e-5
