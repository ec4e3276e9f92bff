"""Sharded training under `gradscope run`: torch FSDP1 with real torchrun (2 ranks, gloo, CPU).

tests/dist_scripts/fsdp1_cases.py trains five FSDP1 cases (flat parameters and
use_orig_params=True; FULL_SHARD and SHARD_GRAD_OP; FSDP's own clip, no clip, and
the bug of clipping the local shards with torch.nn.utils.clip_grad_norm_) and
computes, inside the script, a float64 reference of the global pre-clip norm from
the ranks' shards, and of every original parameter's full-gradient norm. Launches
dominate the time: one recorded launch runs every case; a plain launch proves the
weights bit-identical; one `--clip-norm` launch proves it is FSDP's own clip.

The fast tests below judge hand-made runs whose process files say norm_scope
rank-local: recommend, check, watch and compare state that the figures are per-rank
and judge no regime on them.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradscope
from gradscope.analysis.ranks import RANK_LOCAL_NOTE, disagreement_note, rank_disagreement
from gsutil import env_without_gradscope, gradscope as gs

CASES = ["flat_full_clip", "orig_grad_op_clip", "flat_grad_op", "orig_full", "local_clip"]  # optimizer ids 0..4
FSDP_CLIP = ["flat_full_clip", "orig_grad_op_clip"]
TAU = 0.8  # fsdp1_cases.py's default --tau
SCRIPT = str(Path(__file__).resolve().parent / "dist_scripts" / "fsdp1_cases.py")
USER_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]

needs_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *map(str, args)]


def _tail(res) -> str:
    return (res.stdout + res.stderr)[-6000:]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp1")
    res = gs("run", "-q", "--out", tmp / "run", "--", *_torchrun(SCRIPT, tmp / "out"), cwd=tmp, timeout=420)
    assert res.returncode == 0, _tail(res)
    return tmp / "run", tmp / "out"


def _ref(out: Path, case: str, rank: int = 0) -> dict:
    return json.loads((out / f"ref-{case}-r{rank}.json").read_text())


def _steps(run, case: str, rank: int):
    s = run.steps
    return s[(s["rank"] == rank) & (s["optimizer"] == CASES.index(case))].reset_index(drop=True)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", CASES)
def test_grad_norm_is_the_global_pre_clip_norm_on_every_rank(recorded, case):
    """Every step, on both ranks: the global pre-clip norm (the float64 sum of the ranks' shard
    squares), not the rank's shard norm after FSDP's clip; the ranks agree."""
    run_dir, out = recorded
    run = gradscope.load_run(run_dir)
    for rank in (0, 1):
        ref = np.array(_ref(out, case, rank)["grad_norm"])
        s = _steps(run, case, rank)
        assert list(s["step"]) == list(range(len(ref)))
        assert np.abs(s["grad_norm"].to_numpy() - ref).max() < 1e-4
        np.testing.assert_allclose(s["grad_norm"], ref, rtol=1e-5)
    assert rank_disagreement(run.steps).empty
    for p in run.meta["processes"]:
        assert (p["norm_scope"], p["layer_norm_scope"]) == ("global", "global")


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", FSDP_CLIP)
def test_fsdp_clip_total_threshold_and_clipped_flags(recorded, case):
    """model.clip_grad_norm_(tau): FSDP's returned total is reused as is, the threshold is tau,
    and `clipped` is set exactly where the global norm exceeds it (some steps, not all)."""
    run_dir, out = recorded
    run = gradscope.load_run(run_dir)
    for rank in (0, 1):
        ref = _ref(out, case, rank)
        s = _steps(run, case, rank)
        np.testing.assert_array_equal(s["grad_norm"].to_numpy(np.float32), np.float32(ref["clip_total"]))
        assert (s["clip_max_norm"] == TAU).all()
        np.testing.assert_array_equal(s["clipped"], np.array(ref["grad_norm"]) > TAU)
        assert s["clipped"].any() and not s["clipped"].all()
    assert all(p["clip_calls"].get("clip_grad_norm_") == 2 * 8 + 8 for p in run.meta["processes"])


@pytest.mark.slow
@needs_gloo
def test_unclipped_cases_have_no_threshold(recorded):
    run = gradscope.load_run(recorded[0])
    for case in ("flat_grad_op", "orig_full"):
        s = _steps(run, case, 0)
        assert s["clip_max_norm"].isna().all() and not s["clipped"].any()


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("case", CASES)
def test_layer_table_has_the_users_names_and_full_parameter_norms(recorded, case):
    """No _fsdp_wrapped_module or _flat_param in the names; each column is the norm of the full
    original parameter's gradient (reduced across ranks), on every rank, never NaN."""
    run_dir, out = recorded
    store = gradscope.load_run(run_dir).layer_norms  # the layer store (format version 2)
    for rank in (0, 1):
        o = CASES.index(case)
        assert store.names(rank, o) == USER_NAMES
        ref = pd.DataFrame(_ref(out, case, rank)["layers"])[USER_NAMES].to_numpy()
        got = store.rows(rank, o, slice(None))
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.slow
@needs_gloo
def test_clip_local_norm_fires_on_the_local_clip_and_nowhere_else(recorded):
    """torch's clip_grad_norm_ on FSDP1 flat shards: a clip-local-norm finding naming each rank's
    effective threshold (tau x global / the rank's shard norm, from the script's own numbers);
    FSDP's own clip and the unclipped cases: no finding. `clipped` says what each rank's own clip did."""
    from gradscope.analysis.audit import findings

    run_dir, out = recorded
    run = gradscope.load_run(run_dir)
    found = findings(run)
    assert [(f.kind, f.optimizer, f.first_step, f.count) for f in found] == [
        ("clip-local-norm", CASES.index("local_clip"), 0, 8)]
    msg = found[0].message
    for rank in (0, 1):
        ref = _ref(out, "local_clip", rank)
        g, local = ref["grad_norm"][0], ref["local_norm"][0]
        assert f"rank {rank} measured {local:.4g} of the global {g:.4g}" in msg
        assert f"as if max_norm were {TAU * g / local:.4g}" in msg
        s = _steps(run, "local_clip", rank)
        np.testing.assert_array_equal(s["clipped"], np.array(ref["local_norm"]) > TAU)
    assert "model.clip_grad_norm_(max_norm)" in msg
    res = gs("check", str(run_dir), "--fail-on", "clip-bugs", timeout=120)
    assert res.returncode == 1 and "clip-local-norm" in res.stdout, _tail(res)


