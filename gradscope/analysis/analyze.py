"""analyze(run) -> RunAnalysis: one verdict and recommendation per optimizer of one rank."""
from __future__ import annotations

import dataclasses

import numpy as np

from gradscope.analysis.config import AnalysisConfig, Preset, get_preset, load_config
from gradscope.analysis.judge import classify_steps, judge, resolve_threshold, threshold_notes, warmup_length
from gradscope.analysis.model import DIVERGENCE, OptimizerAnalysis, RunAnalysis
from gradscope.analysis.recommend import compare_preset, drift, normalising, recommend
from gradscope.analysis.situation import assess
from gradscope.analysis.robust import percentiles, trailing_median_mad
from gradscope.analysis.ranks import disagreement_note, missing_ranks
from gradscope.analysis.select import Series, choose_rank, split_optimizers
from gradscope.analysis.spikes import attach_layers, find_spikes
from gradscope.errors import GradscopeError


def analyze(
    run,
    config: AnalysisConfig | None = None,
    clip_norm: float | None = None,
    preset: str | Preset | None = None,
    optimizer: int | None = None,
    rank: int | None = None,
) -> RunAnalysis:
    """Judge a Run's clipping (see gradscope.analysis for the contract).

    Raises GradscopeError (exit code 2) when there is nothing to judge: no steps, no
    gradient norms, only non-finite norms, or fewer than config.min_steps finite ones.
    """
    cfg = config if config is not None else load_config()
    where = str(run.path)
    if clip_norm is not None and not (np.isfinite(clip_norm) and clip_norm > 0):
        raise GradscopeError(f"--clip-norm must be a positive number, got {clip_norm!r}")
    pre = get_preset(preset) if isinstance(preset, str) else preset

    steps = run.steps
    if steps is None or len(steps) == 0:
        raise GradscopeError(f"'{where}' has no optimizer steps (was anything recorded or logged?)")
    chosen, ranks = choose_rank(steps, rank, where)
    notes = [str(n) for n in (run.meta.get("notes") or [])]
    if len(ranks) > 1:
        note = disagreement_note(steps, chosen, cfg.ranks.rtol)
        notes.append(note or f"{len(ranks)} ranks agree within {cfg.ranks.rtol:g} (relative); judging rank {chosen}")
        steps = steps[steps["rank"] == chosen]
    lost = missing_ranks(run)
    if lost:
        notes.append(f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of the run recorded nothing "
                     "(a launcher that did not pass gradscope's environment on, or a node started outside "
                     "`gradscope run`)")
    override = run.meta.get("clip_norm_override")
    if override is not None:
        notes.append(f"every step was clipped at {override:g} by `gradscope run --clip-norm` (not by the script)")
    sampled = bool(run.meta.get("sampled"))
    if sampled:
        notes.append(
            "the log holds only every k-th step: percentiles, clip fractions and spikes are estimates from the "
            "logged steps, and a spike between two logged steps is invisible"
        )
    if not np.isfinite(steps["grad_norm"].to_numpy(dtype=float)).any() and steps["grad_norm"].isna().all():
        raise GradscopeError(f"'{where}' has no gradient norms (the grad_norm column is empty)")

    series = split_optimizers(steps, optimizer, where)
    opts = [o for o in run.meta.get("optimizers") or [] if isinstance(o, dict)]
    classes = {o.get("id"): o.get("class") for o in opts}
    momenta = {o.get("id"): o.get("momentum") for o in opts}
    results: list[OptimizerAnalysis] = []
    problems: list[str] = []
    for s in series:
        try:
            label = f"optimizer {s.optimizer}" if len(series) > 1 or optimizer is not None else "the run"
            results.append(_analyze_series(s, run, chosen, cfg, clip_norm, pre, classes.get(s.optimizer), label,
                                           momenta.get(s.optimizer)))
        except GradscopeError as e:
            if len(series) == 1:
                raise
            problems.append(e.message)
    if not results:
        raise GradscopeError("; ".join(problems))
    notes.extend(f"skipped: {p}" for p in problems)
    return RunAnalysis(
        path=where, source=run.source, rank=chosen, ranks=ranks, sampled=sampled, optimizers=results, notes=notes
    )


