"""The clip audit: each clipping bug found on a real script with the right kind, first step and
count; every control clean; training bit-identical; no tensor value read on the host; the
findings in `run`'s summary, `recommend` (report and --json) and `check` (warnings, --fail-on
clip-bugs, its YAML config, JUnit, GitHub annotations)."""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope.analysis.audit import KINDS, describe, findings
from gsutil import SCRIPTS, gradscope as gs, python

AUDIT = SCRIPTS / "audit"

# script -> (kind, first step, count), read off each script's loop:
BUGS = {
    # 30 steps, every clip before the scaler unscales (skipped overflow steps included: they are rows too)
    "clip_before_unscale": ("clip-before-unscale", 0, 30),
    # 20 steps, each followed by a clip: the first follows step 0, the last step 19
    "clip_after_step": ("clip-after-step", 0, 20),
    # 15 steps of 4 micro-batches, a clip after each backward: every step has a clip that a backward overwrote
    "clip_per_microbatch": ("clip-per-microbatch", 0, 15),
    # 20 steps, every clip leaves out the head
    "clip_partial": ("clip-partial", 0, 20),
    # 20 steps, no zero_grad: step 0 applies fresh gradients, steps 1..19 accumulated ones
    "no_zero_grad": ("no-zero-grad", 1, 19),
}


def _weights(path: Path) -> dict:
    sd = torch.load(path)
    flat = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{n}": t for n, t in v.items()})
        else:
            flat[k] = v
    return flat


@pytest.fixture(scope="module")
def bug_runs(tmp_path_factory):
    """Each bug script under `gradscope run` and under plain python (for the weights)."""
    tmp = tmp_path_factory.mktemp("bugs")
    out = {}
    for name in BUGS:
        res = gs("run", "--out", tmp / name, AUDIT / f"{name}.py", tmp / f"{name}-with.pt", cwd=tmp)
        assert res.returncode == 0, res.stderr
        plain = python(AUDIT / f"{name}.py", tmp / f"{name}-without.pt", cwd=tmp)
        assert plain.returncode == 0, plain.stderr
        out[name] = (tmp / name, res, tmp)
    return out


@pytest.mark.parametrize("name", list(BUGS))
def test_each_bug_is_found_with_its_kind_first_step_and_count(bug_runs, name):
    run_dir, res, _ = bug_runs[name]
    kind, first, count = BUGS[name]
    found = findings(gradscope.load_run(run_dir))
    assert [(f.kind, f.first_step, f.count) for f in found] == [(kind, first, count)]
    record = json.loads((run_dir / "process-r0.json").read_text())["clip_audit"]
    assert record["error"] is None and [f["kind"] for f in record["findings"]] == [kind]
    # `gradscope run` prints it in its summary, one line
    line = [ln for ln in res.stderr.splitlines() if "clip bug" in ln]
    assert len(line) == 1 and f"{kind} from step {first} ({count} steps): " in line[0]


@pytest.mark.parametrize("name", list(BUGS))
def test_every_finding_leaves_training_bit_identical(bug_runs, name):
    _, _, tmp = bug_runs[name]
    with_gs, without = _weights(tmp / f"{name}-with.pt"), _weights(tmp / f"{name}-without.pt")
    assert with_gs.keys() == without.keys()
    assert all(torch.equal(with_gs[k], without[k]) for k in with_gs)


def test_clip_before_unscale_states_the_threshold_the_real_gradients_get(bug_runs):
    """The message's number is what happens: after scaler.step, the applied (unscaled) gradient of a
    clipped step has norm max_norm / loss scale. Checked by replaying the script's loop by hand."""
    run_dir, _, _ = bug_runs["clip_before_unscale"]
    run = gradscope.load_run(run_dir)
    f = findings(run)[0]
    scale0 = float(run.steps["loss_scale"][run.steps["step"] == 0].iloc[0])
    assert scale0 == 2.0**16 and f"loss scale ({scale0:g} at step 0)" in f.message
    assert f"1 / 65536 = {1 / 65536:.3g}, not at 1" in f.message

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    applied = []
    for _ in range(8):
        x = torch.randn(16, 8)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), x.sum(1, keepdim=True))
        opt.zero_grad()
        scaler.scale(loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scale = scaler.get_scale()
        scaler.step(opt)  # unscales the (clipped) gradients in place
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())).item()
        if norm == norm and norm != float("inf"):
            applied.append((norm, scale))
        scaler.update()
    assert applied
    for norm, scale in applied:
        assert norm == pytest.approx(1.0 / scale, rel=1e-3)


