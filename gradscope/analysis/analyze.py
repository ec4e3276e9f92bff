"""analyze(run) -> RunAnalysis: one verdict and recommendation per optimizer of one rank."""
from __future__ import annotations

import dataclasses

import numpy as np

from gradscope.analysis.audit import errors as audit_errors, findings as audit_findings
from gradscope.analysis.confidence import assess_confidence, tune_command
from gradscope.analysis.config import AnalysisConfig, Preset, get_preset, load_config
from gradscope.analysis.judge import (
    classify_steps, in_force, judge, resolve_threshold, threshold_notes, warmup_length,
)
from gradscope.analysis.model import (
    DIVERGENCE, OptimizerAnalysis, Recommendation, RunAnalysis, Spikes, Verdict, WholeRun,
)
from gradscope.analysis.recommend import _effect, compare_preset, drift, normalising, recommend
from gradscope.analysis.situation import assess
from gradscope.analysis.robust import percentiles, trailing_median_mad
from gradscope.analysis.ranks import compared_steps, disagreement_note, missing_ranks
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
    gradient norms, fewer than config.min_steps finite ones, or only non-finite norms and
    a loss that does not fall (when it falls, the answer says so and has no recommendation).
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
    if run.source == "gradscope" and run.meta.get("incomplete"):  # first: what the recording is missing
        notes.insert(0, "incomplete recording: " + "; ".join(map(str, run.meta["incomplete"])))
    if len(ranks) > 1:
        note = disagreement_note(steps, chosen, cfg.ranks.rtol)
        shared = compared_steps(steps)
        notes.append(note or (
            f"{len(ranks)} ranks agree within {cfg.ranks.rtol:g} (relative) on the {shared} steps they share; "
            f"judging rank {chosen}" if shared else
            f"ranks {', '.join(map(str, ranks))} were not compared: no step was recorded by two replica ranks "
            f"(a rank numbered 1000 or above is a second process recorded as the same rank); judging rank {chosen}"))
        steps = steps[steps["rank"] == chosen]
    if run.source == "gradscope" and run.meta.get("status") == "running":
        n = len(steps)
        per = steps.groupby("optimizer").size() if n else None
        held = (f"{n} optimizer steps" if per is None or len(per) == 1
                else f"{n} optimizer steps of {len(per)} optimizers ({', '.join(f'{int(c)}' for c in per)})")
        notes.append(f"the run is still being recorded (meta.json status 'running'): it holds {held} so far; "
                     "this report judges those, and a later `gradscope recommend` will see more")
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
    found = [f for f in audit_findings(run, rank=chosen) if optimizer is None or f.optimizer == optimizer]
    notes.extend(audit_errors(run, rank=chosen))
    for o in results:
        o.findings = [f for f in found if f.optimizer == o.optimizer]
    return RunAnalysis(
        path=where, source=run.source, rank=chosen, ranks=ranks, sampled=sampled, optimizers=results, notes=notes,
        status=run.meta.get("status"),
        findings=found,
    )


def _origin_of(run, rank: int | None, optimizer: int):
    from gradscope.analysis.origin import nan_origin

    o = nan_origin(run, rank) if run.source == "gradscope" else None
    return o if o is not None and o.optimizer == optimizer else None


