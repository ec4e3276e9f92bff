"""`gradscope run --clip-norm T`: clipping applied without editing the script, bit-identical
to the script clipping itself at T right before optimizer.step(), and recorded like any run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradscope
from gsutil import gradscope as gs, python, script


def _same_weights(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


TINY = [script("tiny_train.py"), "--steps", "15", "--accum", "2", "--opt", "adamw"]


@pytest.mark.parametrize("script_clip", [None, 50.0, 0.01])
def test_clip_norm_equals_the_script_clipping_itself(tmp_path, script_clip):
    """Unclipped script, or one clipping at another threshold, under --clip-norm 4.0 trains
    exactly as the script calling clip_grad_norm_(params, 4.0) after accumulation."""
    plain = python(*TINY, "--clip", "4.0", "--save", tmp_path / "plain.pt", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    own = [] if script_clip is None else ["--clip", str(script_clip)]
    res = gs("run", "--out", tmp_path / "run", "--clip-norm", "4.0", *TINY, *own,
             "--save", tmp_path / "rec.pt", "--ref", tmp_path / "ref.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _same_weights(tmp_path / "plain.pt", tmp_path / "rec.pt")

    ref = json.loads((tmp_path / "ref.json").read_text())
    run = gradscope.load_run(tmp_path / "run")
    s = run.steps
    g = np.array(ref["grad_norm"])  # float64, before any clipping
    np.testing.assert_allclose(s["grad_norm"], g, rtol=1e-5)
    assert (s["clip_max_norm"] == 4.0).all()
    np.testing.assert_array_equal(s["clipped"], g > 4.0)
    assert s["clipped"].any() and not s["clipped"].all()  # the threshold bites on some steps only
    assert run.meta["clip_norm_override"] == 4.0
    from gradscope.analysis import analyze

    assert any("clipped at 4 by `gradscope run --clip-norm`" in n for n in analyze(run).notes)
    proc = json.loads((tmp_path / "run" / "process-r0.json").read_text())
    assert proc["clip_norm_override"] == 4.0
    assert proc["script_max_norms_overridden"] == ([] if script_clip is None else [script_clip])
    assert proc["clip_calls"].get("clip_grad_norm_", 0) == (0 if script_clip is None else 15)


def test_clip_norm_under_amp_acts_on_unscaled_gradients(tmp_path):
    """GradScaler: the clip happens inside scaler.step(), after unscale_, on finite steps only."""
    plain = python(script("amp_train.py"), tmp_path / "r1.json", tmp_path / "plain.pt", "1.0", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    res = gs("run", "--out", tmp_path / "run", "--clip-norm", "1.0",
             script("amp_train.py"), tmp_path / "r2.json", tmp_path / "rec.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _same_weights(tmp_path / "plain.pt", tmp_path / "rec.pt")
    s = gradscope.load_run(tmp_path / "run").steps
    ok = ~s["skipped"].to_numpy()
    ref = np.array(json.loads((tmp_path / "r2.json").read_text())["grad_norm"])
    np.testing.assert_allclose(s["grad_norm"][ok], ref[ok], rtol=1e-5)
    np.testing.assert_array_equal(s["clipped"][ok], ref[ok] > 1.0)


def test_python_api_clip_norm(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    with gradscope.record(tmp_path / "run", clip_norm=0.05):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            expected.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item())
            before = [p.grad.clone() for p in model.parameters()]
            opt.step()
            # what the step applied: the gradient scaled down to norm 0.05
            applied = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
            assert applied == pytest.approx(min(expected[-1], 0.05), rel=1e-5)
            assert all(torch.allclose(b * min(1.0, 0.05 / (expected[-1] + 1e-6)), p.grad) for b, p in
                       zip(before, model.parameters()))
    s = gradscope.load_run(tmp_path / "run").steps
    np.testing.assert_allclose(s["grad_norm"], expected, rtol=1e-5)
    assert (s["clip_max_norm"] == 0.05).all()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_clip_norm_is_one_line_exit_2(tmp_path, value):
    res = gs("run", "--out", tmp_path / "run", "--clip-norm", value, script("tiny_train.py"), cwd=tmp_path)
    assert res.returncode == 2
    assert "--clip-norm" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_python_api_refuses_a_bad_clip_norm_before_touching_anything(tmp_path, value):
    from gradscope.errors import GradscopeError

    with pytest.raises(GradscopeError, match="--clip-norm must be a positive, finite number"):
        with gradscope.record(tmp_path / "run", clip_norm=value):
            pass
    assert not (tmp_path / "run").exists()
