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
    unskipped = idx_bad[~skipped_bad]
    nf = NonFinite(
        count=len(idx_bad),
        first_step=int(s.step[first]),
        first_kind=kind,
        overflow_skipped=int(skipped_bad.sum()),
        recovered=int(recovered.sum()),
        divergence_step=div,
        steps=[int(v) for v in s.step[idx_bad[:20]]],
        first_unskipped_step=int(s.step[unskipped[0]]) if len(unskipped) else None,
    )
    return bad, valid, nf


def warmup_length(lr: np.ndarray, step: np.ndarray, cfg: AnalysisConfig) -> tuple[int, str | None]:
    """Finite steps treated as warm-up, and one sentence on how that was decided (or None).

    lr, step: of the finite steps, in order. With follow_lr and a learning rate known on
    every step, the warm-up is the learning rate's own: the steps before it first reaches
    its maximum (none when it never rises above its first value: a constant LR or a decay
    from the first step). Without a known LR, a fraction of the steps, clamped to
    [min_steps, max_steps]. Never more than max_fraction of the steps.
    """
    w = cfg.warmup
    n = len(step)
    cap = int(w.max_fraction * n)
    fin = np.isfinite(lr)
    if w.follow_lr and n and fin.all():
        top = float(np.max(lr))
        tol = 1e-9 * abs(top)
        if top <= lr[0] + tol:
            return 0, ("no warm-up left out: the learning rate never rises above its first value "
                       "(constant, or decaying from the start)") if n > 1 else None
        peak = int(np.argmax(lr >= top - tol))
        shown = peak < n - 1 and bool(np.all(lr[peak + 1:] <= top + tol))  # a later step shows it stopped rising
        if peak <= cap and shown:
            return peak, f"warm-up: the {peak} steps before the learning rate peaks at step {int(step[peak])}"
        if shown:
            return cap, (f"warm-up capped at {cap} steps ({w.max_fraction:.0%} of the finite steps, to step "
                         f"{int(step[cap])}); the learning rate peaks later, at step {int(step[peak])}")
        return min(peak, cap), (
            f"the learning rate still rises at the last step ({int(step[-1])}): its warm-up does not end within "
            f"the data, and the first {min(peak, cap)} steps (to step {int(step[min(peak, cap)])}) are left out")
    k = int(round(w.fraction * n))
    k = min(max(k, w.min_steps), w.max_steps, cap)
    return max(k, 0), None


def resolve_threshold(s: Series, clip_norm: float | None, meta: dict) -> Threshold:
    """--clip-norm, else the run's own threshold: `gradscope run --clip-norm` (override), the
    max_norm the script passed most often, the log's args file, or the trainer's default (see
    THRESHOLD_SOURCES)."""
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
    override = _positive(meta.get("clip_norm_override"))
    if clip_norm is not None:
        th.clip_norm, th.source = float(clip_norm), "option"
    elif override is not None:
        # The recorder clipped every step at this value (the script's own max_norm was replaced).
        th.clip_norm, th.source = override, "override"
        th.script_values, th.changed = [v for v in values if v != override], False
    elif _positive(meta.get("clip_norm")) is not None and values in ([], [_positive(meta["clip_norm"])]):
        # an importer's threshold from the log's args file (it also fills clip_max_norm with it)
        th.clip_norm, th.source = _positive(meta["clip_norm"]), "log"
    elif values:
        th.clip_norm, th.source = values[0], "script"
    elif _positive(meta.get("clip_norm_default")) is not None:
        th.clip_norm, th.source = _positive(meta["clip_norm_default"]), "default"
        th.assumed_because = str(meta.get("clip_norm_default_reason") or "the trainer's default")
    return th


def in_force(s: Series, th: Threshold, meta: dict, at_step: int) -> float | None:
    """The clip norm that was applied at step `at_step` of the run (not a --clip-norm to judge)."""
    override = _positive(meta.get("clip_norm_override"))
    if override is not None:
        return override
    i = np.flatnonzero(s.step == at_step)
    if len(i) and _positive(s.clip_max_norm[i[0]]) is not None:
        return float(s.clip_max_norm[i[0]])
    if th.script_values:
        return None  # the script clipped, but not on that step
    return _positive(meta.get("clip_norm")) or _positive(meta.get("clip_norm_default"))


def _positive(v) -> float | None:
    if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return float(v)
    return None


def threshold_notes(s: Series, th: Threshold) -> list[str]:
    notes = []
    if th.changed:
        cm = s.clip_max_norm
        parts = ", ".join(f"{v:g} ({int(np.count_nonzero(cm == v))} steps)" for v in th.script_values[:5])
        notes.append(f"max_norm changed during the run: {parts}; judging the most used")
    if th.source == "option" and th.script_values and th.script_values[0] != th.clip_norm:
        notes.append(f"judging --clip-norm {th.clip_norm:g} instead of the script's max_norm {th.script_values[0]:g}")
    if th.source == "default":
        notes.append(f"max_norm {th.clip_norm:g} assumed: {th.assumed_because}; judge another threshold with "
                     "`--clip-norm X`")
    if th.script_values and th.clip_call_fraction < 0.99:
        notes.append(f"clip_grad_norm_ was called on {th.clip_call_fraction:.0%} of the steps only")
    if np.isinf(s.clip_max_norm).any():
        notes.append("the script called clip_grad_norm_ with max_norm=inf on some steps (measures, never clips)")
    if th.clip_value is not None:
        notes.append(
            f"the script also clips by value (clip_grad_value_ {th.clip_value:g}); gradscope judges norm clipping only"
        )
    return notes


def judge(g: np.ndarray, th: Threshold, cfg: AnalysisConfig, p50: float | None = None, adam: bool = False) -> Verdict:
    """The regime of the judged threshold on the steady-state norms g (finite, positive; p50 their median).
    adam: the optimizer normalises its update by a second moment (advice.normalises_update), where a clip
    caps the gradient fed into the moment estimates and does not scale the update: no learning-rate words."""
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
    elif frac >= cfg.regime.always_fraction and adam:
        regime = "always-clips"
        meaning = (
            f"{frac:.0%} of steps are clipped: every one of those gradients enters the moment estimates at length "
            f"{tau:.4g}, so the optimizer sees a normalised gradient and no longer singles out spikes (the update, "
            "divided by the second moment, is not scaled down by the clip)."
        )
    elif frac >= cfg.regime.always_fraction:
        regime = "always-clips"
        meaning = (
            f"{frac:.0%} of steps are clipped: clipping has become gradient normalisation, shrinking the average "
            f"update to {mm:.2f}x, an effective learning-rate cut of {1 - mm:.0%} that no longer singles out spikes."
        )
    elif adam:
        regime = "healthy"
        meaning = (
            f"Clipping caps {frac:.1%} of the gradients fed into the moment estimates"
            + (" (the large ones) and leaves the rest untouched." if frac <= 0.1 else
               ": still the larger ones, but more than the outliers.")
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
