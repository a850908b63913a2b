"""Hydra multirun puts every job in its own run directory."""
from __future__ import annotations

import pytest
from conftest import TINY, run_script
from omegaconf import OmegaConf


@pytest.mark.slow
def test_multirun_gives_each_seed_its_own_run_directory(tmp_path):
    overrides = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=10"]
    result = run_script(
        "train.py", "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}", *overrides, timeout=400
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.rglob("config.yaml"))
    assert [p.name.split("_")[0] for p in runs] == ["0", "1"]
    assert all(len(p.name) <= 96 + 12 for p in runs)  # long override lists are shortened
    assert [OmegaConf.load(p / "config.yaml").seed for p in runs] == [0, 1]
    for run in runs:
        assert (run / "last.ckpt").is_file() and (run / "metrics.json").is_file()
