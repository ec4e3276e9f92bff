"""`gradscope recommend`: judge a run's clip norm and recommend one (thin: parse -> analyze -> present)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from gradscope.cli.app import app

RECOMMEND_HELP = """Judge the gradient clipping of a recorded run or a trainer's log, and recommend a clip norm.

\b
  gradscope recommend gradscope_runs/exp1
  gradscope recommend out/checkpoint-500/trainer_state.json --preset transformer
  gradscope recommend metrics.csv --column grad_norm --clip-norm 1.0 --json
  gradscope recommend runs/               every run and trainer log found under runs/

With several runs (several paths, or directories holding runs or logs, found
recursively) each gets its report, then a summary table lists them; --json prints
{"runs": [...]}. A run that cannot be judged is listed with why, and the exit status is 2.

Regimes: never-clips, always-clips, healthy, unclipped.
"""


@app.command("recommend", help=RECOMMEND_HELP)
def recommend_command(
    runs: List[Path] = typer.Argument(
        ..., metavar="RUN", help="Gradscope run directories or training logs (see --format), or directories holding them."
    ),
    clip_norm: Optional[float] = typer.Option(None, "--clip-norm", help="Judge this threshold instead of the run's own."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Compare with a model family's usual range: transformer, cnn, rnn, recommender, alignment."
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML overriding configs/analysis.yaml."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
    format: Optional[str] = typer.Option(None, "--format", help="Force the log format (hf, swift, csv, jsonl, ...)."),
    column: Optional[str] = typer.Option(None, "--column", help="Name of the grad-norm column in a foreign log."),
    optimizer: Optional[int] = typer.Option(None, "--optimizer", help="Only this optimizer (id)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Analyse this rank (default: rank 0)."),
) -> int:
    from gradscope.analysis import analyze, get_preset, load_config
    from gradscope.importers import open_run

    cfg = load_config(config)
    pre = get_preset(preset) if preset is not None else None  # a bad name fails before reading the run
    from gradscope.importers.discover import find_inputs

    inputs = find_inputs(runs)

    def one(path: Path):
        loaded = open_run(str(path), format=format, column=column)
        return analyze(loaded, cfg, clip_norm=clip_norm, preset=pre, optimizer=optimizer, rank=rank)

    if len(inputs) == 1:  # one run: the output is exactly that run's
        result = one(inputs[0])
        if as_json:
            from gradscope.report.recommend import dumps

            sys.stdout.write(dumps(result, cfg) + "\n")
        else:
            from gradscope.report.recommend import render

            _say_incomplete(result)
            render(result, config=cfg)
        return 0
    return _recommend_many(inputs, one, cfg, as_json)


def _recommend_many(inputs: list[Path], one, cfg, as_json: bool) -> int:
    """Each input's report (or why it could not be judged), then one table of them all."""
    import json

    from gradscope.errors import GradscopeError
    from gradscope.report import recommend as report

    results: list[tuple[str, object, str | None]] = []
    for p in inputs:
        try:
            results.append((str(p), one(p), None))
        except GradscopeError as e:
            results.append((str(p), None, e.message))
    worst = 2 if any(err for _, _, err in results) else 0
    if as_json:
        docs = [report.to_json(r, cfg) if r is not None else {"run": t, "error": err, "exit_code": 2}
                for t, r, err in results]
        sys.stdout.write(json.dumps({"runs": docs, "exit_code": worst}, indent=2, allow_nan=False) + "\n")
        return worst
    from rich.console import Console

    console = Console()
    for t, r, err in results:
        if r is not None:
            _say_incomplete(r, console)
            report.render(r, console=console, config=cfg)
        else:
            console.print(f"[bold]gradscope recommend[/bold] {t}: [red]error[/red]: {err}", highlight=False)
        console.print()
    report.render_summary(results, console=console)
    return worst


def _say_incomplete(result, console=None) -> None:
    """The report's first line says what an incomplete recording is missing (analyze's first note)."""
    note = next((n for n in getattr(result, "notes", []) or [] if str(n).startswith("incomplete recording:")), None)
    if note is None:
        return
    if console is None:
        print(f"gradscope: {note}", flush=True)
    else:
        console.print(f"gradscope: {note}", highlight=False, markup=False)
