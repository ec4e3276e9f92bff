"""The situation a run is in (stable, spiky, unstable-needs-normalisation, blew-up) and the
clip norm it calls for, each checked against the rule recomputed here from the run's table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import gradscope
from gradscope.analysis import analyze
from gradscope.analysis.config import load_config

CFG = load_config().situation
HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time"


def _table_run(d, g, loss, momentum=None):
    d.mkdir(parents=True)
    rows = [HEADER] + [f"0,{i},{v!r},{l!r},nan,0,nan,0,nan,0.1,{1.7e9 + i}" for i, (v, l) in enumerate(zip(g, loss))]
    (d / "steps-r0.csv").write_text("\n".join(rows) + "\n")
    (d / "meta.json").write_text(json.dumps({
        "format": "gradscope-run", "format_version": 1, "status": "completed", "exit_code": 0,
        "optimizers": [{"id": 0, "class": "SGD", "momentum": momentum}],
    }))
    return gradscope.load_run(d)


def test_blowup_of_real_training_normalises_at_the_first_gradient_norm(tmp_path):
    """A deep tanh MLP with a too-large init and SGD momentum 0.9 goes non-finite; the threshold
    is (1 - 0.9) x the norm of the first gradient, and the onset of the blow-up is reported."""
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        lin = torch.nn.Linear(16, 16)
        torch.nn.init.normal_(lin.weight, std=2.0 / 4)
        layers += [lin, torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    with gradscope.record(tmp_path / "run"):
        for _ in range(80):
            x = torch.randn(32, 16)
            loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), x.sum(1) / 4)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = gradscope.load_run(tmp_path / "run")
    assert run.meta["optimizers"][0]["momentum"] == 0.9

    s = run.steps
    g = s["grad_norm"].to_numpy()
    bad = ~np.isfinite(g) | np.isinf(s["loss"].to_numpy())
    assert bad.any() and bad[-1], "the test needs a run that really blows up"
    div = int(np.flatnonzero(bad)[0])
    fin = g[:div]
    early = np.median(fin[:5])
    onset = int(np.flatnonzero(fin > 30 * early)[0])
    expected = 1.0 * (1 - 0.9) * fin[0]

    r = analyze(run).main.recommendation
    assert r.situation == "blew-up"
    assert r.clip_norm == pytest.approx(expected, rel=1e-12)
    assert (r.low, r.high) == pytest.approx((expected / 2, expected * 2), rel=1e-12)
    assert r.onset_step == int(s["step"].iloc[onset])
    assert f"step {int(s['step'].iloc[div])}" in r.evidence
    assert r.clip_fraction == pytest.approx(np.mean(fin[analyze(run).main.warmup_steps:] > r.clip_norm_rounded))


def test_runaway_without_nonfinite_is_a_blowup(tmp_path):
    g = [2.0, 2.2, 1.9, 2.1, 2.0, 2.05, 1.95] + [2.0 * 3.0 ** k for k in range(1, 25)]
    loss = [1.0] * 7 + [1.0 * 2 ** k for k in range(1, 25)]
    run = _table_run(tmp_path / "r", g, loss)
    r = analyze(run).main.recommendation
    onset = next(i for i, v in enumerate(g) if v > 30 * np.median(g[:5]))
    assert r.situation == "blew-up" and "ran away" in r.evidence and r.onset_step == onset
    assert r.clip_norm == pytest.approx(g[0], rel=1e-12)  # no momentum recorded: factor 1


def test_unstable_run_normalises(tmp_path):
    """The loss climbing to twice its first value, finite throughout: (1 - m) x the first norm."""
    rng = np.random.default_rng(1)
    g = np.exp(rng.normal(0.0, 0.3, 200))
    loss = np.full(200, 4.0) + rng.normal(0, 0.1, 200)
    loss[120] = 8.5  # one climb past 2x is enough evidence
    run = _table_run(tmp_path / "r", g.tolist(), loss.tolist(), momentum=0.5)
    a = analyze(run).main
    r = a.recommendation
    assert r.situation == "unstable-needs-normalisation" and "step 120" in r.evidence
    assert r.clip_norm == pytest.approx(0.5 * g[0], rel=1e-12)
    assert (r.low, r.high) == pytest.approx((0.25 * g[0], g[0]), rel=1e-12)
    assert r.clip_fraction == pytest.approx(np.mean(g[a.warmup_steps:] > r.clip_norm_rounded))
    # clipping most steps is the advice here, so drift does not warn that it is a learning-rate cut
    assert a.drift is not None and a.drift.warning is None
    calm = loss.copy()
    calm[120] = 7.9  # short of 2x: not unstable
    assert analyze(_table_run(tmp_path / "calm", g.tolist(), calm.tolist())).main.recommendation.situation in (
        "stable", "spiky")


def test_spiky_and_stable_runs_keep_the_headroom_method(tmp_path):
    rng = np.random.default_rng(2)
    base = np.exp(rng.normal(0.0, 0.05, 400))
    spiky = base.copy()
    spiky[50::40] *= 6.0
    falling = np.linspace(3.0, 1.0, 400)
    for name, g, want in [("spiky", spiky, "spiky"), ("stable", base, "stable")]:
        run = _table_run(tmp_path / name, g.tolist(), falling.tolist())
        a = analyze(run).main
        r = a.recommendation
        assert r.situation == want
        assert r.low <= r.clip_norm <= r.high
        # between the bulk and the spikes: ordinary steps pass, spikes are cut
        assert np.max(base) < r.clip_norm < 6.0 * np.min(base)
        if want == "spiky":
            # midway in log space between the ordinary steps' top and the smallest spike
            steady_spikes = spiky[50::40][np.arange(50, 400, 40) >= a.warmup_steps]
            assert a.spikes.count == len(spiky[50::40])
            assert r.high == pytest.approx(steady_spikes.min(), rel=1e-12)
            assert r.clip_norm == pytest.approx(min(np.sqrt(r.low * r.high), 2.0 * r.low), rel=1e-12)
            assert "midway" in r.basis
        else:
            assert r.basis is None


def test_json_carries_situation_and_range(tmp_path, capsys):
    from gradscope.cli import main

    g = [2.0, 2.2, 1.9, 2.1, 2.0, 2.05, 1.95] + [2.0 * 3.0 ** k for k in range(1, 25)] + [math.inf]
    _table_run(tmp_path / "r", g, [1.0] * len(g))
    with pytest.raises(SystemExit):
        main(["recommend", str(tmp_path / "r"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["situation"] == "blew-up"
    lo, hi = doc["recommended_range"]
    assert lo == pytest.approx(doc["recommended_clip_norm"] / 2) and hi == pytest.approx(doc["recommended_clip_norm"] * 2)
    assert doc["blowup_onset_step"] == 10 and "non-finite at step 31" in doc["situation_evidence"]
    assert doc["recommended_clip_norm"] == pytest.approx(2.0)  # the first norm, no momentum
