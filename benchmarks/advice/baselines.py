"""Clipping rules the recommender is compared with, implemented from their papers.

Each is a callable clipper(params) used between backward() and step(); all of them read
the norm on the host every step (.item()), which is fine for a benchmark, not for gradscope.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _norm(params) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


class Fixed:
    """clip_grad_norm_ at a constant threshold."""

    def __init__(self, tau: float):
        self.tau = tau

    def __call__(self, params) -> None:
        torch.nn.utils.clip_grad_norm_(params, self.tau)


class AutoClip:
    """Seetharaman, Wichern, Pardo, Le Roux (2020), "AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks": clip at the p-th percentile (p = 10) of every gradient norm
    observed so far, the current one included."""

    def __init__(self, percentile: float = 10.0):
        self.percentile = percentile
        self.history: list[float] = []

    def __call__(self, params) -> None:
        g = _norm(params)
        if math.isfinite(g):
            self.history.append(g)
        if self.history:
            torch.nn.utils.clip_grad_norm_(params, float(np.percentile(self.history, self.percentile)))


class ZClip:
    """Kumar, Owen, Chowdhury, Güra (2025), "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training": EMA mean/variance of the norm (alpha 0.97) initialised over 25 warm-up
    steps; a step whose z-score exceeds z_thresh (2.5) is clipped to
    mean + z_thresh * std / (z / z_thresh); the EMA is updated with the clipped norm.
    No extra hard cap (max_grad_norm) is applied: the rule is compared on its own."""

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6):
        self.alpha, self.z, self.warmup, self.eps = alpha, z_thresh, warmup_steps, eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def __call__(self, params) -> None:
        g = _norm(params)
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return
        std = math.sqrt(self.var)
        z = (g - self.mean) / (std + self.eps)
        effective = g
        if z > self.z:
            effective = self.mean + self.z * std / (z / self.z)
            torch.nn.utils.clip_grad_norm_(params, effective)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
