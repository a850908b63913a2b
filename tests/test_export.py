"""export.py: a run becomes a Hugging Face GPT-NeoX folder with the lab's logits (<= 1e-5 on every
real token of the run's evaluation prompts, noise and padding included), what GPT-NeoX cannot
express is refused with one line, and the folder evaluates like the run through model=hf."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from conftest import compose_cfg, error_lines, run_script
from lab_runs import copy_run, make_run
from lab.build import load_trained
from lab.cli import user_errors_exit
from lab.eval.run import evaluate_run
from lab.export.folder import INFO_FILE, export_run
from lab.export.gpt_neox import ExportError, exportable_backbone, hf_inputs, rope_permutation, to_hf_model
from lab.export.verify import evaluation_batches
from lab.models.backbone import apply_rope, rope_cache
from lab.models.hf import HFModel

NOISY = ["model.init=torch", "task.noise_tokens=[1,3]"]  # large random weights, noise tokens in the prompts


def load_folder(folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def real_token_diff(lab, hf, batches) -> float:
    return max(float((lab(b)[b.attend] - hf(**hf_inputs(b)).logits[b.attend]).abs().max()) for b in batches)


@pytest.fixture(scope="module")
def noisy_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root / "run", *NOISY)
    return run, export_run(run, root / "hf")


# ------------------------------------------------------------------------------ the conversion
def test_rope_permutation_turns_interleaved_pairs_into_halves():
    """The lab rotates (2i, 2i+1), GPT-NeoX (i, i + d/2): permuted vectors rotate into permuted
    vectors, so query-key products are unchanged."""
    hd, T = 8, 6
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, T, hd, generator=g)
    cos, sin = rope_cache(torch.arange(T)[None], hd)
    lab_q, lab_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    perm = rope_permutation(hd)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    angles = torch.arange(T)[None, :, None].float() / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([angles, angles], -1)
    neox_q, neox_k = apply_rotary_pos_emb(q[..., perm], k[..., perm], emb.cos(), emb.sin())
    torch.testing.assert_close(neox_q, lab_q[..., perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(neox_q @ neox_k.transpose(-1, -2), lab_q @ lab_k.transpose(-1, -2), atol=1e-5, rtol=0)


def test_export_folder_loads_in_plain_transformers(noisy_export):
    run, folder = noisy_export
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json", INFO_FILE}
    hf, tokenizer = load_folder(folder)
    c = hf.config
    assert type(hf).__name__ == "GPTNeoXForCausalLM" and c.model_type == "gpt_neox"
    assert (c.use_parallel_residual, c.hidden_act, c.tie_word_embeddings, c.attention_bias) == (False, "gelu", False, True)
    assert c.rope_parameters["partial_rotary_factor"] == 1.0 and c.layer_norm_eps == 1e-5

    _, task, lab, _ = load_trained(run, "last")
    batches = evaluation_batches(task)
    noise = [b for b in batches if b.role_mask("noise").any()]
    padded = [b for b in batches if (~b.attend[:, -1]).any()]
    assert noise and padded  # the comparison covers noise tokens and padding
    assert real_token_diff(lab, hf, batches) <= 1e-5

    # The tokenizer spells the lab's tokens with the lab's ids.
    for sample in task.eval_set("id", noise=True)[:8]:
        text = " ".join(task.vocab.decode(sample.tokens))
        assert tokenizer(text)["input_ids"] == list(sample.tokens)
    assert tokenizer.convert_ids_to_tokens(list(range(len(task.vocab)))) == list(task.vocab.tokens)
    assert tokenizer.pad_token_id == task.vocab.pad_id

    info = json.loads((folder / INFO_FILE).read_text())
    assert info["run"] == str(run.resolve()) and info["checkpoint"] == "last" and info["task"] == "retrieval"
    assert info["vocab"] == list(task.vocab.tokens)
    assert info["check"]["max_abs_logit_diff"] <= 1e-5 and info["check"]["prompts"] == 4 * task.eval_size


@pytest.mark.parametrize("overrides, edit", [
    (["model.pos_encoding=none"], None),
    (["adapter=lora"], lambda m: [p.normal_(0, 0.05) for n, p in m.named_parameters() if n.endswith("lora_b")]),
    (["model.token_shift=true"], lambda m: m.shift_scale.fill_(0.0)),  # a shift faded out to 0 adds nothing
], ids=["no_positions", "lora_merged", "faded_token_shift"])
def test_other_exportable_runs_are_exact(tmp_path, overrides, edit):
    run = make_run(tmp_path / "run", *NOISY, *overrides, edit=edit)
    folder = export_run(run, tmp_path / "hf")
    _, task, lab, _ = load_trained(run, "last")
    hf, _ = load_folder(folder)
    assert real_token_diff(lab, hf, evaluation_batches(task)) <= 1e-5
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["lora_merged"] == ("adapter=lora" in overrides)
    if "adapter=lora" in overrides:  # the adapters changed the model, and the export carries them
        plain = exportable_backbone(lab).blocks[0].attn.qkv.weight
        assert not torch.equal(plain, lab.blocks[0].attn.qkv.weight)


# --------------------------------------------------------------------------------- refusals
REFUSED = [
    (["model.token_shift=true"], "recipe=plain"),
    (["model.token_shift=associations"], "recipe=plain"),
    (["model.pos_encoding=learned"], "model.pos_encoding=rope"),
]


@pytest.mark.parametrize("overrides, advice", REFUSED, ids=["token_shift", "token_shift_associations", "learned_positions"])
def test_inexpressible_models_are_refused_and_nothing_is_written(tmp_path, capsys, overrides, advice):
    run = make_run(tmp_path / "run", *overrides)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(export_run)(run, out)
    assert exit_info.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and advice in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_output_folder_is_not_overwritten(noisy_export, tmp_path):
    run, _ = noisy_export
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_run(run, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert export_run(run, out) == out  # an empty folder is fine


def test_export_that_misses_the_tolerance_writes_nothing(noisy_export, tmp_path):
    run, folder = noisy_export
    check = json.loads((folder / INFO_FILE).read_text())["check"]
    assert 0 < check["lab_float32_error"] < 1e-4  # the scale float32 itself rounds at, recorded beside the check
    with pytest.raises(ExportError, match="differ from the lab's by .* float32 rounding error"):
        export_run(run, tmp_path / "hf", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_image_model_is_refused_unless_its_language_model_alone_is_asked_for():
    from lab.models.backbone import Backbone
    from lab.models.visual import Projector, VisionTextModel, VisualEncoder
    from tasks.vocab import IMG, SPECIAL_TOKENS

    torch.manual_seed(0)
    backbone = Backbone(vocab_size=30, n_layers=2, d_model=32, n_heads=2, d_ff=64, init="torch").eval()
    enc = VisualEncoder("resnet18", 2, 32)
    model = VisionTextModel(backbone, enc, Projector(enc.dim, 32, "mlp"), SPECIAL_TOKENS.index(IMG)).eval()
    with pytest.raises(ExportError, match="image run.*text_only=true"):
        exportable_backbone(model)
    hf = to_hf_model(model, text_only=True)
    tokens = torch.randint(6, 30, (3, 10))
    attend = torch.ones_like(tokens, dtype=torch.bool)
    attend[1, 7:] = False
    batch = {"tokens": tokens, "attend": attend}
    with torch.no_grad():
        diff = (model(batch)[attend] - hf(**hf_inputs(batch)).logits[attend]).abs().max()
    assert diff <= 1e-5


# ------------------------------------------------------------------------------ entry point
@pytest.mark.slow  # the fast suite stays short; `pytest --all` (CI) runs it
def test_export_cli(noisy_export, tmp_path):
    run, _ = noisy_export
    out = tmp_path / "hf"
    done = run_script("export.py", f"run={run}", f"out={out}")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file()
    again = run_script("export.py", f"run={run}", f"out={out}")
    lines = error_lines(again.stderr)
    assert again.returncode == 2 and len(lines) == 1 and "already exists" in lines[0], again.stderr


# ------------------------------------------------------------------------------- round trip
def test_hf_adapter_reads_the_export_like_the_run(noisy_export):
    """lab.models.hf builds the lab's own mask, so even padding and noise rows agree."""
    run, folder = noisy_export
    _, task, lab, _ = load_trained(run, "last")
    adapter = HFModel.from_path(folder)
    assert adapter.tokenizer is not None and adapter.vocab_size == len(task.vocab)
    with torch.no_grad():
        for batch in evaluation_batches(task):
            full = list(range(lab.n_layers + 1))
            a, b = lab.run(batch, capture=full), adapter.run(batch, capture=full)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
            for layer in full:
                torch.testing.assert_close(a.captured[layer], b.captured[layer], atol=1e-5, rtol=0)


