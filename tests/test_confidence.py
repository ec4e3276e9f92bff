"""`recommend` says when one pilot cannot tell the threshold (a run that blew up at once, too few
steps) and hands out the `gradscope tune` command for the run's own script instead; a run that
holds the information stays confident. Rules recomputed here from the table they judge."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

import gradscope
from gradscope.analysis import analyze
from gradscope.analysis.confidence import assess_confidence, tune_command
from gradscope.analysis.config import load_config
from gradscope.report.recommend import to_json

CFG = load_config().confidence
HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time"
SCRIPT_META = {"target": "script", "command": [sys.executable, "train.py", "--lr", "3e-4", "--name", "a b"]}


def _table_run(d, g, loss, **meta):
    d.mkdir(parents=True)
    rows = [HEADER] + [f"0,{i},{float(v)!r},{float(l)!r},nan,0,nan,0,nan,0.1,{1.7e9 + i}" for i, (v, l) in enumerate(zip(g, loss))]
    (d / "steps-r0.csv").write_text("\n".join(rows) + "\n")
    (d / "meta.json").write_text(json.dumps({
        "format": "gradscope-run", "format_version": 1, "status": "completed", "exit_code": 0,
        "optimizers": [{"id": 0, "class": "SGD", "momentum": None}], **meta,
    }))
    return gradscope.load_run(d)


def _stable(n, seed=0):
    rng = np.random.default_rng(seed)
    g = np.exp(rng.normal(0.0, 0.1, n))
    loss = 2.0 - np.linspace(0, 1, n) + rng.normal(0, 0.01, n)
    return g, loss


def test_a_pilot_whose_loss_triples_within_two_steps_is_not_confident_and_gets_the_tune_command(tmp_path):
    g, loss = _stable(200)
    g[0] = 0.5  # the norms grew past the first one: the loss rise reads as instability
    loss[0], loss[1], loss[2] = 1.0, 1.5, 3.5  # 3.5x the first loss at step 2: blew up at once
    loss[3:] = 3.0                               # and stays up: unstable-needs-normalisation
    run = _table_run(tmp_path / "r", g, loss, **SCRIPT_META)
    o = analyze(run).main
    assert o.recommendation.situation == "unstable-needs-normalisation"
    assert not o.confidence.confident
    assert "3.5x its first value within 2 steps" in o.confidence.reasons[0]
    doc = to_json(analyze(run))
    assert doc["confident"] is False and doc["confidence_reasons"] == o.confidence.reasons
    assert doc["tune_command"] == "gradscope tune train.py --lr 3e-4 --name 'a b'"
    assert shlex.split(doc["tune_command"])[2:] == SCRIPT_META["command"][1:]
    assert doc["recommended_clip_norm"] == pytest.approx(g[0])  # the guess is still there


def test_the_same_climb_after_the_first_steps_stays_confident(tmp_path):
    g, loss = _stable(200)
    g[0] = 0.5
    loss[:10] = 1.0
    loss[10:] = 3.0  # the loss rose (unstable), but not at once: the early steps show a sane scale
    doc = to_json(analyze(_table_run(tmp_path / "r", g, loss, **SCRIPT_META)))
    assert doc["situation"] == "unstable-needs-normalisation"
    assert doc["confident"] is True and doc["confidence_reasons"] == [] and doc["tune_command"] is None


def test_a_norm_that_triples_at_once_in_a_run_that_blew_up_is_not_confident():
    g = np.array([1.0, 2.0, 3.2, 50.0, 400.0] + [1e4] * 60)
    loss = np.full(len(g), np.nan)
    c = assess_confidence("blew-up", g, loss, 65, 0, 60, CFG, "gradscope tune t.py")
    assert not c.confident and "3.2x its first value within 2 steps" in c.reasons[0]
    assert c.tune_command == "gradscope tune t.py"
    # the same numbers in a run that is not normalising say nothing about the blow-up
    assert assess_confidence("stable", g, loss, None, 0, 60, CFG, "x").confident


def test_non_finite_at_once_is_not_confident():
    g = np.array([1.0, 1.1] + [1.2] * 60)
    c = assess_confidence("blew-up", g, np.full(len(g), np.nan), 2, 0, 60, CFG, None)
    assert not c.confident and "non-finite at step 2" in c.reasons[0] and c.tune_command is None


@pytest.mark.parametrize("n, confident", [(CFG.min_steady_steps - 1, False), (CFG.min_steady_steps, True)])
def test_too_few_steady_state_steps_are_not_confident(n, confident):
    g, loss = _stable(n + 5)
    c = assess_confidence("stable", g, loss, None, 0, n, CFG, "cmd")
    assert c.confident is confident
    if not confident:
        assert c.reasons == [f"only {n} steady-state steps (at least {CFG.min_steady_steps} are needed to place a "
                             "threshold among them)"]


def test_a_stable_run_is_confident_and_its_report_says_nothing_of_tune(tmp_path):
    g, loss = _stable(300)
    run = tmp_path / "r"
    _table_run(run, g, loss, **SCRIPT_META)
    doc = to_json(analyze(gradscope.load_run(run)))
    assert doc["situation"] == "stable" and doc["confident"] is True
    p = subprocess.run([sys.executable, "-m", "gradscope", "recommend", str(run)], capture_output=True, text=True)
    assert p.returncode == 0 and "gradscope tune" not in p.stdout and "not confident" not in p.stdout


def test_the_report_prints_the_tune_command_instead_of_a_confident_number(tmp_path):
    g, loss = _stable(200)
    g[0] = 0.5
    loss[:3] = [1.0, 2.0, 4.0]
    loss[3:] = 3.0
    run = tmp_path / "r"
    _table_run(run, g, loss, **SCRIPT_META)
    p = subprocess.run([sys.executable, "-m", "gradscope", "recommend", str(run)], capture_output=True, text=True,
                       env={**__import__("os").environ, "COLUMNS": "250"})
    assert p.returncode == 0, p.stderr
    assert "(a guess: this run cannot tell, see below)" in p.stdout
    assert "not confident" in p.stdout
    assert "gradscope tune train.py --lr 3e-4 --name 'a b'" in p.stdout


@pytest.mark.parametrize("meta, expected", [
    ({"target": "script", "command": ["/usr/bin/python3", "t.py", "--x", "1"]}, "gradscope tune t.py --x 1"),
    ({"target": "module", "command": ["/usr/bin/python3", "-m", "pkg.train", "--c", "c.yaml"]},
     "gradscope tune -m pkg.train --c c.yaml"),
    ({"target": "command", "command": ["torchrun", "--nproc-per-node", "2", "t.py"]},
     "gradscope tune -- torchrun --nproc-per-node 2 t.py"),
    ({}, None),                       # another trainer's log: the command is unknown
    ({"target": "script", "command": "python t.py"}, None),
])
def test_tune_command_reproduces_the_recorded_target(meta, expected):
    assert tune_command(meta) == expected


def test_a_stable_pilot_whose_loss_never_fell_is_not_confident(tmp_path):
    """Norms that sit at a level say nothing when the run is not learning (a CNN stuck at chance):
    the mean of the last tenth of the losses must be below the first tenth's by flat_loss_z
    standard errors, recomputed here from the losses themselves."""
    g, falling = _stable(200)
    rng = np.random.default_rng(1)
    flat = 2.3 + rng.normal(0, 0.01, 200)  # chance loss, noise only
    stuck = to_json(analyze(_table_run(tmp_path / "flat", g, flat, **SCRIPT_META)))
    assert stuck["situation"] == "stable"
    w = 20  # a tenth of 200
    se = np.sqrt(flat[:w].var(ddof=1) / w + flat[-w:].var(ddof=1) / w)
    assert flat[:w].mean() - flat[-w:].mean() <= CFG.flat_loss_z * se  # by hand: it did not fall
    assert stuck["confident"] is False and stuck["tune_command"].startswith("gradscope tune ")
    assert any("did not fall" in r and f"{flat[-w:].mean():.4g}" in r for r in stuck["confidence_reasons"])
    learning = to_json(analyze(_table_run(tmp_path / "falling", g, falling, **SCRIPT_META)))
    assert learning["situation"] == "stable" and learning["confident"] is True
