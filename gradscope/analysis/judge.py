"""Which steps count, which threshold is judged, and what it does: non-finite steps, warm-up, regime."""
from __future__ import annotations

import math

import numpy as np

from gradscope.analysis.config import AnalysisConfig
from gradscope.analysis.model import DIVERGENCE, OVERFLOW_SKIPPED, RECOVERED, NonFinite, Threshold, Verdict
from gradscope.analysis.robust import clip_fraction, mean_multiplier
from gradscope.analysis.select import Series


def classify_steps(s: Series) -> tuple[np.ndarray, np.ndarray, NonFinite]:
    """(bad, valid, NonFinite): bad = non-finite grad_norm or infinite loss; valid = usable for statistics.

    A NaN loss alone is not "bad": foreign logs and steps without a scalar loss leave it
    empty. Valid steps are finite, positive, not skipped (a skipped update applied nothing).
    A bad step is an overflow the scaler skipped (harmless), one that finite steps follow
    (training went on: something skipped it), or the start of a divergence (non-finite to
    the end of the run).
    """
    g = s.grad_norm
    bad = ~np.isfinite(g) | np.isinf(s.loss)
    valid = ~bad & ~s.skipped & (g > 0)
    idx_bad = np.flatnonzero(bad)
    if len(idx_bad) == 0:
        return bad, valid, NonFinite(0, None, None, 0, 0, None, [])
    valid_idx = np.flatnonzero(valid)
    last_valid = int(valid_idx[-1]) if len(valid_idx) else -1
    skipped_bad = s.skipped[idx_bad]
    tail = ~skipped_bad & (idx_bad > last_valid)
    recovered = ~skipped_bad & ~tail
    first = int(idx_bad[0])
    kind = OVERFLOW_SKIPPED if skipped_bad[0] else (DIVERGENCE if tail[0] else RECOVERED)
    div = int(s.step[idx_bad[tail][0]]) if tail.any() else None
    nf = NonFinite(
        count=len(idx_bad),
        first_step=int(s.step[first]),
        first_kind=kind,
        overflow_skipped=int(skipped_bad.sum()),
        recovered=int(recovered.sum()),
        divergence_step=div,
        steps=[int(v) for v in s.step[idx_bad[:20]]],
    )
    return bad, valid, nf


def warmup_length(n_valid: int, lr: np.ndarray, cfg: AnalysisConfig) -> tuple[int, bool]:
    """Finite steps treated as warm-up, and whether the learning-rate peak set it.

    A fraction of the steps, clamped to [min_steps, max_steps]; with follow_lr, extended to
    the first step where the learning rate reaches its maximum (the end of an LR warm-up:
    norms are not steady while the LR still rises); never more than max_fraction.
    """
    w = cfg.warmup
    k = int(round(w.fraction * n_valid))
    k = min(max(k, w.min_steps), w.max_steps)
    by_lr = False
    if w.follow_lr and len(lr):
        fin = np.isfinite(lr)
        if fin.any():
            top = np.max(lr[fin])
            peak = int(np.argmax(fin & (lr >= top - 1e-9 * abs(top))))
            if peak > k:
                k, by_lr = peak, True
    k = min(k, int(w.max_fraction * n_valid))
    return max(k, 0), by_lr


def resolve_threshold(s: Series, clip_norm: float | None, meta: dict) -> Threshold:
    """--clip-norm, else the max_norm the script passed most often, else the log's metadata."""
    cm = s.clip_max_norm
    fin = cm[np.isfinite(cm)]
    values: list[float] = []
    if len(fin):
        vals, counts = np.unique(fin, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        values = [float(vals[i]) for i in order]
    cv = s.clip_value[np.isfinite(s.clip_value)]
    clip_value = float(np.median(cv)) if len(cv) else None
    th = Threshold(
        clip_norm=None, source=None, script_values=values, changed=len(values) > 1,
        clip_call_fraction=float(len(fin) / len(cm)) if len(cm) else 0.0, clip_value=clip_value,
    )
    if clip_norm is not None:
        th.clip_norm, th.source = float(clip_norm), "option"
    elif values:
        th.clip_norm, th.source = values[0], "script"
    else:
        m = meta.get("clip_norm")
        if isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m > 0:
            th.clip_norm, th.source = float(m), "log"
    return th


def threshold_notes(s: Series, th: Threshold) -> list[str]:
    notes = []
    if th.changed:
        cm = s.clip_max_norm
        parts = ", ".join(f"{v:g} ({int(np.count_nonzero(cm == v))} steps)" for v in th.script_values[:5])
        notes.append(f"max_norm changed during the run: {parts}; judging the most used")
    if th.source == "option" and th.script_values and th.script_values[0] != th.clip_norm:
        notes.append(f"judging --clip-norm {th.clip_norm:g} instead of the script's max_norm {th.script_values[0]:g}")
    if th.script_values and th.clip_call_fraction < 0.99:
        notes.append(f"clip_grad_norm_ was called on {th.clip_call_fraction:.0%} of the steps only")
    if np.isinf(s.clip_max_norm).any():
        notes.append("the script called clip_grad_norm_ with max_norm=inf on some steps (measures, never clips)")
    if th.clip_value is not None:
        notes.append(
            f"the script also clips by value (clip_grad_value_ {th.clip_value:g}); gradscope judges norm clipping only"
        )
    return notes


def judge(g: np.ndarray, th: Threshold, cfg: AnalysisConfig, p50: float | None = None) -> Verdict:
    """The regime of the judged threshold on the steady-state norms g (finite, positive; p50 their median)."""
    tau = th.clip_norm
    if tau is None:
        return Verdict(
            "unclipped", None, None, None, None, None, None,
            "No clipping threshold is known (no clip_grad_norm_ call was recorded and the log names none): "
            "every spike reaches the weights at full size.",
        )
    frac = clip_fraction(g, tau)
    n_clip = int(np.count_nonzero(g > tau))
    mm = mean_multiplier(g, tau)
    gmax = float(g.max())
    p50 = float(np.median(g)) if p50 is None else p50
    to_max, to_p50 = tau / gmax, tau / p50
    if n_clip == 0:
        regime = "never-clips"
        meaning = (
            f"Clipping never fired after warm-up: max_norm {tau:.4g} sits {to_max:.3g}x above the largest norm "
            f"({gmax:.4g}), so it is dead code here and only stops a spike {to_max:.3g}x bigger than anything seen."
        )
    elif frac >= cfg.regime.always_fraction:
        regime = "always-clips"
        meaning = (
            f"{frac:.0%} of steps are clipped: clipping has become gradient normalisation, shrinking the average "
            f"update to {mm:.2f}x, an effective learning-rate cut of {1 - mm:.0%} that no longer singles out spikes."
        )
    elif frac <= 0.1:
        regime = "healthy"
        meaning = (
            f"Clipping cuts {frac:.1%} of steps (the large ones) and leaves the rest untouched; "
            f"the average update keeps {mm:.3f}x of its size."
        )
    else:
        regime = "healthy"
        meaning = (
            f"Clipping cuts {frac:.1%} of steps: still the larger ones, but more than the outliers, so it also "
            f"trims ordinary updates (average update {mm:.3f}x of its size)."
        )
    return Verdict(regime, tau, frac, n_clip, mm, to_max, to_p50, meaning)
