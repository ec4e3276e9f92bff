"""The bad-step rule over a whole steps table: the vectorised twin of rundir.is_bad_step.

A step is bad when its loss was recorded and is inf/NaN, or its gradient norm is inf/NaN and
no loss scaler absorbed it (a GradScaler-skipped step applied nothing: the scaler working).
The stopper (capture, one row at a time), the gate, the run summary and tune all use this
rule; tests/test_bad_steps.py runs both versions over one table.

Whether a loss was recorded: a table that says so exactly carries rundir.LOSS_RECORDED
(format version 2: an empty loss field). Otherwise NaN in the loss column is ambiguous (no
loss reported, or a NaN loss), and is read per series: a NaN loss counts only in a series
that records losses elsewhere (a finite or infinite value), and, in other trainers' logs,
only where the gradient norm agrees that something went wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope import rundir


@dataclass
class BadSteps:
    """Boolean masks over the table's rows."""

    loss: np.ndarray      # bad by its loss
    gradient: np.ndarray  # bad by its gradient norm (not skipped)
    absorbed: np.ndarray  # non-finite gradient norm a loss scaler skipped (not bad)

    @property
    def any(self) -> np.ndarray:
        return self.loss | self.gradient


def loss_recorded(steps, source: str = "gradscope") -> np.ndarray:
    """Where the table's loss column holds a recorded loss (see the module docstring)."""
    loss = steps["loss"].to_numpy(dtype=float)
    if rundir.LOSS_RECORDED in steps:
        return steps[rundir.LOSS_RECORDED].to_numpy(dtype=bool)
    recorded = ~np.isnan(loss)
    keys = _series_keys(steps)
    for key in np.unique(keys):
        sel = keys == key
        if recorded[sel].any():  # the series records losses: its NaN is a NaN loss
            recorded |= sel
    if source != "gradscope":
        recorded &= ~np.isnan(loss) | ~np.isfinite(steps["grad_norm"].to_numpy(dtype=float))
    return recorded


def bad_steps(steps, source: str = "gradscope") -> BadSteps:
    """rundir.is_bad_step applied to every row of a steps table."""
    loss = steps["loss"].to_numpy(dtype=float)
    grad = steps["grad_norm"].to_numpy(dtype=float)
    skipped = steps["skipped"].to_numpy(dtype=bool)
    bad_grad = ~np.isfinite(grad)
    if source != "gradscope":
        keys = _series_keys(steps)
        for key in np.unique(keys):
            sel = keys == key
            if np.isnan(grad[sel]).all():
                # A trainer that logs NaN for every step (DeepSpeed ZeRO / FSDP) has no norm to judge.
                bad_grad &= ~sel
    return _masks(bad_grad, loss, skipped, loss_recorded(steps, source))


def one_series(grad, loss, skipped, recorded=None) -> BadSteps:
    """The rule over one series' arrays (the live view's incremental table); `recorded`: where a
    loss was recorded, or None to read NaN by the per-series rule (this series records losses?)."""
    grad, loss = np.asarray(grad, dtype=float), np.asarray(loss, dtype=float)
    if recorded is None:
        recorded = np.full(len(loss), bool((~np.isnan(loss)).any()))
    return _masks(~np.isfinite(grad), loss, np.asarray(skipped, dtype=bool), np.asarray(recorded, dtype=bool))


def _masks(bad_grad, loss, skipped, recorded) -> BadSteps:
    return BadSteps(loss=recorded & ~np.isfinite(loss), gradient=bad_grad & ~skipped, absorbed=bad_grad & skipped)


def _series_keys(steps) -> np.ndarray:
    n = len(steps)
    rank = steps["rank"].to_numpy(dtype=np.int64) if "rank" in steps else np.zeros(n, dtype=np.int64)
    opt = steps["optimizer"].to_numpy(dtype=np.int64) if "optimizer" in steps else np.zeros(n, dtype=np.int64)
    return rank * 1_000_003 + opt
