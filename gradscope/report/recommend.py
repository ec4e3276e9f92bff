"""How `gradscope recommend` looks: a rich report for people, a stable JSON object for tools.

JSON schema "gradscope.recommend/1" (what `to_json` returns; NaN/inf never appear, null does)
---------------------------------------------------------------------------------------------
Top level: the optimizer with the most steps, flattened (every per-optimizer key below),
plus these run-level keys:

    schema          "gradscope.recommend/1"
    path            the run directory or log that was read
    format          "gradscope" or the importer's format name (hf, swift, csv, ...)
    rank            the rank analysed (null for an empty table); ranks: every rank present
    sampled         true when the log holds only every k-th step
    status          the run's status: meta.json's ("running" while it is still being recorded,
                    "completed", "stopped", "failed", "interrupted", "killed") or the log's ("completed", "unknown")
    status_line     the report's first line when the run did not end cleanly (failed, interrupted, killed,
                    still running), else null
    optimizers      list of per-optimizer objects (one per optimizer, by id)
    notes           run-level notes followed by the main optimizer's notes (strings)
    findings        the clip audit's findings on the rank analysed, every optimizer: a list of
                    {kind, first_step, count, message} (empty when none, and for foreign logs,
                    which carry no audit); kind: "clip-before-unscale" | "clip-after-step" |
                    "clip-per-microbatch" | "clip-partial" | "no-zero-grad" | "clip-local-norm". Each optimizer
                    object has its own "findings" list too.

Per optimizer:

    optimizer, optimizer_class (str|null), rank
    steps               rows of this optimizer (optimizer steps; logged points if sampled)
    finite_steps        finite, positive, not skipped: the steps statistics can use
    skipped_steps, skipped_fraction       the loss scaler skipped the update (inf/NaN grads)
    nonfinite_steps     steps with a non-finite grad_norm or an infinite loss
    first_nonfinite_step (int|null), nonfinite_kind ("overflow-skipped"|"recovered"|"divergence"|null;
                        null also when every norm is non-finite while the loss falls: no divergence)
    nonfinite           {count, first_step, first_kind, overflow_skipped, recovered,
                         divergence_step (int|null), steps (first 20),
                         origin: null, or where `gradscope run --trace-nan` found the first non-finite
                         value: {step, phase ("input"|"forward"|"backward"|"loss"), module (str|null),
                         detail, optimizer, rank}}
    warmup_steps        finite steps left out at the start (rows: logged points for a sampled log)
    steady_optimizer_steps  the optimizer steps the steady state covers: steady_steps, or for a log of every
                        k-th step the span its logged points cover
    steady_steps        finite steps judged; steady_from_step: the first one's step number
    analysis_until_step step where a divergence began (statistics stop there), or null
    percentiles         {"p50", "p90", "p99", "max"} of steady-state grad norms
    whole_run           {steps, finite_steps, min, p50, max, max_step}: the same run with warm-up
                        included (min/p50/max/max_step null when no norm is finite)
    clip_norm           threshold judged, or null; clip_norm_source: "option" (recommend --clip-norm)
                        | "override" (recorded with `gradscope run --clip-norm`) | "script" (the max_norm
                        passed to clip_grad_norm_) | "log" (an args file beside a log) | "default" (the
                        trainer's default, assumed: a Hugging Face / ms-swift / LLaMA-Factory log with
                        grad_norm and no args file) | null
    clip_norm_changed   the script's max_norm changed during the run; script_clip_norms: distinct
                        values passed to clip_grad_norm_, most used first; clip_value: a
                        clip_grad_value_ threshold or null
    regime              "never-clips" | "always-clips" | "healthy" | "unclipped" | null (no finite norm,
                        or rank-local norms)
    norm_scope          "global" | "rank-local": the recorded norms are each rank's shard only (the
                        process files' norm_scope); then regime and every recommended_* key are null
    clip_fraction       share of steady-state steps with grad_norm > clip_norm (null: unclipped)
    clipped_steps, mean_multiplier (mean of min(1, clip_norm/grad_norm)),
    clip_norm_to_max    clip_norm / largest steady-state norm; clip_norm_to_p50: / median
    meaning             one sentence on what the regime means for the user
    action              what to do, the first line of the report: "keep" (the run's max_norm lies in the
                        range the data support) | "change" (it does not: use recommended_clip_norm_rounded) |
                        "add" (the run does not clip; clip at recommended_clip_norm_rounded) | "tune" (not
                        confident: run tune_command) | "remove" (reserved; recommend never gives it) |
                        null (no advice: no finite norm, or the run's script failed); advice: that line
    adam_family         the optimizer normalises its update by a second moment (Adam, AdamW, NAdam, RMSprop,
                        ...): there a clip caps the gradient fed into the moment estimates, and the
                        mean_multiplier keys are the gradient's factor, not the update's
    recommended_clip_norm          exact float; recommended_clip_norm_rounded: 2-3 significant digits
                        (both null, with every recommended_* key, when no norm is finite: see meaning)
    recommended_clip_fraction, recommended_clipped_steps, recommended_mean_multiplier: what the
                        rounded value would do on this run
    recommendation      {reference_level, headroom, based_on_steps, method}
    situation           "stable" | "spiky" | "unstable-needs-normalisation" | "blew-up": which
                        method made the recommendation; situation_evidence: one sentence why
    recommended_range   [low, high]: the thresholds the data support (see the README's method)
    blowup_onset_step   blew-up: step where the norm left its early level (int|null)
    confident           false when one pilot cannot tell the threshold (a run that blew up at once,
                        too few steps: gradscope/analysis/confidence.py); recommended_clip_norm is
                        then a guess (null: no recommendation). confidence_reasons: why not
                        (strings, empty when confident)
    tune_command        when not confident: the `gradscope tune` command line that measures
                        instead (the run's own script and arguments), else null; null too when
                        the command is unknown (another trainer's log)
    drift               null (steady state too short) or {early, late (percentile objects),
                        early_steps, late_steps ([first, last] step numbers), p50_ratio,
                        drifting, recommended_clip_fraction_early, recommended_clip_fraction_late,
                        warning (str|null)}
    spikes              {count, z_threshold, min_ratio, layers_available, listed: [{step,
                        grad_norm, level, ratio, z, in_warmup, layers: [{name, share}]}]}
    preset              null or {name, low, high (null: no upper bound), source, position
                        ("below"|"within"|"above"), clip_fraction_at_low, clip_fraction_at_high,
                        mean_multiplier_at_low, message}
    caveats             strings: what to weigh before applying the recommendation (few points,
                        a cap below a threshold that failed, a larger average update)
    snippets            {pytorch, huggingface, lightning, deepspeed, keras, paddle, ms-swift} or null
    notes               strings
"""
from __future__ import annotations

