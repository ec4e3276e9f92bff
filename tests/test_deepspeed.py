"""DeepSpeed ZeRO under `gradscope run`: real torchrun (2 ranks, gloo, CPU), real engines.

tests/dist_scripts/deepspeed_cases.py trains one engine per case (ZeRO 0, 1, 2, 3, with and
without gradient accumulation, gradient_clipping from a dict, a JSON file, the config's own
optimizer, a loss scale) and computes, before every optimizer step, a float64 reference of the global
pre-clip gradient norm from the full weights and every rank's micro-batches. Three launches:
recorded (gradient_clipping TAU), plain torchrun (the same, without gradscope), and recorded
with `--clip-norm TAU` over a config without gradient_clipping.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradscope
from gsutil import env_without_gradscope, gradscope as gs, python

pytestmark = [
    pytest.mark.slow,
    # find_spec, not importorskip: importing deepspeed here would put it in every later test's process
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the frameworks extra)"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
CASES_PY = str(SCRIPTS / "deepspeed_cases.py")
sys.path.insert(0, str(SCRIPTS))
from deepspeed_cases import CASES, LOSS_SCALE, STEPS, TAU  # noqa: E402  (the script imports deepspeed only when it runs)

NAMES = [c[0] for c in CASES]  # optimizer ids 0.. in this order
RTOL = 1e-4  # the contract: within 1e-4 of the float64 reference (float32 arithmetic gives ~1e-7)


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
def runs(tmp_path_factory):
    """(recorded run, its refs), plain refs, (--clip-norm run, its refs)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    res = gs("run", "--out", tmp / "run", "--", *_torchrun(CASES_PY, tmp / "out"), cwd=tmp, timeout=600)
    assert res.returncode == 0, _tail(res)
    plain = python(*_torchrun(CASES_PY, tmp / "plain")[1:], cwd=tmp, timeout=600, env=env_without_gradscope())
    assert plain.returncode == 0, _tail(plain)
    res = gs("run", "--out", tmp / "clip", "--clip-norm", TAU, "--",
             *_torchrun(CASES_PY, tmp / "clipout", "--config-clip", 0), cwd=tmp, timeout=600)
    assert res.returncode == 0, _tail(res)
    return (tmp / "run", tmp / "out"), tmp / "plain", (tmp / "clip", tmp / "clipout")


def _ref(out: Path, case: str, rank: int = 0) -> dict:
    return json.loads((out / f"ref-{case}-r{rank}.json").read_text())


def _steps(run_dir: Path, case: str, rank: int):
    s = gradscope.load_run(run_dir).steps
    return s[(s["rank"] == rank) & (s["optimizer"] == NAMES.index(case))].reset_index(drop=True)


def _check_norms(run_dir: Path, out: Path, case: str) -> None:
    for rank in (0, 1):
        ref = _ref(out, case, rank)
        s = _steps(run_dir, case, rank)
        assert list(s["step"]) == list(range(STEPS)), f"{case} r{rank}: one row per optimizer step"
        want = np.array(ref["norms"])
        got = s["grad_norm"].to_numpy()
        err = np.abs(got - want) / want
        assert err.max() < RTOL, f"{case} r{rank}: grad_norm {got} vs float64 {want} (max rel err {err.max():.2g})"
        # DeepSpeed's own number is the same one (the script read it with get_global_grad_norm)
        if ref["ds_norms"][0] is not None:
            assert np.allclose(got, ref["ds_norms"], rtol=1e-6, atol=0)
        assert (s["clip_max_norm"] == TAU).all(), f"{case} r{rank}: threshold {set(s['clip_max_norm'])}"
        # the flag: the float64 norm above the threshold (no reference norm is within 1e-4 of it)
        assert np.all(np.abs(want - TAU) > RTOL * want)
        assert list(s["clipped"]) == list(want > TAU), f"{case} r{rank}: clipped flags"
        assert not s["skipped"].any()
        scale = LOSS_SCALE if case == "z2_scaled" else np.nan
        assert np.array_equal(s["loss_scale"].to_numpy(), np.full(STEPS, scale), equal_nan=True)
        # the loss: what the micro-batches passed to backward (DeepSpeed divides by the accumulation
        # steps), without the loss scale
        assert np.allclose(s["loss"].to_numpy(), ref["losses"], rtol=1e-5, atol=0), f"{case} r{rank}: loss"


@pytest.mark.parametrize("case", NAMES)
def test_grad_norm_is_the_global_pre_clip_norm(runs, case):
    """Every step's grad_norm (both ranks) is the global pre-clip norm within 1e-4 of float64;
    clip_max_norm is DeepSpeed's gradient_clipping; clipped is right; loss is the step's."""
    (run_dir, out), _, _ = runs
    _check_norms(run_dir, out, case)


def test_some_steps_clip_and_some_do_not(runs):
    """The flags test above can fail both ways: TAU sits inside the cases' norms."""
    (_, out), _, _ = runs
    flags = np.concatenate([np.array(_ref(out, c)["norms"]) > TAU for c in NAMES])
    assert flags.any() and not flags.all()


