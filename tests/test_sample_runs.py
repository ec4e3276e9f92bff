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
    assert nf is not None
    after = run.steps[run.steps["step"] >= nf.step]
    assert len(after) <= 3 and after["grad_norm"].isna().all()  # it ends there, non-finite to the last step
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


TINY = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
for _ in range(3):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
"""


def _keys(d: Path) -> dict:
    meta = json.loads((d / "meta.json").read_text())
    proc = json.loads((d / "process-r0.json").read_text())
    return {
        "meta.json": set(meta),
        "process-r0.json": set(proc),
        "process-r0.json optimizers[]": set().union(*(set(o) for o in proc["optimizers"])),
        "steps-r0.csv header": set((d / "steps-r0.csv").read_text().splitlines()[0].split(",")),
    }


def test_every_sample_carries_every_field_a_fresh_recording_writes(tmp_path):
    """Samples recorded by an older gradscope lack fields the analysis reads (a process file without
    `momentum` made lstm_nan's recommendation 10x too large): compare each with a recording made now."""
    (tmp_path / "tiny.py").write_text(TINY)
    r = gradscope("run", "--quiet", "--layer-stride", "1", "--out", tmp_path / "fresh", tmp_path / "tiny.py")
    assert r.returncode == 0, r.stderr
    fresh = _keys(tmp_path / "fresh")
    assert "momentum" in fresh["process-r0.json optimizers[]"]  # the field whose absence started this test
    for name in record.RUNS:
        have = _keys(SAMPLES / name)
        for what, keys in fresh.items():
            missing = keys - have[what]
            assert not missing, f"sample_runs/{name} {what} lacks {sorted(missing)}: run python sample_runs/record.py"
