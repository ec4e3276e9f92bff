"""analyze(run) -> RunAnalysis: one verdict and recommendation per optimizer of one rank."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from gradscope.analysis.audit import errors as audit_errors, findings as audit_findings
from gradscope.analysis.advice import advise, normalises_update, status_line
from gradscope.analysis.confidence import Confidence, assess_confidence, tune_command
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
from gradscope.analysis.ranks import RANK_LOCAL_NOTE, compared_steps, disagreement_note, missing_ranks, norm_scope
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
    rank_local = norm_scope(run) == "rank-local"
    notes = _recording_notes(run, rank_local)
    if len(ranks) > 1:
        notes.append(_ranks_note(steps, chosen, ranks, cfg.ranks.rtol, rank_local))
        steps = steps[steps["rank"] == chosen]
    notes.extend(_coverage_notes(run, steps))
    if not np.isfinite(steps["grad_norm"].to_numpy(dtype=float)).any() and steps["grad_norm"].isna().all():
        raise GradscopeError(f"'{where}' has no gradient norms (the grad_norm column is empty)")

    results, problems = _analyze_optimizers(run, steps, chosen, cfg, clip_norm, pre, optimizer)
    notes.extend(f"skipped: {p}" for p in problems)
    found = [f for f in audit_findings(run, rank=chosen) if optimizer is None or f.optimizer == optimizer]
    notes.extend(audit_errors(run, rank=chosen))
    results = _finish_optimizers(results, found, rank_local, failed=run.source == "gradscope"
                                 and run.meta.get("status") == "failed")
    head = status_line(run.meta.get("status"), run.meta.get("exit_code"), run.meta.get("signal"), len(steps)) \
        if run.source == "gradscope" else None
    return RunAnalysis(
        path=where, source=run.source, rank=chosen, ranks=ranks, sampled=bool(run.meta.get("sampled")),
        optimizers=results, notes=notes, status=run.meta.get("status"), findings=found, status_line=head,
    )


def _recording_notes(run, rank_local: bool) -> list[str]:
    """The importer's notes, what the recording is missing (first), and rank-local norms."""
    notes = [str(n) for n in (run.meta.get("notes") or [])]
    if run.source == "gradscope" and run.meta.get("incomplete"):  # first: what the recording is missing
        notes.insert(0, "incomplete recording: " + "; ".join(map(str, run.meta["incomplete"])))
    if rank_local:
        notes.append(RANK_LOCAL_NOTE)
    return notes


def _ranks_note(steps, chosen: int, ranks: list[int], rtol: float, rank_local: bool) -> str:
    """Whether the ranks' norms agree, and which rank is judged."""
    note = disagreement_note(steps, chosen, rtol, sharded=rank_local)
    shared = compared_steps(steps)
    return note or (
        f"{len(ranks)} ranks agree within {rtol:g} (relative) on the {shared} steps they share; "
        f"judging rank {chosen}" if shared else
        f"ranks {', '.join(map(str, ranks))} were not compared: no step was recorded by two replica ranks "
        f"(a rank numbered 1000 or above is a second process recorded as the same rank); judging rank {chosen}")


def _coverage_notes(run, steps) -> list[str]:
    """What the judged steps cover: a run still being recorded, ranks that recorded nothing, a
    `gradscope run --clip-norm` override, a log of every k-th step."""
    notes = []
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
    if run.meta.get("sampled"):
        notes.append(
            "the log holds only every k-th step: percentiles, clip fractions and spikes are estimates from the "
            "logged steps, and a spike between two logged steps is invisible"
        )
    return notes


def _analyze_optimizers(run, steps, chosen: int, cfg: AnalysisConfig, clip_norm: float | None,
                        pre: Preset | None, optimizer: int | None) -> tuple[list[OptimizerAnalysis], list[str]]:
    """Each optimizer's analysis, and why any could not be judged (an error when none could)."""
    where = str(run.path)
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
    return results, problems


def _finish_optimizers(results: list[OptimizerAnalysis], found: list, rank_local: bool,
                       failed: bool) -> list[OptimizerAnalysis]:
    """Each optimizer's audit findings and the one line to act on (none for rank-local norms)."""
    for o in results:
        o.findings = [f for f in found if f.optimizer == o.optimizer]
    if rank_local:  # per-rank shard norms: no regime, no threshold, so no keep/change line either
        results = [_per_rank_only(o) for o in results]
    for o in results:
        o.advice = None if rank_local else advise(o, failed=failed)
    return results


