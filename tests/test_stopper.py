"""`--stop-on-nan` stops within two optimizer steps of the first bad step, not at the next flush."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradscope
from gradscope.capture.stopper import NanStop, is_bad
from gsutil import gradscope as gs, script


def _run(tmp_path, *args):
    out = tmp_path / "run"
    return gs("run", "--out", out, *args, cwd=tmp_path), out


def test_stops_right_after_the_first_bad_step_even_with_a_long_flush_interval(tmp_path):
    # lr 50 blows the tiny model up to inf/NaN within a few dozen steps; with 1000-step / 1e9 s
    # flushes the old flush-based stop would have let it train all 500 steps.
    res, out = _run(tmp_path, "--stop-on-nan", "--flush-steps", "1000", "--flush-seconds", "1e9",
                    script("tiny_train.py"), "--steps", "500", "--lr", "50", "--progress", "progress")
    assert res.returncode == 1, res.stderr
    s = gradscope.load_run(out).steps
    bad = ~np.isfinite(s["loss"]) | ~np.isfinite(s["grad_norm"])
    assert bad.any()
    first_bad = int(s["step"][bad].iloc[0])
    assert first_bad < 400
    after = int((s["step"] > first_bad).sum())
    assert after <= 2  # within two optimizer steps (on CPU: none)
    last_done = int((tmp_path / "progress").read_text())  # the script's own count of finished steps
    assert last_done <= first_bad + 1
    assert "non-finite" in res.stderr and f"at step {first_bad} of optimizer 0" in res.stderr
    meta = gradscope.load_run(out).meta
    assert meta["status"] == "failed" and meta["exit_code"] == 1


def test_a_gradscaler_skipped_overflow_step_does_not_stop(tmp_path):
    # amp_train.py starts at scale 2**40: its first steps overflow and are skipped by the scaler.
    res, out = _run(tmp_path, "--stop-on-nan", script("amp_train.py"), "ref.json", "w.pt")
    assert res.returncode == 0, res.stderr
    s = gradscope.load_run(out).steps
    assert s["skipped"].sum() >= 1 and not np.isfinite(s["grad_norm"]).all()
    assert len(s) == 40


def test_the_rule():
    inf, nan = float("inf"), float("nan")
    assert is_bad(1.0, inf, 0) and is_bad(1.0, nan, 1)  # a non-finite loss is never absorbed
    assert is_bad(inf, 1.0, 0) and not is_bad(inf, 1.0, 1) and not is_bad(1.0, 2.0, 0)


class _Row:
    def __init__(self, step, values):
        self.step, self.values, self.norms = step, values, None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_are_polled_without_a_sync():
    watch = NanStop()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        seen_at = None
        for step in range(50):
            loss = torch.tensor(float("nan") if step >= 10 else 1.0, device="cuda", dtype=torch.float64)
            values = torch.stack([torch.ones((), device="cuda", dtype=torch.float64), loss,
                                  torch.zeros((), device="cuda", dtype=torch.float64),
                                  torch.zeros((), device="cuda", dtype=torch.float64),
                                  torch.ones((), device="cuda", dtype=torch.float64)])
            watch.add(_Row(step, values), 0)
            if watch.poll() and seen_at is None:
                seen_at = step
            torch.cuda._sleep(1000)  # a little device work per step, as training has
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert watch.poll() and watch.reason == "non-finite loss at step 10 of optimizer 0"
    assert seen_at is not None and seen_at <= 12
