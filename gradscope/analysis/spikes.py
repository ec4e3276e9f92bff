"""Spikes: steps whose norm jumps far above the recent typical level, and the layers behind them."""
from __future__ import annotations

import numpy as np

from gradscope.analysis.config import AnalysisConfig
from gradscope.analysis.model import Spike, Spikes
from gradscope.analysis.robust import MAD_TO_SIGMA


def find_spikes(
    x: np.ndarray, level: np.ndarray, mad: np.ndarray, steps: np.ndarray, warmup: int, cfg: AnalysisConfig
) -> tuple[Spikes, np.ndarray]:
    """Spikes among the finite log-norms x (trailing level/MAD from robust.trailing_median_mad).

    A spike has robust z = (x - level) / max(1.4826 * MAD, mad_floor) >= z_threshold and a
    norm at least min_ratio times the level: the z-score alone would flag 10 % wiggles of a
    very steady run, the ratio alone ordinary steps of a very noisy one. The first steps,
    before a trailing level exists, are held against the level of the steps that follow them
    (lead_in), so that a spike at the very start of a run is found too. Returns the Spikes
    and the positions (into x) of every spike.
    """
    sc = cfg.spikes
    level, mad = lead_in(x, level, mad, cfg.level.window, cfg.level.min_periods)
    # NaN level (too early) gives NaN z, and NaN compares False: no mask needed.
    resid = x - level
    z = resid / np.maximum(MAD_TO_SIGMA * mad, sc.mad_floor)
    with np.errstate(invalid="ignore"):
        hit = (z >= sc.z_threshold) & (resid >= np.log(sc.min_ratio))
    pos = np.flatnonzero(hit)
    listed = [
        Spike(
            step=int(steps[i]), grad_norm=float(np.exp(x[i])), level=float(np.exp(level[i])),
            ratio=float(np.exp(x[i] - level[i])), z=float(z[i]), in_warmup=bool(i < warmup),
        )
        for i in pos[: sc.max_listed]
    ]
    return Spikes(len(pos), listed, sc.z_threshold, sc.min_ratio, False), pos


def lead_in(x: np.ndarray, level: np.ndarray, mad: np.ndarray, window: int, min_periods: int):
    """level and MAD with the leading positions that have none filled from the median and MAD of
    the `window` values right after them (at least min_periods of them; else left NaN)."""
    have = np.isfinite(level)
    if have.all() or not have.any():
        return level, mad
    h = int(np.argmax(have))
    after = x[h:h + window]
    if len(after) < min_periods:
        return level, mad
    m = float(np.median(after))
    level, mad = level.copy(), mad.copy()
    level[:h] = m
    mad[:h] = float(np.median(np.abs(after - m)))
    return level, mad


def attach_layers(spikes: Spikes, layers, rank: int | None, optimizer: int, top: int) -> None:
    """Give each listed spike its top layers by share of the squared norm (when the run's layer
    norms have that step). `layers`: a rundir.LayerNorms (only the spikes' rows are read) or a
    wide DataFrame."""
    from gradscope.rundir import FrameLayerNorms, LayerNorms

    if not spikes.listed or top <= 0 or layers is None:
        return
    if not isinstance(layers, LayerNorms):
        if len(layers) == 0:
            return
        layers = FrameLayerNorms(layers)
    series = [k for k in layers.series() if k[1] == optimizer and (rank is None or k[0] == rank)]
    if not series:
        return
    names = layers.names(*series[0])
    if not names:
        return
    at, vals = layers.at_steps(*series[0], [s.step for s in spikes.listed])
    if len(at) == 0:
        return
    by_step = {int(st): i for i, st in enumerate(at)}
    for sp in spikes.listed:
        i = by_step.get(sp.step)
        if i is None:
            continue
        sq = np.where(np.isfinite(vals[i]), vals[i], 0.0) ** 2
        total = sq.sum()
        if total <= 0:
            continue
        order = np.argsort(-sq, kind="stable")[:top]
        sp.layers = [(names[j], float(sq[j] / total)) for j in order if sq[j] > 0]
        spikes.layers_available = True
