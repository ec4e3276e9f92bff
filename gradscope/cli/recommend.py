"""`gradscope recommend`: judge a run's clip norm and recommend one (thin: parse -> analyze -> present)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from gradscope.cli.app import app

RECOMMEND_HELP = """Judge the gradient clipping of a recorded run or a trainer's log, and recommend a clip norm.

\b
  gradscope recommend gradscope_runs/exp1
  gradscope recommend out/checkpoint-500/trainer_state.json --preset transformer
  gradscope recommend metrics.csv --column grad_norm --clip-norm 1.0 --json

Regimes: never-clips, always-clips, healthy, unclipped.
"""


@app.command("recommend", help=RECOMMEND_HELP)
def recommend_command(
    run: Path = typer.Argument(..., metavar="RUN", help="A gradscope run directory, or a training log (see --format)."),
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
    loaded = open_run(str(run), format=format, column=column)
    result = analyze(loaded, cfg, clip_norm=clip_norm, preset=pre, optimizer=optimizer, rank=rank)
    if as_json:
        from gradscope.report.recommend import dumps

        sys.stdout.write(dumps(result, cfg) + "\n")
    else:
        from gradscope.report.recommend import render

        render(result, config=cfg)
    return 0
