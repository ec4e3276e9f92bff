"""The recorder, end to end: real training scripts under `gradscope run`, every recorded
figure compared with the script's own float64 computation."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import gradscope
import gradscope.capture.api
from gsutil import gradscope as gs, python, script


def _ref(path):
    with open(path) as f:
        return json.load(f)


def _run(tmp_path, *args, name="run"):
    out = tmp_path / name
    res = gs("run", "--out", out, *args, cwd=tmp_path)
    return res, out


def test_plain_loop_records_exact_norm_loss_lr(tmp_path):
    """One row per step with the pre-clip global L2 norm, the loss and the lr, all exact."""
    res, out = _run(tmp_path, script("tiny_train.py"), "--steps", "12", "--opt", "adamw", "--ref", "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    run = gradscope.load_run(out)
    s = run.steps
    assert list(s["step"]) == list(range(12))
    assert set(s["optimizer"]) == {0} and set(s["rank"]) == {0}
    np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_array_equal(s["lr"], ref["lr"])  # StepLR halves it every 5 steps
    assert s["clip_max_norm"].isna().all() and not s["clipped"].any()
    assert not s["skipped"].any() and s["loss_scale"].isna().all()
    assert run.meta["status"] == "completed" and run.meta["exit_code"] == 0
    (opt,) = run.meta["optimizers"]
    assert opt["class"] == "AdamW" and opt["parameters"] == 8 * 16 + 16 + 16 * 16 + 16 + 16 + 1
    assert "gradscope: completed" in res.stderr and "12 steps recorded" in res.stderr


def test_layers_are_named_like_named_parameters_and_exact(tmp_path):
    res, out = _run(tmp_path, script("tiny_train.py"), "--steps", "6", "--ref", "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    layers = gradscope.load_run(out).layers
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(layers.columns) == ["rank", "optimizer", "step", *names]
    for step, expected in enumerate(ref["layers"]):
        row = layers[layers["step"] == step].iloc[0]
        np.testing.assert_allclose([row[n] for n in names], [expected[n] for n in names], rtol=1e-5)
        # the global norm is the L2 norm of the per-layer norms
        assert math.isclose(math.sqrt(sum(expected[n] ** 2 for n in names)), ref["grad_norm"][step], rel_tol=1e-9)


def test_frozen_parameter_gets_nan_column_and_is_left_out_of_the_norm(tmp_path):
    res, out = _run(tmp_path, script("tiny_train.py"), "--steps", "4", "--freeze-bias", "--ref", "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    run = gradscope.load_run(out)
    np.testing.assert_allclose(run.steps["grad_norm"], ref["grad_norm"], rtol=1e-5)
    assert run.layers["2.bias"].isna().all()
    np.testing.assert_allclose(run.layers["4.weight"], [r["4.weight"] for r in ref["layers"]], rtol=1e-5)


def test_accumulation_and_clip_imported_at_top(tmp_path):
    """Loss is the sum of the micro-batch losses as scaled; the norm is before clipping."""
    res, out = _run(tmp_path, script("tiny_train.py"), "--steps", "10", "--accum", "3", "--clip", "3.0",
                    "--ref", "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    s = gradscope.load_run(out).steps
    assert len(s) == 10
    np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)
    assert (s["clip_max_norm"] == 3.0).all()
    np.testing.assert_array_equal(s["clipped"], np.array(ref["grad_norm"]) > 3.0)
    assert s["clipped"].any() and not s["clipped"].all()


def test_clip_grad_value_is_recorded(tmp_path):
    res, out = _run(tmp_path, script("tiny_train.py"), "--steps", "5", "--clip-value", "0.01", "--ref", "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    run = gradscope.load_run(out)
    s = run.steps
    assert (s["clip_value"] == 0.01).all() and s["clip_max_norm"].isna().all()
    np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=1e-5)  # measured before clamping
    assert run.meta["processes"][0]["clip_calls"]["clip_grad_value_"] == 5


def _weights(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("args", [
    ["tiny_train.py", "--steps", "15", "--accum", "2", "--clip", "0.3", "--opt", "adamw"],
    ["amp_train.py", "ref.json", "{save}", "1.0"],
])
def test_weights_bit_identical_with_and_without_gradscope(tmp_path, args):
    def argv(save):
        a = [script(args[0]), *[x.format(save=save) for x in args[1:]]]
        return a if "{save}" in " ".join(args) else [*a, "--save", save]

    plain = python(*argv(tmp_path / "plain.pt"), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    res, _ = _run(tmp_path, *argv(tmp_path / "recorded.pt"))
    assert res.returncode == 0, res.stderr
    a, b = _weights(tmp_path / "plain.pt"), _weights(tmp_path / "recorded.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_amp_skipped_steps_scale_and_unscaled_loss(tmp_path):
    res, out = _run(tmp_path, script("amp_train.py"), "ref.json", "w.pt")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    s = gradscope.load_run(out).steps
    assert len(s) == 40  # skipped steps are rows too
    np.testing.assert_array_equal(s["skipped"], ref["skipped"])
    assert s["skipped"].sum() >= 20 and (~s["skipped"]).sum() >= 5
    np.testing.assert_array_equal(s["loss_scale"], ref["scale"])
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)  # unscaled, not loss * 2**40
    ok = ~s["skipped"].to_numpy()
    np.testing.assert_allclose(s["grad_norm"][ok], np.array(ref["grad_norm"])[ok], rtol=1e-5)
    assert not np.isfinite(s["grad_norm"][~ok]).any()  # what the scaler found


def test_two_optimizers_at_different_rates(tmp_path):
    res, out = _run(tmp_path, script("two_optimizers.py"), "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    run = gradscope.load_run(out)
    a = run.steps[run.steps["optimizer"] == 0]
    b = run.steps[run.steps["optimizer"] == 1]
    assert list(a["step"]) == list(range(10)) and list(b["step"]) == list(range(5))
    np.testing.assert_allclose(a["grad_norm"], ref["a"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], ref["b"], rtol=1e-5)
    np.testing.assert_allclose(a["loss"], ref["loss_a"], rtol=1e-6)
    np.testing.assert_allclose(b["loss"], ref["loss_b"], rtol=1e-6)  # two backward() calls per step
    assert [o["class"] for o in run.meta["optimizers"]] == ["SGD", "Adam"]


def test_manual_update_loop_each_clip_call_is_a_step(tmp_path):
    res, out = _run(tmp_path, script("manual_update.py"), "ref.json")
    assert res.returncode == 0, res.stderr
    ref = _ref(tmp_path / "ref.json")
    run = gradscope.load_run(out)
    s = run.steps
    assert list(s["step"]) == list(range(12))
    np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)
    assert (s["clip_max_norm"] == 0.25).all()
    assert run.meta["optimizers"][0]["kind"] == "manual"
    assert list(run.layers.columns[3:]) == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                           "head.weight", "head.bias"]


def test_divergence_to_nan_is_recorded_where_it_happens(tmp_path):
    res, out = _run(tmp_path, script("tiny_train.py"), "--steps", "30", "--lr", "50", "--ref", "ref.json")
    assert res.returncode == 0, res.stderr
    ref = np.array(_ref(tmp_path / "ref.json")["grad_norm"])
    got = gradscope.load_run(out).steps["grad_norm"].to_numpy()
    assert not np.isfinite(ref).all(), "the test script must diverge"
    finite = np.isfinite(got)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5)
    # float32 gradients square past float32's range (as in torch's own clip_grad_norm_):
    # such a step reads inf, never a wrong finite number, and only once the norm is astronomical.
    assert np.all(~np.isfinite(ref) <= ~finite)
    assert np.all(ref[~finite & np.isfinite(ref)] > 1e18)
    first_bad = int(np.argmin(finite))
    assert first_bad > 0 and finite[:first_bad].all()


def test_layer_stride_and_no_layers(tmp_path):
    res, out = _run(tmp_path, "--layer-stride", "3", script("tiny_train.py"), "--steps", "10")
    assert res.returncode == 0, res.stderr
    assert list(gradscope.load_run(out).layers["step"]) == [0, 3, 6, 9]
    res, out = _run(tmp_path, "--layer-stride", "0", script("tiny_train.py"), "--steps", "3", name="nolayers")
    assert res.returncode == 0, res.stderr
    assert not list(out.glob("layers-*")) and len(gradscope.load_run(out).steps) == 3


def test_dataloader_spawn_workers_and_pool_over_main(tmp_path):
    res, out = _run(tmp_path, script("workers.py"))
    assert res.returncode == 0, res.stderr
    assert "workers ok" in res.stderr
    run = gradscope.load_run(out)
    assert len(run.steps) == 4
    assert [f.name for f in out.glob("steps-*")] == ["steps-r0.csv"]  # workers wrote nothing


def test_python_api_records_and_removes_every_hook(tmp_path):
    from torch.nn.utils import clip_grad
    from torch.optim import optimizer as optim_mod

    originals = (torch.autograd.backward, clip_grad._get_total_norm, clip_grad._clip_grads_with_norm_,
                 clip_grad.clip_grad_value_, torch.optim.Optimizer.__init__, torch.amp.GradScaler.step,
                 torch.amp.GradScaler.scale, torch.nn.utils.get_total_norm)
    hooks_before = len(optim_mod._global_optimizer_pre_hooks)
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # created before recording starts
    expected = []
    with gradscope.record(tmp_path / "api", flush_steps=2):
        assert torch.autograd.backward is not originals[0]
        for _ in range(5):
            loss = model(torch.randn(4, 3)).sum()
            opt.zero_grad()
            loss.backward()
            expected.append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item())
            opt.step()
    now = (torch.autograd.backward, clip_grad._get_total_norm, clip_grad._clip_grads_with_norm_,
           clip_grad.clip_grad_value_, torch.optim.Optimizer.__init__, torch.amp.GradScaler.step,
           torch.amp.GradScaler.scale, torch.nn.utils.get_total_norm)
    assert all(a is b for a, b in zip(originals, now))
    assert len(optim_mod._global_optimizer_pre_hooks) == hooks_before
    run = gradscope.load_run(tmp_path / "api")
    np.testing.assert_allclose(run.steps["grad_norm"], expected, rtol=1e-5)
    assert run.meta["status"] == "completed"
    assert list(run.layers.columns[3:]) == ["weight", "bias"]


def test_no_host_read_from_capture_code_between_flushes(tmp_path, monkeypatch):
    """Per step the recorder must not read a tensor value on the host (.item(), float(), ...)."""
    import traceback

    reads = []
    # The package's directory, not the text "gradscope/capture": a checkout may sit anywhere.
    capture_dir = os.path.dirname(gradscope.capture.api.__file__) + os.sep

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            stack = "".join(traceback.format_stack(limit=8))
            if capture_dir in stack:
                reads.append((name, stack))
            return orig(self, *a, **k)

        return wrapper

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradscope.record(tmp_path / "sync", flush_steps=1000, flush_seconds=1e9):
        for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        for _ in range(20):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        assert reads == [], reads[0][1]
        monkeypatch.undo()
    assert len(gradscope.load_run(tmp_path / "sync").steps) == 20


def test_tensor_thresholds_are_read_as_often_as_torch_reads_them(tmp_path, monkeypatch):
    """torch itself reads a tensor max_norm / clip_value / norm_type with float(), once per call;
    with gradscope recording, a step must read them no more often than that."""
    reads = []
    orig = torch.Tensor.__float__

    def spy(self):
        reads.append(1)
        return orig(self)

    def train(steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), torch.tensor(0.1), norm_type=torch.tensor(2.0))
            torch.nn.utils.clip_grad_value_(model.parameters(), torch.tensor(0.05))
            opt.step()

    monkeypatch.setattr(torch.Tensor, "__float__", spy)
    train(10)
    without = len(reads)
    reads.clear()
    with gradscope.record(tmp_path / "t", flush_steps=1000, flush_seconds=1e9):
        train(10)
        with_gradscope = len(reads)
    monkeypatch.undo()
    assert without == 30 and with_gradscope == without
    s = gradscope.load_run(tmp_path / "t").steps
    assert np.allclose(s["clip_max_norm"], 0.1)


def test_closure_optimizer_loss_comes_from_inside_step(tmp_path):
    """LBFGS runs backward() inside step(), several times: the step's loss and norm are its
    closure's first evaluation (the gradient the step starts from)."""
    res, out = _run(tmp_path, script("lbfgs_train.py"), "ref.json")
    assert res.returncode == 0, res.stderr
    s = gradscope.load_run(out).steps
    ref = _ref(tmp_path / "ref.json")
    assert list(s["step"]) == list(range(5))
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=1e-5)