@pytest.mark.slow
@needs_gloo
def test_recommend_names_the_regime_of_fsdps_clip(recorded):
    """recommend judges the global norms against FSDP's threshold (not 'unclipped', not per-rank)."""
    res = gs("recommend", str(recorded[0]), "--optimizer", "0", "--json", timeout=120)
    assert res.returncode == 0, _tail(res)
    doc = json.loads(res.stdout)
    ref = np.array(_ref(recorded[1], "flat_full_clip")["grad_norm"])
    assert doc["clip_norm"] == TAU and doc["clip_norm_source"] == "script"
    assert doc["clipped_steps"] == int((ref > TAU).sum())
    assert doc["regime"] == ("always-clips" if (ref > TAU).mean() >= 0.5 else "healthy")
    assert not any("rank-local" in n for n in doc["notes"]) and doc["norm_scope"] == "global"


@pytest.mark.slow
@needs_gloo
def test_training_is_bit_identical_with_and_without_gradscope(recorded, tmp_path):
    """The recorder's collectives, hooks and the FSDP clip patch change nothing: same final weights."""
    _, out = recorded
    plain = tmp_path / "plain"
    res = subprocess.run(_torchrun(SCRIPT, plain), cwd=tmp_path, capture_output=True, text=True,
                         timeout=420, env=env_without_gradscope())
    assert res.returncode == 0, _tail(res)
    for case in CASES:
        a, b = torch.load(out / f"state-{case}.pt"), torch.load(plain / f"state-{case}.pt")
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{case}: {k} differs"


