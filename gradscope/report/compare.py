"""How `gradscope compare` looks: one rich table, one JSON object, one figure of overlaid curves."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from gradscope.analysis.compare import FINAL_FRACTION, CompareRow

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
DEFAULT_OUTPUT = "gradscope-compare.png"


def _f(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return format(x, spec)


def _num(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


def to_json(rows: list[CompareRow]) -> dict:
    runs = []
    for r in rows:
        runs.append({
            "run": r.run,
            "optimizer": r.optimizer,
            "optimizer_class": r.optimizer_class,
            "format": r.source,
            "steps": r.steps,
            "grad_norm": {k: _num(v) for k, v in r.percentiles.items()},
            "clip_norm": _num(r.clip_norm),
            "clip_fraction": _num(r.clip_fraction),
            "mean_multiplier": _num(r.mean_multiplier),
            "final_loss": _num(r.final_loss),
            "final_loss_std": _num(r.final_loss_std),
            "final_steps": list(r.final_steps) if r.final_steps else None,
            "non_finite_steps": r.non_finite,
            "skipped_steps": r.skipped,
            "regime": r.regime,
            "situation": r.situation,
            "error": r.error,
            "norm_scope": r.norm_scope,
            "metrics": {k: {"step": s, "value": _num(v)} for k, (s, v) in r.metrics.items()},
        })
    return {"final_fraction": FINAL_FRACTION, "runs": runs}


def table_lines(rows: list[CompareRow]) -> list[str]:
    """The table as plain aligned lines: nothing is cut, in a terminal or a CI log alike. update× is
    left out ('-') for an Adam-family optimizer, where a clip does not scale the update."""
    from gradscope.analysis.advice import normalises_update

    metrics = any(r.metrics for r in rows)
    cols = ("run", "steps", "p50", "p90", "p99", "max", "max_norm", "clips", "update×", "final loss",
            "non-finite", "skipped", "situation") + (("last metrics",) if metrics else ())
    cells = []
    for r in rows:
        p = r.percentiles
        loss = _f(r.final_loss, ".4g") + (f" ±{_f(r.final_loss_std, '.2g')}" if r.final_loss_std else "")
        cells.append((
            r.run, str(r.steps), *(_f(p.get(k), ".4g") for k in ("p50", "p90", "p99", "max")),
            _f(r.clip_norm, "g"), f"{r.clip_fraction:.1%}" if r.clip_fraction is not None else "-",
            "-" if normalises_update(r.optimizer_class) else _f(r.mean_multiplier, ".3f"), loss,
            str(r.non_finite), str(r.skipped),
            r.situation or ("per-rank" if r.norm_scope == "rank-local" else "not judged" if r.error else "-"),
            *([_metric_cell(r)] if metrics else []),
        ))
    from gradscope.report.table import aligned

    return aligned(cols, cells, left=(0, len(cols) - 1))


def _metric_cell(r: CompareRow, most: int = 3) -> str:
    items = [f"{k}={_f(v, '.4g')}@{s}" for k, (s, v) in list(r.metrics.items())[:most]]
    return " ".join(items) + (f" (+{len(r.metrics) - most})" if len(r.metrics) > most else "") if items else "-"


def render(rows: list[CompareRow], file=None) -> None:
    import sys

    out = file or sys.stdout
    print("gradscope compare", file=out)
    print("\n".join(table_lines(rows)), file=out)
    print(f"grad norm p50-max: steady-state percentiles (as `recommend` reports them); clips: share of "
          f"steady-state steps above max_norm; update×: mean update multiplier (SGD-style optimizers; '-' for "
          f"Adam-family ones, where a clip caps the gradient fed into the moments and does not scale the update); "
          f"final loss: mean ± sd of the "
          f"last {FINAL_FRACTION:.0%} of logged losses; skipped: loss-scaler overflows"
          + ("; last metrics: each reported name's last value @ the step it was reported after"
             if any(r.metrics for r in rows) else ""), file=out)
    from gradscope.analysis.ranks import RANK_LOCAL_NOTE

    for r in rows:
        if r.error:
            print(f"note: {r.run}: not judged: {r.error}", file=out)
        elif r.norm_scope == "rank-local":
            print(f"note: {r.run}: {RANK_LOCAL_NOTE}", file=out)


def run_colors(n: int) -> list:
    """n distinct colours: the qualitative palette up to its length, then tab20, then evenly spaced hues of
    a perceptual map (a pilot and a probe never share a colour)."""
    import matplotlib

    if n <= len(COLORS):
        return list(COLORS[:n])
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.02, 0.98, n)]


def build_figure(rows: list[CompareRow]):
    """Two panels sharing the step axis: grad norm and loss (log scales when positive), one distinct colour
    per run, the legend beside the panels (never over the data), each judged max_norm a labelled dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    with_metrics = any(r.metric_series for r in rows)
    if with_metrics:  # a third panel: what the scripts reported (metrics-r*.csv)
        fig = Figure(figsize=(13, 9.5), layout="constrained")
        ax_n, ax_l, ax_m = fig.subplots(3, 1, sharex=True)
    else:
        fig = Figure(figsize=(13, 7), layout="constrained")
        ax_n, ax_l = fig.subplots(2, 1, sharex=True)
    colors = run_colors(len(rows))
    drawn_loss = False
    pos_loss = True
    taus: list[tuple[float, object, str]] = []
    for i, r in enumerate(rows):
        if r.curves is None or len(r.curves.step) == 0:
            continue
        _draw_norm_curve(ax_n, r, colors[i], taus)
        loss_drawn, loss_positive = _draw_loss_curve(ax_l, r, colors[i])
        drawn_loss |= loss_drawn
        pos_loss &= loss_positive
    _label_thresholds(ax_n, taus)
    _style_panels(fig, ax_n, ax_l, drawn_loss, drawn_loss and pos_loss)
    if with_metrics:
        _draw_metrics(ax_m, rows, colors)
    return fig