def test_stop_on_nan_stops_within_one_flush_and_exits_1(tmp_path):
    res, out = _run(tmp_path, "--stop-on-nan", "--flush-steps", "5", script("tiny_train.py"),
                    "--steps", "500", "--lr", "50", "--progress", "progress")
    assert res.returncode == 1
    run = gradscope.load_run(out)
    bad = ~np.isfinite(run.steps["loss"]) | ~np.isfinite(run.steps["grad_norm"])
    first_bad = int(run.steps["step"][bad].iloc[0])
    assert "non-finite" in res.stderr and f"at step {first_bad}" in res.stderr
    stopped_after = int((tmp_path / "progress").read_text())
    assert stopped_after < first_bad + 5  # within one flush interval
    assert run.meta["status"] == "failed" and run.meta["exit_code"] == 1
    assert len(run.steps) == stopped_after + 2  # the step that raised was recorded too


@pytest.mark.parametrize("accum, stride", [(1, 1), (3, 2)])
def test_lean_path_writes_the_same_bytes_as_the_full_path(tmp_path, accum, stride):
    """Plain steps take the lean path (capture/rows.py: norms and losses in one stack, the
    global norm batched at flush); every recorded figure is the full path's, bit for bit."""
    def train(out, lean):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with gradscope.record(out, layer_stride=stride, flush_steps=7) as rec:
            calls = []
            if not lean:
                rec._record_lean = lambda *a: False
            else:
                orig = rec._record_lean
                rec._record_lean = lambda *a: calls.append(orig(*a)) or calls[-1]
            for _ in range(25):
                for _ in range(accum):
                    x = torch.randn(16, 6)
                    loss = (model(x) - x[:, :3]).pow(2).mean() / accum
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return calls

    calls = train(tmp_path / "lean", True)
    assert calls and all(calls)  # every step took the lean path
    train(tmp_path / "full", False)
    name = "steps-r0.csv"
    lean = (tmp_path / "lean" / name).read_text().splitlines()
    full = (tmp_path / "full" / name).read_text().splitlines()
    def cut(line):
        return (line.rsplit(",", 1)[0])
    assert [cut(l) for l in lean] == [cut(l) for l in full], name  # all but the wall-clock time
    for name in ("layers-r0-o0.f32", "layers-r0-o0.i64", "layers-r0-o0.json"):  # the layer store: same bytes
        assert (tmp_path / "lean" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    ref = gradscope.load_run(tmp_path / "lean").steps
    assert len(ref) == 25 and ref["grad_norm"].notna().all() and ref["loss"].notna().all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_records_nothing(tmp_path):
    """A forked child (a DataLoader worker under the fork start method) inherits the hooks and the
    recorder; its steps must not reach the parent's run (the recorder is switched off in the child
    by os.register_at_fork, not by a getpid() per call)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def step():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    with gradscope.record(tmp_path / "r") as rec:
        for _ in range(3):
            step()
        pending = rec._pending
        pid = os.fork()
        if pid == 0:  # the child: steps of its own, then leave without atexit handlers
            code = 0
            try:
                for _ in range(5):
                    step()
                code = 0 if not rec._on and rec._pending == pending else 3
            except Exception:
                code = 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        for _ in range(2):
            step()
    assert os.waitstatus_to_exitcode(status) == 0
    steps = gradscope.load_run(tmp_path / "r").steps
    assert steps["step"].tolist() == [0, 1, 2, 3, 4]
