"""What `gradscope watch` shows about a run so far: pure functions of the arrays read so far.

Rolling figures use the last ROLLING rows. The alerts use the analyzer's own rules where
it has them: a spike is a step whose log-norm is at least spikes.z_threshold robust
z-scores and spikes.min_ratio times above the median of the level.window finite steps before
its anchor (the last multiple of ANCHOR_EVERY finite steps); "never-clips so far" / "always-clips so far" are the regimes of `recommend`
(no step / at least half of the steps above the threshold) over the finite steps after the
warm-up, once there are at least MIN_JUDGED of them and the warm-up is over. The warm-up and the
clipped count are `recommend`'s (judge.warmup_length: the learning rate's own warm-up when it is
recorded, else a share of the steps): "clips X%" is the share of steady-state finite steps above
the threshold, the number `gradscope run`, `recommend`, `compare` and `plot` show. While the
learning rate still rises at the last step, the warm-up is not over, and no regime alert is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gradscope.analysis import bad_steps
from gradscope.analysis.config import AnalysisConfig
from gradscope.analysis.robust import MAD_TO_SIGMA

ROLLING = 200
# The level of a step is that of its anchor: the median of the level.window finite steps before
# the last multiple of ANCHOR_EVERY finite steps (as the analyzer re-evaluates it every
# level.stride steps): a step is never in its own window, and a million steps cost a second.
ANCHOR_EVERY = 10
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
        w, every = cfg.level.window, ANCHOR_EVERY
        ok = np.isfinite(g) & (g > 0) & ~skipped.astype(bool)
        done = np.flatnonzero(ok[: self.checked])
        before = done[-(w + every):]  # enough history for the anchor of every new step
        idx = np.concatenate([before, self.checked + np.flatnonzero(ok[self.checked:])])
        if len(idx) == len(before):
            self.checked = n
            return
        x = np.log(g[idx])
        base = len(done) - len(before)  # finite steps of the run before x[0]
        pos = base + np.arange(len(before), len(x))  # the new steps' places among the run's finite steps
        anchors = np.unique(pos - pos % every)
        anchors = anchors[anchors >= cfg.level.min_periods]
        lev_a = np.full(len(anchors), np.nan)
        mad_a = np.full(len(anchors), np.nan)
        short = anchors < w  # the run's first w finite steps: shorter windows, a few
        for j in np.flatnonzero(short):
            win = x[: anchors[j] - base]
            lev_a[j] = np.median(win)
            mad_a[j] = np.median(np.abs(win - lev_a[j]))
        full = np.flatnonzero(~short)
        if len(full):
            from numpy.lib.stride_tricks import sliding_window_view

            windows = sliding_window_view(x, w)  # row r = x[r : r + w]
            for a in range(0, len(full), 4096):  # in blocks: no huge (anchors x window) array
                block = full[a: a + 4096]
                win = windows[anchors[block] - w - base]
                lev = np.median(win, axis=1)
                lev_a[block] = lev
                mad_a[block] = np.median(np.abs(win - lev[:, None]), axis=1)
        key = pos - pos % every
        at = np.searchsorted(anchors, key)
        have = at < len(anchors)
        have[have] &= anchors[at[have]] == key[have]
        level = np.full(len(pos), np.nan)
        mad = np.full(len(pos), np.nan)
        level[have] = lev_a[at[have]]
        mad[have] = mad_a[at[have]]
        xn = x[len(before):]
        with np.errstate(invalid="ignore"):
            z = (xn - level) / np.maximum(MAD_TO_SIGMA * mad, cfg.spikes.mad_floor)
            hit = (z >= cfg.spikes.z_threshold) & (xn - level >= math.log(cfg.spikes.min_ratio))
        for k in np.flatnonzero(hit):
            self.count += 1
            ratio = math.exp(xn[k] - level[k])
            st = int(step[idx[len(before) + k]])
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
    rolling_clip_fraction: float | None  # of the steady-state finite steps so far (recommend's count)
    skipped: int
    first_bad: tuple[int, str] | None    # (step, "loss" / "gradient" / "loss and gradient")
    regime_so_far: str | None            # "never-clips" / "always-clips" when it looks so, else None
    judged_fraction: float | None        # the clip fraction behind regime_so_far
    spikes: SpikeTracker = field(default_factory=SpikeTracker)
    clipped_steps: int | None = None     # of steady_steps, above clip_norm (rolling_clip_fraction's count)
    steady_steps: int | None = None
    warmup_open: bool = False            # the learning rate still rises at the last step


def _mode(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    vals, counts = np.unique(v, return_counts=True)
    return float(vals[np.argmax(counts)])


def summarize(opt: int, step: np.ndarray, g: np.ndarray, loss: np.ndarray, clip: np.ndarray,
              skipped: np.ndarray, t: np.ndarray, clip_override: float | None, spikes: SpikeTracker,
              rank_local: bool = False, lr: np.ndarray | None = None,
              cfg: AnalysisConfig | None = None) -> LiveSeries:
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

    # The one bad-step rule (analysis/bad_steps.py), as the gate applies it.
    b = bad_steps.one_series(g, loss, skipped)
    bad_loss, bad_grad = b.loss, b.gradient
    bad = b.any
    first_bad = None
    if bad.any():
        i = int(np.argmax(bad))
        what = " and ".join(q for q, m in (("loss", bad_loss), ("gradient", bad_grad)) if np.asarray(m)[i])
        first_bad = (int(step[i]), what)

    regime, judged, frac, n_clip, n_steady, open_ = None, None, None, None, None, False
    valid = np.isfinite(g) & ~skipped & (g > 0)
    if tau is not None and valid.any():
        from gradscope.analysis.config import load_config
        from gradscope.analysis.judge import warmup_length

        gv = g[valid]
        lv = lr[valid] if lr is not None and len(lr) == len(g) else np.full(len(gv), np.nan)
        k, note = warmup_length(lv, step[valid], cfg if cfg is not None else load_config())
        open_ = bool(note and "still rises at the last step" in note)
        gv = gv[k:]
        if len(gv):
            n_steady, n_clip = len(gv), int(np.count_nonzero(gv > tau))
            frac = n_clip / n_steady
        if len(gv) >= MIN_JUDGED and not open_ and not rank_local:  # per-rank shard norms: no regime
            judged = frac
            regime = "never-clips" if judged == 0 else ("always-clips" if judged >= 0.5 else None)
    last_g = float(g[-1]) if n else None
    return LiveSeries(
        optimizer=opt, rows=n, last_step=int(step[-1]) if n else None, steps_per_s=rate, last_grad_norm=last_g,
        rolling=rolling, clip_norm=tau, rolling_clip_fraction=frac, skipped=int(skipped.sum()),
        first_bad=first_bad, regime_so_far=regime, judged_fraction=judged, spikes=spikes,
        clipped_steps=n_clip, steady_steps=n_steady, warmup_open=open_,
    )


def findings(process: dict | None) -> list[dict]:
    """Clip-audit findings a recording process wrote so far: [{kind, first_step, count, message}].

    The process file keeps them under "clip_audit" (issue 14's record); the sentence is the
    audit's own (analysis/audit.py) when that module is installed."""
    if not process:
        return []
    record = process.get("clip_audit")
    items = record.get("findings") if isinstance(record, dict) else process.get("findings")
    try:
        from gradscope.analysis.audit import describe
    except ImportError:  # an installation without the clip audit
        describe = None
    out = []
    for d in items or []:
        if not isinstance(d, dict) or not d.get("kind"):
            continue
        message = d.get("message") or (describe(d, None) if describe is not None else "")
        out.append({"kind": d["kind"], "first_step": d.get("first_step"), "count": d.get("count"),
                    "message": message})
    return out
