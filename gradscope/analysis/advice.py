"""The one line a user acts on (keep, change, add or tune the clip norm), the run's status line, and
which optimizers normalise their update by a second moment (where clipping is no learning-rate cut).

Pure functions of an analysis: `recommend` prints `advice.line` first, `--json` gives `action`.

Actions (JSON `action`):
- keep    the run's threshold lies in the range the data support (or rounds to the recommendation)
- change  the run's threshold lies outside that range: the recommendation, and why
- add     the run does not clip, and one pilot can place a threshold
- remove  reserved: one run never shows that no clipping is best, so `recommend` does not give it
- tune    one run cannot tell (not confident): measure with `gradscope tune`
- null    no advice: no finite norm to judge, or the run's script failed
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ACTIONS = ("keep", "change", "add", "remove", "tune")

# Optimizers whose update is divided by a running second moment of the gradient (Adam and its
# relatives, fused/foreach/8-bit/paged variants included, RMSprop, Adagrad, Adadelta, Adafactor, LAMB):
# scaling the gradient by c does not scale the update by c there, so the SGD algebra of a clip
# (the update shrinks by min(1, tau/|g|), "a learning-rate cut") is false for them.
_SECOND_MOMENT = re.compile(r"adam|rmsprop|adagrad|adadelta|adafactor|lamb|lion|sophia|came", re.IGNORECASE)


def normalises_update(optimizer_class: str | None) -> bool:
    """True for an optimizer that normalises its update by a second moment (by its class name)."""
    return bool(optimizer_class) and bool(_SECOND_MOMENT.search(str(optimizer_class)))


ADAM_CLIP = ("clipping caps the gradient fed into the moment estimates; the update is normalised by the "
             "second moment, so it is not scaled by max_norm / norm (no learning-rate cut)")


@dataclass(frozen=True)
class Advice:
    action: str | None   # one of ACTIONS, or None (no advice)
    line: str            # the first line of the report: what to do, and why in a few words


def status_line(status: str | None, exit_code, signal_name, steps: int) -> str | None:
    """The run's status, when it is not a clean end: failed, interrupted, killed or still running."""
    held = f"{steps} optimizer step{'s' if steps != 1 else ''} recorded"
    if status == "failed":
        code = f" (exit code {exit_code})" if exit_code is not None else ""
        return (f"the run FAILED{code} after {held}: the script's error ended it, so nothing below is advice "
                "for a working training; fix the failure and record it again")
    if status == "interrupted":
        return f"the run was INTERRUPTED ({signal_name or 'Ctrl-C'}) after {held}: the figures below read those only"
    if status == "killed":
        return (f"the run was KILLED{f' ({signal_name})' if signal_name else ''} after {held}: the figures below "
                "read those only")
    if status == "running":
        return f"the run is STILL RUNNING: {held} so far; the figures below read those only"
    return None


def advise(o, failed: bool = False) -> Advice:
    """The verdict line of one optimizer's analysis (model.OptimizerAnalysis)."""
    r, v, c = o.recommendation, o.verdict, o.confidence
    if failed:
        return Advice(None, "no advice: the run's script failed; fix the failure and record the run again")
    if r is None:
        return Advice(None, "no advice: no finite gradient norm to base a threshold on (see below)")
    if c is not None and not c.confident:
        why = c.reasons[0] if c.reasons else "one run cannot tell the threshold"
        return Advice("tune", f"run gradscope tune: {why}")
    new = r.clip_norm_rounded
    tau = v.clip_norm
    if tau is None:
        return Advice("add", f"add clipping at max_norm = {new:g}: {_why_add(r)}")
    lo, hi = r.low, r.high
    inside = (lo is not None and hi is not None and min(lo, hi) <= tau <= max(lo, hi)) or f"{tau:g}" == f"{new:g}"
    if inside:
        span = f"{lo:.3g} to {hi:.3g}" if lo is not None else f"{new:g}"
        return Advice("keep", f"keep max_norm = {tau:g}: it lies in the range the data support ({span}; "
                              f"it clips {v.clip_fraction:.1%} of steady-state steps)")
    return Advice("change", f"change max_norm {tau:g} \u2192 {new:g}: {_why_change(o)}")


_SIT = {"blew-up": "blew up", "unstable-needs-normalisation": "grew unstable (its loss climbed)"}


def _why_add(r) -> str:
    if r.situation in ("blew-up", "unstable-needs-normalisation"):
        return f"unclipped, the run {_SIT[r.situation]}; this threshold clips {r.clip_fraction:.0%} of its steps"
    if r.situation == "spiky":
        return f"it cuts the {r.clipped_steps} spike-sized steps ({r.clip_fraction:.1%}) and lets the rest through"
    return f"it cuts the largest {r.clip_fraction:.1%} of steady-state steps ({r.clipped_steps}) and lets the rest through"


def _why_change(o) -> str:
    r, v = o.recommendation, o.verdict
    now = f"{v.clip_norm:g} clips {v.clip_fraction:.1%} of steady-state steps"
    then = f"{r.clip_norm_rounded:g} would clip {r.clip_fraction:.1%}"
    if v.regime == "never-clips":
        return f"{v.clip_norm:g} never clips after warm-up (dead code); {then}, the outliers"
    if r.situation in ("blew-up", "unstable-needs-normalisation"):
        return f"{now}, and the run {_SIT[r.situation]}; {then}"
    if v.regime == "always-clips":
        return f"{now}: clipping has become gradient normalisation; {then}, the outliers only"
    if v.clip_norm < r.clip_norm_rounded:
        return f"{now}, ordinary large steps as well as outliers; {then}, the outliers only"
    return f"{now}, fewer than the outliers; {then}"
