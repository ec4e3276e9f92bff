"""The data-driven clip norm, its drift between early and late training, and the preset comparison.

Method (all in log-norm space, so it is blind to the units of the norm: multiply every
norm by c and the recommendation is multiplied by c, its clip fraction unchanged):

1. level(t) = trailing median of log(grad_norm) over the previous `level.window` finite
   steps: the typical norm of that moment of training, untouched by spikes and NaNs.
2. residual(t) = log(grad_norm(t)) - level(t): how far a step stands above its moment.
3. headroom = the `residual_quantile` (0.98) quantile of the steady-state residuals of the
   steps that are not spikes (spikes.py), estimated robustly as median + z_q x 1.4826 MAD
   (z_q the normal quantile), and at least log(min_headroom): the excursion an ordinary step
   makes above the typical level. Spikes, even frequent ones, and non-finite steps cannot move it.
4. reference = the `level_quantile` (0.9) quantile of the level over steady state: the
   typical level of the run's high stretches, so that a slow drift upward or downward is not
   clipped as if it were a spike.
5. clip norm = exp(reference + headroom). On a stationary run it clips about 1-2 % of the
   steps, the largest ones; a residual that is a spike lands far beyond the headroom.
6. When spikes were found, the run holds two populations, and the clip norm moves to the
   geometric midpoint between the top of the ordinary steps (median level + headroom) and
   the smallest spike, at most `spike_margin` (2) times that top: every spike is cut, the
   ordinary steps pass.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from gradscope.analysis.config import AnalysisConfig, Preset
from gradscope.analysis.model import Drift, PresetCheck, Recommendation
from gradscope.analysis.robust import clip_fraction, mean_multiplier, percentiles, quantiles, round_sig


def recommend(
    x_s: np.ndarray, level_s: np.ndarray, cfg: AnalysisConfig, spike: np.ndarray | None = None
) -> Recommendation:
    """x_s: steady-state log-norms; level_s: their trailing median (NaN where none yet); spike: mask of
    the steps found as spikes, left out of the headroom so that spikes cannot raise it."""
    rc = cfg.recommend
    have = np.isfinite(level_s)
    if have.sum() < 3:
        # Too short for a trailing level: the series' own median stands in for it.
        level_s = np.full(len(x_s), np.median(x_s))
    elif not have.all():
        level_s = np.where(have, level_s, level_s[np.argmax(have)])
    resid = x_s - level_s
    if spike is not None and spike.any() and (~spike).sum() >= 3:
        resid = resid[~spike]
    floor = float(np.log(rc.min_headroom))
    # The q-quantile of the ordinary excursions, read from their median and MAD (as if they were
    # normal in log space): frequent spikes too small for spikes.py to flag would otherwise own
    # the top quantiles and lift the threshold above them (up to half the steps can be outliers).
    # resid and its deviations are arrays of our own: numpy may partition them in place.
    centre = float(np.median(resid, overwrite_input=True))
    scale = 1.4826 * float(np.median(np.abs(resid - centre), overwrite_input=True))

    def above(q: float) -> float:
        return max(centre + NormalDist().inv_cdf(q) * scale, floor)

    headroom = above(rc.residual_quantile)
    median_level, ref = (float(v) for v in quantiles(level_s, [0.5, rc.level_quantile]))
    tau = float(np.exp(ref + headroom))
    # The range: the same rule cutting the top 5 % or the top 0.5 % of ordinary excursions.
    low = float(np.exp(ref + above(min(0.95, rc.residual_quantile))))
    high = float(np.exp(ref + above(max(0.995, rc.residual_quantile))))
    basis = None
    if spike is not None and spike.any():
        # A spiky run holds two populations: ordinary steps and spikes. The threshold that
        # separates them with the widest margin on both sides sits midway (in log space)
        # between the top of the ordinary excursions at the run's median level and the
        # smallest spike: every spike is cut, no ordinary step is.
        # Capped at spike_margin x that top, so that huge spikes cannot lift it out of reach of a
        # smaller one the run has not shown yet.
        bulk_top = median_level + headroom
        smallest = float(np.min(x_s[spike]))
        if smallest > bulk_top:
            tau = float(np.exp(min((bulk_top + smallest) / 2, bulk_top + np.log(rc.spike_margin))))
            low, high = float(np.exp(bulk_top)), float(np.exp(smallest))
            ref = median_level
            headroom = float(np.log(tau)) - ref
            basis = (f"midway (geometric) between the top of the ordinary steps ({low:.4g}: the median level x "
                     f"the q{rc.residual_quantile:g} excursion) and the smallest of {int(spike.sum())} spikes "
                     f"({high:.4g}), at most {rc.spike_margin:g}x the former")
    return Recommendation(
        **_effect(np.exp(x_s), tau),
        reference_level=float(np.exp(ref)),
        headroom=float(np.exp(headroom)),
        based_on_steps=len(x_s),
        low=low,
        high=high,
        basis=basis,
    )


def _effect(g: np.ndarray, tau: float) -> dict:
    """A threshold and what it would have done to the norms g. The effect is that of the rounded
    value, the one the report and the snippets hand out: rounding may cross a norm."""
    shown = round_sig(tau)
    return dict(clip_norm=tau, clip_norm_rounded=shown, clip_fraction=clip_fraction(g, shown),
                clipped_steps=int(np.count_nonzero(g > shown)), mean_multiplier=mean_multiplier(g, shown))


def normalising(sit, g_s: np.ndarray) -> Recommendation:
    """The recommendation of a run that blew up or is unstable (situation.py): a threshold
    that clips most steps, with what it would have done on the steady-state steps."""
    tau = float(sit.clip_norm)
    level = float(np.median(g_s))
    return Recommendation(
        **_effect(g_s, tau),
        reference_level=level,
        headroom=tau / level,
        based_on_steps=len(g_s),
        situation=sit.name,
        evidence=sit.evidence,
        low=sit.low,
        high=sit.high,
        basis=sit.basis,
        onset_step=sit.onset_step,
    )


def drift(g_s: np.ndarray, step_s: np.ndarray, tau: float, cfg: AnalysisConfig,
          normalising: bool = False, adam: bool = False) -> Drift | None:
    """Early (first third) vs late (last third) of steady state; None when a third has < 3 steps.
    normalising: tau is meant to clip most steps (a run that blew up or grew unstable), so
    neither clipping most steps nor the pilot's drift, a symptom of its instability, is warned of."""
    n = len(g_s)
    k = n // 3
    if k < 3:
        return None
    early, late = g_s[:k], g_s[n - k:]
    pe = percentiles(early, cfg.drift.percentiles)
    pl = percentiles(late, cfg.drift.percentiles)
    me = pe["p50"] if "p50" in pe else float(np.median(early))
    ml = pl["p50"] if "p50" in pl else float(np.median(late))
    ratio = ml / me
    drifting = ratio > cfg.drift.max_ratio or ratio < 1 / cfg.drift.max_ratio
    fe, fl = clip_fraction(early, tau), clip_fraction(late, tau)
    always = cfg.regime.always_fraction
    warning = None
    cut_early, cut_late = fe >= always, fl >= always
    if not normalising and (drifting or cut_early or cut_late):
        way = "fell" if ratio < 1 else "rose"
        parts = [
            f"grad norms {way} {max(ratio, 1 / ratio):.3g}x from early (p50 {me:.3g}) "
            f"to late (p50 {ml:.3g}) training; clip norm {round_sig(tau):g} clips {fe:.1%} early "
            f"and {fl:.1%} late"
        ]
        if fl == 0 and ratio < 1:
            parts.append(
                f"late in the run it only stops spikes above {tau / ml:.3g}x the late median"
            )
        if fe == 0 and ratio > 1:
            parts.append(f"early in the run it only stops spikes above {tau / me:.3g}x the early median")
        act = "it normalises most gradients fed into the moment estimates" if adam else "it acts as a learning-rate cut"
        if cut_early and cut_late:
            parts.append(f"{act} early and late")
        elif cut_early or cut_late:
            parts.append(f"{'early' if cut_early else 'late'} in the run {act}")
        if drifting:
            parts.append("one threshold cannot serve both: consider a threshold schedule")
        elif cut_early != cut_late:
            parts.append("check the stretches separately")
        warning = "; ".join(parts)
    return Drift(
        early=pe, late=pl,
        early_steps=(int(step_s[0]), int(step_s[k - 1])),
        late_steps=(int(step_s[n - k]), int(step_s[-1])),
        p50_ratio=ratio, drifting=drifting,
        recommended_clip_fraction_early=fe, recommended_clip_fraction_late=fl,
        warning=warning,
    )