def _per_rank_only(o: OptimizerAnalysis) -> OptimizerAnalysis:
    """Rank-local norms (norm_scope): keep the per-rank figures, judge no regime, recommend nothing."""
    v = o.verdict
    return dataclasses.replace(
        o, verdict=Verdict(None, v.clip_norm if v is not None else None, None, None, None, None, None,
                           RANK_LOCAL_NOTE[0].upper() + RANK_LOCAL_NOTE[1:] + "."),
        recommendation=None, drift=None, preset=None, caveats=[], confidence=None, norm_scope="rank-local")


def _origin_of(run, rank: int | None, optimizer: int):
    from gradscope.analysis.origin import nan_origin

    o = nan_origin(run, rank) if run.source == "gradscope" else None
    return o if o is not None and o.optimizer == optimizer else None


@dataclass
class _Usable:
    """One series' usable steps (finite, positive, not skipped) and, after the first k (warm-up), its
    steady state."""

    g: np.ndarray        # grad norms
    step: np.ndarray
    loss: np.ndarray
    k: int               # warm-up steps left out of the steady state

    @property
    def x(self) -> np.ndarray:
        return np.log(self.g)

    @property
    def g_s(self) -> np.ndarray:
        return self.g[self.k:]

    @property
    def step_s(self) -> np.ndarray:
        return self.step[self.k:]


def _analyze_series(
    s: Series, run, rank: int | None, cfg: AnalysisConfig, clip_norm: float | None, pre: Preset | None, cls,
    label: str, momentum: float | None = None,
) -> OptimizerAnalysis:
    bad, valid, nonfinite = classify_steps(s)
    nonfinite.origin = _origin_of(run, rank, s.optimizer)
    n_valid = int(valid.sum())
    th = resolve_threshold(s, clip_norm, run.meta)
    blind = _too_few_norms(s, str(run.path), nonfinite, th, cfg, cls, rank, label, n_valid)
    if blind is not None:
        return blind
    k, warmup_note = warmup_length(s.lr[valid], s.step[valid], cfg)
    u = _Usable(s.grad_norm[valid], s.step[valid], s.loss[valid], k)
    notes = _series_notes(s, bad, nonfinite, n_valid, warmup_note, th)
    caveats = _few_steps_caveat(n_valid, k, cfg)
    pct = percentiles(u.g_s, cfg.percentiles)
    p50 = pct["p50"] if "p50" in pct else None
    adam = normalises_update(cls)
    verdict = judge(u.g_s, th, cfg, p50, adam=adam)
    level, mad = trailing_median_mad(u.x, cfg.level.window, cfg.level.stride, cfg.level.min_periods)
    spikes, spike_pos = find_spikes(u.x, level, mad, u.step, k, cfg)
    rec, sit = _steady_recommendation(u, level, spike_pos, spikes.count, nonfinite, th, cfg, momentum)
    rec, capped = _below_failed_threshold(rec, s, th, run.meta, nonfinite, u.g_s, cfg)
    dr = drift(u.g_s, u.step_s, rec.clip_norm_rounded, cfg, normalising=sit.clip_norm is not None, adam=adam)
    rec = _with_drift_evidence(rec, dr)
    raised = _update_growth(verdict, rec, cfg) if not adam else None
    caveats += [c for c in (capped, raised) if c]
    attach_layers(spikes, run.layer_norms, rank, s.optimizer, cfg.spikes.top_layers)
    conf, covered = _confidence(run, u, sit.name, nonfinite, rec, cfg)
    skipped = int(s.skipped.sum())
    top = int(np.argmax(u.g))
    return OptimizerAnalysis(
        optimizer=s.optimizer, optimizer_class=cls, rank=rank, steps=len(s), finite_steps=n_valid,
        skipped_steps=skipped, skipped_fraction=skipped / len(s), warmup_steps=k, steady_steps=len(u.g_s),
        steady_from_step=int(u.step_s[0]), analysis_until_step=nonfinite.divergence_step, percentiles=pct,
        threshold=th, verdict=verdict, recommendation=rec, drift=dr, spikes=spikes, nonfinite=nonfinite,
        preset=compare_preset(pre, rec, u.g_s, p50, adam=adam) if pre is not None else None,
        notes=notes,
        whole_run=WholeRun(steps=len(s), finite_steps=n_valid, min=float(u.g.min()), p50=float(np.median(u.g)),
                           max=float(u.g[top]), max_step=int(u.step[top])),
        caveats=caveats, confidence=conf, adam_family=adam, steady_optimizer_steps=covered,
    )


def _too_few_norms(s: Series, where: str, nonfinite, th, cfg: AnalysisConfig, cls, rank: int | None, label: str,
                   n_valid: int) -> OptimizerAnalysis | None:
    """None when the series has enough finite norms to judge; else the answer for a series whose every
    norm is non-finite while its loss falls, or a GradscopeError saying why there is nothing to judge."""
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
    return None