EVALUATORS = ["evaluators=[accuracy,layer_relevance,interventions]", "evaluators.layer_relevance.n_boot=20",
              "evaluators.layer_relevance.plots=false", "evaluators.interventions.n_pairs=64",
              "evaluators.interventions.only_correct=false",  # every pair's outcome is compared, solved or not
              "evaluators.interventions.plots=false"]


def assert_same(a, b, path="results"):
    """Equal structure; numbers equal up to float32 noise (1e-4), NaNs in the same places."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-4), path
    else:
        assert a == b, path


def test_evaluate_round_trip_matches_the_run(tiny_run, tmp_path):
    """``python evaluate.py model=hf model.path=<export> <task overrides>`` (the command the export
    records) gives the run's accuracy, layer relevance and intervention results."""
    run = copy_run(tiny_run.dir, tmp_path / "run")
    folder = export_run(run, tmp_path / "hf")
    command = json.loads((folder / INFO_FILE).read_text())["evaluate"].split()
    assert command[:3] == ["python", "evaluate.py", "model=hf"]
    ours = evaluate_run(compose_cfg("evaluate", [f"run={run}", *EVALUATORS]))
    theirs = evaluate_run(compose_cfg("evaluate", [*command[2:], f"out_dir={tmp_path / 'hf_eval'}", *EVALUATORS]))
    for name in ("accuracy", "layer_relevance", "interventions"):
        ours_json = json.loads((run / "eval" / f"{name}.json").read_text())
        theirs_json = json.loads((tmp_path / "hf_eval" / f"{name}.json").read_text())
        ours_json.pop("info"), theirs_json.pop("info")
        assert_same(ours_json, theirs_json, name)
    assert ours["accuracy"] == theirs["accuracy"]
    assert all(split["n_used"] == 64 for split in theirs["interventions"]["results"].values())