@pytest.mark.slow
@needs_gloo
def test_clip_norm_option_is_fsdps_own_global_clip(recorded, tmp_path):
    """`gradscope run --clip-norm tau` on the same script without its clip calls gives, bit for bit,
    the weights of the script calling model.clip_grad_norm_(tau) itself; the recorded threshold,
    global norm and clipped flags are those of that clip."""
    _, out = recorded
    res = gs("run", "-q", "--clip-norm", str(TAU), "--out", tmp_path / "run", "--",
             *_torchrun(SCRIPT, tmp_path / "out", "--cases", ",".join(FSDP_CLIP), "--no-clip"),
             cwd=tmp_path, timeout=420)
    assert res.returncode == 0, _tail(res)
    run = gradscope.load_run(tmp_path / "run")
    for i, case in enumerate(FSDP_CLIP):
        a, b = torch.load(out / f"state-{case}.pt"), torch.load(tmp_path / "out" / f"state-{case}.pt")
        for k in a:
            assert torch.equal(a[k], b[k]), f"{case}: {k} differs from FSDP's own clip"
        ref = np.array(_ref(out, case)["grad_norm"])
        s = run.steps[(run.steps["rank"] == 0) & (run.steps["optimizer"] == i)]
        np.testing.assert_allclose(s["grad_norm"], ref, rtol=1e-5)
        assert (s["clip_max_norm"] == TAU).all()
        np.testing.assert_array_equal(s["clipped"], ref > TAU)
    # gradscope's own clip calls are not the script's
    assert all(not p["clip_calls"] for p in run.meta["processes"])


# ---------------------------------------------------------------------- fast: rank-local norms


def _rank_local_run(tmp_path: Path, n: int = 60) -> Path:
    """A two-rank recording whose process files say norm_scope rank-local: the ranks' norms
    differ (each its own shard), with a threshold the shards exceed on most steps."""
    from gradscope import rundir

    d = tmp_path / "rl"
    d.mkdir()
    rng = np.random.default_rng(0)
    for rank, scale in ((0, 1.0), (1, 1.7)):
        g = scale * np.exp(rng.normal(0.0, 0.1, n))
        rows = pd.DataFrame({
            "optimizer": 0, "step": np.arange(n), "grad_norm": g, "loss": np.linspace(2, 1, n),
            "clip_max_norm": 0.5, "clipped": (g > 0.5).astype(int), "clip_value": np.nan, "skipped": 0,
            "loss_scale": np.nan, "lr": 1e-3, "time": 1.7e9 + np.arange(n),
        })
        rows.to_csv(d / rundir.steps_file(rank), index=False)
        (d / rundir.process_file(rank)).write_text(json.dumps({
            "format": rundir.FORMAT_NAME, "format_version": rundir.FORMAT_VERSION, "rank": rank, "world_size": 2,
            "status": "completed", "optimizers": [{"id": 0, "class": "AdamW", "kind": "optimizer", "steps": n}],
            "clip_calls": {"clip_grad_norm_": n}, "clip_thresholds": {"clip_grad_norm_": [0.5]},
            "clip_audit": {"findings": [], "error": None},
            "norm_scope": "rank-local", "layer_norm_scope": "rank-local",
            "closed": True, "recording_error": None,  # a clean stop wrote it (rundir.recording_gaps)
        }))
    (d / rundir.META_FILE).write_text(json.dumps({"format": rundir.FORMAT_NAME, "format_version": rundir.FORMAT_VERSION,
                                                  "status": "completed", "exit_code": 0, "command": ["train.py"]}))
    return d


