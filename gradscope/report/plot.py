"""`gradscope plot`: one headless figure of a run (matplotlib Agg), fast and honest at any length.

Panels: gradient norm over steps (log scale) with the judged and recommended
thresholds and the range of thresholds the data support (shaded), clipped / skipped /
non-finite steps marked (clipped steps as dots while few, as a rug of ticks along the
panel's foot when many); the loss (raw, faint, and smoothed) with the learning rate on its
own axis (the warm-up is judged from it); a histogram of the norms on a log scale in raw
norm units (the same units as every other panel), integer counts; the clip fraction as a
function of the threshold; a small per-layer heatmap when layer norms were recorded.

Long runs are drawn from at most a few thousand points per series: each bin keeps
its minimum and maximum (downsample_minmax), so a single-step spike in a million
steps is still drawn, and non-finite steps are marked, never dropped.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradscope.report.sources import THRESHOLD_SOURCE_LABELS

if TYPE_CHECKING:
    from gradscope.analysis.model import OptimizerAnalysis, RunAnalysis

# Points per line series after downsampling: 2 per bin, a bin narrower than a pixel
# of a 14-inch figure at 100 dpi.
MAX_METRICS = 6  # metric names drawn in the metrics panel
MAX_BINS = 2000
MAX_MARKERS = 2000
MAX_CLIP_DOTS = 50  # more clipped steps than this are a rug of ticks, not dots over the curve
HEATMAP_COLUMNS = 600
HEATMAP_ROWS = 80
HEATMAP_LABELLED = 12  # more layers than this: the heatmap's rows are not labelled (the panel stays small)
TAU_GRID = 300

COLORS = ("#1f77b4", "#9467bd", "#2ca02c", "#8c564b", "#e377c2", "#17becf")
JUDGED_COLOR = "#d62728"
RECOMMENDED_COLOR = "#2ca02c"
CLIPPED_COLOR = "#ff7f0e"
SKIPPED_COLOR = "#7f7f7f"
NONFINITE_COLOR = "#000000"
LR_COLOR = "#555555"
FONT_MIN = 8.0  # no text smaller than this (points): labels must read at the figure's size
LEGEND_FONT = 8.0
FIG_WIDTH = 13.0  # inches


# ---------------------------------------------------------------- pure helpers


def downsample_minmax(x: np.ndarray, y: np.ndarray, max_bins: int = MAX_BINS) -> tuple[np.ndarray, np.ndarray]:
    """At most 2 * max_bins points that draw like (x, y): each of max_bins equal-count bins
    keeps its finite minimum and maximum, in step order. Non-finite values are skipped
    (mark them separately); a bin with none finite contributes nothing.

    Short series come back unchanged (non-finite values included, so a line breaks there).
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=float)
    n = len(y)
    if max_bins < 1:
        raise ValueError("max_bins must be at least 1")
    if n <= 2 * max_bins:
        return x, y
    k = -(-n // max_bins)  # ceil: points per bin
    bins = -(-n // k)
    pad = bins * k - n
    finite = np.isfinite(y)
    lo_src = np.where(finite, y, np.inf)
    hi_src = np.where(finite, y, -np.inf)
    if pad:
        lo_src = np.concatenate([lo_src, np.full(pad, np.inf)])
        hi_src = np.concatenate([hi_src, np.full(pad, -np.inf)])
    lo_src = lo_src.reshape(bins, k)
    hi_src = hi_src.reshape(bins, k)
    i_lo = lo_src.argmin(axis=1)
    i_hi = hi_src.argmax(axis=1)
    has = np.isfinite(lo_src[np.arange(bins), i_lo])
    base = np.arange(bins) * k
    first = np.minimum(i_lo, i_hi)
    second = np.maximum(i_lo, i_hi)
    idx = np.stack([base + first, base + second], axis=1)[has]
    # A bin whose min and max are the same point keeps it once.
    same = idx[:, 0] == idx[:, 1]
    flat = idx.ravel()
    keep = np.ones(len(flat), dtype=bool)
    keep[1::2] = ~same
    flat = flat[keep]
    return x[flat], y[flat]


def thin_markers(x: np.ndarray, max_points: int = MAX_MARKERS) -> np.ndarray:
    """At most ~max_points marker positions: every position when few, else the first of
    each occupied bin of the range (a lone event still gets its marker)."""
    x = np.asarray(x)
    if len(x) <= max_points:
        return x
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return x[:1]
    b = np.floor((x.astype(float) - lo) / (hi - lo) * (max_points - 1)).astype(np.int64)
    _, first = np.unique(b, return_index=True)
    return x[np.sort(first)]


def survival(norms: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of finite norms strictly above each tau (what clipping at tau would clip)."""
    g = np.sort(np.asarray(norms, dtype=float)[np.isfinite(norms)])
    if len(g) == 0:
        return np.full(len(taus), np.nan)
    return 1.0 - np.searchsorted(g, taus, side="right") / len(g)


def tau_grid(norms: np.ndarray, *marks: float | None, n: int = TAU_GRID) -> np.ndarray:
    """A log-spaced grid of thresholds spanning the finite positive norms and the marks."""
    g = np.asarray(norms, dtype=float)
    g = g[np.isfinite(g) & (g > 0)]
    pts = [v for v in marks if v is not None and np.isfinite(v) and v > 0]
    vals = np.concatenate([g, np.asarray(pts, dtype=float)]) if pts else g
    if len(vals) == 0:
        return np.logspace(-3, 3, n)
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    return np.logspace(math.log10(lo) - 0.2, math.log10(hi) + 0.2, n)


def heatmap_matrix(
    values: np.ndarray, max_cols: int = HEATMAP_COLUMNS, skipped: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log10 of a (steps x layers) array as (layers x columns), columns binned by max so a
    spike stays. A column with a non-finite value of a step the loss scaler did not skip
    is NaN (drawn as 'non-finite'); skipped steps are left out of the bins.
    Returns (matrix, index of the first row of each column, column holds only skipped steps)."""
    v = np.asarray(values, dtype=float)
    n, width = v.shape
    skip = np.zeros(n, dtype=bool) if skipped is None else np.asarray(skipped, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), -np.inf)  # 0 -> -inf: "below scale"
    logv = np.where(np.isfinite(v), logv, np.nan)
    logv[skip] = -np.inf  # ignored by max; the column is flagged below if nothing else is in it
    k = max(1, -(-n // max_cols))
    cols = -(-n // k)
    pad = cols * k - n
    if pad:
        logv = np.concatenate([logv, np.full((pad, width), -np.inf)])
        skip = np.concatenate([skip, np.ones(pad, dtype=bool)])
    blocks = logv.reshape(cols, k, width)
    bad = np.isnan(blocks).any(axis=1)
    mx = np.where(np.isnan(blocks), -np.inf, blocks).max(axis=1)
    mx = np.where(bad, np.nan, mx)
    only_skipped = skip.reshape(cols, k).all(axis=1)
    return mx.T, np.arange(cols) * k, only_skipped


@dataclass
class Heatmap:
    """The layer heatmap of one series, already binned to the figure's columns (heatmap_matrix's
    columns, computed by streaming the rows once: see layer_heatmap)."""

    names: list[str]
    mat: np.ndarray  # log10 (layers x columns); NaN: a non-finite value; -inf: below scale
    edges: np.ndarray  # column edges in steps (len columns + 1)
    only_skipped: np.ndarray  # column holds only steps the loss scaler skipped
    peak: np.ndarray  # each layer's largest finite binned norm (raw), to pick the rows shown


def layer_heatmap(store, key: tuple[int, int], skipped_steps: np.ndarray | None,
                  max_cols: int = HEATMAP_COLUMNS) -> Heatmap | None:
    """heatmap_matrix of a series' layer rows, read a block of whole bins at a time: the bins'
    max of the raw float values (log10 is monotone, so it is taken of the max, per bin), in
    bounded memory whatever the run's length."""
    names = store.names(*key)
    steps = store.steps(*key)
    n = len(steps)
    if n == 0 or not names:
        return None
    if (np.diff(steps) < 0).any():  # rows not in step order (a foreign table): draw them sorted
        order = np.argsort(steps, kind="stable")
        values = store.rows(*key, order)
        steps = steps[order]
        skip = np.isin(steps, skipped_steps) if skipped_steps is not None else None
        mat, starts, only = heatmap_matrix(values, max_cols, skip)
        peak = np.nanmax(np.where(np.isfinite(values), values, np.nan), axis=0)
        return Heatmap(names, mat, np.append(steps[starts], steps[-1] + 1).astype(float) - 0.5, only, peak)
    k = max(1, -(-n // max_cols))
    cols = -(-n // k)
    skip_all = np.isin(steps, skipped_steps) if skipped_steps is not None and len(skipped_steps) else None
    mx = np.empty((cols, len(names)), dtype=np.float64)
    only = np.zeros(cols, dtype=bool)
    per = max(1, 16384 // k) * k  # rows per read: whole bins
    for first, values in store.chunks(*key, rows=per, native=True):
        m = len(values)
        if skip_all is not None:
            skip = skip_all[first:first + m]
            if skip.any():
                values = values.copy()
                values[skip] = 0.0  # left out of the max (0 reads as "below scale")
        b0, nb = first // k, -(-m // k)
        pad = nb * k - m
        if pad:
            values = np.concatenate([values, np.zeros((pad, values.shape[1]), dtype=values.dtype)])
        mx[b0:b0 + nb] = values.reshape(nb, k, -1).max(axis=1)  # NaN and inf propagate: bad bins
        if skip_all is not None:
            sk = np.concatenate([skip_all[first:first + m], np.ones(pad, dtype=bool)])
            only[b0:b0 + nb] = sk.reshape(nb, k).all(axis=1)
    bad = ~np.isfinite(mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(mx > 0, np.log10(np.where(mx > 0, mx, 1.0)), -np.inf)
    logv = np.where(bad, np.nan, logv)
    peak = np.where(bad, np.nan, mx).max(axis=0, initial=-np.inf, where=~bad)
    peak = np.where(bad.all(axis=0), np.nan, peak)  # only non-finite: listed first, as heatmap_matrix's callers did
    starts = np.arange(cols) * k
    return Heatmap(names, logv.T, np.append(steps[starts], steps[-1] + 1).astype(float) - 0.5, only, peak)


# ---------------------------------------------------------------- what to draw


@dataclass
class Series:
    """One optimizer's steps, as arrays."""

    optimizer: int
    label: str
    step: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray
    clipped: np.ndarray
    skipped: np.ndarray
    lr: np.ndarray | None = None    # the learning rate per step (None / NaN: not recorded)
    clip_norm: float | None = None  # the threshold judged
    clip_source: str | None = None
    recommended: float | None = None
    recommended_fraction: float | None = None
    supported: tuple[float, float] | None = None  # the range of thresholds the data support (recommend's)
    judged_fraction: float | None = None
    regime: str | None = None
    steady_from: int | None = None  # first step the analyzer judged (after warm-up)
    judged_clipped: int | None = None  # the analyzer's count of clipped steady-state steps
    judged_steps: int | None = None    # the steady-state steps it counted them among
    blowup_from: int | None = None     # a blow-up's onset: the distribution panels stop before it
    origin: Any = None  # analysis.origin.Origin of this optimizer (--trace-nan), or None

    def steady(self) -> np.ndarray:
        """Finite, not-skipped norms of the steps the analyzer judged (all when unknown), without
        a blow-up's runaway steps (a norm growing to 1e17 says nothing about a threshold)."""
        ok = np.isfinite(self.grad_norm) & ~self.skipped
        if self.steady_from is not None:
            ok &= self.step >= self.steady_from
        if self.blowup_from is not None:
            ok &= self.step < self.blowup_from
        return self.grad_norm[ok]


@dataclass
class PlotData:
    title: str
    series: list[Series]
    layers: Heatmap | None = None  # the first series' layer heatmap, or None
    notes: list[str] = field(default_factory=list)
    source: str = "gradscope"  # or the importer's format name
    metrics: Any = None  # the plotted rank's metrics-r*.csv rows (step, name, value), or None


def _mode(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return None
    vals, counts = np.unique(v, return_counts=True)
    return float(vals[np.argmax(counts)])


def plot_data(run, analysis: RunAnalysis | None = None, clip_norm: float | None = None,
              name: str | None = None) -> PlotData:
    """Arrays and thresholds for the figure from a Run and (optionally) the analyzer's result.

    What the analyzer concluded (threshold, recommendation, warm-up, NaN origin) is drawn as it
    is, never judged again; without a result (or for an optimizer it could not judge) the figure
    shows what the run recorded: its clip_grad_norm_ threshold and its traced NaN origin."""
    steps = run.steps
    notes: list[str] = []
    ranks = sorted(steps["rank"].unique().tolist()) if len(steps) else [0]
    rank = analysis.rank if analysis is not None else None
    rank = ranks[0] if rank is None or rank not in ranks else rank
    if len(ranks) > 1:
        notes.append(f"rank {rank} of {len(ranks)}")
        steps = steps[steps["rank"] == rank]
    by_opt = {o.optimizer: o for o in analysis.optimizers} if analysis is not None else {}
    series = [_series(run, int(opt_id), s.sort_values("step", kind="stable"), by_opt.get(int(opt_id)), clip_norm)
              for opt_id, s in steps.groupby("optimizer", sort=True)]
    _attach_origin(series, by_opt, run, rank)
    layers = _first_heatmap(run, series, rank)
    if layers is not None and len(series) > 1:
        notes.append(f"layer heatmap: optimizer {series[0].optimizer}")
    if (run.meta or {}).get("sampled"):
        notes.append(f"sampled log: every {run.meta.get('logging_steps')}th step")
    metrics = getattr(run, "metrics", None)
    if metrics is not None and len(metrics):
        metrics = metrics[metrics["rank"] == rank]
    return PlotData(title=_title(run, series, name), series=series, layers=layers, notes=notes, source=run.source,
                    metrics=metrics if metrics is not None and len(metrics) else None)


def _series(run, opt_id: int, s, a: OptimizerAnalysis | None, clip_norm: float | None) -> Series:
    """One optimizer's rows (in step order) and, when the analyzer judged it, what it concluded."""
    cls = next((o.get("class") for o in (run.meta.get("optimizers") or [])
                if isinstance(o, dict) and o.get("id") == opt_id), None)
    ser = Series(
        optimizer=opt_id,
        label=f"optimizer {opt_id}" + (f" ({cls})" if cls else ""),
        step=s["step"].to_numpy(),
        grad_norm=s["grad_norm"].to_numpy(dtype=float),
        loss=s["loss"].to_numpy(dtype=float),
        clipped=s["clipped"].to_numpy(dtype=bool),
        skipped=s["skipped"].to_numpy(dtype=bool),
        lr=s["lr"].to_numpy(dtype=float) if "lr" in s else None,
    )
    ser.clip_norm, ser.clip_source = _judged_threshold(run, s, a, clip_norm)
    if a is not None:
        _draw_analysis(ser, a)
    return ser


def _judged_threshold(run, s, a: OptimizerAnalysis | None, clip_norm: float | None) -> tuple[float | None, str | None]:
    """(the threshold drawn as judged, its legend label): plot --clip-norm, else the analyzer's, else the
    one the run recorded (the script's most used max_norm, a log's max_grad_norm)."""
    if clip_norm is not None:
        return float(clip_norm), THRESHOLD_SOURCE_LABELS["option"].legend
    th = a.threshold if a is not None else None
    if th is not None and th.clip_norm is not None:
        label = THRESHOLD_SOURCE_LABELS.get(th.source) if th.source is not None else None
        return float(th.clip_norm), (label or THRESHOLD_SOURCE_LABELS["script"]).legend
    m = _mode(s["clip_max_norm"].to_numpy(dtype=float))
    if m is not None:
        return m, THRESHOLD_SOURCE_LABELS["script"].legend
    meta_clip = (run.meta or {}).get("clip_norm")
    if isinstance(meta_clip, (int, float)) and meta_clip > 0:
        return float(meta_clip), THRESHOLD_SOURCE_LABELS["log"].legend
    return None, None


def _draw_analysis(ser: Series, a: OptimizerAnalysis) -> None:
    """The analyzer's recommendation, verdict, warm-up and blow-up onset of this optimizer, as drawn."""
    rec = a.recommendation
    if rec is not None and rec.clip_norm_rounded:
        ser.recommended = float(rec.clip_norm_rounded)
        ser.recommended_fraction = rec.clip_fraction
        if rec.low is not None and rec.high is not None and 0 < rec.low < rec.high:
            ser.supported = (float(rec.low), float(rec.high))
    ser.judged_fraction = a.clip_fraction
    ser.regime = a.regime
    ser.steady_from = int(a.steady_from_step) if a.steady_from_step is not None and a.warmup_steps else None
    v = a.verdict
    if ser.clip_norm is not None and v.clipped_steps is not None and v.clip_norm == ser.clip_norm:
        ser.judged_clipped = int(v.clipped_steps)
        ser.judged_steps = int(a.steady_steps) or None
    if rec is not None and rec.situation == "blew-up" and rec.onset_step is not None:
        fin = np.isfinite(ser.grad_norm) & ~ser.skipped & (ser.step >= (ser.steady_from or 0))
        if (fin & (ser.step < rec.onset_step)).sum() >= 2:  # something left to show before it
            ser.blowup_from = int(rec.onset_step)


def _attach_origin(series: list[Series], by_opt: dict[int, OptimizerAnalysis], run, rank: int) -> None:
    """The NaN origin `--trace-nan` recorded: the analyzer's for an optimizer it judged, else read from the run."""
    recorded: list = []
    for s in series:
        a = by_opt.get(s.optimizer)
        if a is not None:
            s.origin = a.nonfinite.origin
            continue
        if not recorded:
            from gradscope.analysis.origin import nan_origin

            recorded.append(nan_origin(run, rank) if run.source == "gradscope" else None)
        o = recorded[0]
        if o is not None and s.optimizer == o.optimizer:
            s.origin = o


def _first_heatmap(run, series: list[Series], rank: int) -> Heatmap | None:
    """The first series' layer heatmap, when its layer norms were recorded."""
    store = run.layer_norms
    if not series or (rank, series[0].optimizer) not in store.series():
        return None
    first = series[0]
    skipped = first.step[first.skipped] if first.skipped.any() else None
    return layer_heatmap(store, (rank, first.optimizer), skipped)


def _title(run, series: list[Series], name: str | None) -> str:
    label = name or Path(run.path).name or str(run.path)
    n = sum(len(s.step) for s in series)
    title = f"{label}  —  {n:,} steps" + (f", {len(series)} optimizers" if len(series) > 1 else "")
    if series and series[0].regime:
        title += f"  —  regime: {series[0].regime}"
    if run.source != "gradscope":
        title += f"  ({run.source} log)"
    return title


def origin_label(o) -> str:
    where = f"`{o.module}`" if o.module else "outside every module"
    return f"NaN origin, step {o.step}: {o.phase}, {where}"


# ---------------------------------------------------------------- the figure


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


_CHARMAPS: dict[str, set[int]] = {}


def _charmap(path: str) -> set[int]:
    if path not in _CHARMAPS:
        from matplotlib.ft2font import FT2Font

        try:
            _CHARMAPS[path] = set(FT2Font(path).get_charmap())
        except (OSError, RuntimeError, ValueError):
            _CHARMAPS[path] = set()
    return _CHARMAPS[path]


def font_plan(texts: list[str]) -> tuple[list[str], set[int]]:
    """(font families to draw with, code points no installed font has).

    The default font lacks CJK and many other scripts: a run path in them would draw as
    tofu boxes. Fonts that cover the missing characters are added as fallbacks; characters
    no font covers are written as escapes (see safe_text) instead of boxes.
    """
    from matplotlib import font_manager, rcParams

    base = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
    need = {ord(c) for t in texts for c in t if not c.isspace()} - _charmap(base)
    families = list(rcParams["font.family"])
    if need:
        for f in font_manager.fontManager.ttflist:
            got = need & _charmap(f.fname)
            if got and f.name not in families:
                families.append(f.name)
                need -= got
            if not need:
                break
    return families, need


def safe_text(text: str, missing: set[int]) -> str:
    return "".join(f"\\u{ord(c):04x}" if ord(c) in missing else c for c in text)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Break a long title into lines that fit width_in inches (DejaVu Sans averages ~0.6 em a character)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(part, chars, break_on_hyphens=False) for part in text.split("\n"))


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Log-axis ticks as plain numbers (0.5, 1, 2), not 5x10^-1, and no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _step_ticks(axis) -> None:
    """Step numbers as 250,000 rather than 0.25 with a 1e6 offset."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def _threshold_lines(ax, s: Series, orientation: str = "h", label: bool = True) -> None:
    draw = ax.axhline if orientation == "h" else ax.axvline
    if s.clip_norm is not None:
        txt = f"judged τ = {_fmt(s.clip_norm)} ({s.clip_source})"
        if s.judged_fraction is not None:
            txt += f", clips {s.judged_fraction:.1%}"
        draw(s.clip_norm, color=JUDGED_COLOR, lw=1.4, ls="--", label=txt if label else None, zorder=4)
    if s.recommended is not None:
        txt = f"recommended τ = {_fmt(s.recommended)}"
        if s.recommended_fraction is not None:
            txt += f", would clip {s.recommended_fraction:.1%}"
        draw(s.recommended, color=RECOMMENDED_COLOR, lw=1.4, ls="-.", label=txt if label else None, zorder=4)


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) positions of each run of consecutive True values."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return []
    d = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), (np.flatnonzero(d == -1) - 1).tolist()))


def _mark_top(ax, steps: np.ndarray, bad: np.ndarray, label: str | None) -> None:
    """Non-finite steps: a triangle just inside the top frame at the start of each run of them,
    and a shaded band over a run of several (hundreds of markers side by side merge into a bar)."""
    from matplotlib.transforms import ScaledTranslation

    runs = runs_of(bad)
    if not runs:
        return
    starts = steps[[a for a, _ in runs]]
    for a, b in runs:
        if b > a:
            ax.axvspan(steps[a], steps[b], facecolor="none", edgecolor=NONFINITE_COLOR, alpha=0.35, hatch="///",
                       lw=0, zorder=1)
    xs = thin_markers(starts)
    # 7 points below the top frame whatever the panel's height: the whole marker stays inside.
    below_top = ax.get_xaxis_transform() + ScaledTranslation(0, -7 / 72, ax.figure.dpi_scale_trans)
    ax.scatter(xs, np.ones(len(xs)), transform=below_top, marker="v", s=28,
               color=NONFINITE_COLOR, zorder=6, label=label, clip_on=False)


def _log_limits(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    """Log-axis limits around positive values, with a margin so a line at either end stays visible."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    span = math.log10(hi / lo)
    return lo / 10 ** (span * pad), hi * 10 ** (span * pad)


def _clipped_label(s: Series, n_all: int, n_warm: int) -> tuple[str, str | None]:
    """Legend text for the clipped markers, in the analyzer's numbers when it judged the run."""
    if s.judged_clipped is not None and s.judged_steps:
        main = (f"clipped: {s.judged_clipped:,} of {s.judged_steps:,} judged steps "
                f"({s.judged_clipped / s.judged_steps:.1%})")
        return main, (f"clipped in warm-up ({n_warm:,}, not judged)" if n_warm else None)
    return f"clipped ({_steps(n_all)})", None


def _steps(n: int) -> str:
    return f"{n:,} step" + ("" if n == 1 else "s")


def _draw_norms(ax, data: PlotData) -> None:
    from matplotlib.lines import Line2D

    multi = len(data.series) > 1
    any_pos = False
    for i, s in enumerate(data.series):
        any_pos |= _draw_series_norms(ax, s, COLORS[i % len(COLORS)], i == 0 or multi, multi)
    first = data.series[0] if data.series else None
    _norm_axis(ax, data, first, any_pos)
    if first is not None:
        _first_series_marks(ax, first, data.source, any_pos)
    ax.set_title("gradient norm per optimizer step", loc="left", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    extra = [a for a in ax.artists if isinstance(a, Line2D) and a.get_label() and not a.get_label().startswith("_")]
    ax.legend(handles + extra, labels + [a.get_label() for a in extra], loc="best", fontsize=LEGEND_FONT,
              ncol=2, framealpha=0.85)


def _draw_series_norms(ax, s: Series, color: str, labelled: bool, multi: bool) -> bool:
    """One series' norm line, its clipped, skipped and non-finite steps; whether it has a positive norm."""
    g = s.grad_norm
    ok = np.isfinite(g) & (g > 0)
    # Skipped steps (inf by design) and non-finite ones are markers, not line points.
    line = np.where(ok & ~s.skipped, g, np.nan)
    x, y = downsample_minmax(s.step, line)
    has_line = bool(np.isfinite(y).any())  # no legend entry for a line that is not there
    ax.plot(x, y, lw=0.8, color=color, zorder=2,
            label=(s.label if multi else "grad norm (pre-clip)") if has_line else None)
    clipped = s.clipped & ok
    if clipped.any():
        _draw_clipped(ax, s, clipped, labelled)
    skipped = s.skipped
    if skipped.any():
        xs = thin_markers(s.step[skipped])
        ax.scatter(xs, np.zeros(len(xs)), transform=_above_foot(ax, 6), marker="x", s=18,
                   color=SKIPPED_COLOR, zorder=5, clip_on=False,
                   label=f"skipped by loss scaler ({int(skipped.sum()):,})")
    bad = ~np.isfinite(g) & ~skipped
    _mark_top(ax, s.step, bad, f"non-finite grad norm ({_steps(int(bad.sum()))})" if bad.any() else None)
    return bool(ok.any())


def _above_foot(ax, points: float):
    """x in data, y in axes coordinates, `points` above the panel's foot."""
    from matplotlib.transforms import ScaledTranslation

    return ax.get_xaxis_transform() + ScaledTranslation(0, points / 72, ax.figure.dpi_scale_trans)


def _draw_clipped(ax, s: Series, clipped: np.ndarray, labelled: bool) -> None:
    """Clipped steps as dots on the curve while few, else a rug of ticks along the panel's foot; the
    warm-up's (not judged) hollow or faint."""
    warm = clipped & (s.step < s.steady_from) if s.steady_from is not None else np.zeros_like(clipped)
    main_label, warm_label = _clipped_label(s, int(clipped.sum()), int(warm.sum()))
    many = int(clipped.sum()) > MAX_CLIP_DOTS
    for sel, lab, face in ((clipped & ~warm, main_label, CLIPPED_COLOR), (warm, warm_label, "none")):
        idx = np.flatnonzero(sel)
        if not len(idx):
            continue
        if many:
            # Many clipped steps: a rug of ticks along the panel's foot, off the curve.
            xs = thin_markers(s.step[idx])
            ax.scatter(xs, np.zeros(len(xs)), transform=_above_foot(ax, 3), marker="|", s=30, color=CLIPPED_COLOR,
                       alpha=1.0 if face != "none" else 0.45, linewidths=0.8, zorder=3, clip_on=False,
                       label=lab if labelled and lab else None)
            continue
        ax.scatter(s.step[idx], s.grad_norm[idx], s=9, facecolors=face, edgecolors=CLIPPED_COLOR, zorder=3,
                   linewidths=0.8, label=lab if labelled else None)


def _norm_axis(ax, data: PlotData, first: Series | None, any_pos: bool) -> None:
    """A log axis spanning the norms and the first series' thresholds, or words when no norm is positive."""
    if any_pos:
        ax.set_yscale("log")
        pos = np.concatenate([s.grad_norm[np.isfinite(s.grad_norm) & (s.grad_norm > 0)] for s in data.series])
        marks = [v for v in ((first.clip_norm, first.recommended, *(first.supported or ())) if first else ())
                 if v is not None and v > 0]
        lo, hi = _log_limits([float(pos.min()), float(pos.max()), *marks])
        ax.set_ylim(lo, hi)
        _plain_log_ticks(ax.yaxis, lo, hi)
        ax.set_ylabel("gradient norm (log)")
    else:
        ax.text(0.5, 0.5, "no finite gradient norm", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_yticks([])
        ax.set_ylabel("gradient norm")


def _first_series_marks(ax, first: Series, source: str, any_pos: bool) -> None:
    """The first series' thresholds and supported range, first non-finite step, NaN origin, warm-up and
    blow-up onset."""
    from matplotlib.lines import Line2D

    if any_pos:
        _threshold_lines(ax, first)
        if first.supported is not None:
            ax.axhspan(*first.supported, color=RECOMMENDED_COLOR, alpha=0.12, lw=0, zorder=1,
                       label=f"range the data support: {_fmt(first.supported[0])} to {_fmt(first.supported[1])}")
    if first.clip_norm is None:
        # Words, not a swatch: there is no line to point at.
        words = ("no clip threshold: the run does not clip" if source == "gradscope"
                 else "no clip threshold known for this log")
        ax.add_artist(Line2D([], [], ls="none", marker="none", label=words))
    bad = np.flatnonzero(~np.isfinite(first.grad_norm) & ~first.skipped)
    if len(bad):
        ax.axvline(first.step[bad[0]], color=NONFINITE_COLOR, lw=0.8, ls=":", zorder=1,
                   label=f"first non-finite: step {first.step[bad[0]]}")
    if first.origin is not None:
        ax.axvline(first.origin.step, color=NONFINITE_COLOR, lw=1.6, ls="-", alpha=0.6, zorder=1,
                   label=origin_label(first.origin))
    if first.steady_from is not None and len(first.step) and first.steady_from > first.step[0]:
        ax.axvspan(first.step[0], first.steady_from, color="0.85", alpha=0.5, lw=0, zorder=0,
                   label="warm-up (not judged)")
    if first.blowup_from is not None:
        ax.axvline(first.blowup_from, color=JUDGED_COLOR, lw=0.8, ls=":", zorder=1,
                   label=f"blow-up from step {first.blowup_from:,}")


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the finite values over `window` points (NaN where none yet): the loss's trend."""
    ok = np.isfinite(y)
    v = np.where(ok, y, 0.0)
    c = np.concatenate([[0.0], np.cumsum(v)])
    n = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    cnt = n[i] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[i] - c[lo]) / np.maximum(cnt, 1), np.nan)


def smooth_window(n: int) -> int:
    """Points in the loss's smoothing window: about 2% of the run, at least 1, at most 500."""
    return int(min(500, max(1, round(n / 50))))


def _draw_loss(ax, data: PlotData) -> None:
    multi = len(data.series) > 1
    drawn = False
    ymins, ymaxs = [], []
    for i, s in enumerate(data.series):
        loss = s.loss
        fin = np.isfinite(loss)
        if not fin.any() and not np.isinf(loss).any():
            continue
        drawn = True
        color = COLORS[i % len(COLORS)]
        x, y = downsample_minmax(s.step, np.where(fin, loss, np.nan))
        w = smooth_window(int(fin.sum()))
        ax.plot(x, y, lw=0.6, color=color, alpha=0.3 if w > 1 else 1.0,
                label=(s.label + " (raw)" if multi else "loss (raw)") if w > 1 else (s.label if multi else "loss"))
        if w > 1:
            xs, ys = downsample_minmax(s.step, smooth(np.where(fin, loss, np.nan), w))
            ax.plot(xs, ys, lw=1.4, color=color,
                    label=(s.label + ", " if multi else "loss, ") + f"mean of the last {w} steps")
        if fin.any():
            ymins.append(np.nanmin(loss[fin]))
            ymaxs.append(np.nanmax(loss[fin]))
        # NaN losses count only when the series records losses at all (NaN also means "none").
        bad = np.isinf(loss) | (np.isnan(loss) & fin.any())
        _mark_top(ax, s.step, bad, f"non-finite loss ({_steps(int(bad.sum()))})" if bad.any() else None)
    if not drawn:
        ax.text(0.5, 0.5, "no loss recorded", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_yticks([])
    else:
        lo, hi = min(ymins, default=1), max(ymaxs, default=1)
        if lo > 0 and hi / lo > 50:
            ax.set_yscale("log")
        if ymins:  # room above the line for the non-finite markers
            if ax.get_yscale() == "log":
                ax.set_ylim(*_log_limits([lo, hi], pad=0.15))
            else:
                pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 1.0
                ax.set_ylim(lo - pad / 2, hi + pad)
    _draw_lr(ax, data)
    if drawn:
        ax.legend(loc="best", fontsize=LEGEND_FONT, framealpha=0.85)
    ax.set_ylabel("loss")
    ax.set_xlabel("optimizer step")
    ax.set_title("loss", loc="left", fontsize=10)
    ax.grid(True, alpha=0.3)


def _draw_lr(ax, data: PlotData) -> None:
    """The first series' learning rate on a twin axis (the warm-up is judged from it), when recorded."""
    s = data.series[0] if data.series else None
    if s is None or s.lr is None or not np.isfinite(s.lr).any():
        return
    twin = ax.twinx()
    x, y = downsample_minmax(s.step, s.lr)
    twin.plot(x, y, color=LR_COLOR, lw=1.0, ls=":", label="learning rate")
    twin.set_ylabel("learning rate (dotted)", color=LR_COLOR)
    twin.tick_params(axis="y", colors=LR_COLOR, labelsize=FONT_MIN)
    top = float(np.nanmax(s.lr))
    twin.set_ylim(0, top * 1.1 if top > 0 else 1.0)


def _draw_hist(ax, data: PlotData) -> None:
    from matplotlib.ticker import MaxNLocator

    s = data.series[0] if data.series else None
    g = s.steady() if s is not None else np.array([])
    g = g[g > 0]
    if len(g) == 0:
        ax.text(0.5, 0.5, "no finite gradient norm", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        # Raw norms on a log axis (bins even in log): tau = 1.5 reads 1.5, as on every other panel.
        lo, hi = float(g.min()), float(g.max())
        if hi / lo < 1 + 1e-9:
            lo, hi = lo / 3, hi * 3
        bins = np.logspace(math.log10(lo), math.log10(hi), min(80, max(10, int(np.sqrt(len(g))))) + 1)
        ax.hist(g, bins=bins, color=COLORS[0], alpha=0.8)
        ax.set_xscale("log")
        marks = [v for v in (s.clip_norm, s.recommended, *(s.supported or ())) if v is not None and v > 0]
        left, right = _log_limits([lo, hi, *marks], pad=0.06)
        ax.set_xlim(left, right)  # a threshold line never sits on the axis
        _plain_log_ticks(ax.xaxis, left, right)
        if s.supported is not None:
            ax.axvspan(*s.supported, color=RECOMMENDED_COLOR, alpha=0.12, lw=0,
                       label=f"range the data support: {_fmt(s.supported[0])} to {_fmt(s.supported[1])}")
        for v, c, ls, what in ((s.clip_norm, JUDGED_COLOR, "--", "judged τ"),
                               (s.recommended, RECOMMENDED_COLOR, "-.", "recommended τ")):
            if v is not None and v > 0:
                ax.axvline(v, color=c, ls=ls, lw=1.4, label=f"{what} = {_fmt(v)}")
        if s.clip_norm is not None or s.recommended is not None:
            ax.legend(loc="best", fontsize=LEGEND_FONT, framealpha=0.85)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of steps: whole numbers
    ax.set_xlabel("gradient norm (log scale)")
    ax.set_ylabel("steps")
    ax.set_title("distribution of norms" + _scope(s, data), loc="left", fontsize=10)
    ax.grid(True, alpha=0.3)


def _scope(s: Series | None, data: PlotData) -> str:
    """Which steps a distribution panel shows (the analyzer's, so the numbers agree)."""
    if s is None:
        return ""
    parts = []
    if len(data.series) > 1:
        parts.append(f"optimizer {s.optimizer}")
    if s.steady_from is not None:
        parts.append(f"steps ≥ {s.steady_from:,}, after warm-up")
    if s.blowup_from is not None:
        parts.append(f"before the blow-up at step {s.blowup_from:,}")
    return f" ({', '.join(parts)})" if parts else ""


def _draw_survival(ax, data: PlotData) -> None:
    s = data.series[0] if data.series else None
    g = s.steady() if s is not None else np.array([])
    if len(g) == 0:
        ax.text(0.5, 0.5, "no finite gradient norm", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        taus = tau_grid(g, s.clip_norm, s.recommended, *(s.supported or ()))
        ax.plot(taus, survival(g, taus) * 100, color=COLORS[0], lw=1.2)
        ax.set_xscale("log")
        ax.set_xlim(taus[0], taus[-1])
        _plain_log_ticks(ax.xaxis, float(taus[0]), float(taus[-1]))
        if s.supported is not None:
            ax.axvspan(*s.supported, color=RECOMMENDED_COLOR, alpha=0.12, lw=0, label="range the data support")
        for v, c, ls, what in ((s.clip_norm, JUDGED_COLOR, "--", "judged"),
                               (s.recommended, RECOMMENDED_COLOR, "-.", "recommended")):
            if v is not None and v > 0:
                f = float(survival(g, np.array([v]))[0]) * 100
                of = " of the steps shown" if s.blowup_from is not None else ""  # not the analyzer's share
                ax.axvline(v, color=c, ls=ls, lw=1.4, label=f"{what} τ = {_fmt(v)}: clips {f:.1f}%{of}")
                ax.plot([v], [f], "o", color=c, ms=4)
        if s.clip_norm is not None or s.recommended is not None:
            ax.legend(loc="best", fontsize=LEGEND_FONT, framealpha=0.85)
        ax.set_ylim(-3, 103)
    ax.set_xlabel("threshold τ (clip_grad_norm_ max_norm)")
    ax.set_ylabel("% of steps clipped")
    ax.set_title("share of steps clipped at each τ" + _scope(s, data), loc="left", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _draw_heatmap(fig, ax, data: PlotData) -> None:
    import matplotlib
    from matplotlib.colors import ListedColormap

    heat = data.layers
    names, mat, only_skipped = heat.names, heat.mat, heat.only_skipped
    if len(names) > HEATMAP_ROWS:  # keep the layers with the largest peak norm
        keep = np.sort(np.argsort(-np.nan_to_num(heat.peak, nan=np.inf), kind="stable")[:HEATMAP_ROWS])
        mat, names = mat[keep], [names[k] for k in keep]
        data.notes.append(f"heatmap: the {HEATMAP_ROWS} layers with the largest norms of {len(heat.names)}")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=JUDGED_COLOR)  # bad: non-finite
    finite = mat[np.isfinite(mat)]
    vmin, vmax = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99.5))) if len(finite) else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    edges = heat.edges  # a column spans from its first step to the next column's first step
    shown = np.where(np.isneginf(mat), vmin, mat)
    im = ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, np.ma.masked_invalid(shown), cmap=cmap,
                       vmin=vmin, vmax=vmax, shading="flat", rasterized=True)
    if only_skipped.any():
        grey = np.where(only_skipped[None, :], 1.0, np.nan).repeat(len(names), axis=0)
        ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, np.ma.masked_invalid(grey),
                      cmap=ListedColormap([SKIPPED_COLOR]), shading="flat", rasterized=True)
    ax.set_ylim(len(names) - 0.5, -0.5)
    if len(names) <= HEATMAP_LABELLED:
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=FONT_MIN)
    else:
        ax.set_ylabel(f"{len(names)} parameters")
    ax.set_xlabel("optimizer step")
    legend = "red: non-finite" + ("; grey: skipped by the loss scaler" if only_skipped.any() else "")
    ax.set_title(f"per-parameter gradient norm (log10; {legend})", loc="left", fontsize=10)
    fig.colorbar(im, ax=ax, pad=0.01, fraction=0.025, label="log10 norm")


def _draw_metrics(ax, data: PlotData) -> None:
    """The values the script reported (metrics-r*.csv), each name at the steps it was reported after."""
    m = data.metrics
    names = list(dict.fromkeys(m["name"]))
    shown = names[:MAX_METRICS]
    values = []
    for i, name in enumerate(shown):
        sel = m[m["name"] == name]
        y = sel["value"].to_numpy(dtype=float)
        ax.plot(sel["step"].to_numpy(), y, lw=0.9, marker="o" if len(sel) <= 200 else None, ms=2.5,
                color=COLORS[i % len(COLORS)], label=name)
        values.extend(y[np.isfinite(y)].tolist())
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.legend(loc="best", fontsize=LEGEND_FONT, framealpha=0.85)
    more = f" (first {MAX_METRICS} of {len(names)} names)" if len(names) > MAX_METRICS else ""
    ax.set_title(f"metrics the script reported, at the step each was reported after{more}", loc="left", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)


def build_figure(data: PlotData):
    """The matplotlib Figure (Agg canvas, no pyplot state) for PlotData."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    with_layers = data.layers is not None
    n_names = 0 if not with_layers else len(data.layers.names)
    # The least actionable panel: at most about a sixth of the figure. Labelled rows (up to
    # HEATMAP_LABELLED) get 0.14 in each, room for FONT_MIN-point names; more rows are unlabelled.
    heat_h = (max(1.2, 0.14 * n_names) if n_names <= HEATMAP_LABELLED else 1.6) if with_layers else 0.0
    with_metrics = data.metrics is not None
    heights = [3.4, 1.8, 2.6] + ([heat_h] if with_layers else []) + ([1.8] if with_metrics else [])
    fig = Figure(figsize=(FIG_WIDTH, sum(heights) + 1.1), dpi=100, layout="constrained")
    gs = fig.add_gridspec(len(heights), 2, height_ratios=heights)
    ax_norm = fig.add_subplot(gs[0, :])
    ax_loss = fig.add_subplot(gs[1, :], sharex=ax_norm)
    ax_hist = fig.add_subplot(gs[2, 0])
    ax_surv = fig.add_subplot(gs[2, 1])
    _step_ticks(ax_norm.xaxis)
    _draw_norms(ax_norm, data)
    _draw_loss(ax_loss, data)
    _draw_hist(ax_hist, data)
    _draw_survival(ax_surv, data)
    if with_layers:
        _draw_heatmap(fig, fig.add_subplot(gs[3, :], sharex=ax_norm), data)
    if with_metrics:
        _draw_metrics(fig.add_subplot(gs[len(heights) - 1, :], sharex=ax_norm), data)
    title = data.title + ("\n" + "; ".join(data.notes) if data.notes else "")
    fig.suptitle(_wrap(title, FIG_WIDTH - 0.4, 11), fontsize=11, x=0.01, ha="left")
    for ax, width in ((ax_norm, FIG_WIDTH - 1.2), (ax_loss, FIG_WIDTH - 1.2), (ax_hist, FIG_WIDTH / 2 - 1.0),
                      (ax_surv, FIG_WIDTH / 2 - 1.0)):
        ax.set_title(_wrap(ax.get_title(loc="left"), width, 10), loc="left", fontsize=10)
    _fonts(fig)
    return fig


def _fonts(fig) -> None:
    """Every text in a font that has its characters (escapes where none has), none below FONT_MIN."""
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_text()]
    families, missing = font_plan([t.get_text() for t in texts])
    for t in texts:
        if missing:
            t.set_text(safe_text(t.get_text(), missing))
        t.set_fontfamily(families)
        if t.get_fontsize() < FONT_MIN:
            t.set_fontsize(FONT_MIN)


def default_output(path: str | os.PathLike) -> Path:
    """RUN/gradscope.png for a directory, <log>.gradscope.png beside a log file."""
    p = Path(path)
    if p.is_dir():
        return p / "gradscope.png"
    return p.with_name(p.name + ".gradscope.png")


FORMATS = {".png", ".svg", ".pdf"}


def save(fig, out: str | os.PathLike) -> Path:
    from gradscope.errors import GradscopeError

    out = Path(out)
    ext = out.suffix.lower()
    if ext not in FORMATS:
        raise GradscopeError(f"cannot write '{out}': choose a .png, .svg or .pdf file name")
    from gradscope.report import make_parent

    try:
        make_parent(out, "plot")
        fig.savefig(out, format=ext[1:])
    except OSError as e:
        raise GradscopeError(f"cannot write '{out}': {e.strerror or e}") from None
    return out
