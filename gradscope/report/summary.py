"""The few lines `gradscope run` prints when the script ends."""
from __future__ import annotations

import math
import sys
from pathlib import Path


def _fmt(x: float) -> str:
    return "nan" if x != x else ("inf" if math.isinf(x) else f"{x:.4g}")


def summary_lines(run_dir: Path) -> list[str]:
    from gradscope.analysis import audit
    from gradscope.analysis.ranks import RANK_LOCAL_NOTE, norm_scope
    from gradscope.rundir import load_run

    run = load_run(run_dir)
    steps = run.steps
    meta = run.meta
    head = f"gradscope: {meta.get('status')} (exit code {meta.get('exit_code')})"
    lines = [head]
    if meta.get("incomplete"):  # what the recording is missing, right under the outcome
        lines.append("  incomplete recording: " + "; ".join(map(str, meta["incomplete"])))
    if steps.empty:
        lines.append("  no optimizer step was recorded (did the script import torch and call optimizer.step()?)")
    judged = _judged(run) if not steps.empty else {}
    ranks = sorted(steps["rank"].unique()) if not steps.empty else []
    view = steps[steps["rank"] == ranks[0]] if ranks else steps
    bugs = audit.findings(run, rank=int(ranks[0]) if ranks else None)
    for opt_id, s in view.groupby("optimizer"):
        info = next((o for o in meta.get("optimizers", []) if o.get("id") == opt_id), {})
        lines.extend(_optimizer_lines(opt_id, s, info, judged.get(int(opt_id)), bugs))
    if len(ranks) > 1:
        lines.append(f"  ranks: {len(ranks)} ({', '.join(map(str, ranks))}); figures above are rank {ranks[0]}")
    for note in audit.errors(run):
        lines.append(f"  note: {note}")
    if norm_scope(run) == "rank-local":
        lines.append(f"  note: {RANK_LOCAL_NOTE}")
    # A next step only when it can work: recommend needs recorded steps.
    lines.append(f"  run saved in {run_dir}" + (f"   next: gradscope recommend {run_dir}" if not steps.empty else ""))
    return lines


def _optimizer_lines(opt_id, s, info: dict, a, bugs: list) -> list[str]:
    """One optimizer's steps, norm percentiles, clipping, clip bugs and bad steps (a: the analyzer's
    judgement of it, or None)."""
    import numpy as np

    from gradscope.analysis.bad_steps import bad_steps

    g = s["grad_norm"].to_numpy(dtype=float)
    finite = g[np.isfinite(g)]
    lines = [f"  optimizer {opt_id} ({info.get('class', '?')}): {len(s)} steps recorded"]
    if len(finite):
        p50, p90, p99 = np.percentile(finite, [50, 90, 99])
        lines.append(
            f"    grad norm  p50 {_fmt(p50)}  p90 {_fmt(p90)}  p99 {_fmt(p99)}  max {_fmt(finite.max())}"
        )
    lines.append(_clipped_line(s, a))
    lines.extend(f"    clip bug   {f.line()}" for f in bugs if f.optimizer == opt_id)
    bad = bad_steps(s).any
    skipped = s["skipped"].to_numpy()
    if bad.any() or skipped.any():
        lines.append(
            f"    non-finite {int(bad.sum())} steps (first at step {int(s['step'].to_numpy()[bad][0]) if bad.any() else '-'}),"
            f" {int(skipped.sum())} skipped by the loss scaler"
        )
    return lines


def _clipped_line(s, a) -> str:
    tau = s["clip_max_norm"].dropna()
    if len(tau) and a is not None and a.verdict.clip_fraction is not None and a.steady_steps:
        # The analyzer's number, the one `recommend` and `plot` show: steady-state steps only.
        return (f"    clipped    {a.verdict.clip_fraction:.1%} of steady-state steps ({a.verdict.clipped_steps} of "
                f"{a.steady_steps}) at max_norm {_fmt(a.verdict.clip_norm)}")
    if len(tau):
        return f"    clipped    {s['clipped'].mean():.1%} of all {len(s)} steps at max_norm {_fmt(tau.mode().iloc[0])}"
    return "    clipped    no clip_grad_norm_ call seen"


def _judged(run) -> dict:
    """optimizer id -> the analyzer's judgement (empty when the run is too short to judge)."""
    try:
        from gradscope.analysis import analyze

        return {o.optimizer: o for o in analyze(run).optimizers}
    except Exception:  # noqa: BLE001 - the summary falls back to plain counts; it must never fail
        return {}


def print_summary(run_dir: Path, file=None) -> None:
    print("\n".join(summary_lines(run_dir)), file=file or sys.stderr)
