"""Whether one pilot can tell the clip norm apart, and the `gradscope tune` command when it cannot.

A recommendation read from one unclipped run is a guess from statistics. Some runs hold
the information (norms that sit at a level: the threshold cuts the outliers), some do not.
Measured in benchmarks/advice/ (see the README's "The advice benchmark"), one pilot cannot tell:

- a run that blew up at once: the loss (or the norm) reached `early_rise` times its first
  value within `early_steps` steps, or went non-finite there. Such a pilot shows only that
  unclipped updates are too large, not by how much: runs whose pilots look alike want
  thresholds 0.45x and 1.1x their first gradient norm.
- too short a run: fewer than `min_steady_steps` steady-state steps to place a threshold in.
- a threshold outside the evidence: the recommendation (as rounded) lies above every norm the
  pilot saw after its warm-up (it would never clip there: by gradscope's own definition, dead
  code) or below every one of them (it would rescale every step). Such a number is not read
  from the pilot's norms but extrapolated past them: a tanh RNN whose pilot was `stable` (max
  11.8) got 19.3, and trained 2.08x worse than the best threshold, its instability coming later
  in training than the pilot reached.
- a run whose loss never fell, where the norms alone look fine (not a normalising situation):
  the mean of its last tenth of losses is not below the mean of its first tenth by
  `flat_loss_z` standard errors. Its norms can look perfectly `stable` (a CNN
  stuck at chance loss), but they are the norms of a run that is not learning, and say nothing
  about the threshold that lets it learn (on the benchmark's `cnn` such pilots led to thresholds
  11-20x the best).

Then the recommendation stays (it is the best guess), marked not confident, with the reasons
and the command that measures instead: `gradscope tune` on the same script.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import numpy as np

from gradscope.analysis.config import ConfidenceConfig

NORMALISING = ("unstable-needs-normalisation", "blew-up")


@dataclass(frozen=True)
class Confidence:
    confident: bool
    reasons: list[str] = field(default_factory=list)  # why not, one sentence each (empty when confident)
    tune_command: str | None = None  # what to run instead (None: confident, or no command known)


def assess_confidence(situation: str, g: np.ndarray, loss: np.ndarray, divergence_step: int | None,
                      first_step: int, steady_steps: int, cfg: ConfidenceConfig,
                      command: str | None = None, tau: float | None = None,
                      g_steady: np.ndarray | None = None, steady_points: int | None = None) -> Confidence:
    """g, loss: the finite, usable steps in order (loss may hold NaN); first_step: the step number
    of g[0]; divergence_step: first step of a non-finite end of run; command: `tune_command`'s;
    tau: the recommendation as handed out (rounded); g_steady: the steady-state norms it is placed among;
    steady_points: for a log of every k-th step, the logged points behind steady_steps (which then counts
    the optimizer steps they cover)."""
    reasons = []
    if situation in NORMALISING:
        soon = first_step + cfg.early_steps  # steps first_step .. soon are "at once"
        k = min(len(g), cfg.early_steps + 1)
        lf = loss[:k]
        rise = None
        if len(lf) and np.isfinite(lf[0]) and lf[0] > 0 and np.isfinite(lf[1:]).any():
            rise = float(np.nanmax(lf[1:] / lf[0])) if len(lf) > 1 else None
        grow = float(np.max(g[1:k] / g[0])) if k > 1 else None
        if divergence_step is not None and divergence_step <= soon:
            reasons.append(f"the pilot went non-finite at step {divergence_step}, at once: it shows that unclipped "
                           "updates are too large, not by how much")
        elif rise is not None and rise >= cfg.early_rise:
            reasons.append(f"the pilot's loss reached {rise:.3g}x its first value within {cfg.early_steps} steps: "
                           "it shows that unclipped updates are too large, not by how much")
        elif grow is not None and grow >= cfg.early_rise:
            reasons.append(f"the pilot's gradient norm reached {grow:.3g}x its first value within "
                           f"{cfg.early_steps} steps: it shows that unclipped updates are too large, not by how much")
    flat = _loss_did_not_fall(loss, cfg.flat_loss_z) if situation not in NORMALISING else None
    if flat:  # (a run that blew up or climbed is judged by how soon it did, above)
        reasons.append(flat)
    outside = outside_evidence(tau, g_steady) if tau is not None and g_steady is not None else None
    if outside:
        reasons.append(outside)
    if steady_steps < cfg.min_steady_steps:
        seen = (f"{steady_points} logged points covering {steady_steps} optimizer steps" if steady_points is not None
                else f"{steady_steps}")
        reasons.append(f"only {seen} steady-state steps (at least {cfg.min_steady_steps} are needed to "
                       "place a threshold among them)")
    if not reasons:
        return Confidence(True)
    return Confidence(False, reasons, command)


def outside_evidence(tau: float, g_steady: np.ndarray) -> str | None:
    """The reason, when tau lies outside the range of the steady-state norms (clips none or all)."""
    if not len(g_steady):
        return None
    lo, hi = float(np.min(g_steady)), float(np.max(g_steady))
    if tau >= hi:
        return (f"the rule's {tau:g} lies above every norm the pilot saw after its warm-up (max {hi:.4g}): it would "
                "never clip there, so the pilot does not show what it would cut (a pilot too short to show "
                "later instability looks like this)")
    if tau < lo:
        return (f"the rule's {tau:g} lies below every norm the pilot saw after its warm-up (min {lo:.4g}): it would "
                "rescale every step, by an amount one pilot cannot place")
    return None


def _loss_did_not_fall(loss: np.ndarray, z: float) -> str | None:
    """The reason, when the finite losses' last tenth (at least 5) is not below their first tenth
    by ``z`` standard errors of the difference; None when it fell, or too few losses to say."""
    v = loss[np.isfinite(loss)]
    w = max(5, len(v) // 10)
    if len(v) < 2 * w:
        return None
    first, last = v[:w], v[-w:]
    se = float(np.sqrt(first.var(ddof=1) / w + last.var(ddof=1) / w))
    if float(first.mean() - last.mean()) > z * se:
        return None
    return (f"the pilot's loss did not fall (mean {last.mean():.4g} over its last {w} steps, "
            f"{first.mean():.4g} over its first {w}): the norms of a run that is not learning say "
            "nothing about the threshold that lets it learn")


def tune_command(meta: dict) -> str | None:
    """`gradscope tune` for the script, module or command a gradscope run recorded (meta.json's
    `target` and `command`); None for other trainers' logs, whose command is unknown."""
    argv = meta.get("command")
    kind = meta.get("target")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    if kind == "script" and len(argv) >= 2:
        rest = argv[1:]
    elif kind == "module" and len(argv) >= 3 and argv[1] == "-m":
        rest = argv[1:]
    elif kind == "command":
        rest = ["--", *argv]
    else:
        return None
    return shlex.join(["gradscope", "tune", *rest])