def _analyze_series(
    s: Series, run, rank: int | None, cfg: AnalysisConfig, clip_norm: float | None, pre: Preset | None, cls,
    label: str, momentum: float | None = None,
) -> OptimizerAnalysis:
    where, opt = str(run.path), s.optimizer
    g_all = s.grad_norm
    bad, valid, nonfinite = classify_steps(s)
    nonfinite.origin = _origin_of(run, rank, opt)
    n_valid = int(valid.sum())
    th = resolve_threshold(s, clip_norm, run.meta)
    if n_valid == 0:
        if nonfinite.count == len(s):
            blind = _no_finite_norm(s, nonfinite, th, cfg, cls, rank, label)
            if blind is not None:
                return blind
            raise GradscopeError(
                f"'{where}': all {len(s)} gradient norms of {label} are non-finite (first at step "
                f"{nonfinite.first_step}) and the loss does not fall: nothing to judge"
            )
        raise GradscopeError(f"'{where}': {label} has no finite, non-zero, non-skipped gradient norm to judge")
    if n_valid < cfg.min_steps:
        raise GradscopeError(
            f"'{where}': {label} has only {n_valid} finite gradient norm{'s' if n_valid != 1 else ''}; "
            f"at least {cfg.min_steps} are needed to judge clipping (record or log more steps)"
        )
    notes: list[str] = []
    caveats: list[str] = []
    g = g_all[valid]
    step = s.step[valid]
    x = np.log(g)
    k, warmup_note = warmup_length(s.lr[valid], step, cfg)
    if warmup_note:
        notes.append(warmup_note)
    if n_valid < cfg.few_steps:
        caveats.append(
            f"only {n_valid} finite gradient norms ({n_valid - k} after warm-up): the verdict and the "
            f"recommendation rest on that few points, so treat them as a first estimate"
        )
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

    notes.extend(threshold_notes(s, th))
    pct = percentiles(g_s, cfg.percentiles)
    p50 = pct["p50"] if "p50" in pct else None
    verdict = judge(g_s, th, cfg, p50)
    spikes, spike_pos = find_spikes(x, level, mad, step, k, cfg)
    is_spike = np.zeros(len(x), dtype=bool)
    is_spike[spike_pos] = True
    # The recommendation's running level is that of the steady state alone: a warm-up's norms must not
    # set the level its first steady steps are measured against (spikes are found on the whole run).
    level_s = level[k:] if k == 0 else trailing_median_mad(x_s, cfg.level.window, cfg.level.stride,
                                                            cfg.level.min_periods)[0]
    rec = recommend(x_s, level_s, cfg, is_spike[k:])
    applied = th.clip_norm if th.source not in (None, "option") else None
    sit = assess(g, step, s.loss[valid], nonfinite.divergence_step, spikes.count, cfg.situation, momentum,
                 first_bad_step=nonfinite.first_unskipped_step, clipped_at=applied,
                 normalises_at=cfg.regime.always_fraction)
    if sit.clip_norm is not None:
        rec = normalising(sit, g_s)
    else:
        rec = dataclasses.replace(rec, situation=sit.name, evidence=sit.evidence)
    rec, capped = _below_failed_threshold(rec, s, th, run.meta, nonfinite, g_s, cfg)
    if capped:
        caveats.append(capped)
    dr = drift(g_s, step_s, rec.clip_norm_rounded, cfg, normalising=sit.clip_norm is not None)
    if rec.situation == "stable" and dr is not None and dr.drifting:
        way = "fell" if dr.p50_ratio < 1 else "rose"
        rec = dataclasses.replace(rec, evidence=f"{rec.evidence}; the level itself {way} "
                                                f"{max(dr.p50_ratio, 1 / dr.p50_ratio):.3g}x from early to late")
    raised = _update_growth(verdict, rec, cfg)
    if raised:
        caveats.append(raised)
    attach_layers(spikes, run.layers, rank, opt, cfg.spikes.top_layers)
    conf = assess_confidence(sit.name, g, s.loss[valid], nonfinite.divergence_step, int(step[0]), len(g_s),
                             cfg.confidence, tune_command(run.meta))
    skipped = int(s.skipped.sum())
    top = int(np.argmax(g))
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
        whole_run=WholeRun(steps=len(s), finite_steps=n_valid, min=float(g.min()), p50=float(np.median(g)),
                           max=float(g[top]), max_step=int(step[top])),
        caveats=caveats,
        confidence=conf,
    )


