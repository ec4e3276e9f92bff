"""How `gradscope tune` looks: a rich report, one JSON object, and a figure of the candidates' loss curves.

JSON schema "gradscope.tune/1" (NaN/inf never appear, null does)
----------------------------------------------------------------
    schema                  "gradscope.tune/1"
    recommended_clip_norm   the threshold to use (float), as in `recommend`; null when the
                            winner is the script as it is and the script does not clip (no clipping)
    choice                  "clip" | "as-is" | "none" (no candidate left: every one diverged)
    candidates              one object per candidate, by threshold (the script as is last):
                            {clip_norm (null: as is), label, steps (horizon of the figures),
                             loss, loss_spread, loss_se, start_loss, clip_fraction, mean_multiplier,
                             diverged, diverged_reason, failed, chosen,
                             clip_fraction: of the steady state, as `recommend` and `compare` count it,
                             metric (with --metric: its value after the horizon's last step, null: none),
                             unranked (with --metric: why a probe that did not diverge has no value, else null),
                             probes: [{run_dir, max_steps, steps_run, status, reused}]}
    metric, maximize        --metric NAME the probes were ranked by (null: the training loss), --maximize
    budget_spent            whole runs of T steps spent by the pilot and every probe (reused ones too)
    budget                  B; total_steps: T; total_steps_source: "option" | "pilot"
    steps_spent, steps_reused   optimizer steps behind budget_spent, and how many were reused
    runner_up               threshold of the runner-up (null: the script as is, or no runner-up);
                            runner_up_label: its label (null: no runner-up); margin: its loss
                            minus the chosen one's, in combined standard errors (null: no runner-up)
    ties                    thresholds within the loss's noise of the best at the final horizon
    horizon                 steps the finalists were compared at
    reason                  why the chosen one won, in words (the report's "why" line; null: no choice);
                            when every finalist is within the noise of the others it says "the clip
                            norm does not matter in this range" (rule "all-tied")
    rule                    how the choice was made: "best", "largest-tied", "middle-tied", "all-tied",
                            "fallback", "only" (null: no choice)
    recommend_clip_norm     `recommend`'s threshold on the pilot (carried into the finals; null: none)
    warmup_steps            the learning-rate warm-up seen in the recorded lr (null: none)
    rungs                   [{steps, candidates, kept}]: the planned rungs, then (when every finalist
                            diverged) one per fallback candidate probed
    seeded                  false when a probe differed from the pilot before anything was clipped
    snippets                as in `recommend` (null without a threshold)
    wall_seconds            this tune's wall time, in seconds, connecting to a Ray cluster included (probes
                            reused from an earlier tune cost none)
    parallelism             the most pilot/probe runs that ran at once (0: every one was reused)
    executor                "local" | "ray": where the probes ran
    pilot, figure, notes
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from gradscope.analysis.tune import AS_IS

SCHEMA = "gradscope.tune/1"
JSON_FILE, FIGURE_FILE = "tune.json", "tune.png"  # written in the tune's --out, beside its runs


def _tau(t: float | None):
    return None if t is None or not math.isfinite(t) else float(t)


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def to_json(result) -> dict:
    from gradscope.report.recommend import snippets

    ch = result.choice
    cands = []
    for c in result.candidates:
        s = c.summary
        cands.append({
            "clip_norm": _tau(c.clip_norm), "label": c.label,
            "steps": s.steps if s else 0,
            "loss": _num(s.loss) if s else None, "loss_spread": _num(s.loss_spread) if s else None,
            "loss_se": _num(s.loss_se) if s else None, "start_loss": _num(s.start_loss) if s else None,
            "clip_fraction": _num(s.clip_fraction) if s else None,
            "mean_multiplier": _num(s.mean_multiplier) if s else None,
            "diverged": bool(s.diverged) if s else False,  # a failed probe did not diverge: see "failed"
            "diverged_reason": s.diverged_reason if s else None,
            "failed": c.failed,
            "chosen": ch is not None and ch.clip_norm == c.clip_norm,
            "metric": _num(s.metric) if s and result.metric else None,
            "unranked": s.unranked if s else None,
            "probes": [{"run_dir": str(p.run_dir), "max_steps": p.max_steps, "steps_run": p.steps_run,
                        "status": p.status, "reused": p.reused, "failure": p.failure} for p in c.probes],
        })
    rec = result.recommended_clip_norm
    kind = "none" if ch is None or ch.clip_norm is None else ("as-is" if ch.clip_norm == AS_IS else "clip")
    return {
        "schema": SCHEMA,
        "metric": result.metric,
        "maximize": bool(result.maximize),
        "recommended_clip_norm": _num(rec),
        "choice": kind,
        "candidates": cands,
        "budget_spent": result.budget_spent,
        "budget": result.budget,
        "total_steps": result.total_steps,
        "total_steps_source": result.total_steps_source,
        "steps_spent": result.steps_spent,
        "steps_reused": result.steps_reused,
        "runner_up": _tau(ch.runner_up) if ch else None,
        "runner_up_label": _label(result, ch.runner_up) if ch and ch.runner_up is not None else None,
        "margin": _num(ch.margin) if ch else None,
        "ties": [_tau(t) for t in ch.ties] if ch else [],
        "horizon": ch.horizon if ch else None,
        "reason": ch.reason if ch else None,
        "rule": ch.rule if ch else None,
        "recommend_clip_norm": _num(result.recommend_clip_norm),
        "warmup_steps": result.warmup_steps,
        "rungs": [{"steps": r.steps, "candidates": [_tau(t) for t in r.candidates],
                   "kept": [_tau(t) for t in r.kept]} for r in result.rungs],
        "seeded": not result.unseeded_at,
        "snippets": snippets(rec) if rec is not None else None,
        "wall_seconds": _num(result.wall_seconds),
        "parallelism": result.parallelism,
        "executor": result.executor,
        "pilot": str(result.pilot.run_dir),
        "figure": str(result.figure) if result.figure else None,
        "notes": list(result.notes),
    }


def dumps(result) -> str:
    return json.dumps(to_json(result), indent=2, allow_nan=False)


def _f(x, spec=".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _label(result, t) -> str:
    c = next((c for c in result.candidates if c.clip_norm == t), None)
    return c.label if c else f"{t:g}"


def render(result, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    T = result.total_steps
    console.print(f"gradscope tune  {result.out}  T = {T} steps "
                  f"({'--steps' if result.total_steps_source == 'option' else 'learned from the pilot'})")
    console.print(_table(result))
    if result.metric:
        console.print(f"  ranked by {result.metric} ({'higher' if result.maximize else 'lower'} is better), the "
                      "value reported after each candidate's last probed step; a candidate without one is not ranked")
    console.print("  loss: mean over the last fifth of each candidate's longest probe; ± spread: its standard "
                  "deviation around the trend; * chosen")
    _print_choice(console, result)
    _print_footer(console, result)


def _table(result):
    """One row per candidate: its figures at the longest horizon it reached."""
    from rich.table import Table

    table = Table(show_edge=False)
    metric = result.metric
    for col, just in (("clip norm", "left"), ("steps probed", "right"),
                      *([(f"{metric} (ranked)", "right")] if metric else []), ("loss (last stretch)", "right"),
                      ("± spread", "right"), ("clip fraction", "right"), ("mean update mult.", "right"),
                      ("diverged", "left")):
        table.add_column(col, justify=just)
    ch = result.choice
    for c in result.candidates:
        s = c.summary
        mark = " *" if ch is not None and ch.clip_norm == c.clip_norm else ""
        if s is None:
            table.add_row(c.label + mark, "-", *(["-"] if metric else []), "-", "-", "-", "-", c.failed or "-")
            continue
        div = c.failed or (s.diverged_reason if s.diverged else s.unranked or "no")
        table.add_row(c.label + mark, str(s.steps), *([_f(s.metric)] if metric else []), _f(s.loss),
                      _f(s.loss_spread), _f(s.clip_fraction, ".1%"), _f(s.mean_multiplier, ".3f"), div)
    return table


def _print_choice(console, result) -> None:
    """The recommendation, how sure it is, and why (or that there is none)."""
    ch = result.choice
    if ch is None or ch.clip_norm is None:
        console.print("[red]no recommendation: every candidate diverged or failed[/red]"
                      if result.candidates else "no recommendation")
        return
    rec = result.recommended_clip_norm
    what = (f"max_norm = {rec:g}" if rec is not None else "no clipping (the script as it is)")
    if ch.clip_norm == AS_IS and rec is not None:
        what += " (the script's own threshold)"
    console.print(f"[bold]recommend  {what}[/bold]")
    sure = _how_sure(result, ch)
    if sure is not None:
        console.print(f"  how sure   {sure}")
    console.print(f"  why        {ch.reason}")


def _how_sure(result, ch) -> str | None:
    """The runner-up against the chosen one (None: no runner-up)."""
    T = result.total_steps
    if ch.runner_up is not None and result.metric:  # one value per probe: no noise units to count in
        ru = _label(result, ch.runner_up)
        by = {c.clip_norm: c.summary.metric for c in result.candidates if c.summary is not None}
        return (f"the runner-up {ru} reported {result.metric} = {_f(by.get(ch.runner_up))}, the chosen "
                f"{_f(by.get(ch.clip_norm))} (one value each: no noise estimate); compared at {ch.horizon} of {T} "
                "steps")
    if ch.runner_up is None or ch.margin is None:
        return None
    ru = _label(result, ch.runner_up)
    taken = {"all-tied": "the clip norm does not matter in this range",
             "middle-tied": "the middle threshold of the ties is taken",
             "largest-tied": "the largest tied threshold is taken, as short probes favour small thresholds",
             }.get(ch.rule, "")
    if ch.rule in ("best", "only") and ch.margin >= 0:
        sure = f"clear: the runner-up {ru} is {ch.margin:.1f} noise units worse"
    elif ch.margin >= 0:
        sure = f"not sure: the runner-up {ru} is only {ch.margin:.1f} noise units worse, a tie"
    else:
        sure = f"a tie: {ru} had a {-ch.margin:.1f} noise units lower loss, within the noise"
    if taken and not sure.startswith("clear"):
        sure += f": {taken}"
    return f"{sure}; compared at {ch.horizon} of {T} steps"


def _print_footer(console, result) -> None:
    """Compute, wall time, rungs, notes, the lines to paste, where the figure and the runs are."""
    from gradscope.report.recommend import SNIPPET_LABELS, snippets

    T = result.total_steps
    console.print(f"  compute    {result.budget_spent:.2f} whole runs of {T} steps (budget {result.budget:g}; "
                  f"{result.steps_spent} optimizer steps, {result.steps_reused} of them reused)")
    console.print(f"  wall time  {_duration(result.wall_seconds)}, "
                  + (f"up to {result.parallelism} run{'s' if result.parallelism > 1 else ''} at once"
                     if result.parallelism else "nothing run (every run reused)")
                  + f" ({result.executor} executor)")
    console.print("  rungs      " + "; ".join(
        f"{len(r.candidates)} at {r.steps} steps -> " + (", ".join(_label(result, t) for t in r.kept) or "none")
        for r in result.rungs))
    for n in result.notes:
        console.print(f"  [yellow]note: {n}[/yellow]")
    if result.recommended_clip_norm is not None:
        console.print("  paste")
        for k, code in snippets(result.recommended_clip_norm).items():
            console.print(f"    {SNIPPET_LABELS[k]:<13} {code}")
    if result.figure:
        console.print(f"  figure     {result.figure}")
    console.print(f"  runs       {result.out}/pilot and {result.out}/probe-*: `gradscope recommend`, `plot` and "
                  "`check` read each")


def _duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # qualitative: neighbouring thresholds differ
STYLES = ["-", "--", "-.", (0, (1, 1))]


def build_figure(result):
    """Each candidate's training-loss curve (its longest probe), as a matplotlib Figure.

    Readable by construction (issue 22's picture notes): a log step axis from 1 to T, so the
    first rung (T/12) is not a knot in the corner; the y range from the curves' own values
    (never below 0 for a non-negative loss) up to 1.5x the highest starting loss, curves that
    leave it cut at the frame's top with a marker; a qualitative palette with line styles, so
    neighbouring thresholds differ; curves identical to one already drawn (candidates that never
    clipped) drawn once with all their labels; the rungs' horizons marked and labelled."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7.6 if result.metric else 4.8), dpi=110, layout="constrained")
    if result.metric:  # the metric the probes were ranked by, under the loss curves
        ax, max_ = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax = fig.add_subplot(1, 1, 1)
    T = result.total_steps
    top = _top(result)
    curves = _curves(result)
    _draw_curves(ax, curves, top)
    _mark_horizons(ax, result)
    ax.set_xscale("log")
    ax.set_xlim(1, max(T, 2))
    ax.set_xlabel("optimizer step (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"gradscope tune: loss of each candidate clip norm (T = {T})")
    _set_y_range(ax, curves, top)
    ax.legend(fontsize=7, ncol=2)
    if result.metric:
        n_c = max(1, len(result.candidates))
        _metric_panel(max_, result, lambda f: PALETTE[int(round(f * n_c)) % len(PALETTE)], n_c)
    return fig


def _top(result) -> float | None:
    """The frame's top: 1.5x the highest starting loss (None: no candidate has one)."""
    starts = [c.summary.start_loss for c in result.candidates
              if c.summary is not None and math.isfinite(c.summary.start_loss)]
    if not starts:
        return None
    hi = max(starts)
    return hi * 1.5 if hi > 0 else hi + abs(hi) * 0.5 + 1e-9


def _curves(result) -> list:
    """(x, y, labels, chosen, diverged) per distinct curve: each candidate's longest probe, its loss
    smoothed by a centred running mean; a curve equal to one before it adds its label to that one."""
    import numpy as np

    from gradscope.analysis.tune import _first_optimizer

    ch = result.choice
    curves: list[tuple[np.ndarray, np.ndarray, list[str], bool, bool]] = []
    for c in result.candidates:
        if not c.probes:
            continue
        pr = max(c.probes, key=lambda p: p.steps_run)
        s = _first_optimizer(pr.steps) if pr.steps is not None else None
        if s is None or not len(s):
            continue
        y = s["loss"].to_numpy(dtype=float)
        x = s["step"].to_numpy() + 1  # optimizer steps made (1..T), for the log axis
        k = max(1, len(y) // 50)
        if k > 1:  # a centred running mean (no padding at the ends), so the curves can be told apart
            import pandas as pd

            y = pd.Series(np.where(np.isfinite(y), y, np.nan)).rolling(k, min_periods=1, center=True).mean().to_numpy()
        chosen = ch is not None and ch.clip_norm == c.clip_norm
        diverged = c.summary is not None and c.summary.diverged
        label = c.label + (" (chosen)" if chosen else "") + (" (diverged)" if diverged else "")
        same = next((cv for cv in curves if len(cv[0]) == len(x) and np.array_equal(cv[1], y, equal_nan=True)), None)
        if same is not None:  # the very same curve (never clipped): drawn once, with both labels
            same[2].append(label)
            continue
        curves.append((x, y, [label], chosen, diverged))
    return curves


def _draw_curves(ax, curves: list, top: float | None) -> None:
    """The chosen curve bold black; the others in turn through the palette, then its line styles
    (dotted: diverged); a curve that leaves the frame is cut there and marked at the top."""
    import numpy as np

    drawn = 0
    for x, y, labels, chosen, diverged in curves:
        out = np.zeros(len(y), bool) if top is None else ~(y <= top)  # NaN/inf/too high: outside the frame
        cut = int(np.argmax(out)) if out.any() else len(y)
        color = "black" if chosen else PALETTE[drawn % len(PALETTE)]
        ls = "-" if chosen else STYLES[(drawn // len(PALETTE)) % len(STYLES)] if not diverged else ":"
        if not chosen:
            drawn += 1
        label = labels[0] if len(labels) == 1 else " = ".join(labels) + " (same curve)"
        ax.plot(x[:cut], y[:cut], lw=2.4 if chosen else 1.3, color=color, ls=ls, label=label)
        if cut < len(y) and top is not None:
            ax.plot([x[cut]], [top], marker="^", color=color, ls="none", clip_on=False)


def _mark_horizons(ax, result) -> None:
    """The first rung's horizon and the finalists' (or the one compared at), labelled."""
    ch = result.choice
    marks = []
    if result.rungs:
        marks.append((result.rungs[0].steps, "first rung"))
    if ch is not None and ch.horizon and (not marks or ch.horizon != marks[0][0]):
        marks.append((ch.horizon, "finalists" if len(result.rungs) > 1 else "compared"))
    for n, what in marks:
        ax.axvline(n, color="grey", lw=0.8, ls="--")
        ax.annotate(f"{what}: {n} steps", xy=(n, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    ha="right", va="top", fontsize=7, color="dimgrey")


def _set_y_range(ax, curves: list, top: float | None) -> None:
    """From the lowest value drawn (never below 0 for a loss that never is) to the frame's top."""
    import numpy as np

    vals = np.concatenate([cv[1][np.isfinite(cv[1])] for cv in curves]) if curves else np.array([])
    if top is not None and len(vals):
        vals = vals[vals <= top]
    if not len(vals):
        return
    lo = float(vals.min())
    hi = top if top is not None else float(vals.max())
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-9
    bottom = lo - pad
    if lo >= 0:
        bottom = max(0.0, bottom)  # a loss that is never negative: no axis below 0
    ax.set_ylim(bottom, hi)


def save_figure(result, path: Path) -> Path:
    """The figure of :func:`build_figure`, written to ``path`` (PNG)."""
    fig = build_figure(result)
    fig.savefig(path, dpi=110)
    return path


def save(result, figure: bool = True) -> None:
    """A tune's files beside its runs: ``tune.png`` (unless ``figure`` is False; its path goes into
    ``result.figure``), then ``tune.json`` (:func:`to_json`)."""
    from gradscope import rundir

    if figure:
        result.figure = save_figure(result, result.out / FIGURE_FILE)
    rundir.write_json_atomic(result.out / JSON_FILE, to_json(result))


def _metric_panel(ax, result, cmap, n) -> None:
    """--metric: each candidate's reported values (its longest probe), chosen one bold."""
    from gradscope.analysis.tune import metric_values

    ch = result.choice
    for i, c in enumerate(result.candidates):
        if not c.probes:
            continue
        pr = max(c.probes, key=lambda p: p.steps_run)
        m = metric_values(getattr(pr, "metrics", None), result.metric)
        if m is None or not len(m):
            continue
        chosen = ch is not None and ch.clip_norm == c.clip_norm
        ax.plot(m["step"].to_numpy() + 1, m["value"].to_numpy(dtype=float), marker="o", ms=3,
                lw=2.4 if chosen else 1.0, color="black" if chosen else cmap(i / n), label=c.label)
    if ch is not None and ch.horizon:
        ax.axvline(ch.horizon, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer steps done")
    ax.set_ylabel(f"{result.metric} ({'higher' if result.maximize else 'lower'} is better)")