def _draw_norm_curve(ax, r: CompareRow, c, taus: list[tuple[float, object, str]]) -> None:
    """A run's positive norms, its non-finite steps (x) and its judged max_norm (dashed; noted in taus)."""
    from gradscope.report.plot import downsample_minmax

    step, g = r.curves.step, r.curves.grad_norm
    pos = np.isfinite(g) & (g > 0)
    x, y = downsample_minmax(step[pos], g[pos])
    ax.plot(x, y, color=c, lw=0.8, alpha=0.85, label=r.run)
    top = np.nanmax(g[pos]) if pos.any() else 1.0
    bad = ~np.isfinite(g) & ~r.curves.skipped
    if bad.any():
        ax.scatter(step[bad], np.full(int(bad.sum()), top), marker="x", color=c, s=18, zorder=3)
    if r.clip_norm is not None:
        ax.axhline(r.clip_norm, color=c, ls="--", lw=0.9, alpha=0.9)
        taus.append((float(r.clip_norm), c, r.run))


def _draw_loss_curve(ax, r: CompareRow, c) -> tuple[bool, bool]:
    """A run's finite losses: (drawn, every drawn loss positive)."""
    from gradscope.report.plot import downsample_minmax

    loss = r.curves.loss
    ok = np.isfinite(loss)
    if not ok.any():
        return False, True
    x, y = downsample_minmax(r.curves.step[ok], loss[ok])
    ax.plot(x, y, color=c, lw=0.8, alpha=0.85, label=r.run)
    return True, bool((loss[ok] > 0).all())


def _label_thresholds(ax, taus: list[tuple[float, object, str]]) -> None:
    """Each dashed line says what it is, at the right edge (one label per distinct value)."""
    from matplotlib.transforms import blended_transform_factory

    edge = blended_transform_factory(ax.transAxes, ax.transData)
    seen: dict[str, list[str]] = {}
    for v, c, run in taus:
        seen.setdefault(f"{v:g}", []).append(run)
    for v, c, run in taus:
        key = f"{v:g}"
        if key not in seen:
            continue
        names = seen.pop(key)
        who = names[0] if len(names) == 1 else f"{len(names)} runs"
        ax.text(0.995, v, f"max_norm {key} ({who})", transform=edge, ha="right", va="bottom", fontsize=8,
                color=c, clip_on=True)


def _style_panels(fig, ax_n, ax_l, drawn_loss: bool, log_loss: bool) -> None:
    """Scales, labels, titles, and the legend beside the panels."""
    ax_n.set_yscale("log")
    ax_n.set_ylabel("grad norm (pre-clip, log)")
    ax_n.set_title("gradient norm (dashed: each run's judged max_norm; x: non-finite steps the loss scaler did not skip)",
                   fontsize=10)
    ax_n.grid(True, which="both", alpha=0.25)
    ax_l.set_ylabel("loss (log)" if log_loss else "loss")
    if log_loss:
        ax_l.set_yscale("log")  # one diverged run must not flatten the others into a line
    ax_l.set_xlabel("optimizer step")
    ax_l.grid(True, which="both", alpha=0.25)
    # The legend beside the panels: it lists every run and covers none of them.
    handles, labels = ax_n.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="runs", title_fontsize=8)
    if not drawn_loss:
        ax_l.text(0.5, 0.5, "no loss logged", transform=ax_l.transAxes, ha="center", va="center")


def _draw_metrics(ax, rows: list[CompareRow], colors: list) -> None:
    """What the scripts reported: colour by run, line style by metric name (the first four names)."""
    styles = ("-", "--", ":", "-.")
    names = list(dict.fromkeys(k for r in rows for k in r.metric_series))[:len(styles)]
    for i, r in enumerate(rows):
        for j, name in enumerate(names):
            if name in r.metric_series:
                x, y = r.metric_series[name]
                ax.plot(x, y, color=colors[i], ls=styles[j], lw=0.9, marker="o", ms=2.5,
                        label=f"{r.run}: {name}")
    ax.set_ylabel("reported metric")
    ax.set_title("metrics the scripts reported, at the step each was reported after (colour: run, line: name)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, alpha=0.25)
    ax.set_xlabel("step")


def save(fig, out: str | os.PathLike) -> Path:
    from gradscope.report.plot import save as save_plot

    return save_plot(fig, out)
