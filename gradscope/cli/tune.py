"""`gradscope tune`: find the clip norm by probing candidates (thin: parse -> gradscope.tune -> present)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from gradscope.cli.app import app
from gradscope.errors import GradscopeError

TUNE_HELP = """Find the clip norm by measuring: a pilot, then short probes (gradscope run --clip-norm TAU --max-steps N).

\b
  gradscope tune train.py --lr 3e-4             T learned from a pilot that runs to its end
  gradscope tune --steps 2000 --jobs 2 train.py  T given: the pilot is short
  gradscope tune --candidates 0.1,0.5,2 --out runs/tune -m mypkg.train
  gradscope tune --metric eval_loss train.py     ranked by the Trainer's eval_loss, not the training loss
  gradscope tune --metric acc --maximize --metric-regex 'val acc ([0-9.]+)' train.py
  gradscope tune --out runs/tune -- torchrun --nproc-per-node 2 train.py
  gradscope tune --gpus-per-probe 2 --out runs/tune -- torchrun --nproc-per-node 2 train.py   8 GPUs: 4 at once
  gradscope tune --executor ray --gpus-per-probe 1 --out /shared/runs/tune train.py          on a Ray cluster

Every pilot and probe is a run directory under --out; run again with the same --out to resume.
The script must be seeded for its probes to be comparable. Exit 1 when every candidate diverged.
"""


@app.command(
    "tune",
    help=TUNE_HELP,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
)
def tune_command(
    ctx: typer.Context,
    module: bool = typer.Option(False, "-m", help="The first argument is a module, run like python -m MODULE "
                                "(everything after it, --steps included, goes to the module)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="T: the real training's length in optimizer steps."),
    budget: float = typer.Option(3.0, "--budget", help="B: total compute, in whole runs of T steps (pilot included)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Probes run at once (default: 1; "
                                       "with --gpus-per-probe N, local: visible GPUs // N; ray: as many as fit)."),
    executor: str = typer.Option("local", "--executor", help="Where the probes run: local (processes here) or ray "
                                 "(tasks on a Ray cluster; pip install 'gradscope[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="The Ray cluster (default: RAY_ADDRESS, "
                                              "else a local Ray instance started for the run)."),
    gpus_per_probe: int = typer.Option(0, "--gpus-per-probe", min=0, help="GPUs each probe gets (local: its own "
                                       "CUDA_VISIBLE_DEVICES among the visible ones; ray: num_gpus)."),
    cpus_per_probe: Optional[int] = typer.Option(None, "--cpus-per-probe", min=0, help="CPUs each probe reserves "
                                                 "(ray: num_cpus, default 1; local: --jobs defaults to cores // N)."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="Thresholds to probe, a,b,... "
                                             "(default: around the pilot's norms)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory of the pilot and probes "
                                       "(default: gradscope_runs/<time>-<name>-tune)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Rank the probes by this metric at their horizon "
                                         "(lower is better) instead of the training loss: a gradscope.log_metric "
                                         "name, a Trainer eval_* key, a Lightning self.log name, or --metric-regex."),
    maximize: bool = typer.Option(False, "--maximize", help="With --metric: higher is better (accuracy)."),
    metric_regex: Optional[str] = typer.Option(None, "--metric-regex", help="A Python regular expression searched "
                                               "in every line the script writes; its first group is --metric's value."),
) -> int:
    from gradscope import launch
    from gradscope.cli.run import check_metric_options
    from gradscope.executors import make_executor
    from gradscope.report.tune import dumps, render, save
    from gradscope.tune import tune

    target = _target(module, list(ctx.args))
    taus = _parse_candidates(candidates) if candidates is not None else None
    check_metric_options(metric, metric_regex, "--metric")
    if maximize and metric is None:
        raise GradscopeError("--maximize needs --metric NAME (without it the training loss is ranked, lower is better)")
    if not (budget > 0) or budget == float("inf"):
        raise GradscopeError(f"--budget must be a positive number of whole runs, got {budget:g}")
    launch.check_target(target)
    out = _out_dir(out, target)
    runner = make_executor(executor, out=out, jobs=jobs, gpus_per_probe=gpus_per_probe, cpus_per_probe=cpus_per_probe,
                           ray_address=ray_address, on_event=_event)
    try:
        _event(f"probes run on {runner.describe}")
        result = tune(target, out, steps=steps, budget=budget, jobs=getattr(runner, "jobs", None) or 1,
                      candidates=taus, on_event=_event, executor=runner, metric=metric, maximize=maximize,
                      metric_regex=metric_regex)
    finally:
        runner.close()
    save(result)  # tune.png and tune.json beside the runs
    if as_json:
        sys.stdout.write(dumps(result) + "\n")
    else:
        render(result)
    return 0 if result.choice is not None and result.choice.clip_norm is not None else 1


def _target(module: bool, args: list[str]):
    """What to tune: -m MODULE, a script, or -- COMMAND (as `gradscope run` classifies it)."""
    from gradscope import launch
    from gradscope.cli.run import _classify

    if module and args:
        # -m is a flag here, so that option parsing stops at the module's name, as python -m does:
        # `gradscope tune -m pkg.train --steps 50` hands --steps 50 to the module, not to tune.
        return launch.Target("module", args[0], args[1:])
    if module:
        raise GradscopeError("-m needs a module name (gradscope tune -m pkg.train ARGS)")
    if not args:
        raise GradscopeError("nothing to tune: give a script (gradscope tune train.py), -m MODULE, or -- COMMAND")
    return _classify(args)


def _out_dir(out: Path | None, target) -> Path:
    """--out, or gradscope_runs/<time>-<name>-tune; never a file."""
    if out is None:
        out = Path("gradscope_runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{target.label}-tune"
    if out.exists() and not out.is_dir():
        raise GradscopeError(f"--out '{out}' is a file; choose a directory")
    return out


def _event(msg: str) -> None:
    # One write per line: with --jobs the probes' threads report at once, and print() writes
    # the text and its newline separately.
    sys.stderr.write(f"gradscope tune: {msg}\n")
    sys.stderr.flush()


def _parse_candidates(text: str) -> list[float]:
    import math

    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise GradscopeError(f"--candidates: '{part}' is not a number (give thresholds like 0.1,0.5,2)") from None
        if not 0 < value < math.inf:
            raise GradscopeError(f"--candidates: {part} is not a positive, finite threshold")
        out.append(value)
    if not out:
        raise GradscopeError("--candidates is empty (give thresholds like 0.1,0.5,2)")
    return out
