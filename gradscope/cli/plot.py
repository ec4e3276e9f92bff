"""`gradscope plot RUN`: draw a run's gradient norms, thresholds, loss and layers to a file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gradscope.cli.app import app

PLOT_HELP = """Draw a run: gradient norm with the judged and recommended clip norms, loss,
norm histogram, clip fraction as a function of the threshold, per-layer heatmap.

\b
  gradscope plot runs/exp1                  -> runs/exp1/gradscope.png
  gradscope plot runs/exp1 -o exp1.svg      (.png, .svg or .pdf)
  gradscope plot out/trainer_state.json     -> out/trainer_state.json.gradscope.png
"""


@app.command("plot", help=PLOT_HELP)
def plot_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A gradscope run directory or another trainer's log."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output file (.png, .svg, .pdf)."),
    clip_norm: Optional[float] = typer.Option(
        None, "--clip-norm", min=0.0, help="Judge this threshold instead of the recorded one."
    ),
    format: Optional[str] = typer.Option(None, "--format", help="Force the input format."),
    column: Optional[str] = typer.Option(None, "--column", help="The grad-norm column of a CSV/JSONL log."),
) -> int:
    from gradscope.cli.check import open_any
    from gradscope.report import plot

    target = out if out is not None else plot.default_output(run)
    if target.suffix.lower() not in plot.FORMATS:
        from gradscope.errors import GradscopeError

        raise GradscopeError(f"cannot write '{target}': choose a .png, .svg or .pdf file name")
    loaded = open_any(run, format, column)
    if loaded.steps is None or len(loaded.steps) == 0:
        from gradscope.errors import GradscopeError
        from gradscope.validate import why_no_steps

        raise GradscopeError(f"nothing to plot: {why_no_steps(loaded)}", exit_code=2)
    from gradscope.analysis.gate import incomplete_text

    missing = incomplete_text(loaded)
    if missing:  # the first line: what the plotted recording is missing
        print(f"gradscope: {missing}", flush=True)
    analysis, why = analyze_quietly(loaded, clip_norm)
    data = plot.plot_data(loaded, analysis, clip_norm=clip_norm, name=str(run))
    if why:
        data.notes.append(f"no recommendation: {why}")
    fig = plot.build_figure(data)
    written = plot.save(fig, target)
    print(f"gradscope: wrote {written}")
    return 0


def analyze_quietly(run, clip_norm: float | None):
    """The analyzer's result, or None and why (a plot is still worth drawing)."""
    from gradscope.errors import GradscopeError

    try:
        from gradscope.analysis import analyze
    except ImportError:
        return None, "the analyzer is not available"
    try:
        return analyze(run, clip_norm=clip_norm), None
    except GradscopeError as e:
        return None, e.message
