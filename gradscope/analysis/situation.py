"""Which situation a run is in, and the clip norm that situation calls for.

The headroom method (recommend.py) assumes what most runs are: norms that sit at a level
and make occasional excursions, so the right threshold cuts only the outliers. Two kinds
of run break that assumption, and on them the best threshold clips most steps, turning
clipping into gradient normalisation (measured in benchmarks/advice/):

- blew-up: the run went non-finite, or its norm ran away (the late norms are
  `runaway_ratio` times the early ones). Statistics of the blow-up itself are meaningless
  (one inf puts any percentile out of reach); the blow-up is read as evidence that
  unclipped updates are too large.
- unstable-needs-normalisation: no blow-up, but the loss climbed to `loss_rise` times its
  first value, on `rise_steps` steps or more or with norms that grew past their start:
  updates of the size the run applied made training worse.

In both, the threshold is `normalise_factor` x (1 - momentum) x the norm of the first
gradient: the update scale at which training started out sane, before the instability fed
on itself. Heavy-ball momentum m makes each update about 1/(1-m) times lr x grad, and it is
the update length the threshold must bound; the recorder stores m (1 for Adam and logs).

Otherwise the run is `spiky` (spikes were found) or `stable`, and the headroom method
stands. See the README ("The advice benchmark") for how these rules were chosen and how
they fare on seeds that were held out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.analysis.config import SituationConfig

SITUATIONS = ("stable", "spiky", "unstable-needs-normalisation", "blew-up")


@dataclass(frozen=True)
class Situation:
    name: str                     # one of SITUATIONS
    evidence: str                 # one sentence: what was seen
    clip_norm: float | None       # set when the situation overrides the headroom method
    low: float | None = None      # the range the data support for clip_norm
    high: float | None = None
    basis: str | None = None      # what clip_norm was computed from
    onset_step: int | None = None  # blew-up: where the norm left its early level
    blowup_step: int | None = None  # blew-up: first non-finite step (None: runaway, still finite)


def assess(g: np.ndarray, step: np.ndarray, loss: np.ndarray, divergence_step: int | None, spikes: int,
           cfg: SituationConfig, momentum: float | None = None, first_bad_step: int | None = None,
           clipped_at: float | None = None, normalises_at: float = 0.5) -> Situation:
    """g, step, loss: the finite, usable steps in order (loss may hold NaN where unknown);
    divergence_step: first step of a non-finite end of run (None: no such end); momentum:
    the optimizer's heavy-ball momentum, when known; first_bad_step: the first non-finite step
    no loss scaler skipped (it may precede the non-finite end: the update went on);
    clipped_at: the clip norm the run applied (None: unclipped); normalises_at: a loss rise is
    read as instability when it lasted (cfg.rise_steps steps or more at loss_rise x the first
    loss) or when the normalising threshold would clip at least this share of the steps; a
    lone noisy loss on norms that fell below their start is neither (normalising at a
    threshold that clips nothing is not what such a run shows)."""
    damp = 1.0 - momentum if momentum is not None and 0.0 <= momentum < 1.0 else 1.0
    n = len(g)
    first = float(g[0])
    tau = cfg.normalise_factor * damp * first
    basis = (f"{cfg.normalise_factor:g}"
             + (f" x (1 - momentum {momentum:g})" if damp != 1.0 else "")
             + f" x the first gradient norm {first:.4g} (step {int(step[0])})")
    low, high = tau / cfg.range_factor, tau * cfg.range_factor

    early = float(np.median(g[:min(cfg.early_steps, n)]))
    tail = g[-max(3, n // 10):]
    runaway = float(np.median(tail)) >= cfg.runaway_ratio * early
    if divergence_step is not None or runaway:
        above = np.flatnonzero(g > cfg.onset_ratio * early)
        onset_step = int(step[above[0]]) if len(above) else None
        if divergence_step is not None:
            first = first_bad_step if first_bad_step is not None and first_bad_step < divergence_step else None
            where = (f"went non-finite at step {first} and stayed non-finite from step {divergence_step}"
                     if first is not None else f"went non-finite at step {divergence_step}")
        else:
            where = f"ran away to {float(np.median(tail)):.3g} (the early level was {early:.3g})"
        evidence = f"the run {where}" + (f"; the norm left its early level of {early:.3g} at step {onset_step}"
                                         if onset_step is not None else "")
        return Situation("blew-up", evidence, tau, low, high, basis, onset_step, divergence_step)

    lf = loss[np.isfinite(loss)]
    if len(lf) >= 2 and lf[0] > 0:
        worst = int(np.argmax(lf))
        if lf[worst] >= cfg.loss_rise * lf[0]:
            at = int(step[np.flatnonzero(np.isfinite(loss))[worst]])
            climbed = (f"the loss climbed to {lf[worst]:.4g} at step {at}, {lf[worst] / lf[0]:.3g}x its first value "
                       f"{lf[0]:.4g}")
            share = float(np.mean(g > tau))
            lasted = int(np.count_nonzero(lf >= cfg.loss_rise * lf[0]))
            if share >= normalises_at or lasted >= cfg.rise_steps:
                how = ("unclipped updates" if clipped_at is None
                       else f"updates of the size it applied (clipped at max_norm {clipped_at:g})")
                return Situation("unstable-needs-normalisation", f"{climbed}: {how} made training worse",
                                 tau, low, high, basis)
            calm = (f"{climbed}, on {lasted} step{'s' if lasted != 1 else ''} only, and the normalising threshold "
                    f"{tau:.3g} ({basis}) would clip only {share:.0%} of the steps: the norms did not grow past their "
                    "start, so that is not read as instability")
            return Situation("spiky" if spikes else "stable", calm if not spikes else
                             f"{spikes} spike{'s' if spikes != 1 else ''} above the recent level; {calm}", None)
    if spikes:
        return Situation("spiky", f"{spikes} spike{'s' if spikes != 1 else ''} above the recent level", None)
    return Situation("stable", "no step stood far above the recent level and the loss never climbed far above "
                               "its start", None)
