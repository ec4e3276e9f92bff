"""The advice benchmark's tune simulator (benchmarks/advice/simulate.py): a simulated probe is
exactly what the recorder records when the training really stops there, and the real `tune()`
driven by it (runner_factory) launches nothing and spends what its probes ran, within the budget."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

import gradscope
from gradscope import rundir
from gradscope.launch import Target
from gradscope.tune import tune

_HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "advice"
sys.path.insert(0, str(_HERE))  # simulate.py imports its neighbours run, tasks and baselines
_spec = importlib.util.spec_from_file_location("advice_simulate", _HERE / "simulate.py")
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)

TASK, SEED = "logreg", 0  # the fastest task: 300 steps, a fraction of a second


def test_a_simulated_probe_is_the_recording_of_a_training_stopped_there(tmp_path):
    tau, n = 0.8, 40  # clips some of the first 40 steps (norms 1.06 down to 0.6)
    runner = sim.SimRunner(None, tmp_path, 1, task=TASK, seed=SEED, root=tmp_path / "cache")
    probe, whole = runner.run([(tau, n, tmp_path / "p40"), (tau, 10_000, tmp_path / "pall")])
    # independently: the same training really stopped after n steps (same LR schedule), recorded
    with gradscope.record(tmp_path / "real", clip_norm=tau, layer_stride=0):
        sim.train(TASK, SEED, stop_at=n)
    real = rundir.load_run(tmp_path / "real").steps
    assert (probe.status, probe.exit_code, probe.steps_run, len(probe.steps)) == ("stopped", 0, n, n)
    assert real["clipped"].any() and not real["clipped"].all()
    for c in rundir.TABLE_COLUMNS:
        if c != "time":
            np.testing.assert_array_equal(probe.steps[c].to_numpy(), real[c].to_numpy(), err_msg=c)
    # a probe longer than the training: the whole of it, completed; its first n rows are the probe
    assert (whole.status, whole.steps_run) == ("completed", sim.TASKS[TASK].steps)
    np.testing.assert_array_equal(whole.steps["loss"].to_numpy()[:n], probe.steps["loss"].to_numpy())
    # the cache on disk hands back the same table and held-out loss
    sim._MEMO.clear()
    again, final = sim.full_training(TASK, SEED, tau, tmp_path / "cache")
    np.testing.assert_array_equal(again["grad_norm"].to_numpy(), whole.steps["grad_norm"].to_numpy())
    assert final == sim.train(TASK, SEED, sim.bench.Fixed(tau)) and math.isfinite(final)


def test_tune_with_the_simulated_runner_launches_nothing_and_respects_the_budget(tmp_path):
    T = sim.TASKS[TASK].steps
    made = []

    def factory(*args, **kw):
        made.append(sim.SimRunner(*args, task=TASK, seed=SEED, root=tmp_path / "cache", **kw))
        return made[-1]

    target = Target("script", str(_HERE / "tasks.py"), ["--task", TASK, "--seed", str(SEED)])
    for budget in (3.0, 2.0):
        out = tmp_path / f"tune-b{budget:g}"
        res = tune(target, out, steps=T, budget=budget, runner_factory=factory)
        runs = made[-1].runs.values()
        ran = sum(len(pr.steps) for pr in runs)
        assert ran == sum(min(pr.max_steps, T) for pr in runs)  # each probe: its first max_steps rows
        assert res.steps_spent == ran <= budget * T
        assert math.isclose(res.budget_spent, ran / T)
        assert res.recommended_clip_norm is None or res.recommended_clip_norm > 0
        assert list(out.iterdir()) == []  # no probe was launched (tune.json is the CLI's to write)
