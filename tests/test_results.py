"""aggregate.py: runs grouped by regime, encoder and training aids; mean, CI, Welch test, figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from conftest import tiny_cfg
from lab.errors import LabError
from lab.results import aggregate, compare, find_runs, main, run_record, training_aids


def fake_run(root, name, regime, seed, ood, aids=()):
    cfg = tiny_cfg(f"experiment={regime}", f"seed={seed}", "recipe=plain", *aids)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    metrics = {"step": 100, "val/text_id_acc": 1.0, "val/text_ood_acc": ood, "val_n/text_ood_n04": ood + 0.1,
               "val_n/text_ood_n05": ood - 0.1}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_groups_means_intervals_and_welch_test(tmp_path):
    a = [0.5, 0.6, 0.7]
    b = [0.2, 0.25, 0.3]
    for seed, (x, y) in enumerate(zip(a, b)):
        fake_run(tmp_path, f"t{seed}", "text_only", seed, x)
        fake_run(tmp_path, f"n{seed}", "noise_text", seed, y)
    fake_run(tmp_path, "aided", "text_only", 0, 0.9, aids=("model.token_shift=true", "task.train_queries=4"))
    records = [run_record(r) for r in find_runs([str(tmp_path)])]
    rows = {(r["regime"], r["aids"]): r for r in aggregate(records)}
    assert set(rows) == {("text_only", "none"), ("noise_text", "none"), ("text_only", "shift+q4")}
    mean, std, half = rows[("text_only", "none")]["val/text_ood_acc"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    plain = [r for r in records if r["aids"] == "none"]
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert f"{p:.3g}" in compare(plain, "text_only", "noise_text")
    out, figure = tmp_path / "t.md", tmp_path / "f.png"
    main([str(tmp_path), "--out", str(out), "--figure", str(figure), "--compare", "text_only@none:noise_text"])
    assert "shift+q4" in out.read_text() and figure.stat().st_size > 1000
    assert "**text_only@none vs noise_text**" in out.read_text()


def test_compare_refuses_to_pool_groups_of_different_aids_or_encoders(tmp_path):
    for seed in range(2):
        fake_run(tmp_path, f"t{seed}", "text_only", seed, 0.5)
        fake_run(tmp_path, f"a{seed}", "text_only", seed, 0.9, aids=("model.token_shift=true",))
        fake_run(tmp_path, f"n{seed}", "noise_text", seed, 0.3)
    records = [run_record(r) for r in find_runs([str(tmp_path)])]
    with pytest.raises(LabError, match=r"'text_only' matches runs of several .* name one of: text_only@none, text_only@shift"):
        compare(records, "text_only", "noise_text")
    with pytest.raises(LabError, match="no runs of 'image_text'"):
        compare(records, "image_text", "noise_text")
    assert "| val/text_ood_acc | +60.0 |" in compare(records, "text_only@shift", "noise_text")


def test_training_aids_are_named_from_the_config():
    assert training_aids(tiny_cfg("recipe=plain")) == "none"
    assert training_aids(tiny_cfg("recipe=fast")) == "shift+mid@middle~anneal+q4"
    assert training_aids(tiny_cfg("recipe=fast", "objective.intermediate.layer=1", "objective.intermediate.anneal=null")) == "shift+mid@1+q4"
    assert training_aids(tiny_cfg("model.token_shift=true")) == "shift"
    assert training_aids(tiny_cfg("recipe=fast_image", "modality=image")) == "shift+midx0.3@middle+q4+1hop4"
    assert training_aids(tiny_cfg("recipe=free_binding")) == "init=scaled+assocshift+mid@middle+q4"
    assert training_aids(tiny_cfg("recipe=positional_control")) == "init=torch+assocshift+learnedpos+slot@middle+q4"
    assert training_aids(tiny_cfg("model.token_shift=true", "train.shift_fade=[10,20]")) == "shift~fade"


def test_relevance_table_reads_the_evaluator_outputs(tmp_path):
    from lab.eval.relevance_table import pruning_markdown

    (tmp_path / "eval").mkdir()
    rows = ["modality,operator,criterion,mode,calibration_split,eval_split,n_removed,removed_block,accuracy,loss,chance",
            "text,skip,accuracy,iterative,id,id,0,,1.0,0.1,0.25", "text,skip,accuracy,iterative,id,id,1,2,0.9,0.2,0.25",
            "text,skip,accuracy,iterative,id,id,2,0,0.5,0.9,0.25", "text,skip,accuracy,iterative,id,id,3,1,0.3,1.2,0.25"]
    rows += [r.replace("text,", "image,").replace(",0.9,", ",0.7,") for r in rows[1:]]  # a second stream, kept apart
    (tmp_path / "eval" / "pruning.csv").write_text("\n".join(rows) + "\n")
    table = pruning_markdown(str(tmp_path))
    assert "| text | accuracy | iterative | id | 1.000 / 0.900 / 0.500 | ['2', '0', '1'] |" in table
    assert "| image | accuracy | iterative | id | 1.000 / 0.700 / 0.500 | ['2', '0', '1'] |" in table


def test_relevance_table_writes_undefined_correlations_as_na(tmp_path):
    """A stream at chance has constant relevance: its correlations (and p-values) are None."""
    from lab.eval.relevance_table import relevance_markdown

    undefined = {"r": None, "p": None, "ci_low": None, "ci_high": None}
    result = {"full": {"accuracy": 0.25}, "chance": 0.25, "n_calibration": 8,
              "operators": {"skip": {"correlations": {"cosine_all": {"vs_relevance": {
                  "pearson": undefined, "spearman": undefined, "kendall": undefined}}},
                  "accuracy_without": [0.25, 0.25], "loss_increase": [0.0, 0.0]}},
              "similarity": {"cosine_all": [0.1, 0.2]}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "layer_relevance.json").write_text(json.dumps({"results": {"text": {"id": result}}}))
    assert "| skip | cosine_all | relevance | n/a [n/a, n/a] (n/a) | n/a (n/a) | n/a (n/a) | - |" in relevance_markdown(str(tmp_path))


def test_the_phase_table_reads_each_phase_and_its_checkpoints_binding(tmp_path):
    from lab.results import phase_table

    run = fake_run(tmp_path, "it", "image_text", 0, 0.9)
    phases = [{"phase": 0, "name": "text", "start": 0, "end": 100, "reason": "saturated", "val/text_id_acc": 0.99,
               "val/text_ood_acc": 0.95, "val/image_id_acc": 0.2, "val/image_ood_acc": 0.1},
              {"phase": 1, "name": "image", "start": 100, "end": 300, "reason": "budget", "val/text_id_acc": 1.0,
               "val/text_ood_acc": 0.97, "val/image_id_acc": 0.96, "val/image_ood_acc": 0.8}]
    (run / "phases.json").write_text(json.dumps(phases))

    def interventions(folder, first, symbolic):
        layer = {"rates": {"symbolic": symbolic}, "ci": {"symbolic": [symbolic - 0.1, symbolic]}}
        site = {"first_causal_layer": first, "layers": [layer] * 3}
        folder.mkdir()
        (folder / "interventions.json").write_text(json.dumps({"results": {s: {"sites": {"final": site}} for s in ("id", "ood")}}))

    interventions(run / "eval_phase0_text", 1, 0.25)   # the text phase's checkpoint
    interventions(run / "eval", 2, 1.0)                # the last phase: the run's own evaluation
    table = phase_table([run_record(run)])
    lines = [l for l in table.splitlines() if l.startswith("| image_text")]
    assert lines[0].split(" | ")[2:6] == ["text", "0-100", "saturated", "0.990"]
    assert lines[0].endswith("| L1 0.25 [0.15, 0.25] | L1 0.25 [0.15, 0.25] |")
    assert lines[1].split(" | ")[2:5] == ["image", "100-300", "budget"] and "L2 1.00 [0.90, 1.00]" in lines[1]


def test_groups_without_spread_get_no_t_test(tmp_path):
    """Seeds that all score the same (a ceiling) give Welch's t = -inf and p = 0: not a finding."""
    for seed in range(2):
        fake_run(tmp_path, f"a{seed}", "image_text", seed, 0.996)
        fake_run(tmp_path, f"b{seed}", "text_control", seed, 0.998)
    records = [run_record(r) for r in find_runs([str(tmp_path)])]
    line = next(l for l in compare(records, "image_text", "text_control").splitlines() if "text_ood" in l)
    assert line == "| val/text_ood_acc | -0.2 | - | - (no spread over seeds) | 2 / 2 |"
