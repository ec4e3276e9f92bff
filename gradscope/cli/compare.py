"""`gradscope compare RUN_A RUN_B [...]`: runs or trainers' logs side by side (table, figure, JSON)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from gradscope.cli.app import app

COMPARE_HELP = """Put runs or trainers' logs side by side: one table and one figure.

\b
  gradscope compare runs/pilot runs/clip0.5
  gradscope compare runs/before runs/after out/trainer_state.json -o cmp.svg
  gradscope compare tune_out/ --json          (every run found under a directory)

Per run (per optimizer when there are several): steps, steady-state grad-norm
p50/p90/p99/max, the judged max_norm and its clip fraction, mean update
multiplier, final-stretch loss (mean of the last 10% of logged losses),
non-finite and skipped steps, situation. The figure overlays the norm (log
scale) and loss curves, aligned by step (default: gradscope-compare.png).
"""


@app.command("compare", help=COMPARE_HELP)
def compare_command(
    runs: List[Path] = typer.Argument(
        ..., metavar="RUN", help="Gradscope run directories or trainer logs, or directories holding them."
    ),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Figure file (.png, .svg, .pdf)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Only the table (or JSON), no figure."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    clip_norm: Optional[float] = typer.Option(
        None, "--clip-norm", min=0.0, help="Judge this threshold on every run instead of each run's own."
    ),
    format: Optional[str] = typer.Option(None, "--format", help="Force the input format."),
    column: Optional[str] = typer.Option(None, "--column", help="The grad-norm column of a CSV/JSONL log."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Compare this rank of each run (default: rank 0)."),
) -> int:
    from gradscope.analysis.compare import compare_rows
    from gradscope.cli.check import open_any
    from gradscope.errors import GradscopeError
    from gradscope.importers.discover import find_inputs
    from gradscope.report import compare as report
    from gradscope.report.plot import FORMATS

    target = out if out is not None else Path(report.DEFAULT_OUTPUT)
    if not no_plot and target.suffix.lower() not in FORMATS:
        raise GradscopeError(f"cannot write '{target}': choose a .png, .svg or .pdf file name")
    from gradscope.analysis.gate import incomplete_text

    inputs = find_inputs(runs)
    rows = []
    for p in inputs:
        loaded = open_any(p, format, column)  # unreadable input: exit 2, as in every command
        missing = incomplete_text(loaded)
        if missing:  # first, before the table: what a compared recording is missing
            print(f"gradscope: {p}: {missing}", file=sys.stderr if as_json else sys.stdout, flush=True)
        try:
            from gradscope.analysis import analyze

            analysis, why = analyze(loaded, clip_norm=clip_norm, rank=rank), None
        except GradscopeError as e:
            analysis, why = None, e.message
        rows.extend(compare_rows(str(p), loaded, analysis, why))
    if as_json:
        import json

        sys.stdout.write(json.dumps(report.to_json(rows), indent=2, allow_nan=False) + "\n")
    else:
        report.render(rows)
    if not no_plot:
        written = report.save(report.build_figure(rows), target)
        print(f"gradscope: wrote {written}", file=sys.stderr if as_json else sys.stdout)
    return 0