import json
import math
from typing import Any

from gradscope.analysis.model import OptimizerAnalysis, RunAnalysis
from gradscope.report.sources import THRESHOLD_SOURCE_LABELS

SCHEMA = "gradscope.recommend/1"

METHOD = (
    "exp(q{lq} of the trailing median of log grad_norm + max(q{rq} of log grad_norm minus that median, "
    "log {mh})) over steady-state finite steps"
)


def snippets(clip_norm: float) -> dict[str, str]:
    """Ready-to-paste settings for the common trainers (norm clipping, global L2 norm everywhere)."""
    v = f"{clip_norm:g}"
    return {
        "pytorch": f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={v})",
        "huggingface": f"TrainingArguments(max_grad_norm={v})",
        "lightning": f"Trainer(gradient_clip_val={v})",
        "deepspeed": f'"gradient_clipping": {v}',
        "keras": f"keras.optimizers.AdamW(global_clipnorm={v})",
        "paddle": f"paddle.nn.ClipGradByGlobalNorm(clip_norm={v})",
        "ms-swift": f"--max_grad_norm {v}",
    }


ADAM_WORDS = ("a clip caps the gradient fed into the moment estimates (the update, normalised by the second "
              "moment, is not scaled by it)")

SNIPPET_LABELS = {
    "pytorch": "PyTorch", "huggingface": "Hugging Face", "lightning": "Lightning", "deepspeed": "DeepSpeed",
    "keras": "Keras", "paddle": "Paddle", "ms-swift": "ms-swift",
}


# ------------------------------------------------------------------------------- JSON