def _series_notes(s: Series, bad: np.ndarray, nonfinite, n_valid: int, warmup_note: str | None, th) -> list[str]:
    """The warm-up, a divergence that cut the run short, zero norms left out, and the threshold's notes."""
    notes = [warmup_note] if warmup_note else []
    if nonfinite.first_kind == DIVERGENCE or nonfinite.divergence_step is not None:
        notes.append(
            f"the run diverged at step {nonfinite.divergence_step} (non-finite to the end): every figure uses the "
            f"{n_valid} finite steps before it"
        )
    zero = int(np.count_nonzero(~bad & ~s.skipped & (s.grad_norm == 0)))
    if zero:
        notes.append(f"{zero} steps had a zero gradient norm (nothing to clip); left out")
    notes.extend(threshold_notes(s, th))
    return notes


def _few_steps_caveat(n_valid: int, k: int, cfg: AnalysisConfig) -> list[str]:
    if n_valid >= cfg.few_steps:
        return []
    return [f"only {n_valid} finite gradient norms ({n_valid - k} after warm-up): the verdict and the "
            f"recommendation rest on that few points, so treat them as a first estimate"]


def _steady_recommendation(u: _Usable, level: np.ndarray, spike_pos, spike_count: int, nonfinite, th,
                           cfg: AnalysisConfig, momentum: float | None):
    """(the recommendation, the situation that chose its method) from the steady-state norms."""
    is_spike = np.zeros(len(u.g), dtype=bool)
    is_spike[spike_pos] = True
    x_s = u.x[u.k:]
    # The recommendation's running level is that of the steady state alone: a warm-up's norms must not
    # set the level its first steady steps are measured against (spikes are found on the whole run).
    level_s = level[u.k:] if u.k == 0 else trailing_median_mad(x_s, cfg.level.window, cfg.level.stride,
                                                                cfg.level.min_periods)[0]
    rec = recommend(x_s, level_s, cfg, is_spike[u.k:])
    applied = th.clip_norm if th.source not in (None, "option") else None
    sit = assess(u.g, u.step, u.loss, nonfinite.divergence_step, spike_count, cfg.situation, momentum,
                 first_bad_step=nonfinite.first_unskipped_step, clipped_at=applied,
                 normalises_at=cfg.regime.always_fraction)
    if sit.clip_norm is not None:
        return normalising(sit, u.g_s), sit
    return dataclasses.replace(rec, situation=sit.name, evidence=sit.evidence), sit


def _with_drift_evidence(rec: Recommendation, dr) -> Recommendation:
    """A stable run whose level drifted: the evidence says which way and how far."""
    if rec.situation == "stable" and dr is not None and dr.drifting:
        way = "fell" if dr.p50_ratio < 1 else "rose"
        return dataclasses.replace(rec, evidence=f"{rec.evidence}; the level itself {way} "
                                                 f"{max(dr.p50_ratio, 1 / dr.p50_ratio):.3g}x from early to late")
    return rec


def _confidence(run, u: _Usable, situation: str, nonfinite, rec: Recommendation,
                cfg: AnalysisConfig) -> tuple[Confidence, int]:
    """(whether one pilot can tell, the optimizer steps the steady state covers)."""
    failed = run.source == "gradscope" and run.meta.get("status") == "failed"
    # A step is an optimizer step: a log of every k-th one covers more steps than it has points.
    covered, points = steady_optimizer_steps(u.step_s, bool(run.meta.get("sampled"))), None
    if covered != len(u.g_s):
        points = len(u.g_s)
    conf = assess_confidence(situation, u.g, u.loss, nonfinite.divergence_step, int(u.step[0]), covered,
                             cfg.confidence, None if failed else tune_command(run.meta),
                             tau=rec.clip_norm_rounded, g_steady=u.g_s, steady_points=points)
    if failed:  # no tune command: it would repeat the arguments that made the script fail
        conf = Confidence(False, [f"the run's script failed (exit code {run.meta.get('exit_code')}): its norms are "
                                  "not those of a working training", *conf.reasons], None)
    return conf, covered


def steady_optimizer_steps(step_s: np.ndarray, sampled: bool) -> int:
    """The optimizer steps the steady state covers: its rows, or for a log of every k-th step (whose
    step numbers are optimizer steps) the span they cover, one stride past the last logged point."""
    n = len(step_s)
    if not sampled or n < 2:
        return n
    stride = float(np.median(np.diff(step_s)))
    return max(n, int(round(float(step_s[-1] - step_s[0]) + stride)))


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