def test_process_file_says_the_norm_is_global(runs):
    (run_dir, _), _, _ = runs
    for rank in (0, 1):
        proc = json.loads((run_dir / f"process-r{rank}.json").read_text())
        assert proc["norm_scope"] == "global"
        opts = proc["optimizers"]
        assert [o["steps"] for o in opts] == [STEPS] * len(NAMES)  # one row per DeepSpeed step, no other
        n_model = 12 * 24 + 24 + 24 * 24 + 24 + 24 * 3 + 3
        assert [o["parameters"] for o in opts] == [n_model] * len(NAMES)
        # per-layer norms would be rank-local partitions here: no layer table rather than a wrong one
        assert all(o["layers_file"] is None for o in opts)
        assert not list(run_dir.glob(f"layers-r{rank}-*.csv"))


@pytest.mark.parametrize("case", NAMES)
def test_weights_bit_identical_with_and_without_gradscope(runs, case):
    (_, out), plain, _ = runs
    a = torch.load(out / f"weights-{case}.pt")
    b = torch.load(plain / f"weights-{case}.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{case}: {k} differs"


@pytest.mark.parametrize("case", NAMES)
def test_clip_norm_is_deepspeeds_own_clip(runs, case):
    """`gradscope run --clip-norm TAU` over a config without gradient_clipping trains exactly as
    the config with gradient_clipping TAU (bit for bit), and records TAU and the global norm."""
    _, plain, (clip_dir, clip_out) = runs
    a = torch.load(clip_out / f"weights-{case}.pt")
    b = torch.load(plain / f"weights-{case}.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{case}: {k} differs from DeepSpeed's own clip at {TAU}"
    _check_norms(clip_dir, clip_out, case)


def test_recommend_names_the_regime(runs):
    """TAU is below most of this case's norms: always-clips (before this, gradscope said unclipped)."""
    (run_dir, out), _, _ = runs
    case = "z3"
    norms = np.array(_ref(out, case)["norms"])
    assert (norms[1:] > TAU).mean() >= 0.5  # the truth, from the float64 reference
    res = gs("recommend", run_dir, "--optimizer", NAMES.index(case), "--json")
    assert res.returncode == 0, _tail(res)
    rep = json.loads(res.stdout)
    assert rep["regime"] == "always-clips", rep["meaning"]
    assert rep["clip_norm"] == pytest.approx(TAU)


HF_PY = str(SCRIPTS / "hf_deepspeed.py")


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs transformers and accelerate (the frameworks extra)")
    tmp = tmp_path_factory.mktemp("hf_deepspeed")
    res = gs("run", "--out", tmp / "run", "--", *_torchrun(HF_PY, tmp / "out"), cwd=tmp, timeout=600)
    assert res.returncode == 0, _tail(res)
    return tmp / "run", tmp / "out"


def test_hf_trainer_with_deepspeed_records_the_global_norm(hf_run):
    """Trainer(deepspeed=config with gradient_clipping "auto"), ZeRO 2, accumulation 2: rank 0's
    grad_norm is the float64 global pre-clip norm on every step, the threshold is max_grad_norm,
    and the clipped flags follow; the Trainer's own logged grad_norm is the same number."""
    run_dir, out = hf_run
    first = json.loads((out / "ref-r0.json").read_text())
    MAX_GRAD_NORM, HF_STEPS = first["max_grad_norm"], first["steps"]
    run = gradscope.load_run(run_dir)
    proc = json.loads((run_dir / "process-r0.json").read_text())
    assert proc["norm_scope"] == "global"
    ids = [o["id"] for o in proc["optimizers"] if o["steps"]]
    assert len(ids) == 1, proc["optimizers"]  # one recorded optimizer: DeepSpeed's steps, no other
    for rank in (0, 1):
        ref = json.loads((out / f"ref-r{rank}.json").read_text())
        s = run.steps[(run.steps["rank"] == rank) & (run.steps["optimizer"] == ids[0])]
        want = np.array(ref["norms"])
        assert len(want) == HF_STEPS and len(s) == HF_STEPS
        got = s["grad_norm"].to_numpy()
        err = np.abs(got - want) / want
        assert err.max() < RTOL, f"r{rank}: {got} vs float64 {want}"
        assert np.allclose(got, ref["hf_norms"], rtol=1e-6)
        assert (s["clip_max_norm"] == MAX_GRAD_NORM).all()
        assert np.all(np.abs(want - MAX_GRAD_NORM) > RTOL * want)
        assert list(s["clipped"]) == list(want > MAX_GRAD_NORM)
        assert np.allclose(s["loss"].to_numpy(), ref["losses"], rtol=1e-5, atol=0)
    flags = np.array(first["norms"]) > MAX_GRAD_NORM
    assert flags.any() and not flags.all()  # the flags above can fail both ways