def compare_preset(preset: Preset, rec: Recommendation, g_s: np.ndarray, p50: float | None = None,
                   adam: bool = False) -> PresetCheck:
    """Where the data-driven value sits relative to a model family's usual range, and why."""
    lo, hi = preset.low, preset.high
    tau = rec.clip_norm_rounded
    span = f"{lo:g}-{hi:g}" if hi is not None else f">= {lo:g}"
    f_lo = clip_fraction(g_s, lo)
    f_hi = clip_fraction(g_s, hi) if hi is not None else None
    m_lo = mean_multiplier(g_s, lo)
    p50 = float(np.median(g_s)) if p50 is None else p50
    tail = (
        " The scale of a norm depends on the loss reduction (sum or mean), model size, batch size and "
        "parametrisation, so the data win; the preset is a sanity check."
    )
    if rec.clip_norm < lo:
        position = "below"
        what = "never clip" if f_lo == 0 else f"clip only {f_lo:.1%} of steps"
        message = (
            f"The data suggest {tau:g}, below the {preset.name} range ({span}): this run's norms are small "
            f"(p50 {p50:.3g}), and {lo:g} would {what}, so it would rarely protect against a spike." + tail
        )
    elif hi is not None and rec.clip_norm > hi:
        position = "above"
        m_hi = mean_multiplier(g_s, hi)
        message = (
            f"The data suggest {tau:g}, above the {preset.name} range ({span}): this run's norms are large "
            f"(p50 {p50:.3g}), and {hi:g} would clip {f_hi:.1%} of steps"
            + ("" if adam else f" (average update x{m_hi:.2f})") + ", "
            + (("normalising most gradients rather than protecting against spikes." if adam else
                "acting as a learning-rate cut rather than as spike protection.") if f_hi >= 0.5
               else "cutting ordinary large steps, not only outliers.") + tail
        )
    else:
        position = "within"
        message = f"The data-driven {tau:g} agrees with the {preset.name} range ({span})."
    return PresetCheck(
        name=preset.name, low=lo, high=hi, source=preset.source, position=position,
        clip_fraction_at_low=f_lo, clip_fraction_at_high=f_hi, mean_multiplier_at_low=m_lo, message=message,
    )
