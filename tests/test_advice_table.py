"""The advice benchmark's table: the ratios it prints are the arithmetic its README states,
recomputed here with numpy from the same (random) per-seed losses; its cache keeps a finished
training and hands it back instead of training again."""
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

TASK = "adding"  # any task: its grid names the methods


def _scored(v):
    return math.inf if not math.isfinite(v) or v >= 2.0 else v  # 2.0: the fake untrained loss


def _fake_results(seed: int):
    rng = np.random.default_rng(seed)
    seeds = [0, 1, 2]
    taus = advice.grid_methods(TASK)
    grid = {(TASK, s, m): float(rng.uniform(0.1, 1.0)) for s in seeds for m in taus}
    grid[(TASK, 1, "none")] = math.inf                  # a diverged seed
    grid[(TASK, 2, taus[-1])] = 5.0                      # worse than untrained: counted as diverged
    init = {(TASK, s): 2.0 for s in seeds}
    best_tau = min(taus[1:], key=lambda m: np.mean([grid[(TASK, s, m)] for s in seeds]))
    for m in advice.nudged(best_tau):
        for s in seeds:
            grid[(TASK, s, m)] = float(rng.uniform(0.1, 1.0))
    picked = {name: {(TASK, s): {"tau": 0.3, "situation": "stable", "confident": s != 1,
                                 "final": float(rng.uniform(0.1, 1.0)), "budget_spent": 2.0 + s / 10}
                     for s in seeds} for name in ("recommend", "tune")}
    return seeds, taus, grid, init, picked, best_tau


@pytest.mark.parametrize("seed", range(5))
def test_ratios_diverged_counts_and_the_nudged_column(seed):
    seeds, taus, grid, init, picked, best_tau = _fake_results(seed)
    sets = {"design families": ([TASK], seeds)}
    row = advice.summarize(sets, grid, init, picked, ["1", "none"])["design families"][TASK]

    best = np.mean([grid[(TASK, s, best_tau)] for s in seeds])
    assert row["grid_best_tau"] == best_tau
    assert row["grid_best_loss"] == pytest.approx(best, rel=1e-12)
    for name in ("recommend", "tune"):
        mean = np.mean([picked[name][(TASK, s)]["final"] for s in seeds])
        assert row["methods"][name]["ratio"] == pytest.approx(mean / best)
    assert row["methods"]["1"]["ratio"] == pytest.approx(np.mean([grid[(TASK, s, "1")] for s in seeds]) / best)
    assert row["methods"]["none"] == {"ratio": math.inf, "diverged": 1}
    assert row["confident"] == [True, False, True]
    assert row["tune_budget_spent"] == [2.0, 2.1, 2.2]

    side = advice.neighbours(TASK, best_tau)
    i = taus.index(best_tau)
    assert side == [m for m in (taus[i - 1] if i > 1 else None, taus[i + 1] if i + 1 < len(taus) else None) if m]
    worst_side = max(np.mean([_scored(grid[(TASK, s, m)]) for s in seeds]) for m in side) / best
    assert row["methods"]["neighbours"]["ratio"] == pytest.approx(worst_side)

    up, down = (float(m) for m in advice.nudged(best_tau))
    assert up == pytest.approx(float(best_tau) * 1.1) and down == pytest.approx(float(best_tau) / 1.1)
    worse = max(np.mean([grid[(TASK, s, m)] for s in seeds]) for m in advice.nudged(best_tau)) / best
    assert row["methods"]["nudged"]["ratio"] == pytest.approx(worse)

    table = advice.render({"design families": {TASK: row}}, ["1", "none"])
    line = next(x for x in table.splitlines() if x.startswith(f"| {TASK} |"))
    assert "1 of 3" in line and line.rstrip(" |").endswith("2.20")  # one seed not confident; tune's worst compute


def test_a_threshold_worse_than_the_untrained_model_counts_as_diverged():
    seeds, taus, grid, init, picked, _ = _fake_results(0)
    row = advice.summarize({"s": ([TASK], seeds)}, grid, init, picked, [taus[-1]])["s"][TASK]
    assert row["methods"][taus[-1]] == {"ratio": math.inf, "diverged": 1}