def _clean(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python: what json.dumps(allow_nan=False) takes."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    try:
        f = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    if hasattr(obj, "dtype") and getattr(obj.dtype, "kind", "") in "iub":
        return bool(obj) if obj.dtype.kind == "b" else int(obj)
    return f if math.isfinite(f) else None


def optimizer_json(o: OptimizerAnalysis, config=None) -> dict:
    r, nf = o.recommendation, o.nonfinite
    rc = config.recommend if config is not None else None
    return {
        "optimizer": o.optimizer,
        "optimizer_class": o.optimizer_class,
        "rank": o.rank,
        "steps": o.steps,
        "finite_steps": o.finite_steps,
        "skipped_steps": o.skipped_steps,
        "skipped_fraction": o.skipped_fraction,
        "nonfinite_steps": nf.count,
        "first_nonfinite_step": nf.first_step,
        "nonfinite_kind": nf.first_kind,
        "nonfinite": _nonfinite_json(nf),
        "warmup_steps": o.warmup_steps,
        "steady_steps": o.steady_steps,
        "steady_optimizer_steps": o.steady_optimizer_steps,
        "steady_from_step": o.steady_from_step,
        "analysis_until_step": o.analysis_until_step,
        "percentiles": o.percentiles,
        "whole_run": _whole_run_json(o.whole_run),
        **_verdict_json(o),
        **_recommendation_json(r, rc),
        "action": o.advice.action if o.advice is not None else None,
        "advice": o.advice.line if o.advice is not None else None,
        "adam_family": o.adam_family,
        "drift": _drift_json(o.drift),
        "spikes": _spikes_json(o.spikes),
        "preset": _preset_json(o.preset),
        **_confidence_json(o.confidence),
        "caveats": list(o.caveats),
        "snippets": snippets(r.clip_norm_rounded) if r is not None else None,
        "notes": list(o.notes),
    }


def _nonfinite_json(nf) -> dict:
    return {
        "count": nf.count, "first_step": nf.first_step, "first_kind": nf.first_kind,
        "overflow_skipped": nf.overflow_skipped, "recovered": nf.recovered,
        "divergence_step": nf.divergence_step, "steps": nf.steps,
        "origin": nf.origin.json() if getattr(nf, "origin", None) is not None else None,
    }


def _whole_run_json(w) -> dict | None:
    if w is None:
        return None
    return {"steps": w.steps, "finite_steps": w.finite_steps, "min": w.min, "p50": w.p50, "max": w.max,
            "max_step": w.max_step}


def _verdict_json(o: OptimizerAnalysis) -> dict:
    """The threshold judged, where it came from, and what it does on the steady state."""
    v, th = o.verdict, o.threshold
    return {
        "clip_norm": v.clip_norm,
        "clip_norm_source": th.source,
        "clip_norm_changed": th.changed,
        "script_clip_norms": th.script_values,
        "clip_value": th.clip_value,
        "regime": v.regime,
        "norm_scope": o.norm_scope,
        "clip_fraction": v.clip_fraction,
        "clipped_steps": v.clipped_steps,
        "mean_multiplier": v.mean_multiplier,
        "clip_norm_to_max": v.clip_norm_to_max,
        "clip_norm_to_p50": v.clip_norm_to_p50,
        "meaning": v.meaning,
    }


def _drift_json(dr) -> dict | None:
    if dr is None:
        return None
    return {
        "early": dr.early, "late": dr.late, "early_steps": dr.early_steps, "late_steps": dr.late_steps,
        "p50_ratio": dr.p50_ratio, "drifting": dr.drifting,
        "recommended_clip_fraction_early": dr.recommended_clip_fraction_early,
        "recommended_clip_fraction_late": dr.recommended_clip_fraction_late,
        "warning": dr.warning,
    }


def _spikes_json(sp) -> dict:
    return {
        "count": sp.count, "z_threshold": sp.z_threshold, "min_ratio": sp.min_ratio,
        "layers_available": sp.layers_available,
        "listed": [
            {
                "step": s.step, "grad_norm": s.grad_norm, "level": s.level, "ratio": s.ratio, "z": s.z,
                "in_warmup": s.in_warmup, "layers": [{"name": n, "share": f} for n, f in s.layers],
            }
            for s in sp.listed
        ],
    }


def _preset_json(p) -> dict | None:
    if p is None:
        return None
    return {
        "name": p.name, "low": p.low, "high": p.high, "source": p.source, "position": p.position,
        "clip_fraction_at_low": p.clip_fraction_at_low, "clip_fraction_at_high": p.clip_fraction_at_high,
        "mean_multiplier_at_low": p.mean_multiplier_at_low, "message": p.message,
    }


def _confidence_json(c) -> dict:
    """confident / confidence_reasons / tune_command (confident null: not assessed)."""
    return {"confident": c.confident if c is not None else None,
            "confidence_reasons": list(c.reasons) if c is not None else [],
            "tune_command": c.tune_command if c is not None else None}


def _recommendation_json(r, rc) -> dict:
    """The recommended_* keys (all null when there is no recommendation)."""
    if r is None:
        return {k: None for k in (
            "recommended_clip_norm", "recommended_clip_norm_rounded", "recommended_clip_fraction",
            "recommended_clipped_steps", "recommended_mean_multiplier", "recommendation", "situation",
            "situation_evidence", "recommended_range", "blowup_onset_step")}
    return {
        "recommended_clip_norm": r.clip_norm,
        "recommended_clip_norm_rounded": r.clip_norm_rounded,
        "recommended_clip_fraction": r.clip_fraction,
        "recommended_clipped_steps": r.clipped_steps,
        "recommended_mean_multiplier": r.mean_multiplier,
        "recommendation": {
            "reference_level": r.reference_level,
            "headroom": r.headroom,
            "based_on_steps": r.based_on_steps,
            "method": r.basis if r.basis is not None else (
                METHOD.format(lq=rc.level_quantile, rq=rc.residual_quantile, mh=rc.min_headroom)
                if rc is not None else None),
        },
        "situation": r.situation,
        "situation_evidence": r.evidence,
        "recommended_range": [r.low, r.high] if r.low is not None else None,
        "blowup_onset_step": r.onset_step,
    }


def to_json(result: RunAnalysis, config=None) -> dict:
    """The JSON object of the module docstring (already free of NaN)."""
    per = [optimizer_json(o, config) for o in result.optimizers]
    for o, d in zip(result.optimizers, per):
        d["findings"] = [f.as_json() for f in result.findings if f.optimizer == o.optimizer]
    main = per[result.optimizers.index(result.main)]
    top = {
        "schema": SCHEMA,
        "path": result.path,
        "format": result.source,
        "rank": result.rank,
        "ranks": result.ranks,
        "sampled": result.sampled,
        "status": result.status,
        "status_line": result.status_line,
    }
    top.update({k: v for k, v in main.items() if k not in ("notes",)})
    top["notes"] = list(result.notes) + list(main["notes"])
    top["findings"] = [f.as_json() for f in result.findings]
    top["optimizers"] = per
    return _clean(top)


def dumps(result: RunAnalysis, config=None) -> str:
    return json.dumps(to_json(result, config), indent=2, allow_nan=False)


# ------------------------------------------------------------------------------- rich


def _f(x: float | None, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


_REGIME_STYLE = {"never-clips": "yellow", "always-clips": "red", "healthy": "green", "unclipped": "magenta",
                 None: "red"}
def _source_text(source: str | None) -> str:
    label = THRESHOLD_SOURCE_LABELS.get(source) if source is not None else None
    return label.text if label is not None else "?"


_KIND = {
    "overflow-skipped": "a loss-scaler overflow the scaler skipped (harmless)",
    "recovered": "non-finite, and finite steps follow (no loss scaler skipped it)",
    "divergence": "a real divergence: non-finite to the end of the run",
}


def render(result: RunAnalysis, console=None, config=None) -> None:
    """Print the report (rich) to console (default: stdout): a header, the run's status when it did not end
    cleanly, the verdict line of each optimizer (keep / change / add / run gradscope tune), the tune command
    when that is the advice, run-level notes, one panel per optimizer made of the sections in SECTIONS, in
    order, and last the paste lines (outside any box, never wrapped: a triple-click copies one working line)."""
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.text import Text

    console = console or Console()
    where = f"{result.path}  [dim]({result.source}"
    if result.rank is not None and len(result.ranks) > 1:
        where += f", rank {result.rank} of {len(result.ranks)}"
    where += ")[/dim]"
    console.print(f"[bold]gradscope recommend[/bold] {where}", highlight=False, soft_wrap=True)
    if result.status_line:
        _line(console, Text(result.status_line, style="bold red" if result.status == "failed" else "bold yellow"))
    many = len(result.optimizers) > 1
    for o in result.optimizers:
        a = o.advice
        if a is None:
            continue
        t = Text(f"optimizer {o.optimizer}: " if many else "")
        t.append(a.line, style=_ACTION_STYLE.get(a.action, "bold red"))
        _line(console, t)
        c = o.confidence
        if a.action == "tune" and c is not None and c.tune_command:
            _line(console, Text(f"  {c.tune_command}", style="bold"))
    for n in result.notes:
        console.print(Text(f"note: {n}", style="dim"))
    for o in result.optimizers:
        parts: list = []
        for section in SECTIONS:
            parts.extend(section(o, o is result.main))
        title = f"optimizer {o.optimizer}" + (f" ({o.optimizer_class})" if o.optimizer_class else "")
        console.print(Panel(Group(*parts), title=title, title_align="left", border_style=_REGIME_STYLE[o.regime]))
    _paste(console, result.main)


_ACTION_STYLE = {"keep": "bold green", "change": "bold cyan", "add": "bold cyan", "remove": "bold cyan",
                 "tune": "bold yellow"}


def _line(console, text) -> None:
    """One line that must stay one line (a command, a paste line): no wrapping, no cropping."""
    console.print(text, soft_wrap=True, no_wrap=True, overflow="ignore", crop=False, highlight=False)


def paste_lines(o: OptimizerAnalysis) -> list[str]:
    """The ready-to-paste settings for the advice's threshold: only when the advice is to change the
    threshold or add one (not when it says keep, tune, or nothing: a failed run gets none)."""
    a = o.advice
    if o.recommendation is None or a is None or a.action not in ("change", "add"):
        return []
    width = max(len(v) for v in SNIPPET_LABELS.values())
    return [f"{SNIPPET_LABELS[k]:<{width}}  {code}" for k, code in snippets(o.recommendation.clip_norm_rounded).items()]


def _paste(console, o: OptimizerAnalysis) -> None:
    from rich.text import Text

    lines = paste_lines(o)
    if not lines:
        return
    console.print(Text(f"paste (max_norm = {o.recommendation.clip_norm_rounded:g})", style="bold"))
    for line in lines:
        _line(console, Text(line))


# Each section: (optimizer analysis, is it the main optimizer) -> renderables (possibly none).


def _head(o: OptimizerAnalysis, main: bool) -> list:
    from rich.text import Text

    head = Text()
    sampled = o.steady_optimizer_steps is not None and o.steady_optimizer_steps != o.steady_steps
    head.append(f"{o.steps} logged points" if sampled else f"{o.steps} steps", style="bold")
    if o.steady_from_step is not None and sampled:
        head.append(
            f"  warm-up {o.warmup_steps}, steady state {o.steady_steps} finite logged points from step "
            f"{o.steady_from_step}, covering {o.steady_optimizer_steps} optimizer steps (the log holds every k-th "
            "step: clip shares below are of the logged points)"
        )
    elif o.steady_from_step is not None:
        head.append(
            f"  warm-up {o.warmup_steps}, steady state {o.steady_steps} finite steps from step {o.steady_from_step}"
        )
    else:
        head.append("  no finite gradient norm")
    if o.skipped_steps:
        head.append(f", {o.skipped_steps} skipped by the loss scaler ({o.skipped_fraction:.1%})")
    return [head]


def _findings(o: OptimizerAnalysis, main: bool) -> list:
    """The clip audit's findings, above the verdict: a clipping bug makes the verdict moot."""
    from rich.text import Text

    out = []
    for f in getattr(o, "findings", None) or []:
        bug = Text("clip bug  ", style="bold red")
        bug.append(f.kind, style="bold red")
        bug.append(f" from step {f.first_step} ({f.count} step{'s' if f.count != 1 else ''}): {f.message}")
        out.append(bug)
    return out


def _percentile_table(o: OptimizerAnalysis, main: bool) -> list:
    from rich.table import Table
    from rich.text import Text

    if o.steady_steps == 0:
        return []
    pt = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    pt.add_column("grad norm")
    for k in o.percentiles:
        pt.add_column(k, justify="right")
    pt.add_row("steady state", *(_f(v) for v in o.percentiles.values()))
    if o.drift is not None:
        pt.add_row(f"early (steps {o.drift.early_steps[0]}-{o.drift.early_steps[1]})",
                   *(_f(o.drift.early.get(k)) for k in o.percentiles))
        pt.add_row(f"late (steps {o.drift.late_steps[0]}-{o.drift.late_steps[1]})",
                   *(_f(o.drift.late.get(k)) for k in o.percentiles))
    out: list = [pt]
    w = o.whole_run
    if w is not None and w.max is not None and w.max_step is not None and w.max_step < o.steady_from_step:
        out.append(Text(
            f"whole run  max {w.max:.4g} at step {w.max_step}, in the warm-up left out above "
            f"(whole run: min {w.min:.4g}, p50 {w.p50:.4g}, {w.finite_steps} finite steps)", style="yellow"))
    return out


def _verdict(o: OptimizerAnalysis, main: bool) -> list:
    from rich.text import Text

    v = o.verdict
    line = Text("verdict  ")
    if v.regime is None:
        line.append("not judged (per-rank norms)" if o.norm_scope == "rank-local" else "nothing to judge",
                    style="bold red")
    else:
        line.append(v.regime, style=f"bold {_REGIME_STYLE[v.regime]}")
    if v.clip_norm is not None and v.clip_fraction is not None:
        line.append(
            f"  max_norm {v.clip_norm:g} ({_source_text(o.threshold.source)}): clips {v.clip_fraction:.1%} "
            f"({v.clipped_steps} of {o.steady_steps} steady-state steps), "
            + ("" if o.adam_family else f"mean update multiplier {v.mean_multiplier:.3f}, ")
            + f"{v.clip_norm_to_max:.3g}x the largest norm"
        )
    return [line, Text(v.meaning, style="italic")]


def _recommendation(o: OptimizerAnalysis, main: bool) -> list:
    from rich.text import Text

    r = o.recommendation
    if r is None:
        why = ("the norms are per-rank, see the verdict" if o.norm_scope == "rank-local"
               else "no finite gradient norm to base it on")
        return [Text(f"recommend  none ({why})", style="bold")]
    unsure = o.confidence is not None and not o.confidence.confident
    keep = o.advice is not None and o.advice.action == "keep"
    rec = Text("data-driven  " if keep or unsure else "recommend  ")
    rec.append(f"max_norm = {r.clip_norm_rounded:g}", style="bold yellow" if unsure else "bold cyan")
    if unsure:
        rec.append(" (a guess: this run cannot tell, see below)")
    elif keep:
        rec.append(f" (max_norm {o.verdict.clip_norm:g} lies in the range the data support: no need to change it)")
    rec.append(
        f"  (exact {r.clip_norm:.6g}): would clip {r.clip_fraction:.1%} of steady-state steps "
        f"({r.clipped_steps}), "
        + (ADAM_WORDS + "; " if o.adam_family else f"mean update multiplier {r.mean_multiplier:.3f}; ")
        + f"{r.headroom:.3g}x the reference level {r.reference_level:.4g}"
        + (" (the median steady-state norm)" if r.situation not in ("stable", "spiky") else
           " (the running median norm near the top of its steady-state range)" if r.basis is None
           else " (the running median norm)")
    )
    sit = Text("situation  ")
    sit.append(r.situation, style="bold" if r.situation in ("stable", "spiky") else "bold yellow")
    sit.append(f": {r.evidence}.")
    if r.basis is not None:
        normalise = r.situation not in ("stable", "spiky") and r.clip_fraction >= 0.5
        sit.append(f" Clipping has to normalise most steps here: {r.basis}." if normalise
                   else f" The threshold sits {r.basis}." if r.basis.startswith("midway")
                   else f" The threshold is {r.basis}.")
    if r.low is not None:
        if f"{r.low:.3g}" == f"{r.high:.3g}":
            sit.append(f" The data give no range around {r.low:.3g}: the norms vary too little to tell "
                       "thresholds apart; try it with `gradscope run --clip-norm`.")
        else:
            sit.append(f" The data support {r.low:.3g} to {r.high:.3g}; try both ends with "
                       f"`gradscope run --clip-norm`.")
    out = [rec, sit, *_unsure(o)]
    for c in o.caveats:
        out.append(Text(f"caveat: {c}", style="yellow"))
    return out


def _unsure(o: OptimizerAnalysis) -> list:
    """When one run cannot tell: why, and the `gradscope tune` command that measures instead."""
    from rich.text import Text

    c = o.confidence
    if c is None or c.confident:
        return []
    line = Text("not confident  ", style="bold yellow")
    if not c.tune_command and c.reasons and c.reasons[0].startswith("the run's script failed"):
        line.append("; ".join(c.reasons) + ".")
        return [line]
    line.append("; ".join(c.reasons) + ". One run cannot tell the threshold here: measure it with short probes "
                "instead" + (" (the command above, from the run's working directory; add --steps T, the real "
                             "training's length in optimizer steps, when this run was shorter)." if c.tune_command
                             else " (`gradscope tune` on the training script)."))
    return [line]


def _drift(o: OptimizerAnalysis, main: bool) -> list:
    from rich.text import Text

    out: list = []
    if o.drift is not None:
        dr = o.drift
        out.append(Text(
            f"drift  late/early median {dr.p50_ratio:.3g}x; the recommendation clips "
            f"{dr.recommended_clip_fraction_early:.1%} early and {dr.recommended_clip_fraction_late:.1%} late"
        ))
        if dr.warning:
            out.append(Text("warning: " + dr.warning, style="yellow"))
    if o.preset is not None:
        out.append(Text(f"preset {o.preset.name}: {o.preset.message}",
                        style="" if o.preset.position == "within" else "yellow"))
    return out


def _spikes(o: OptimizerAnalysis, main: bool) -> list:
    from rich.table import Table
    from rich.text import Text

    sp = o.spikes
    if not sp.count:
        return [Text("spikes  none" if o.finite_steps else "spikes  - (no finite norm)")]
    early = sum(s.in_warmup for s in sp.listed)
    out: list = [Text(f"spikes  {sp.count} (z >= {sp.z_threshold:g} and >= {sp.min_ratio:g}x the recent level)"
                      + (f", {early} of them in the warm-up" if early else ""))]
    st = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for c in ("step", "grad norm", "x level", "z", "top layers (share of squared norm)"):
        st.add_column(c, justify="left" if c.startswith("top") else "right")
    for s in sp.listed[:10]:
        layers = ", ".join(f"{n} {f:.0%}" for n, f in s.layers) or ("-" if not s.in_warmup else "(warm-up)")
        st.add_row(str(s.step), _f(s.grad_norm), _f(s.ratio, ".3g"), _f(s.z, ".3g"), layers)
    out.append(st)
    if sp.count > 10:
        out.append(Text(f"  ... and {sp.count - 10} more (--json lists up to {len(sp.listed)})", style="dim"))
    return out


def _nonfinite(o: OptimizerAnalysis, main: bool) -> list:
    from rich.text import Text

    nf = o.nonfinite
    if not nf.count:
        return [Text("non-finite  none")]
    kind = _KIND.get(nf.first_kind, "") if nf.first_kind else "every norm, while the loss stays finite (see above)"
    out = [Text(f"non-finite  {nf.count} step{'s' if nf.count != 1 else ''}, first at step {nf.first_step}: {kind}",
                style="red" if nf.first_kind == "divergence" else "yellow")]
    if nf.overflow_skipped and nf.overflow_skipped != nf.count:
        out.append(Text(f"            {nf.overflow_skipped} of them skipped by the loss scaler"))
    if getattr(nf, "origin", None) is not None:
        out.append(Text(f"            origin ({nf.origin.phase}): {nf.origin.sentence}"))
    return out


def _notes(o: OptimizerAnalysis, main: bool) -> list:
    from rich.text import Text

    return [Text(f"note: {n}", style="dim") for n in o.notes]


SECTIONS = (_head, _findings, _percentile_table, _verdict, _recommendation, _drift, _spikes, _nonfinite, _notes)


def render_summary(results: list, console=None) -> None:
    """One table of many runs: [(target, RunAnalysis or None, error or None)], main optimizer of each."""
    from rich.console import Console
    from rich.text import Text

    from gradscope.report.table import aligned

    console = console or Console()
    header = ("run", "steps", "p50", "p99", "max_norm", "regime", "clips", "recommend", "situation")
    rows = []
    for target, r, err in results:
        if r is None:
            rows.append((target, "-", "-", "-", "-", "error", "-", "-", "not judged (see above)"))
            continue
        o = r.main
        v = o.verdict
        label = target + (f" (optimizer {o.optimizer})" if len(r.optimizers) > 1 else "")
        rows.append((
            label, str(o.steps), _f(o.percentiles.get("p50")), _f(o.percentiles.get("p99")),
            _f(v.clip_norm, "g"), v.regime or "-", f"{v.clip_fraction:.1%}" if v.clip_fraction is not None else "-",
            f"{o.recommendation.clip_norm_rounded:g}" if o.recommendation is not None else "-",
            o.recommendation.situation if o.recommendation is not None else "no finite norm",
        ))
    console.print("[bold]gradscope recommend: summary[/bold]", highlight=False)
    for line in aligned(header, rows, left=(0, 5, 8)):
        console.print(Text(line), no_wrap=True, crop=False, soft_wrap=True)
