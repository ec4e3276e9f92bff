"""What `gradscope watch` shows about a run so far: pure functions of the arrays read so far.

Rolling figures use the last ROLLING rows. The alerts use the analyzer's own rules where
it has them: a spike is a step whose log-norm is at least spikes.z_threshold robust
z-scores and spikes.min_ratio times above the median of the previous level.window finite
steps; "never-clips so far" / "always-clips so far" are the regimes of `recommend`
(no step / at least half of the steps above the threshold) over the finite steps after the
first 10% (the warm-up), once there are at least MIN_JUDGED of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gradscope.analysis.config import AnalysisConfig
from gradscope.analysis.robust import MAD_TO_SIGMA

ROLLING = 200
MIN_JUDGED = 20
WARMUP_FRACTION = 0.1


@dataclass
class SpikeTracker:
    """Spikes found so far; each poll examines only the rows not examined before."""

    checked: int = 0
    count: int = 0
    largest: tuple[int, float] | None = None  # (step, ratio to the level)
    first_step: int | None = None

    def update(self, step: np.ndarray, g: np.ndarray, skipped: np.ndarray, cfg: AnalysisConfig) -> None:
        n = len(g)
        if n <= self.checked:
            return
        w = cfg.level.window
        lo = max(0, self.checked - 4 * w)  # enough history for w finite steps in all but odd runs
        x = np.full(n - lo, np.nan)
        ok = np.isfinite(g[lo:]) & (g[lo:] > 0) & ~skipped[lo:].astype(bool)
        x[ok] = np.log(g[lo:][ok])
        for i in range(self.checked - lo, n - lo):
            if not ok[i]:
                continue
            prev = x[:i][ok[:i]][-w:]
            if len(prev) < cfg.level.min_periods:
                continue
            level = float(np.median(prev))
            mad = float(np.median(np.abs(prev - level)))
            z = (x[i] - level) / max(MAD_TO_SIGMA * mad, cfg.spikes.mad_floor)
            if z >= cfg.spikes.z_threshold and x[i] - level >= math.log(cfg.spikes.min_ratio):
                self.count += 1
                ratio = math.exp(x[i] - level)
                st = int(step[lo + i])
                if self.first_step is None:
                    self.first_step = st
                if self.largest is None or ratio > self.largest[1]:
                    self.largest = (st, ratio)
        self.checked = n


@dataclass
class LiveSeries:
    """One optimizer's figures so far."""

    optimizer: int
    rows: int
    last_step: int | None
    steps_per_s: float | None
    last_grad_norm: float | None
    rolling: dict[str, float]            # p50, p90, p99 of the last ROLLING finite norms
    clip_norm: float | None              # the run's threshold (the most used recent max_norm)
    rolling_clip_fraction: float | None  # of the last ROLLING finite steps
    skipped: int
    first_bad: tuple[int, str] | None    # (step, "loss" / "gradient" / "loss and gradient")
    regime_so_far: str | None            # "never-clips" / "always-clips" when it looks so, else None
    judged_fraction: float | None        # the clip fraction behind regime_so_far
    spikes: SpikeTracker = field(default_factory=SpikeTracker)


def _mode(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    vals, counts = np.unique(v, return_counts=True)
    return float(vals[np.argmax(counts)])


def summarize(opt: int, step: np.ndarray, g: np.ndarray, loss: np.ndarray, clip: np.ndarray,
              skipped: np.ndarray, t: np.ndarray, clip_override: float | None, spikes: SpikeTracker) -> LiveSeries:
    n = len(step)
    skipped = skipped.astype(bool)
    tail = slice(max(0, n - ROLLING), n)
    gt, st = g[tail], skipped[tail]
    use = np.isfinite(gt) & ~st & (gt > 0)
    rolling = {}
    if use.any():
        p = np.percentile(gt[use], [50, 90, 99])
        rolling = {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}
    tt = t[tail]
    rate = None
    if len(tt) >= 2 and tt[-1] > tt[0]:
        rate = (len(tt) - 1) / (tt[-1] - tt[0])
    tau = clip_override if clip_override is not None else _mode(clip[tail])
    frac = float(np.mean(gt[use] > tau)) if tau is not None and use.any() else None

    # The gate's rule: a non-finite loss, or a non-finite norm the scaler did not skip.
    records_loss = bool(np.isfinite(loss).any() or np.isinf(loss).any())
    bad_loss = np.isinf(loss) | (np.isnan(loss) if records_loss else False)
    bad_grad = ~np.isfinite(g) & ~skipped
    bad = bad_loss | bad_grad
    first_bad = None
    if bad.any():
        i = int(np.argmax(bad))
        what = " and ".join(q for q, m in (("loss", bad_loss), ("gradient", bad_grad)) if np.asarray(m)[i])
        first_bad = (int(step[i]), what)

    regime, judged = None, None
    if tau is not None:
        valid = np.isfinite(g) & ~skipped & (g > 0)
        gv = g[valid]
        gv = gv[int(round(WARMUP_FRACTION * len(gv))):]
        if len(gv) >= MIN_JUDGED:
            judged = float(np.mean(gv > tau))
            regime = "never-clips" if judged == 0 else ("always-clips" if judged >= 0.5 else None)
    last_g = float(g[-1]) if n else None
    return LiveSeries(
        optimizer=opt, rows=n, last_step=int(step[-1]) if n else None, steps_per_s=rate, last_grad_norm=last_g,
        rolling=rolling, clip_norm=tau, rolling_clip_fraction=frac, skipped=int(skipped.sum()),
        first_bad=first_bad, regime_so_far=regime, judged_fraction=judged, spikes=spikes,
    )


def findings(process: dict | None) -> list[dict]:
    """Clip-audit findings a recording process wrote ({kind, first_step, count, message}), if any."""
    if not process:
        return []
    items = process.get("findings") or (process.get("clip_audit") or {}).get("findings") or []
    return [f for f in items if isinstance(f, dict) and f.get("kind")]
