"""`gradscope check RUN`: exit 1 when a run went NaN/inf (or breaks a policy rule), for CI."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from gradscope.cli.app import app

CHECK_HELP = """Fail (exit 1) when a run's loss or gradient norm went NaN/inf.

\b
  gradscope check runs/exp1
  gradscope check runs/exp1 --fail-on always-clips,never-clips --max-clip-fraction 0.3
  gradscope check runs/exp1 --fail-on clip-bugs
  gradscope check out/checkpoint-500/trainer_state.json --junit gradscope.xml
  gradscope check runs/exp1 --fail-on divergence        (the loss doubled from its best, for 20 logged steps)
  gradscope check runs/ sweeps/lr3e-4 out/trainer_state.json     (many at once)

RUN may be several paths; a directory that is not itself a run is searched for
gradscope runs and trainer logs (found recursively). With several, each is checked,
a summary table lists them, and the exit status is the worst of them.

Each run's lines end with one-line sparklines of its grad norm and loss, the first
bad step marked. A GradScaler overflow step that was skipped is not a failure. Clipping bugs
the clip audit found are printed as warnings (--fail-on clip-bugs fails on them). A run whose
script failed fails (script-failed, on in configs/check.yaml). Policy rules come
from configs/check.yaml, --config FILE, or the flags (flags win). Exit codes:
0 every check passed, 1 a check failed, 2 bad input. Under GitHub Actions
(GITHUB_ACTIONS=true) failures are printed as ::error annotations.
"""


@app.command("check", help=CHECK_HELP)
def check_command(
    runs: List[Path] = typer.Argument(
        ..., metavar="RUN", help="Gradscope run directories or trainer logs, or directories holding them."
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="Policy YAML (default: configs/check.yaml)."),
    fail_on: Optional[str] = typer.Option(
        None, "--fail-on", metavar="REGIMES",
        help="Fail on these regimes: always-clips,never-clips,unclipped,healthy; and/or divergence (the loss rose "
             "above --divergence-factor x its running minimum for --divergence-steps logged steps); clip-bugs: on the clip audit's findings; "
             "script-failed: the recorded script exited with an error (on in configs/check.yaml; the flag replaces the file's list).",
    ),
    max_clip_fraction: Optional[float] = typer.Option(
        None, "--max-clip-fraction", min=0.0, max=1.0, help="Fail when more than this share of steps is clipped."
    ),
    max_spikes: Optional[int] = typer.Option(None, "--max-spikes", min=0, help="Fail on more gradient-norm spikes."),
    max_skipped_fraction: Optional[float] = typer.Option(
        None, "--max-skipped-fraction", min=0.0, max=1.0, help="Fail when the loss scaler skipped more steps."
    ),
    clip_norm: Optional[float] = typer.Option(
        None, "--clip-norm", min=0.0, help="Judge this threshold instead of the recorded one (policy rules)."
    ),
    divergence_factor: Optional[float] = typer.Option(
        None, "--divergence-factor", help="--fail-on divergence: k > 1 (default 2)."
    ),
    divergence_steps: Optional[int] = typer.Option(
        None, "--divergence-steps", help="--fail-on divergence: m >= 1 logged steps (default 20)."
    ),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="FILE", help="Also write a JUnit XML report."),
    json_out: bool = typer.Option(False, "--json", help="Print the verdict as JSON instead of lines."),
    format: Optional[str] = typer.Option(None, "--format", help="Force the input format (see `gradscope recommend --help`)."),
    column: Optional[str] = typer.Option(None, "--column", help="The grad-norm column of a CSV/JSONL log."),
) -> int:
    from gradscope.analysis import gate
    from gradscope.importers.discover import find_inputs
    from gradscope.report import ci

    policy = gate.override(
        gate.load_policy(config),
        fail_on=gate.parse_fail_on(fail_on) if fail_on is not None else None,
        max_clip_fraction=max_clip_fraction,
        max_spikes=max_spikes,
        max_skipped_fraction=max_skipped_fraction,
        divergence_factor=divergence_factor,
        divergence_steps=divergence_steps,
    )
    inputs = find_inputs(runs)
    if len(inputs) == 1:  # one run: the output is exactly that run's
        target = str(inputs[0])
        loaded, verdict = verdict_for(inputs[0], policy, clip_norm, format, column)
        if junit is not None:
            ci.write_junit(verdict, target, junit)
        if json_out:
            print(ci.to_json(verdict, target))
        else:
            curves = ci.curve_lines(loaded, verdict)
            print("\n".join(ci.lines(verdict, target, github=ci.in_github_actions(), curves=curves)))
        sys.stdout.flush()
        return verdict.exit_code
    return _check_many(inputs, policy, clip_norm, format, column, junit, json_out)


def verdict_for(path: Path, policy, clip_norm: float | None = None, format: str | None = None,
                column: str | None = None):
    """Open one run or log and judge it: (the Run, the gate's CheckVerdict); GradscopeError on bad input."""
    from gradscope.analysis import gate

    loaded = open_any(path, format, column)
    if loaded.steps is None or len(loaded.steps) == 0:
        from gradscope.errors import GradscopeError
        from gradscope.validate import why_no_steps

        raise GradscopeError(f"nothing to check: {why_no_steps(loaded)}", exit_code=2)
    facts, problem = None, None
    if gate.needs_analysis(policy):
        facts, problem = analysis_facts(loaded, clip_norm)
    verdict = gate.evaluate(loaded, policy, facts)
    if problem:
        verdict.notes.append(f"policy rules could not be judged: {problem}")
    return loaded, verdict


def _check_many(inputs: list[Path], policy, clip_norm, format, column, junit, json_out) -> int:
    """Every input judged on its own; bad input in one is that one's exit 2, not the end of the others."""
    import json

    from gradscope.errors import GradscopeError
    from gradscope.report import ci

    results = []
    for p in inputs:
        try:
            loaded, verdict = verdict_for(p, policy, clip_norm, format, column)
            results.append(ci.Checked(str(p), verdict, curves=ci.curve_lines(loaded, verdict)))
        except GradscopeError as e:
            results.append(ci.Checked(str(p), None, e.message, e.exit_code))
    worst = max(r.exit_code for r in results)
    if junit is not None:
        ci.write_junit_many(results, junit)
    if json_out:
        print(json.dumps(ci.many_to_json(results), indent=2, allow_nan=False))
    else:
        github = ci.in_github_actions()
        out = []
        for r in results:
            out.extend(ci.checked_lines(r, github=github))
            out.append("")
        out.extend(ci.summary_lines(results))
        print("\n".join(out))
    sys.stdout.flush()
    return worst


def open_any(path: Path, format: str | None = None, column: str | None = None):
    """A run directory or another trainer's log, as a Run (exit 2 on bad input)."""
    try:
        from gradscope.importers import open_run
    except ImportError:  # pragma: no cover - importers are part of the package
        if format not in (None, "gradscope") or column:
            raise
        from gradscope.rundir import load_run

        return load_run(path)
    return open_run(path, format=format, column=column)


def analysis_facts(run, clip_norm: float | None = None):
    """(facts for the policy rules, or None and why not)."""
    import inspect

    from gradscope.analysis import gate
    from gradscope.errors import GradscopeError

    try:
        from gradscope.analysis import analyze
    except ImportError:
        return None, "the analyzer is not available in this installation"
    kwargs = {}
    if clip_norm is not None and "clip_norm" in inspect.signature(analyze).parameters:
        kwargs["clip_norm"] = clip_norm
    try:
        result = analyze(run, **kwargs)
    except GradscopeError as e:
        return None, e.message
    return gate.facts_from_analysis(result), None