def _analyze_series(
    s: Series, run, rank: int | None, cfg: AnalysisConfig, clip_norm: float | None, pre: Preset | None, cls,
    label: str, momentum: float | None = None,
) -> OptimizerAnalysis:
    where, opt = str(run.path), s.optimizer
    g_all = s.grad_norm
    bad, valid, nonfinite = classify_steps(s)
    n_valid = int(valid.sum())
    if n_valid == 0:
        if nonfinite.count == len(s):
            raise GradscopeError(
                f"'{where}': all {len(s)} gradient norms of {label} are non-finite (first at step "
                f"{nonfinite.first_step}): nothing to judge"
            )
        raise GradscopeError(f"'{where}': {label} has no finite, non-zero, non-skipped gradient norm to judge")
    if n_valid < cfg.min_steps:
        raise GradscopeError(
            f"'{where}': {label} has only {n_valid} finite gradient norm{'s' if n_valid != 1 else ''}; "
            f"at least {cfg.min_steps} are needed to judge clipping (record or log more steps)"
        )
    notes: list[str] = []
    g = g_all[valid]
    step = s.step[valid]
    x = np.log(g)
    k, by_lr = warmup_length(n_valid, s.lr[valid], cfg)
    if by_lr:
        notes.append(f"warm-up extended to step {int(step[k])}, where the learning rate peaks")
    if nonfinite.first_kind == DIVERGENCE or nonfinite.divergence_step is not None:
        notes.append(
            f"the run diverged at step {nonfinite.divergence_step} (non-finite to the end): every figure uses the "
            f"{n_valid} finite steps before it"
        )
    zero = int(np.count_nonzero(~bad & ~s.skipped & (g_all == 0)))
    if zero:
        notes.append(f"{zero} steps had a zero gradient norm (nothing to clip); left out")

    level, mad = trailing_median_mad(x, cfg.level.window, cfg.level.stride, cfg.level.min_periods)
    g_s, x_s, step_s = g[k:], x[k:], step[k:]

    th = resolve_threshold(s, clip_norm, run.meta)
    notes.extend(threshold_notes(s, th))
    pct = percentiles(g_s, cfg.percentiles)
    p50 = pct["p50"] if "p50" in pct else None
    verdict = judge(g_s, th, cfg, p50)
    spikes, spike_pos = find_spikes(x, level, mad, step, k, cfg)
    is_spike = np.zeros(len(x), dtype=bool)
    is_spike[spike_pos] = True
    rec = recommend(x_s, level[k:], cfg, is_spike[k:])
    sit = assess(g, step, s.loss[valid], nonfinite.divergence_step, spikes.count, cfg.situation, momentum)
    if sit.clip_norm is not None:
        rec = normalising(sit, g_s)
    else:
        rec = dataclasses.replace(rec, situation=sit.name, evidence=sit.evidence)
    dr = drift(g_s, step_s, rec.clip_norm_rounded, cfg, normalising=sit.clip_norm is not None)
    attach_layers(spikes, run.layers, rank, opt, cfg.spikes.top_layers)
    skipped = int(s.skipped.sum())
    return OptimizerAnalysis(
        optimizer=opt,
        optimizer_class=cls,
        rank=rank,
        steps=len(s),
        finite_steps=n_valid,
        skipped_steps=skipped,
        skipped_fraction=skipped / len(s),
        warmup_steps=k,
        steady_steps=len(g_s),
        steady_from_step=int(step_s[0]),
        analysis_until_step=nonfinite.divergence_step,
        percentiles=pct,
        threshold=th,
        verdict=verdict,
        recommendation=rec,
        drift=dr,
        spikes=spikes,
        nonfinite=nonfinite,
        preset=compare_preset(pre, rec, g_s, p50) if pre is not None else None,
        notes=notes,
    )