def test_no_clipping_as_grid_best_has_no_nudged_cell():
    seeds, taus, grid, init, picked, _ = _fake_results(1)
    for s in seeds:  # make "none" the best threshold, on every seed
        grid[(TASK, s, "none")] = 0.01
    summary = advice.summarize({"s": ([TASK], seeds)}, grid, init, {"recommend": picked["recommend"]}, ["1"])
    row = summary["s"][TASK]
    assert row["grid_best_tau"] == "none" and "nudged" not in row["methods"]
    assert "grid-best ±10%" not in advice.render(summary, ["1"])  # no column when no row has the cell
    other = dict(row, grid_best_tau="0.5", methods={**row["methods"], "nudged": {"ratio": 1.1, "diverged": 0}})
    table = advice.render({"s": {TASK: row, "other": other}}, ["1"])
    line = next(x for x in table.splitlines() if x.startswith(f"| {TASK} |"))
    assert "grid-best ±10%" in table and line.rstrip(" |").endswith("-")


def test_the_grid_sits_around_each_family_s_norm_scale():
    small, big = advice.grid_methods("tiny_norm"), advice.grid_methods("sum_mlp")
    assert small[0] == big[0] == "none"
    ratios = [float(b) / float(s) for s, b in zip(small[1:], big[1:])]
    assert ratios == pytest.approx([1e4] * (len(small) - 1))
    assert set(advice.HELDOUT_FAMILIES) <= set(advice.DEFAULT_TASKS) and len(advice.HELDOUT_FAMILIES) >= 2


def test_the_cache_returns_a_finished_training_instead_of_training_again(tmp_path, monkeypatch):
    calls = []

    def fake_train(task, seed, clipper, stop_at=None):
        calls.append((task, seed, stop_at))
        return float("nan") if seed == 1 else 0.25

    monkeypatch.setattr(advice, "train", fake_train)
    assert advice._train_job((tmp_path, TASK, 0, "0.5")) == (TASK, 0, "0.5", 0.25)
    assert advice._train_job((tmp_path, TASK, 1, "none")) == (TASK, 1, "none", math.inf)  # NaN kept as diverged
    assert advice._train_job((tmp_path, TASK, 0, "0.5")) == (TASK, 0, "0.5", 0.25)
    assert advice._train_job((tmp_path, TASK, 1, "none")) == (TASK, 1, "none", math.inf)
    assert calls == [(TASK, 0, None), (TASK, 1, None)]  # the second round came from disk
    assert advice.cached(tmp_path, TASK, 0, "0.5")["final"] == 0.25


def test_recommend_else_tune_takes_tune_exactly_where_recommend_is_not_confident():
    rec = {("t", 0): {"confident": True, "final": 1.0}, ("t", 1): {"confident": False, "final": 9.0},
           ("t", 2): {"confident": None, "final": 2.0}, ("u", 0): {"confident": False, "final": 5.0}}
    tune = {("t", 0): {"final": 0.5}, ("t", 1): {"final": 0.7}, ("t", 2): {"final": 0.1}}
    both = advice.recommend_else_tune(rec, tune)
    assert {k: v["final"] for k, v in both.items()} == {("t", 0): 1.0, ("t", 1): 0.7, ("t", 2): 2.0}


class _InlinePool:
    """multiprocessing.Pool's part that run.main uses, in this process (so the fake train holds)."""

    def __init__(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)


def test_grid_only_trains_the_grid_and_baselines_and_asks_for_no_advice(tmp_path, monkeypatch, capsys):
    trained = []

    def fake_train(task, seed, clipper, stop_at=None):
        trained.append((task, seed, stop_at, type(clipper).__name__))
        return 2.0 if stop_at == 0 else 1.0 + (0.9 if clipper is None else clipper_loss(clipper))

    def clipper_loss(c):
        return abs(getattr(c, "tau", 0.5) - 0.5)  # the fake task is best at tau 0.5

    def no_advice(*a, **k):
        raise AssertionError("--grid-only asked for advice")

    monkeypatch.setattr(advice, "train", fake_train)
    monkeypatch.setattr(advice, "Pool", _InlinePool)
    monkeypatch.setattr(advice.os, "nice", lambda n: 0)  # the test process keeps its priority
    for name in ("_recommend_job", "_tune_job", "tune_available", "_gradscope"):
        monkeypatch.setattr(advice, name, no_advice)
    assert advice.main(["--tasks", TASK, "--seeds", "0", "--grid-only", "--no-nudged", "--jobs", "1",
                        "--out", str(tmp_path)]) == 0
    methods = ["untrained", "autoclip", "zclip", "1"] + advice.grid_methods(TASK)
    assert sorted(set(methods)) == sorted({f.stem for f in (tmp_path / "cache" / TASK / "s0").glob("*.json")})
    assert len(trained) == len(set(methods))  # each training once, the untrained one with stop_at=0
    assert [t for t in trained if t[2] == 0] == [(TASK, 0, 0, "NoneType")]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "table.md").exists()
    out = capsys.readouterr().out
    assert f"| {TASK} | 0.5 | - |" in out and "0 pilots" in out  # the fake grid's best, and no advice
