"""The recorded sample runs: small, complete, each showing the behaviour its name promises."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gradscope.analysis import analyze
from gradscope.analysis.gate import find_non_finite
from gradscope.rundir import load_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_runs"))
import record  # noqa: E402  (sample_runs/record.py: the one command that re-records them)

from gsutil import gradscope  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "sample_runs"


def test_at_least_five_sample_runs_each_small_with_its_script():
    assert len(record.RUNS) >= 5
    for name, (script, _, _) in record.RUNS.items():
        d = SAMPLES / name
        assert (SAMPLES / "scripts" / script).is_file()
        size = sum(f.stat().st_size for f in d.iterdir())
        assert size <= 1_000_000, f"{name} is {size} bytes"
        meta = json.loads((d / "meta.json").read_text())
        assert meta["status"] == "completed" and meta["target"] == "script"
        assert meta["command"][-1 - len(record.RUNS[name][1])].endswith(script)
        assert not (d / "gradscope.png").exists()  # plots are not part of the sample


def test_healthy_transformer_clips_a_few_outliers():
    main = analyze(load_run(SAMPLES / "healthy_transformer")).main
    assert main.regime == "healthy"
    assert 0.01 <= main.clip_fraction <= 0.20
    assert find_non_finite(load_run(SAMPLES / "healthy_transformer")) is None


def test_lstm_without_clipping_diverges_to_nan():
    run = load_run(SAMPLES / "lstm_nan")
    nf = find_non_finite(run)
    assert nf is not None and nf.step == run.steps["step"].max()
    assert run.steps["clip_max_norm"].isna().all()


@pytest.mark.parametrize("name,regime", [("lstm_never_clips", "never-clips"), ("lstm_always_clips", "always-clips")])
def test_lstm_thresholds_land_in_their_regimes(name, regime):
    run = load_run(SAMPLES / name)
    assert analyze(run).main.regime == regime
    assert find_non_finite(run) is None


def test_amp_run_has_skipped_overflow_steps_at_the_start():
    steps = load_run(SAMPLES / "amp_fp16_skipped").steps
    assert steps["skipped"].iloc[:10].all() and 10 <= steps["skipped"].sum() <= 60
    assert steps["loss_scale"].iloc[0] == 2.0**40
    assert find_non_finite(load_run(SAMPLES / "amp_fp16_skipped")) is None


@pytest.mark.slow
def test_rerecording_the_nan_run_diverges_at_the_same_step(tmp_path):
    script, args, stride = record.RUNS["lstm_nan"]
    out = tmp_path / "lstm_nan"
    r = gradscope("run", "--quiet", "--layer-stride", str(stride), "--out", out,
                  SAMPLES / "scripts" / script, *args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert find_non_finite(load_run(out)).step == find_non_finite(load_run(SAMPLES / "lstm_nan")).step
