"""`--trace-nan`: the first non-finite value's step, phase and module, on real training scripts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import gradscope
import gradscope.capture.api
from gsutil import gradscope as gs, python, script


def _origin(tmp_path, mode, *extra, bad_step=7):
    out = tmp_path / mode
    res = gs("run", "-q", "--out", out, "--trace-nan", *extra, script("nan_origin.py"), "--mode", mode,
             "--bad-step", str(bad_step), cwd=tmp_path)
    run = gradscope.load_run(out)
    return res, run, run.meta["processes"][0]["nan_trace"]["origin"]


@pytest.mark.parametrize("mode, phase, module", [
    ("sqrt", "forward", "encoder.1.gate"),      # sqrt of negative numbers from step 7 on
    ("fp16", "forward", "encoder.1.gate"),      # float16 overflow to inf
    ("nanrow", "input", "model"),               # a NaN row in the batch: the root module's input
    ("l2zero", "backward", "encoder.1.norm"),   # L2 norm of a zero row: forward finite, gradient NaN
    ("l2inline", "backward", "encoder.1"),      # the same, written in encoder.1's own forward
    ("loss", "loss", None),                     # log of a negative loss: model outputs finite
])
def test_origin_is_named_right(tmp_path, mode, phase, module):
    res, run, origin = _origin(tmp_path, mode)
    assert res.returncode == 0, res.stderr
    s = run.steps
    bad = ~np.isfinite(s["loss"]) | ~np.isfinite(s["grad_norm"])
    assert int(s["step"][bad].iloc[0]) == 7 and np.isfinite(s["loss"][:7]).all()  # the script's design
    assert (origin["step"], origin["phase"], origin["module"]) == (7, phase, module)
    assert origin["optimizer"] == 0 and origin["detail"]


def test_forward_detail_says_the_inputs_were_finite(tmp_path):
    _, _, origin = _origin(tmp_path, "sqrt", bad_step=3)
    assert origin["step"] == 3
    assert origin["detail"] == "the forward output of `encoder.1.gate` (Gate) was non-finite; its inputs were finite"


def test_trace_leaves_training_bit_identical(tmp_path):
    plain = python(script("nan_origin.py"), "--mode", "none", "--save", "plain.pt", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    res = gs("run", "-q", "--out", tmp_path / "r", "--trace-nan", script("nan_origin.py"), "--mode", "none",
             "--save", "traced.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "traced.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = gradscope.load_run(tmp_path / "r").meta["processes"][0]["nan_trace"]
    assert info == {"enabled": True, "steps_traced": 20, "origin": None}


def test_stop_on_nan_keeps_the_origin(tmp_path):
    res, run, origin = _origin(tmp_path, "l2zero", "--stop-on-nan", "--flush-steps", "1000")
    assert res.returncode == 1
    assert len(run.steps) == 8  # stopped in the bad step's optimizer.step()
    assert (origin["step"], origin["phase"], origin["module"]) == (7, "backward", "encoder.1.norm")


def test_without_the_option_nothing_is_traced(tmp_path):
    res = gs("run", "-q", "--out", tmp_path / "r", script("nan_origin.py"), "--mode", "sqrt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "nan_trace" not in gradscope.load_run(tmp_path / "r").meta["processes"][0]


class _Masked(torch.nn.Module):
    """Returns -inf where masked, every step, by design (an attention mask): not a failure."""

    def forward(self, x):
        return x.masked_fill(torch.arange(x.shape[-1]) % 2 == 0, float("-inf"))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.mask = _Masked()
        self.head = torch.nn.Linear(4, 1)
        self.broken = False

    def forward(self, x):
        h = torch.softmax(self.mask(self.fc(x)), -1)
        out = self.head(h)
        return torch.log(out - 10) if self.broken else out


def test_a_module_that_is_non_finite_by_design_is_not_blamed(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradscope.record(tmp_path / "r", trace_nan=True):
        for step in range(8):
            net.broken = step >= 5
            loss = net(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    origin = gradscope.load_run(tmp_path / "r").meta["processes"][0]["nan_trace"]["origin"]
    # the first non-finite failure is step 5, made in _Net's own code (the log); the -inf mask, present every step, is benign
    assert origin["step"] == 5 and origin["phase"] == "forward" and origin["module"] == "_Net"  # no variable in __main__ holds it: its class


def test_no_host_read_per_step_while_tracing(tmp_path, monkeypatch):
    import sys

    reads = []
    capture_dir = os.path.dirname(gradscope.capture.api.__file__).replace("\\", "/") + "/"

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if caller.startswith(capture_dir):  # a capture module read a value itself (judged by the package's
                # directory, not the text "gradscope/capture": a checkout may sit anywhere)
                reads.append((name, caller))
            return orig(self, *a, **k)

        return wrapper

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradscope.record(tmp_path / "t", flush_steps=1000, flush_seconds=1e9, trace_nan=True):
        for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        for _ in range(20):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert reads == [], reads[0][1]
        monkeypatch.undo()
    assert gradscope.load_run(tmp_path / "t").meta["processes"][0]["nan_trace"]["steps_traced"] == 20


# ---------------------------------------------------------------- where it shows


@pytest.fixture(scope="module")
def sqrt_runs(tmp_path_factory):
    """The sqrt script (forward NaN from step 37), recorded with and without --trace-nan."""
    d = tmp_path_factory.mktemp("shows")
    for name, extra in (("traced", ["--trace-nan"]), ("plain", [])):
        res = gs("run", "-q", "--out", d / name, *extra, script("nan_origin.py"), "--mode", "sqrt",
                 "--steps", "40", "--bad-step", "37", cwd=d)
        assert res.returncode == 0, res.stderr
    return d


def test_check_names_the_origin(sqrt_runs):
    res = gs("check", sqrt_runs / "traced")
    assert res.returncode == 1
    assert ("the first non-finite value was the forward output of `encoder.1.gate` (Gate) at step 37; "
            "its inputs were finite") in res.stdout
    doc = json.loads(gs("check", "--json", sqrt_runs / "traced").stdout)
    assert doc["non_finite"]["origin"]["module"] == "encoder.1.gate"


def test_check_without_the_trace_suggests_the_command(sqrt_runs):
    res = gs("check", sqrt_runs / "plain")
    assert res.returncode == 1
    assert "record it again with `gradscope run --trace-nan " in res.stdout
    assert "nan_origin.py --mode sqrt --steps 40 --bad-step 37`" in res.stdout
    assert "the first non-finite value was" not in res.stdout


def test_recommend_json_has_the_origin_contract(sqrt_runs):
    res = gs("recommend", "--json", sqrt_runs / "traced")
    assert res.returncode == 0, res.stderr
    origin = json.loads(res.stdout)["nonfinite"]["origin"]
    assert {k: origin[k] for k in ("step", "phase", "module")} == {"step": 37, "phase": "forward",
                                                                   "module": "encoder.1.gate"}
    assert origin["detail"].endswith("its inputs were finite")
    plain = json.loads(gs("recommend", "--json", sqrt_runs / "plain").stdout)
    assert plain["nonfinite"]["first_step"] == 37 and plain["nonfinite"]["origin"] is None


def test_plot_marks_the_origin_step(sqrt_runs):
    from gradscope.report.plot import origin_label, plot_data

    data = plot_data(gradscope.load_run(sqrt_runs / "traced"))
    o = data.series[0].origin
    assert o.step == 37 and origin_label(o) == "NaN origin, step 37: forward, `encoder.1.gate`"
    assert plot_data(gradscope.load_run(sqrt_runs / "plain")).series[0].origin is None
    res = gs("plot", sqrt_runs / "traced", "-o", sqrt_runs / "t.png")
    assert res.returncode == 0, res.stderr
    assert (sqrt_runs / "t.png").stat().st_size > 10_000


class _Sqrt(torch.nn.Module):
    bad = False

    def forward(self, x):
        return torch.sqrt(x - 100) if self.bad else x


def test_closure_steps_are_traced_in_their_own_step(tmp_path):
    """optimizer.step(closure) (Lightning's automatic optimization) runs forward and backward
    inside step(): the events still belong to that step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _Sqrt(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.record(tmp_path / "r", trace_nan=True):
        for step in range(10):
            model[1].bad = step >= 6
            x = torch.randn(8, 4)

            def closure():
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss

            opt.step(closure)
    run = gradscope.load_run(tmp_path / "r")
    assert np.isfinite(run.steps["loss"][:6]).all() and not np.isfinite(run.steps["loss"][6])
    origin = run.meta["processes"][0]["nan_trace"]["origin"]
    assert (origin["step"], origin["phase"], origin["module"]) == (6, "forward", "1")


def test_scaler_skipped_overflow_steps_are_no_origin_and_training_is_identical(tmp_path):
    # amp_train.py: fp16 autocast, GradScaler at 2**40: its first steps overflow and are skipped
    plain = python(script("amp_train.py"), "ref.json", "plain.pt", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    res = gs("run", "-q", "--out", tmp_path / "r", "--trace-nan", script("amp_train.py"), "ref2.json", "traced.pt",
             cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = gradscope.load_run(tmp_path / "r")
    assert run.steps["skipped"].sum() >= 1
    assert run.meta["processes"][0]["nan_trace"]["origin"] is None
    a, b = torch.load(tmp_path / "plain.pt"), torch.load(tmp_path / "traced.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tracing_adds_no_sync_and_names_the_origin(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), _Sqrt(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = [torch.randn(32, 64, device="cuda") for _ in range(30)]
    with gradscope.record(tmp_path / "r", flush_steps=10_000, flush_seconds=1e9, trace_nan=True):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call made while steps run raises
        try:
            for step, x in enumerate(data):
                model[1].bad = step >= 20
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    origin = gradscope.load_run(tmp_path / "r").meta["processes"][0]["nan_trace"]["origin"]
    assert (origin["step"], origin["phase"], origin["module"]) == (20, "forward", "1")
