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
    """The table as plain aligned lines: nothing is cut, in a terminal or a CI log alike."""
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
            _f(r.mean_multiplier, ".3f"), loss, str(r.non_finite), str(r.skipped),
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
          f"steady-state steps above max_norm; update×: mean update multiplier; final loss: mean ± sd of the "
          f"last {FINAL_FRACTION:.0%} of logged losses; skipped: loss-scaler overflows"
          + ("; last metrics: each reported name's last value @ the step it was reported after"
             if any(r.metrics for r in rows) else ""), file=out)
    from gradscope.analysis.ranks import RANK_LOCAL_NOTE

    for r in rows:
        if r.error:
            print(f"note: {r.run}: not judged: {r.error}", file=out)
        elif r.norm_scope == "rank-local":
            print(f"note: {r.run}: {RANK_LOCAL_NOTE}", file=out)


def build_figure(rows: list[CompareRow]):
    """Two panels sharing the step axis: grad norm (log scale) and loss, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradscope.report.plot import downsample_minmax

    with_metrics = any(r.metric_series for r in rows)
    if with_metrics:  # a third panel: what the scripts reported (metrics-r*.csv)
        fig, (ax_n, ax_l, ax_m) = plt.subplots(3, 1, figsize=(12, 9.5), sharex=True, constrained_layout=True)
    else:
        fig, (ax_n, ax_l) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, constrained_layout=True)
    drawn_loss = False
    for i, r in enumerate(rows):
        if r.curves is None or len(r.curves.step) == 0:
            continue
        c = COLORS[i % len(COLORS)]
        step = r.curves.step
        g = r.curves.grad_norm
        pos = np.isfinite(g) & (g > 0)
        x, y = downsample_minmax(step[pos], g[pos])
        ax_n.plot(x, y, color=c, lw=0.8, alpha=0.85, label=r.run)
        top = np.nanmax(g[pos]) if pos.any() else 1.0
        bad = ~np.isfinite(g) & ~r.curves.skipped
        if bad.any():
            ax_n.scatter(step[bad], np.full(int(bad.sum()), top), marker="x", color=c, s=18, zorder=3)
        if r.clip_norm is not None:
            ax_n.axhline(r.clip_norm, color=c, ls="--", lw=0.9, alpha=0.9)
        loss = r.curves.loss
        ok = np.isfinite(loss)
        if ok.any():
            x, y = downsample_minmax(step[ok], loss[ok])
            ax_l.plot(x, y, color=c, lw=0.8, alpha=0.85, label=r.run)
            drawn_loss = True
    ax_n.set_yscale("log")
    ax_n.set_ylabel("grad norm (pre-clip, log)")
    ax_n.set_title("gradient norm (dashed: each run's judged max_norm; x: non-finite steps the loss scaler did not skip)",
                   fontsize=10)
    ax_n.legend(fontsize=8, loc="best")
    ax_n.grid(True, which="both", alpha=0.25)
    ax_l.set_ylabel("loss")
    ax_l.set_xlabel("step")
    ax_l.grid(True, alpha=0.25)
    if drawn_loss:
        ax_l.legend(fontsize=8, loc="best")
    else:
        ax_l.text(0.5, 0.5, "no loss logged", transform=ax_l.transAxes, ha="center", va="center")
    if with_metrics:
        styles = ("-", "--", ":", "-.")
        names = list(dict.fromkeys(k for r in rows for k in r.metric_series))[:len(styles)]
        for i, r in enumerate(rows):
            for j, name in enumerate(names):
                if name in r.metric_series:
                    x, y = r.metric_series[name]
                    ax_m.plot(x, y, color=COLORS[i % len(COLORS)], ls=styles[j], lw=0.9, marker="o", ms=2.5,
                              label=f"{r.run}: {name}")
        ax_m.set_ylabel("reported metric")
        ax_m.set_title("metrics the scripts reported, at the step each was reported after (colour: run, line: name)",
                       fontsize=10)
        ax_m.legend(fontsize=8, loc="best")
        ax_m.grid(True, alpha=0.25)
        ax_m.set_xlabel("step")
    return fig


def save(fig, out: str | os.PathLike) -> Path:
    from gradscope.report.plot import save as save_plot

    return save_plot(fig, out)
