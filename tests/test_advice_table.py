"""The advice benchmark's table: the ratios it prints are the arithmetic its README states,
recomputed here with numpy from the same (random) per-seed losses."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "advice"
sys.path.insert(0, str(_HERE))  # run.py imports its neighbours tasks and baselines
_spec = importlib.util.spec_from_file_location("advice_run", _HERE / "run.py")
advice = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(advice)


def _fake_results(seed: int):
    rng = np.random.default_rng(seed)
    seeds = [0, 1, 2]
    taus = ["none"] + [str(x) for x in advice.GRID if x is not None]
    grid = {("t", s, m): float(rng.uniform(0.1, 1.0)) for s in seeds for m in taus}
    grid[("t", 1, "none")] = math.inf                  # a diverged seed
    grid[("t", 2, "50.0")] = 5.0                        # worse than untrained: counted as diverged
    init = {("t", s): 2.0 for s in seeds}
    best_tau = min(taus[1:], key=lambda m: np.mean([grid[("t", s, m)] for s in seeds]))
    for m in advice.nudged(best_tau):
        for s in seeds:
            grid[("t", s, m)] = float(rng.uniform(0.1, 1.0))
    rec = {("t", s): {"tau": 0.3, "situation": "stable", "final": float(rng.uniform(0.1, 1.0))} for s in seeds}
    return seeds, taus, grid, init, rec, best_tau


@pytest.mark.parametrize("seed", range(5))
def test_ratios_diverged_counts_and_the_nudged_column(seed):
    seeds, taus, grid, init, rec, best_tau = _fake_results(seed)
    row = advice.summarize(["t"], {"design": seeds}, grid, init, rec, ["1.0", "none"])["design"]["t"]

    best = np.mean([grid[("t", s, best_tau)] for s in seeds])
    assert row["grid_best_tau"] == best_tau
    assert row["grid_best_loss"] == pytest.approx(best, rel=1e-12)
    assert row["methods"]["recommend"]["ratio"] == pytest.approx(np.mean([rec[("t", s)]["final"] for s in seeds]) / best)
    assert row["methods"]["1.0"]["ratio"] == pytest.approx(np.mean([grid[("t", s, "1.0")] for s in seeds]) / best)
    assert row["methods"]["none"] == {"ratio": math.inf, "diverged": 1}

    up, down = (float(m) for m in advice.nudged(best_tau))
    assert up == pytest.approx(float(best_tau) * 1.1) and down == pytest.approx(float(best_tau) / 1.1)
    worse = max(np.mean([grid[("t", s, m)] for s in seeds]) for m in advice.nudged(best_tau)) / best
    assert row["methods"]["nudged"]["ratio"] == pytest.approx(worse)


def test_a_threshold_worse_than_the_untrained_model_counts_as_diverged():
    seeds, taus, grid, init, rec, _ = _fake_results(0)
    row = advice.summarize(["t"], {"design": seeds}, grid, init, rec, ["50.0"])["design"]["t"]
    assert row["methods"]["50.0"] == {"ratio": math.inf, "diverged": 1}


def test_no_clipping_as_grid_best_has_no_nudged_cell():
    seeds, taus, grid, init, rec, _ = _fake_results(1)
    for s in seeds:  # make "none" the best threshold, on every seed
        grid[("t", s, "none")] = 0.01
    summary = advice.summarize(["t"], {"design": seeds}, grid, init, rec, ["1.0"])
    row = summary["design"]["t"]
    assert row["grid_best_tau"] == "none" and "nudged" not in row["methods"]
    line = next(x for x in advice.render(summary, ["1.0"]).splitlines() if x.startswith("| t |"))
    assert line.rstrip(" |").endswith("-")
