"""Runs side by side: one row of comparable figures per run (and optimizer), and its curves.

Pure: a Run and the analyzer's RunAnalysis of it (or why there is none) in, CompareRow out.
Percentiles, the judged threshold, its clip fraction and mean update multiplier and the
situation are the analyzer's (steady state, as `recommend` reports them). The rest is
counted here on every row of the series:

- final-stretch loss: the mean (and standard deviation) of the last FINAL_FRACTION of the
  logged losses (at least one); non-finite when any of them is.
- non-finite steps: a non-finite loss, or a non-finite gradient norm the loss scaler did
  not skip (a skipped overflow applied nothing: counted under `skipped`).
- metrics: the last value of each name the script reported (metrics-r*.csv, the same rank),
  with the step it was reported after; their series for the figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FINAL_FRACTION = 0.1


@dataclass
class Curves:
    step: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray
    skipped: np.ndarray


@dataclass
class CompareRow:
    run: str                          # the path as given
    optimizer: int
    optimizer_class: str | None
    source: str                       # "gradscope" or the importer's format
    steps: int                        # rows (optimizer steps, or logged points)
    percentiles: dict[str, float]     # steady state: p50, p90, p99, max (empty: not judged)
    clip_norm: float | None           # the judged threshold
    clip_fraction: float | None       # share of steady-state steps it clips
    mean_multiplier: float | None     # mean(min(1, clip_norm / grad_norm))
    final_loss: float | None          # mean of the final stretch (None: no loss logged)
    final_loss_std: float | None
    final_steps: tuple[int, int] | None  # first and last step of the final stretch
    non_finite: int
    skipped: int
    situation: str | None
    regime: str | None
    error: str | None = None          # why the analyzer could not judge it
    norm_scope: str = "global"        # "rank-local": per-rank shard norms, no regime judged (ranks.norm_scope)
    curves: Curves | None = field(default=None, repr=False)
    metrics: dict = field(default_factory=dict)  # name -> (step, last value) reported (metrics-r*.csv)
    metric_series: dict = field(default_factory=dict, repr=False)  # name -> (steps, values)

    @property
    def label(self) -> str:
        return self.run


def final_stretch(step: np.ndarray, loss: np.ndarray, records_nan: bool) -> tuple[float | None, float | None, tuple[int, int] | None]:
    """(mean, std, (first, last step)) of the last FINAL_FRACTION of the logged losses.

    records_nan: a NaN in this series is a value (gradscope records every step's loss), not
    a gap (a foreign log's row without a loss)."""
    known = np.ones(len(loss), dtype=bool) if records_nan else ~np.isnan(loss)
    idx = np.flatnonzero(known)
    if len(idx) == 0:
        return None, None, None
    k = max(1, math.ceil(FINAL_FRACTION * len(idx)))
    tail = idx[-k:]
    values = loss[tail]
    if not np.isfinite(values).all():
        bad = values[~np.isfinite(values)]
        v = float("nan") if np.isnan(bad).any() else float("inf")
        return v, None, (int(step[tail[0]]), int(step[tail[-1]]))
    return float(values.mean()), float(values.std()), (int(step[tail[0]]), int(step[tail[-1]]))


def non_finite_steps(grad_norm: np.ndarray, loss: np.ndarray, skipped: np.ndarray, records_nan: bool) -> int:
    bad_loss = np.isinf(loss) | (np.isnan(loss) if records_nan else np.zeros(len(loss), dtype=bool))
    return int(np.count_nonzero(bad_loss | (~np.isfinite(grad_norm) & ~skipped)))


def compare_rows(label: str, run, analysis=None, error: str | None = None) -> list[CompareRow]:
    """One row per optimizer of the analysed rank (rank 0 when not analysed)."""
    from gradscope.analysis.ranks import norm_scope
    from gradscope.analysis.select import split_optimizers

    scope = norm_scope(run)
    steps = run.steps
    rank = analysis.rank if analysis is not None else None
    if rank is None and len(steps):
        ranks = steps["rank"].to_numpy()
        rank = 0 if (ranks == 0).any() else int(ranks.min())
    if len(steps):
        steps = steps[steps["rank"] == rank]
    by_opt = {o.optimizer: o for o in (analysis.optimizers if analysis is not None else [])}
    classes = {o.get("id"): o.get("class") for o in (run.meta.get("optimizers") or []) if isinstance(o, dict)}
    rows = []
    series = split_optimizers(steps, None, label) if len(steps) else []
    for s in series:
        if analysis is not None and s.optimizer not in by_opt:
            continue  # the analyzer skipped it (too few steps); its reason is in the notes
        o = by_opt.get(s.optimizer)
        # gradscope records a loss for every step of a series that has any: NaN there is a value.
        records_nan = run.source == "gradscope" and bool(np.isfinite(s.loss).any() or np.isinf(s.loss).any())
        mean, std, where = final_stretch(s.step, s.loss, records_nan)
        v = o.verdict if o is not None else None
        rows.append(CompareRow(
            run=label + (f" (optimizer {s.optimizer})" if len(series) > 1 else ""),
            optimizer=s.optimizer,
            optimizer_class=(o.optimizer_class if o is not None else None) or classes.get(s.optimizer),
            source=run.source,
            steps=len(s),
            percentiles=dict(o.percentiles) if o is not None else {},
            clip_norm=v.clip_norm if v is not None else None,
            clip_fraction=v.clip_fraction if v is not None else None,
            mean_multiplier=v.mean_multiplier if v is not None else None,
            final_loss=mean,
            final_loss_std=std,
            final_steps=where,
            non_finite=non_finite_steps(s.grad_norm, s.loss, s.skipped, records_nan),
            skipped=int(s.skipped.sum()),
            situation=o.recommendation.situation if o is not None and o.recommendation is not None else None,
            regime=v.regime if v is not None else None,
            error=error,
            curves=Curves(s.step, s.grad_norm, s.loss, s.skipped),
            norm_scope=scope,
        ))
    if rows:
        rows[0].metrics, rows[0].metric_series = _metrics_of(run, rank)
    if not rows:
        rows.append(CompareRow(label, 0, None, run.source, 0, {}, None, None, None, None, None, None, 0, 0,
                               None, None, error or "no optimizer steps"))
    return rows


def _metrics_of(run, rank) -> tuple[dict, dict]:
    """Each reported name's last (step, value) and its series, on ``rank`` (metrics-r*.csv)."""
    m = getattr(run, "metrics", None)
    if m is None or not len(m):
        return {}, {}
    m = m[m["rank"] == rank] if rank is not None else m
    last, series = {}, {}
    for name, sel in m.groupby("name", sort=False):
        steps, values = sel["step"].to_numpy(), sel["value"].to_numpy(dtype=float)
        last[name] = (int(steps[-1]), float(values[-1]))
        series[name] = (steps, values)
    return last, series
