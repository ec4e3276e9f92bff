"""`gradscope run`: record an unmodified training script, module or launcher command."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from gradscope.cli.app import app
from gradscope.errors import GradscopeError

RUN_HELP = """Record every optimizer step of a training run.

\b
  gradscope run train.py --lr 3e-4            a script; its arguments pass through verbatim
  gradscope run -m mypkg.train --config c.yaml
  gradscope run --out runs/exp1 train.py
  gradscope run --out runs/ddp -- torchrun --nproc-per-node 2 train.py

Exits with the script's own status. gradscope's options go before the script.
"""


@app.command(
    "run",
    help=RUN_HELP,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
)
def run_command(
    ctx: typer.Context,
    module: Optional[str] = typer.Option(None, "-m", "--module", help="Run a module, like python -m."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run directory (default: gradscope_runs/<time>-<name>)."
    ),
    force: bool = typer.Option(False, "--force", help="Reuse a non-empty run directory: removes only the files of the run recorded there, by its own records."),
    layer_stride: int = typer.Option(1, "--layer-stride", min=0, help="Per-layer norms every N steps (0: off)."),
    flush_steps: int = typer.Option(100, "--flush-steps", min=1, help="Copy values to disk every N steps..."),
    flush_seconds: float = typer.Option(2.0, "--flush-seconds", min=0.0, help="...or every T seconds, whichever first."),
    stop_on_nan: bool = typer.Option(
        False, "--stop-on-nan", help="Stop the training at the first non-finite loss or unabsorbed gradient norm (exit 1)."
    ),
    clip_norm: Optional[float] = typer.Option(
        None, "--clip-norm", help="Clip every step at this global L2 norm, right before optimizer.step() "
        "(after accumulation and AMP unscaling); replaces the max_norm of the script's own clip_grad_norm_ calls.",
    ),
    trace_nan: bool = typer.Option(
        False, "--trace-nan", help="Record where the first NaN/inf appeared: input, the module's forward or "
        "backward, or the loss (no per-step host read; see README)."
    ),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", min=1, help="End the training cleanly after N optimizer steps of the first optimizer "
        "(status 'stopped', exit 0).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No lines of gradscope's own: neither 'recording' at the start nor the summary at the end."),
) -> int:
    from gradscope import launch, rundir
    from gradscope.capture.boot import checked_clip_norm

    args = list(ctx.args)
    if module is not None:
        target = launch.Target("module", module, args)
    elif not args:
        raise GradscopeError("nothing to run: give a script (gradscope run train.py), -m MODULE, or -- COMMAND")
    else:
        target = _classify(args)
    checked_clip_norm(clip_norm)  # here, before the script starts, as well as in the recorder
    launch.check_target(target)
    run_dir = out if out is not None else launch.default_run_dir(target)
    run_dir = rundir.prepare_run_dir(run_dir, force=force)

    returncode = launch.run_recorded(
        target, run_dir, layer_stride=layer_stride, flush_steps=flush_steps, flush_seconds=flush_seconds,
        stop_on_nan=stop_on_nan, clip_norm=clip_norm, trace_nan=trace_nan, max_steps=max_steps, announce=not quiet,
    )
    if not quiet:
        from gradscope.report.summary import print_summary

        try:
            print_summary(run_dir)
        except Exception as e:  # the script's status matters more than our summary
            print(f"gradscope: run saved in {run_dir} (summary unavailable: {e})", file=sys.stderr)
    return returncode


def _classify(args: list[str]):
    """A .py file (or any non-executable file) is a script; anything else is a command."""
    from gradscope.launch import Target

    first, rest = args[0], args[1:]
    if first.startswith("-") and first != "-":
        # Options after the script belong to the script; one before it is gradscope's, and unknown.
        raise GradscopeError(
            f"no such option for gradscope run: '{first}' (see gradscope run --help; gradscope's options go "
            "before the script, and a launcher command goes after --)"
        )
    path = Path(first)
    if first.endswith(".py") or (path.is_file() and not os.access(path, os.X_OK)):
        return Target("script", first, rest)
    if path.is_dir():
        return Target("script", first, rest)  # a directory with __main__.py, like python DIR
    return Target("command", first, rest)