def test_recommend_says_rank_local_figures_are_per_rank_and_judges_no_regime(tmp_path):
    d = _rank_local_run(tmp_path)
    res = gs("recommend", str(d), "--json", timeout=120)
    assert res.returncode == 0, _tail(res)
    doc = json.loads(res.stdout)
    assert doc["regime"] is None and doc["recommended_clip_norm"] is None and doc["norm_scope"] == "rank-local"
    assert RANK_LOCAL_NOTE in doc["notes"]
    assert any("each rank recorded the norm of its own shard" in n for n in doc["notes"])
    assert not any("desynchronised" in n for n in doc["notes"])
    text = gs("recommend", str(d), timeout=120)
    assert text.returncode == 0 and "per-rank" in text.stdout, _tail(text)
    assert "always-clips" not in text.stdout and "not judged (per-rank norms)" in text.stdout
    assert "no finite gradient norm" not in text.stdout


def test_check_skips_regime_policies_on_rank_local_norms(tmp_path):
    """Regime rules and the clip-fraction limit are SKIP (neither PASS nor FAIL) with the reason;
    the non-finite check still judges the run."""
    d = _rank_local_run(tmp_path)
    res = gs("check", str(d), "--fail-on", "always-clips", "--max-clip-fraction", "0.1", "--json", timeout=120)
    assert res.returncode == 0, _tail(res)
    doc = json.loads(res.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("fail-on", "max-clip-fraction"):
        assert checks[name]["status"] == "skipped" and "per-rank" in checks[name]["message"]
    assert checks["non-finite"]["status"] == "pass"


def test_compare_and_watch_say_the_figures_are_per_rank(tmp_path):
    d = _rank_local_run(tmp_path)
    res = gs("compare", str(d), str(d), "--json", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, _tail(res)
    runs = json.loads(res.stdout)["runs"]
    assert all(r["norm_scope"] == "rank-local" and r["regime"] is None for r in runs)
    text = gs("compare", str(d), str(d), cwd=tmp_path, timeout=120)
    assert f"note: {d}: {RANK_LOCAL_NOTE}" in text.stdout
    w = gs("watch", str(d), "--exit-on-end", "--interval", "0.05", timeout=120)
    assert w.returncode == 0 and RANK_LOCAL_NOTE in w.stdout and "always-clips" not in w.stdout, _tail(w)


def test_disagreement_note_names_sharding_when_the_norms_are_rank_local():
    steps = pd.DataFrame({"rank": [0, 1], "optimizer": [0, 0], "step": [0, 0], "grad_norm": [0.43, 0.87]})
    sharded = disagreement_note(steps, 0, sharded=True)
    assert "sharded" in sharded and "desynchronised" not in sharded
    assert "desynchronised" in disagreement_note(steps, 0)


def test_wrapper_levels_are_left_out_of_parameter_names():
    from gradscope.capture.names import strip_wrappers

    assert strip_wrappers("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.w") \
        == "layers.0.w"
    assert strip_wrappers("module.encoder._orig_mod.weight") == "encoder.weight"
    assert strip_wrappers("encoder.module.weight") == "encoder.module.weight"  # a user's module named `module`


def test_an_unknown_flat_shard_is_recorded_as_rank_local(tmp_path):
    """A flat parameter no FSDP handle owns (the shard of an engine gradscope does not know) cannot
    be reduced: its norm is recorded as is, and the process file says it is rank-local."""
    import torch.distributed.fsdp  # noqa: F401  (FSDP1 loaded, as in a script that uses it)

    model = torch.nn.Linear(4, 2)
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))
    flat._is_flat_param = True  # what FSDP1's FlatParameter carries
    opt = torch.optim.SGD([flat], lr=0.1)
    grads = []
    with gradscope.record(tmp_path / "run"):
        for i in range(3):
            flat.grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(i))
            grads.append(flat.grad.double().norm().item())
            opt.step()
    proc = json.loads((tmp_path / "run" / "process-r0.json").read_text())
    assert (proc["norm_scope"], proc["layer_norm_scope"]) == ("rank-local", "rank-local")
    run = gradscope.load_run(tmp_path / "run")
    np.testing.assert_allclose(run.steps["grad_norm"], grads, rtol=1e-6)
