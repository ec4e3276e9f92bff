"""The loss gate (`check --fail-on divergence`) and the curves `check` prints into a CI log."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from gradscope.analysis.divergence import FACTOR, SMOOTH, STEPS, series_divergence
from gradscope.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"
HEALTHY = ["healthy_transformer", "transformer_noisy", "amp_fp16_skipped", "lstm_never_clips", "lstm_always_clips"]


def check(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["check", *map(str, args)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def by_hand(losses: list[float], k: float = FACTOR, m: int = STEPS, w: int = SMOOTH):
    """The documented rule, written out plainly: (start index, minimum index) or None."""
    smooth, best, _best_at, streak = [], math.inf, None, 0
    for i in range(len(losses)):
        window = [x if math.isfinite(x) else math.inf for x in losses[max(0, i - w + 1): i + 1]]
        s = statistics.median(window)
        smooth.append(s)
        if s < best:
            best, _best_at = s, i
        streak = streak + 1 if s > k * best else 0
        if streak == m:
            start = i - m + 1
            return start, smooth.index(min(smooth[: start + 1]))
    return None


def steps_csv(name: str) -> list[dict]:
    with open(SAMPLES / name / "steps-r0.csv") as f:
        return list(csv.DictReader(f))


def test_rule_on_hand_made_series():
    step = np.arange(60)
    flat = np.full(60, 1.0)
    assert series_divergence(step, flat) is None
    up = flat.copy()
    up[30:] = 3.0  # tripled from step 30 on, for 30 steps
    start, confirmed, loss, minimum, at = series_divergence(step, up)
    # the median of 5 crosses 2x at the third high step (32) and stays: confirmed 20 steps later
    assert (start, confirmed, loss, minimum, at) == (32, 51, 3.0, 1.0, 0)
    short = flat.copy()
    short[30:30 + 19] = 3.0  # 19 high steps: the median is high for 19 steps too (shifted by 2) -> passes
    assert series_divergence(step, short) is None
    assert by_hand(list(short)) is None
    spiky = flat.copy()
    spiky[::3] = 50.0  # one step in three 50x: the median of 5 never moves
    assert series_divergence(step, spiky) is None
    blown = flat.copy()
    blown[35:] = np.inf  # a non-finite loss counts as above anything
    assert series_divergence(step, blown)[0] == 37


def test_real_diverging_run_fails_where_the_rule_by_hand_says(capsys):
    rows = steps_csv("lstm_diverged")
    losses = [float(r["loss"]) for r in rows]
    start, min_at = by_hand(losses)
    code, out, _ = check(capsys, SAMPLES / "lstm_diverged", "--fail-on", "divergence")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL divergence"))
    assert f"loss diverged at step {rows[start]['step']}:" in line
    assert f"(step {rows[min_at]['step']})" in line
    assert "FAILED (divergence)" in out
    # without the rule it passes: its losses are finite
    assert check(capsys, SAMPLES / "lstm_diverged")[0] == 0


@pytest.mark.parametrize("name", HEALTHY)
def test_no_false_alarm_on_healthy_noisy_and_gradscaler_runs(capsys, name):
    code, out, _ = check(capsys, SAMPLES / name, "--fail-on", "divergence")
    assert code == 0, out
    assert "PASS divergence" in out
    assert by_hand([float(r["loss"]) for r in steps_csv(name)]) is None


def test_noisy_sample_is_really_noisy():
    """transformer_noisy earns its place: its per-step loss jumps far more than the healthy run's, and on
    more than ten steps it is above twice its running minimum: a rule without the streak would fire."""
    def losses(name):
        return np.array([float(r["loss"]) for r in steps_csv(name)])

    def jitter(name):
        return float(np.median(np.abs(np.diff(np.log(losses(name))))))

    assert jitter("transformer_noisy") > 1.5 * jitter("healthy_transformer")
    x = losses("transformer_noisy")
    assert int(np.sum(x > 2 * np.minimum.accumulate(x))) >= 10


def test_factor_and_steps_from_flags_and_config(capsys, tmp_path):
    code, out, _ = check(capsys, SAMPLES / "lstm_diverged", "--fail-on", "divergence", "--divergence-factor", "20")
    assert code == 0 and "never stayed above 20x" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fail-on: [divergence]\ndivergence-factor: 1.5\ndivergence-steps: 3\n")
    code, out, _ = check(capsys, SAMPLES / "lstm_nan", "--config", cfg)
    losses = [float(r["loss"]) for r in steps_csv("lstm_nan")]
    expected = by_hand(losses, k=1.5, m=3)
    assert expected is not None and code == 1
    assert f"loss diverged at step {expected[0]}:" in out
    for bad in ("divergence-factor: 1\n", "divergence-steps: 0\n", "divergence-factor: high\n"):
        cfg.write_text(bad)
        code, _, err = check(capsys, SAMPLES / "healthy_transformer", "--config", cfg)
        assert code == 2 and err.startswith("gradscope: error: ") and "divergence" in err
    code, _, err = check(capsys, SAMPLES / "healthy_transformer", "--divergence-steps", "0")
    assert code == 2 and "divergence-steps" in err


def test_foreign_log_counts_logged_steps_and_skips_gaps(capsys, tmp_path):
    """A Hugging Face log: window-averaged losses every 10 steps; eval rows have no loss (gaps)."""
    hist = []
    for i in range(60):
        step = 10 * (i + 1)
        loss = 2.0 - i * 0.03 if i < 30 else 4.0  # down to ~1.1, then doubled and stuck
        hist.append({"step": step, "loss": loss, "grad_norm": 1.0, "learning_rate": 1e-4})
        hist.append({"step": step, "eval_loss": 9.9})
    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"global_step": 600, "max_steps": 600, "logging_steps": 10, "log_history": hist}))
    code, out, _ = check(capsys, tmp_path / "trainer_state.json", "--fail-on", "divergence")
    start, _ = by_hand([h["loss"] for h in hist if "loss" in h])
    assert code == 1 and f"loss diverged at step {10 * (start + 1)}:" in out


def test_losses_that_are_not_positive_are_not_judged(capsys, tmp_path):
    from test_check import write_run

    rows = [(s, 1.0, -1.0 - s / 10, False) for s in range(40)]
    code, out, _ = check(capsys, write_run(tmp_path / "r", rows), "--fail-on", "divergence")
    assert code == 0 and "SKIP divergence" in out and "not all positive" in out


# ---------------------------------------------------------------- the curve in the CI log


def _bin_of(i: int, n: int, width: int) -> int:
    edges = np.linspace(0, n, width + 1).astype(int)
    return int(np.searchsorted(edges, i, side="right") - 1)


def test_check_prints_sparklines_with_the_first_bad_step_marked(capsys):
    code, out, _ = check(capsys, SAMPLES / "lstm_diverged", "--fail-on", "divergence")
    lines = out.splitlines()
    g = next(x for x in lines if x.startswith("grad_norm "))
    loss = next(x for x in lines if x.startswith("loss "))
    spark = g.split()[1]
    rows = steps_csv("lstm_diverged")
    start, _ = by_hand([float(r["loss"]) for r in rows])
    assert len(spark) == min(60, len(rows))
    assert spark.index("✗") == _bin_of(start, len(rows), len(spark)) and spark.count("✗") == 1
    assert loss.split()[1].index("✗") == spark.index("✗")
    assert f"✗ step {rows[start]['step']}: loss diverging" in g
    # the last line is still the outcome
    assert lines[-1].endswith("FAILED (divergence)")


def test_sparkline_of_a_clean_run_has_no_mark_and_the_nan_run_marks_its_last_step(capsys):
    _, out, _ = check(capsys, SAMPLES / "healthy_transformer")
    g = next(x for x in out.splitlines() if x.startswith("grad_norm "))
    assert "✗" not in g and "steps 0-299, log scale" in g
    gs = [float(r["grad_norm"]) for r in steps_csv("healthy_transformer")]
    assert f"log scale {min(gs):.3g}-{max(gs):.3g}" in g
    _, out, _ = check(capsys, SAMPLES / "lstm_nan")
    g = next(x for x in out.splitlines() if x.startswith("grad_norm "))
    rows = steps_csv("lstm_nan")
    i = next(i for i, r in enumerate(rows) if not (math.isfinite(float(r["loss"])) and math.isfinite(float(r["grad_norm"]))))
    spark = g[len("grad_norm "):len("grad_norm ") + min(60, len(rows))]
    assert spark.index("✗") == _bin_of(i, len(rows), len(spark)) and spark.count("✗") == 1
    assert f"✗ step {rows[i]['step']}: non-finite" in g
