"""The advice benchmark's comparison rules do what their papers say (an unfair baseline would
make the benchmark's table meaningless), checked against a hand computation of each rule."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "advice"))
from baselines import AutoClip, ZClip  # noqa: E402


def _param_with_norm(norm: float) -> list:
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.tensor([norm, 0.0, 0.0, 0.0], dtype=torch.float64)
    return [p]


def test_autoclip_clips_at_the_10th_percentile_of_the_history_including_now():
    rule = AutoClip(10.0)
    norms = [5.0, 1.0, 3.0, 8.0, 2.0, 9.0, 0.5, 4.0]
    for i, g in enumerate(norms):
        params = _param_with_norm(g)
        rule(params)
        tau = np.percentile(norms[: i + 1], 10)
        expected = g * min(1.0, tau / (g + 1e-6))
        assert params[0].grad.norm().item() == pytest.approx(expected, rel=1e-9)


def test_zclip_warmup_ema_and_reciprocal_threshold():
    rule = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25)
    rng = np.random.default_rng(0)
    warm = list(1.0 + 0.1 * rng.standard_normal(25))
    for g in warm:  # warm-up: never clipped
        params = _param_with_norm(g)
        rule(params)
        assert params[0].grad.norm().item() == pytest.approx(g)
    mean = float(np.mean(warm))
    var = float(np.var(warm))
    for g in [1.05, 3.0, 0.9, 10.0]:
        std = var ** 0.5
        z = (g - mean) / (std + 1e-6)
        eff = mean + 2.5 * std / (z / 2.5) if z > 2.5 else g
        params = _param_with_norm(g)
        rule(params)
        applied = params[0].grad.norm().item()
        assert applied == pytest.approx(g * min(1.0, eff / (g + 1e-6)) if z > 2.5 else g, rel=1e-9)
        mean = 0.97 * mean + 0.03 * eff
        var = 0.97 * var + 0.03 * (eff - mean) ** 2
    assert rule.mean == pytest.approx(mean) and rule.var == pytest.approx(var)