def test_clip_partial_names_the_share_and_the_module_left_out(bug_runs):
    run_dir, _, _ = bug_runs["clip_partial"]
    f = findings(gradscope.load_run(run_dir))[0]
    # independently: the script's encoder (8->32->32) is clipped, its head (32->4) is not
    enc = 8 * 32 + 32 + 32 * 32 + 32
    head = 32 * 4 + 4
    assert f.detail["tensors"] == 6 and f.detail["clipped_tensors"] == 4
    assert f.detail["elements"] == enc + head and f.detail["clipped_elements"] == enc
    assert f.detail["left_out"] == [{"module": "head", "tensors": 2, "elements": head}]
    assert (f"covers 4 of the 6 parameter tensors the optimizer updates ({enc:,} of {enc + head:,} elements, "
            f"{enc / (enc + head):.1%}); left out: head ({head} elements)") in f.message


CONTROLS = [
    ("ok_amp_unscale.py",),  # AMP + accumulation, unscale_ before the clip
    ("ok_manual_zeroing.py",),  # p.grad = None, p.grad.zero_(), p.grad.data.zero_(), torch._foreach_zero_
    ("ok_actor_critic.py",),  # a backward between one model's clip and its step that never reaches it
]


@pytest.mark.parametrize("script", [c[0] for c in CONTROLS])
def test_controls_that_clip_right_give_no_finding(tmp_path, script):
    res = gs("run", "-q", "--out", tmp_path / "run", AUDIT / script, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = gradscope.load_run(tmp_path / "run")
    assert run.meta["processes"][0]["clip_calls"].get("clip_grad_norm_", 0) > 0  # it did clip
    assert run.meta["processes"][0]["clip_audit"] == {"findings": [], "error": None}
    assert findings(run) == []


def test_accumulating_loop_with_clip_before_step_gives_no_finding(tmp_path):
    """The usual loop: zero_grad, k backward passes, one clip, step (tests/scripts/tiny_train.py)."""
    res = gs("run", "-q", "--out", tmp_path / "run", SCRIPTS / "tiny_train.py", "--accum", "3", "--clip", "0.5",
             "--steps", "8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert findings(gradscope.load_run(tmp_path / "run")) == []


@pytest.mark.slow
@pytest.mark.parametrize("accum,algorithm", [(2, "norm"), (1, "norm"), (3, "value")])
def test_lightning_with_accumulation_and_gradient_clip_val_gives_no_finding(tmp_path, accum, algorithm):
    pytest.importorskip("lightning")
    res = gs("run", "-q", "--out", tmp_path / "run", AUDIT / "ok_lightning.py", tmp_path / "w.pt", accum, algorithm,
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = gradscope.load_run(tmp_path / "run").meta["processes"][0]
    fn = "clip_grad_norm_" if algorithm == "norm" else "clip_grad_value_"
    assert proc["clip_calls"][fn] == 12 // accum  # Lightning clipped every step
    assert proc["clip_audit"] == {"findings": [], "error": None}


@pytest.mark.slow
def test_hf_trainer_with_max_grad_norm_and_accumulation_gives_no_finding(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    res = gs("run", "-q", "--out", tmp_path / "run", AUDIT / "ok_hf_trainer.py", tmp_path / "hf", cwd=tmp_path,
             timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = gradscope.load_run(tmp_path / "run").meta["processes"][0]
    assert proc["clip_calls"]["clip_grad_norm_"] == 8  # 64 samples / (4 x 2 accumulation) steps, each clipped
    assert proc["clip_audit"] == {"findings": [], "error": None}


# ---------------------------------------------------------------- no host read


_READS = ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy")


@pytest.mark.parametrize("name", list(BUGS))
def test_the_audit_reads_no_tensor_value_on_the_host(tmp_path, monkeypatch, name):
    """Running a bug script in-process reads tensors on the host exactly as often with recording
    (and the audit finding its bug) as without: the audit decides from order and identity only."""
    counts = {"n": 0}

    def spy(orig):
        def wrapper(self, *a, **k):
            counts["n"] += 1
            return orig(self, *a, **k)

        return wrapper

    monkeypatch.setattr(sys, "argv", [str(AUDIT / f"{name}.py")])
    for attr in _READS:
        monkeypatch.setattr(torch.Tensor, attr, spy(getattr(torch.Tensor, attr)))
    runpy.run_path(str(AUDIT / f"{name}.py"), run_name="__main__")
    without = counts["n"]
    counts["n"] = 0
    with gradscope.record(tmp_path / "r", flush_steps=10_000, flush_seconds=1e9) as rec:
        runpy.run_path(str(AUDIT / f"{name}.py"), run_name="__main__")
        during = counts["n"]
        assert rec._audit._found  # the bug was found meanwhile
    monkeypatch.undo()
    assert during == without
    assert [f.kind for f in findings(gradscope.load_run(tmp_path / "r"))] == [BUGS[name][0]]


# ---------------------------------------------------------------- analysis (pure) and presentation


def test_describe_every_kind_in_one_sentence():
    records = {
        "clip-before-unscale": {"function": "clip_grad_value_", "threshold": 0.5, "first_step": 3},
        "clip-after-step": {"function": "clip_grad_norm_"},
        "clip-per-microbatch": {"function": "clip_grad_norm_"},
        "clip-partial": {"function": "clip_grad_norm_", "tensors": 10, "clipped_tensors": 2, "elements": 1000,
                         "clipped_elements": 100, "left_out_modules": 5,
                         "left_out": [{"module": m, "tensors": 2, "elements": e}
                                      for m, e in (("a", 500), ("b", 200), ("c", 100), ("d", 50))]},
        "no-zero-grad": {},
        "clip-local-norm": {"function": "clip_grad_norm_", "threshold": 1.0, "first_step": 2,
                            "ranks": [(0, 0.5, 2.0), (1, 1.5, 2.0)]},
    }
    for kind in KINDS:
        text = describe({"kind": kind, **records[kind]}, loss_scale=1024.0)
        assert text.endswith(".") and "; " in text  # what happens; what to do
    assert "(1024 at step 3), so the real gradients are clipped at clip_value / loss scale = 0.5 / 1024 = 0.000488" \
        in describe({"kind": "clip-before-unscale", **records["clip-before-unscale"]}, 1024.0)
    assert "2 of the 10 parameter tensors the optimizer updates (100 of 1,000 elements, 10.0%); left out: " \
           "a (500 elements), b (200 elements), c (100 elements) and 2 more modules" \
        in describe({"kind": "clip-partial", **records["clip-partial"]})
    # the loss scale unknown (no row): no number is made up
    assert "divided by the loss scale" in describe({"kind": "clip-before-unscale", "threshold": 1.0}, None)


def test_recommend_shows_findings_above_the_verdict_and_in_json(bug_runs, tmp_path):
    run_dir, _, _ = bug_runs["clip_after_step"]
    res = gs("recommend", run_dir, cwd=tmp_path, env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "clip bug  clip-after-step from step 0 (20 steps): clip_grad_norm_ is called after" in out
    assert out.index("clip bug") < out.index("verdict")
    doc = json.loads(gs("recommend", run_dir, "--json", cwd=tmp_path).stdout)
    assert [set(f) for f in doc["findings"]] == [{"kind", "first_step", "count", "message"}]
    assert (doc["findings"][0]["kind"], doc["findings"][0]["first_step"], doc["findings"][0]["count"]) == (
        "clip-after-step", 0, 20)
    assert doc["optimizers"][0]["findings"] == doc["findings"]


def test_recommend_json_findings_is_an_empty_list_when_none(tmp_path):
    res = gs("run", "-q", "--out", tmp_path / "run", SCRIPTS / "tiny_train.py", "--clip", "1.0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(gs("recommend", tmp_path / "run", "--json", cwd=tmp_path).stdout)
    assert doc["findings"] == [] and doc["optimizers"][0]["findings"] == []


def test_check_warns_and_fails_on_clip_bugs_when_asked(bug_runs, tmp_path):
    run_dir, _, _ = bug_runs["no_zero_grad"]
    res = gs("check", run_dir, cwd=tmp_path)
    assert res.returncode == 0
    assert "warning: no-zero-grad from step 1 (19 steps): optimizer.step() runs again" in res.stdout

    res = gs("check", run_dir, "--fail-on", "clip-bugs", "--junit", tmp_path / "j.xml", "--json", cwd=tmp_path)
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert [c["name"] for c in doc["checks"] if c["status"] == "fail"] == ["clip-bugs"]
    assert doc["findings"][0]["kind"] == "no-zero-grad"
    junit = (tmp_path / "j.xml").read_text()
    assert '<testcase name="clip-bugs"' in junit and "no-zero-grad from step 1" in junit

    config = tmp_path / "check.yaml"
    config.write_text("fail_on: [clip-bugs]\n")
    assert gs("check", run_dir, "--config", config, cwd=tmp_path).returncode == 1

    env = {**os.environ, "GITHUB_ACTIONS": "true"}
    res = gs("check", run_dir, cwd=tmp_path, env=env)
    assert res.returncode == 0 and "::warning title=gradscope clip audit::" in res.stdout
    res = gs("check", run_dir, "--fail-on", "clip-bugs", cwd=tmp_path, env=env)
    assert res.returncode == 1 and "::error title=gradscope check clip-bugs::" in res.stdout


def test_check_fail_on_clip_bugs_passes_a_clean_run_and_skips_a_foreign_log(tmp_path):
    res = gs("run", "-q", "--out", tmp_path / "run", SCRIPTS / "tiny_train.py", "--clip", "1.0", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = gs("check", tmp_path / "run", "--fail-on", "clip-bugs", cwd=tmp_path)
    assert res.returncode == 0 and "PASS clip-bugs: the clip audit found no clipping bug" in res.stdout
    log = tmp_path / "log.csv"
    log.write_text("step,grad_norm\n" + "".join(f"{i},{1 + i % 3}\n" for i in range(20)))
    res = gs("check", log, "--fail-on", "clip-bugs", cwd=tmp_path)
    assert res.returncode == 0 and "SKIP clip-bugs: no clip audit in this input" in res.stdout
    bad = gs("check", log, "--fail-on", "clip-bug", cwd=tmp_path)
    assert bad.returncode == 2 and "clip-bugs" in bad.stderr


@pytest.mark.slow
def test_lightning_clip_in_on_after_backward_with_accumulation_is_clip_per_microbatch(tmp_path):
    """Under Lightning's closures too: a clip in on_after_backward runs after each of the 2 micro-batches
    of every window (12 batches, 6 steps), so each step's first clip is overwritten by the second backward."""
    pytest.importorskip("lightning")
    script = AUDIT / "lightning_clip_per_microbatch.py"
    res = gs("run", "-q", "--out", tmp_path / "run", script, tmp_path / "with.pt", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = findings(gradscope.load_run(tmp_path / "run"))
    assert [(f.kind, f.first_step, f.count) for f in found] == [("clip-per-microbatch", 0, 6)]
    plain = python(script, tmp_path / "without.pt", cwd=tmp_path, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = _weights(tmp_path / "with.pt"), _weights(tmp_path / "without.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_audit_that_failed_says_so_instead_of_looking_clean(tmp_path, monkeypatch):
    """A failure inside the audit turns it off (training goes on, bit for bit) and is recorded;
    check and recommend then say that findings may be missing, rather than report a clean run."""
    from gradscope.capture import audit as capture_audit

    def broken(self, opt):
        raise RuntimeError("boom")

    # Called at the first zero_grad (the optimizer's audit state does not exist yet), inside a guard.
    monkeypatch.setattr(capture_audit.ClipAudit, "_owners_of_groups", broken)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.record(tmp_path / "r"):
        for _ in range(12):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["processes"][0]["clip_audit"] == {"findings": [], "error": "RuntimeError: boom"}
    res = gs("check", tmp_path / "r", "--fail-on", "clip-bugs", cwd=tmp_path)
    assert res.returncode == 0 and "SKIP clip-bugs: the clip audit stopped early" in res.stdout
    assert "note: the clip audit stopped early on rank 0 (RuntimeError: boom)" in res.stdout
    doc = json.loads(gs("recommend", tmp_path / "r", "--json", cwd=tmp_path).stdout)
    assert any("the clip audit stopped early" in n for n in doc["notes"])