def _below_failed_threshold(rec: Recommendation, s: Series, th, meta: dict, nf, g_s: np.ndarray,
                            cfg: AnalysisConfig) -> tuple[Recommendation, str | None]:
    """A run that went non-finite while clipped at tau shows tau is too loose: the recommendation
    stays below it (at most tau / range_factor when it would reach tau), and so does its range."""
    if nf.divergence_step is None:
        return rec, None
    at = nf.first_unskipped_step if nf.first_unskipped_step is not None else nf.divergence_step
    tau = in_force(s, th, meta, at)
    if tau is None or (rec.clip_norm < tau and (rec.high is None or rec.high < tau)):
        return rec, None
    f = cfg.situation.range_factor
    assumed = " (assumed: the trainer's default)" if th.source == "default" and tau == th.clip_norm else ""
    if rec.clip_norm >= tau:
        new = tau / f
        rule = f"{rec.clip_norm:.4g}" + (f" ({rec.basis})" if rec.basis else "")
        rec = dataclasses.replace(rec, **_effect(g_s, new), headroom=new / rec.reference_level,
                                  low=new / f, high=new,
                                  basis=f"1/{f:g} of the max_norm {tau:g} under which the run went non-finite "
                                        f"(the rule alone gave {rule})")
        why = (f"the run went non-finite at step {at} while clipped at max_norm {tau:g}{assumed}, so a threshold at or "
               f"above {tau:g} is no fix: the recommendation is capped at {new:.4g} (1/{f:g} of it)")
    else:
        rec = dataclasses.replace(rec, high=rec.clip_norm)
        why = (f"the run went non-finite at step {at} while clipped at max_norm {tau:g}{assumed}: the range stops at the "
               f"recommendation, below {tau:g}")
    return rec, why


def _update_growth(v, rec: Recommendation, cfg: AnalysisConfig) -> str | None:
    """A looser threshold on a run that clipped most steps is an effective learning-rate increase: say so."""
    if v.regime != "always-clips" or v.mean_multiplier is None or not rec.clip_norm_rounded > v.clip_norm:
        return None
    growth = rec.mean_multiplier / v.mean_multiplier
    if not growth > 1.0:
        return None
    return (
        f"raising max_norm from {v.clip_norm:g} to {rec.clip_norm_rounded:g} makes the average update {growth:.3g}x "
        f"larger (mean update multiplier {v.mean_multiplier:.3f} -> {rec.mean_multiplier:.3f}): an effective "
        f"learning-rate increase of {growth:.3g}x. Check that the loss still falls with the larger updates (a short "
        f"`gradscope run --clip-norm {rec.clip_norm_rounded:g}`), or divide the learning rate by {growth:.3g} to "
        f"keep the update size"
    )


def _no_finite_norm(s: Series, nf, th, cfg: AnalysisConfig, cls, rank, label: str) -> OptimizerAnalysis | None:
    """Every norm is non-finite, yet the loss stays finite and falls: the updates were finite, so the logged
    norm is not the one they used. An answer without a recommendation (None when the loss does not show it)."""
    loss = s.loss[np.isfinite(s.loss)]
    if len(loss) < 3:
        return None
    third = max(1, len(loss) // 3)
    first, last = float(np.median(loss[:third])), float(np.median(loss[-third:]))
    if not last < first:
        return None
    g = s.grad_norm
    kinds = " and ".join(k for k, m in (("inf", np.isinf(g)), ("NaN", np.isnan(g))) if m.any())
    meaning = (
        f"All {len(s)} gradient norms of {label} are non-finite ({kinds}) while the loss stays finite and falls "
        f"from {first:.4g} to {last:.4g}: the updates were finite, so the logged norm is not the one they used "
        "(a norm computed in fp16 that overflowed, or before the loss scaler unscaled the gradients). Nothing here "
        "measures the gradients' size, so no threshold can be judged or recommended: log the norm after unscaling, "
        "or record the run with `gradscope run`."
    )
    sc = cfg.spikes
    return OptimizerAnalysis(
        optimizer=s.optimizer, optimizer_class=cls, rank=rank, steps=len(s), finite_steps=0,
        skipped_steps=int(s.skipped.sum()), skipped_fraction=float(s.skipped.sum()) / len(s),
        warmup_steps=0, steady_steps=0, steady_from_step=None, analysis_until_step=None,
        percentiles=percentiles(np.array([]), cfg.percentiles), threshold=th,
        verdict=Verdict(None, th.clip_norm, None, None, None, None, None, meaning),
        recommendation=None, drift=None, spikes=Spikes(0, [], sc.z_threshold, sc.min_ratio, False),
        # not a divergence: the loss shows training went on with finite updates
        nonfinite=dataclasses.replace(nf, first_kind=None, divergence_step=None),
        preset=None, notes=threshold_notes(s, th),
        whole_run=WholeRun(steps=len(s), finite_steps=0, min=None, p50=None, max=None, max_step=None),
    )
