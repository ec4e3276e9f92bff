"""The CI gate behind `gradscope check`: non-finite steps and policy rules -> pass/fail verdicts.

Pure functions: a Run (plus the analyzer's per-optimizer facts) in, dataclasses out.
How a verdict looks (plain lines, GitHub annotations, JUnit XML) is report/ci.py's job.

A step fails the non-finite check when its loss is inf/NaN, or when its gradient
norm is inf/NaN and no loss scaler absorbed it (a GradScaler that skipped the
update applied nothing: that is the scaler working, not a failure).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from gradscope.analysis import audit
from gradscope.analysis.model import REGIMES
from gradscope.analysis.ranks import RANK_LOCAL_NOTE, disagreement_note, norm_scope
from gradscope.errors import GradscopeError

# --fail-on names that are rules of their own, not regimes.
LOSS_DIVERGENCE = "divergence"  # the loss rose far above its running minimum and stayed (analysis/divergence.py)
CLIP_BUGS = "clip-bugs"  # fail on any finding of the clip audit (analysis/audit.py)
# The recording misses steps or files (rundir.recording_gaps): killed, a full disk, a cut or unreadable file.
INCOMPLETE = "incomplete"
SCRIPT_FAILED = "script-failed"  # the recorded script exited with an error (meta.json status "failed")
# Rules a --fail-on flag does not turn off when the config file has them on: an incomplete run, or
# one whose script failed, is never a PASS, whatever other rule is asked for (a config file without
# them turns them off).
KEPT_BY_FLAGS = (INCOMPLETE, SCRIPT_FAILED)
FAIL_ON_RULES = (LOSS_DIVERGENCE, CLIP_BUGS, INCOMPLETE, SCRIPT_FAILED)
POLICY_FILE = "check.yaml"
# Policy keys as written in YAML (dashes and underscores both accepted) -> Policy fields.
_POLICY_KEYS = {
    "fail_on": "fail_on",
    "max_clip_fraction": "max_clip_fraction",
    "max_spikes": "max_spikes",
    "max_skipped_fraction": "max_skipped_fraction",
    "divergence_factor": "divergence_factor",
    "divergence_steps": "divergence_steps",
}
MAX_LAYERS_LISTED = 5
GROWTH_ROWS = 4096  # finite layer rows before a bad step that a growth is judged against

PASS, FAIL, SKIP = "pass", "fail", "skipped"


@dataclass(frozen=True)
class Policy:
    """Optional rules on top of the non-finite check; None / () turns a rule off."""

    fail_on: tuple[str, ...] = ()
    max_clip_fraction: float | None = None
    max_spikes: int | None = None
    max_skipped_fraction: float | None = None
    divergence_factor: float = 2.0   # --fail-on divergence: the loss above this x its running minimum...
    divergence_steps: int = 20       # ...for this many logged steps in a row


@dataclass
class SeriesFacts:
    """What the analyzer concluded about one optimizer's series (one rank)."""

    rank: int
    optimizer: int
    regime: str | None = None
    clip_fraction: float | None = None
    clip_norm: float | None = None
    spikes: int | None = None


@dataclass
class CheckNonFinite:
    """The first step that went bad, and how much of the run did."""

    rank: int
    optimizer: int
    optimizer_class: str | None
    step: int
    quantity: str  # "loss", "gradient" or "loss and gradient"
    loss: float
    grad_norm: float
    bad_steps: int  # failing steps in the whole run
    absorbed_steps: int  # non-finite gradients a loss scaler skipped (not failures)
    layers: list[str] = field(default_factory=list)  # non-finite layers, inf before nan
    layers_total: int = 0  # layers recorded at layers_step
    layers_step: int | None = None
    # Just before: the layers whose norm had grown most over their own median,
    # (name, norm, step, norm / median of that layer's earlier norms).
    growing: list[tuple[str, float, int, float]] = field(default_factory=list)
    multi_rank: bool = False
    multi_optimizer: bool = False
    origin: Any = None  # analysis.origin.Origin recorded by --trace-nan, or None
    trace_hint: str | None = None  # without --trace-nan: the command that would find the origin

    @property
    def where(self) -> str:
        opt = f"optimizer {self.optimizer}" + (f" {self.optimizer_class}" if self.optimizer_class else "")
        rank = f", rank {self.rank}" if self.multi_rank else ""
        return f"step {self.step} ({opt}{rank})"


SAMPLED = "sampled"  # meta key of a foreign log that holds every k-th step only (meta "logging_steps": k)


@dataclass(frozen=True)
class BlindSpot:
    """Something a foreign log cannot show the non-finite check (report/ci.py says it in words)."""

    flag: str  # rundir.NAN_LOSSES_DROPPED, rundir.NORMS_UNTRUSTED, rundir.SHARDED_TRAINING or SAMPLED
    logging_steps: int | None = None  # SAMPLED: the log holds every k-th step (None: k not known)


@dataclass
class CheckResult:
    """One check as CI sees it: a JUnit testcase, a line, an annotation."""

    name: str  # "non-finite", "fail-on", "clip-bugs", "max-clip-fraction", "max-spikes", "max-skipped-fraction"
    status: str  # PASS, FAIL or SKIP
    message: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class CheckVerdict:
    checks: list[CheckResult]
    non_finite: CheckNonFinite | None
    notes: list[str] = field(default_factory=list)  # rank-local norms, the audit's errors, divergence notes, ...
    steps: int = 0
    divergence: Any = None  # analysis.divergence.Divergence when --fail-on divergence found one

    @property
    def first_bad(self) -> tuple[int, int, int, str] | None:
        """(rank, optimizer, step, what) of the earliest failing step: non-finite or diverging."""
        cands = []
        if self.non_finite is not None:
            nf = self.non_finite
            cands.append((nf.step, nf.rank, nf.optimizer, f"non-finite {nf.quantity}"))
        if self.divergence is not None:
            d = self.divergence
            cands.append((d.step, d.rank, d.optimizer, "loss diverging"))
        if not cands:
            return None
        step, rank, opt, what = min(cands)
        return rank, opt, step, what
    findings: list = field(default_factory=list)  # the clip audit's (analysis/audit.py Finding): warnings
    blind_spots: list[BlindSpot] = field(default_factory=list)  # what the input cannot show (said before notes)

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


# ---------------------------------------------------------------- policy (YAML + flags)


def parse_fail_on(value: str | Iterable[str] | None, where: str = "--fail-on") -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        name = str(item).strip().lower().replace("_", "-")
        if not name:
            continue
        if name not in REGIMES and name not in FAIL_ON_RULES:
            raise GradscopeError(
                f"{where}: unknown regime '{item}' (choose from: {', '.join(REGIMES + FAIL_ON_RULES)})"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _number(value: Any, key: str, where: str, *, integer: bool = False, fraction: bool = False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GradscopeError(f"'{where}': {key} must be a number, got {value!r}")
    if integer and value != int(value):
        raise GradscopeError(f"'{where}': {key} must be a whole number, got {value!r}")
    if value < 0 or (fraction and value > 1):
        bound = "between 0 and 1" if fraction else "0 or more"
        raise GradscopeError(f"'{where}': {key} must be {bound}, got {value!r}")
    return int(value) if integer else float(value)


def policy_from_mapping(data: Any, where: str) -> Policy:
    """A Policy from a parsed YAML mapping; unknown keys and bad values are errors naming the file."""
    if data is None:
        return Policy()
    if not isinstance(data, dict):
        raise GradscopeError(f"'{where}': a check config must be a mapping (keys: {', '.join(_POLICY_KEYS)})")
    norm = {}
    for k, v in data.items():
        key = str(k).strip().replace("-", "_")
        if key not in _POLICY_KEYS:
            raise GradscopeError(
                f"'{where}': unknown setting '{k}' (valid: {', '.join(k.replace('_', '-') for k in _POLICY_KEYS)})"
            )
        norm[key] = v
    fail_on = norm.get("fail_on")
    if fail_on is not None and not isinstance(fail_on, (str, list)):
        raise GradscopeError(f"'{where}': fail-on must be a list of regimes, got {fail_on!r}")
    return Policy(
        fail_on=parse_fail_on(fail_on, f"'{where}': fail-on"),
        max_clip_fraction=_number(norm.get("max_clip_fraction"), "max-clip-fraction", where, fraction=True),
        max_spikes=_number(norm.get("max_spikes"), "max-spikes", where, integer=True),
        max_skipped_fraction=_number(norm.get("max_skipped_fraction"), "max-skipped-fraction", where, fraction=True),
        **_divergence_settings(norm, where),
    )


def _divergence_settings(norm: dict, where: str) -> dict:
    out = {}
    k = _number(norm.get("divergence_factor"), "divergence-factor", where)
    if k is not None:
        if k <= 1:
            raise GradscopeError(f"'{where}': divergence-factor must be more than 1, got {k!r}")
        out["divergence_factor"] = k
    m = _number(norm.get("divergence_steps"), "divergence-steps", where, integer=True)
    if m is not None:
        if m < 1:
            raise GradscopeError(f"'{where}': divergence-steps must be 1 or more, got {m!r}")
        out["divergence_steps"] = m
    return out


def load_policy(path: str | os.PathLike | None = None) -> Policy:
    """configs/check.yaml (shipped with gradscope), or the user's file instead of it."""
    from gradscope.analysis.config import read_yaml

    data, where = read_yaml(path, POLICY_FILE)
    return policy_from_mapping(data, where)


def override(policy: Policy, **flags: Any) -> Policy:
    """Flags given on the command line win over the file; None means 'not given'."""
    from dataclasses import replace

    given = {k: v for k, v in flags.items() if v is not None}
    if "fail_on" in given:
        kept = tuple(r for r in policy.fail_on if r in KEPT_BY_FLAGS and r not in given["fail_on"])
        given["fail_on"] = kept + tuple(given["fail_on"])
    div = {k.replace("_", "-"): given[k] for k in ("divergence_factor", "divergence_steps") if k in given}
    for key, value in div.items():  # the same bounds as in the YAML file
        _divergence_settings({key.replace("-", "_"): value}, f"--{key}")
    return replace(policy, **given)


# ---------------------------------------------------------------- non-finite


def _finite(x: float) -> bool:
    return x == x and not math.isinf(x)


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"


def _optimizer_class(meta: dict, opt_id: int) -> str | None:
    for o in meta.get("optimizers", []) or []:
        if isinstance(o, dict) and o.get("id") == opt_id:
            return o.get("class")
    return None


def _any_loss(steps) -> bool:
    from gradscope.analysis.bad_steps import loss_recorded

    return bool(loss_recorded(steps).any())


def _bad_masks(steps, source: str):
    """(bad loss, bad gradient, absorbed) boolean arrays over the steps table (analysis/bad_steps.py)."""
    from gradscope.analysis.bad_steps import bad_steps

    b = bad_steps(steps, source)
    return b.loss, b.gradient, b.absorbed


def find_non_finite(run) -> CheckNonFinite | None:
    """The first failing step (by wall-clock time when known, else by step), or None."""
    import numpy as np

    steps = run.steps
    if steps is None or len(steps) == 0:
        return None
    bad_loss, bad_grad, absorbed = _bad_masks(steps, run.source)
    bad = bad_loss | bad_grad
    if not bad.any():
        return None
    idx = np.flatnonzero(bad)
    times = steps["time"].to_numpy(dtype=float)[idx]
    if np.isfinite(times).all():
        order = np.lexsort((steps["step"].to_numpy()[idx], times))
    else:
        order = np.lexsort((steps["rank"].to_numpy()[idx], steps["optimizer"].to_numpy()[idx], steps["step"].to_numpy()[idx]))
    i = int(idx[order[0]])
    row = steps.iloc[i]
    quantity = " and ".join(q for q, m in (("loss", bad_loss), ("gradient", bad_grad)) if m[i])
    rank, opt, step = int(row["rank"]), int(row["optimizer"]), int(row["step"])
    nf = CheckNonFinite(
        rank=rank,
        optimizer=opt,
        optimizer_class=_optimizer_class(run.meta, opt),
        step=step,
        quantity=quantity,
        loss=float(row["loss"]),
        grad_norm=float(row["grad_norm"]),
        bad_steps=int(bad.sum()),
        absorbed_steps=int(absorbed.sum()),
        multi_rank=steps["rank"].nunique() > 1,
        multi_optimizer=steps["optimizer"].nunique() > 1,
    )
    _attach_layers(nf, run, steps, bad)
    _attach_origin(nf, run)
    return nf


def _attach_origin(nf: CheckNonFinite, run) -> None:
    from gradscope.analysis.origin import nan_origin, trace_command, traced

    if run.source != "gradscope":
        nf.trace_hint = "gradscope run --trace-nan train.py ..."
        return
    nf.origin = nan_origin(run, nf.rank)
    if nf.origin is None and not traced(run, nf.rank):
        nf.trace_hint = trace_command(run)


def _attach_layers(nf: CheckNonFinite, run, steps, bad) -> None:
    """Layers non-finite at the first bad step, else at the earliest recorded step where any was.

    Reads the layer rows from the bad step on, a block at a time, until a non-finite one, and
    the few finite rows before it: on a long run the rest of the layer store is never read."""
    import numpy as np

    store = run.layer_norms
    key = (nf.rank, nf.optimizer)
    if key not in store.series():
        return
    names = store.names(*key)
    if not names:
        return
    # Steps a scaler skipped have inf layers by design: they are not where it went wrong.
    mine = (steps["rank"].to_numpy() == nf.rank) & (steps["optimizer"].to_numpy() == nf.optimizer)
    absorbed = mine & steps["skipped"].to_numpy(dtype=bool) & ~bad
    all_at = store.steps(*key)
    usable = ~np.isin(all_at, steps["step"].to_numpy()[absorbed])
    start = int(np.searchsorted(all_at, nf.step)) if (np.diff(all_at) >= 0).all() else 0
    j = row = None
    for first, values in store.chunks(*key, start=start):
        at = all_at[first:first + len(values)]
        any_bad = ~np.isfinite(values).all(axis=1) & usable[first:first + len(values)] & (at >= nf.step)
        if not any_bad.any():
            continue
        exact = np.flatnonzero(any_bad & (at == nf.step))
        k = int(exact[0]) if len(exact) else int(np.flatnonzero(any_bad)[np.argmin(at[any_bad])])
        if j is None or at[k] < all_at[j]:
            j, row = first + k, values[k]
        if len(exact):
            break
    if j is None:
        return
    inf_first = [n for n, v in zip(names, row) if np.isinf(v)] + [n for n, v in zip(names, row) if np.isnan(v)]
    nf.layers = inf_first
    nf.layers_total = len(names)
    nf.layers_step = int(all_at[j])
    _attach_growth(nf, store, key, names, all_at, usable)


def _attach_growth(nf: CheckNonFinite, store, key, names, all_at, usable) -> None:
    """The layers whose norm grew most into the last finite row before the bad one, against their
    median over the finite rows before that (the last GROWTH_ROWS of them: a bounded read)."""
    import numpy as np

    cand = np.flatnonzero((all_at < nf.layers_step) & usable)
    before, before_at = np.zeros((0, len(names))), np.zeros(0, dtype=np.int64)
    while len(cand) and len(before) < GROWTH_ROWS:  # read from the end, a block at a time
        take, cand = cand[-GROWTH_ROWS:], cand[:-GROWTH_ROWS]
        vals = store.rows(*key, take)
        ok = np.isfinite(vals).all(axis=1)
        before, before_at = np.concatenate([vals[ok], before]), np.concatenate([all_at[take][ok], before_at])
    before, before_at = before[-GROWTH_ROWS:], before_at[-GROWTH_ROWS:]
    if len(before) >= 2:
        last = before[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            growth = last / np.median(before[:-1], axis=0)
        growth = np.where(np.isfinite(growth), growth, 0.0)
        top = np.argsort(-growth)[:3]
        nf.growing = [
            (names[k], float(last[k]), int(before_at[-1]), float(growth[k])) for k in top if growth[k] > 1.5
        ]


def describe_non_finite(nf: CheckNonFinite) -> str:
    """One line naming the step, the quantity that went bad, and the layers."""
    text = f"{nf.quantity} went non-finite at {nf.where}: loss {_fmt(nf.loss)}, grad_norm {_fmt(nf.grad_norm)}"
    if nf.layers:
        shown = nf.layers[:MAX_LAYERS_LISTED]
        more = len(nf.layers) - len(shown)
        listed = ", ".join(shown) + (f" and {more} more" if more else "")
        at = "" if nf.layers_step == nf.step else f" at step {nf.layers_step} (the first with layer norms recorded)"
        if len(nf.layers) == nf.layers_total:
            text += f"; every layer non-finite{at} ({nf.layers_total} of {nf.layers_total})"
            if nf.growing:
                grew = ", ".join(f"{n} {_fmt(v)} ({r:.1f}x its median)" for n, v, _, r in nf.growing)
                text += f"; fastest-growing layers just before (step {nf.growing[0][2]}): {grew}"
        else:
            text += f"; non-finite layers{at}: {len(nf.layers)} of {nf.layers_total}: {listed}"
    later = nf.bad_steps - 1
    if later:
        text += f"; {later} more bad step{'s' if later != 1 else ''} after it"
    if nf.origin is not None:
        text += f"; {nf.origin.sentence}"
    elif nf.trace_hint:
        text += f"; to find the module where it first appeared, record it again with `{nf.trace_hint}`"
    return text


# ---------------------------------------------------------------- the verdict


def evaluate(run, policy: Policy | None = None, facts: list[SeriesFacts] | None = None) -> CheckVerdict:
    """Run every check: non-finite always, the policy's rules when set."""
    policy = policy or Policy()
    facts = facts or []
    steps = run.steps
    rank_local = norm_scope(run) == "rank-local"
    notes = _rank_notes(steps, rank_local)
    checks: list[CheckResult] = []
    if INCOMPLETE in policy.fail_on and run.source == "gradscope":  # first: what is missing comes first
        checks.append(_check_incomplete(run))
    nf = find_non_finite(run)
    checks.append(_check_non_finite(run, nf))
    found = audit.findings(run)
    broken = audit.errors(run)
    notes.extend(broken)
    rules, more, divergence = _policy_checks(run, policy, facts, rank_local, found, bool(broken))
    checks.extend(rules)
    notes.extend(more)
    return CheckVerdict(checks=checks, non_finite=nf, notes=notes, steps=len(steps), divergence=divergence,
                        findings=found, blind_spots=blind_spots(run))


def _rank_notes(steps, rank_local: bool) -> list[str]:
    """Rank-local norms, and ranks whose norms disagree."""
    notes = [RANK_LOCAL_NOTE] if rank_local else []
    if steps is not None and len(steps) and "rank" in steps and steps["rank"].nunique() > 1:
        note = disagreement_note(steps, None, sharded=rank_local)
        if note:
            notes.append(note)
    return notes


def _check_non_finite(run, nf: CheckNonFinite | None) -> CheckResult:
    """FAIL at the first bad step; else PASS saying what was finite (SKIP: no steps)."""
    import numpy as np

    if nf is not None:
        return CheckResult("non-finite", FAIL, describe_non_finite(nf))
    steps = run.steps
    n = len(steps)
    _, _, absorbed = _bad_masks(steps, run.source) if n else (None, None, np.zeros(0, bool))
    if absorbed.any():
        msg = (f"{n} steps: losses finite; gradient norms finite except {int(absorbed.sum())} overflow "
               "steps the loss scaler skipped (nothing applied: harmless)")
    else:
        msg = f"{n} steps: every loss and gradient norm finite" if n else "no steps recorded"
        if n and run.source == "gradscope" and not _any_loss(steps):
            msg = f"{n} steps: every gradient norm finite (no loss recorded: no backward() gradscope saw)"
    return CheckResult("non-finite", PASS if n else SKIP, msg)


def _policy_checks(run, policy: Policy, facts: list[SeriesFacts], rank_local: bool, found: list,
                   broken: bool) -> tuple[list[CheckResult], list[str], Any]:
    """The policy's rules, in a fixed order: (checks, the divergence rule's notes, the Divergence or None)."""
    checks = []
    notes: list[str] = []
    divergence = None
    regimes = tuple(r for r in policy.fail_on if r in REGIMES)
    # Rank-local norms (norm_scope): the regime rules and the clip-fraction limit are not judged on a
    # shard's norm (SKIP, never PASS or FAIL); non-finite, divergence, clip bugs and spikes still are.
    per_rank = "the recorded norms are per-rank (norm_scope rank-local), so no regime is judged"
    if regimes:
        checks.append(CheckResult("fail-on", SKIP, per_rank) if rank_local else _check_fail_on(regimes, facts))
    if LOSS_DIVERGENCE in policy.fail_on:
        check, notes, divergence = _check_divergence(run, policy)
        checks.append(check)
    if CLIP_BUGS in policy.fail_on:
        checks.append(_check_clip_bugs(found, audit.audited(run), broken))
    if SCRIPT_FAILED in policy.fail_on:
        checks.append(_check_script_failed(run))
    if policy.max_clip_fraction is not None:
        checks.append(CheckResult("max-clip-fraction", SKIP, per_rank) if rank_local
                      else _check_clip_fraction(policy.max_clip_fraction, facts))
    if policy.max_spikes is not None:
        checks.append(_check_spikes(policy.max_spikes, facts))
    if policy.max_skipped_fraction is not None:
        checks.append(_check_skipped(policy.max_skipped_fraction, run.steps))
    return checks, notes, divergence


def incomplete_text(run) -> str | None:
    """One line saying what a gradscope recording is missing (rundir.recording_gaps), or None."""
    gaps = [str(g) for g in ((getattr(run, "meta", None) or {}).get("incomplete") or [])]
    return f"incomplete recording: {'; '.join(gaps)}" if gaps else None


def _check_incomplete(run) -> CheckResult:
    text = incomplete_text(run)
    if text:
        return CheckResult(INCOMPLETE, FAIL, text[len("incomplete recording: "):])
    return CheckResult(INCOMPLETE, PASS, "the recording is complete (every recording process closed it)")


def _check_script_failed(run) -> CheckResult:
    """--fail-on script-failed: the script the run recorded ended with an error (meta.json status
    "failed": a non-zero exit code, not a signal). Foreign logs carry no exit status: skipped."""
    if run.source != "gradscope":
        return CheckResult(SCRIPT_FAILED, SKIP, "a trainer's log records no exit status of its script")
    meta = run.meta or {}
    status, code = meta.get("status"), meta.get("exit_code")
    if status == "failed":
        return CheckResult(SCRIPT_FAILED, FAIL, f"the script failed (exit code {code}) after {len(run.steps)} "
                                                "recorded steps: its figures are not those of a working training")
    return CheckResult(SCRIPT_FAILED, PASS, f"the script did not fail (status {status})")


def _check_divergence(run, policy: Policy) -> tuple[CheckResult, list[str], Any]:
    from gradscope.analysis.divergence import describe, find_divergence

    k, m = policy.divergence_factor, policy.divergence_steps
    d, judged, notes = find_divergence(run, k, m)
    if d is not None:
        multi = run.steps["rank"].nunique() > 1 or run.steps["optimizer"].nunique() > 1
        return CheckResult(LOSS_DIVERGENCE, FAIL, describe(d, multi)), notes, d
    if judged == 0:
        why = "; ".join(notes) if notes else "no loss recorded or logged"
        return CheckResult(LOSS_DIVERGENCE, SKIP, f"the divergence rule could not judge the run: {why}"), [], None
    return CheckResult(LOSS_DIVERGENCE, PASS, f"the loss never stayed above {k:g}x its running minimum for {m} "
                                         "logged steps"), notes, None


def _label(f: SeriesFacts, facts: list[SeriesFacts]) -> str:
    parts = []
    if len({x.optimizer for x in facts}) > 1:
        parts.append(f"optimizer {f.optimizer}")
    if len({x.rank for x in facts}) > 1:
        parts.append(f"rank {f.rank}")
    return f" ({', '.join(parts)})" if parts else ""


def _check_fail_on(fail_on: tuple[str, ...], facts: list[SeriesFacts]) -> CheckResult:
    judged = [f for f in facts if f.regime]
    if not judged:
        return CheckResult("fail-on", SKIP, "no regime could be judged (too few finite steps)")
    hits = [f for f in judged if f.regime in fail_on]
    if hits:
        why = "; ".join(
            f"regime {f.regime}{_label(f, facts)}" + (
                f": clips {f.clip_fraction:.1%} of steady-state steps at max_norm {_fmt(f.clip_norm)}"
                if f.clip_fraction is not None and f.clip_norm is not None else ""
            )
            for f in hits
        )
        return CheckResult("fail-on", FAIL, f"{why} (policy fails on {', '.join(fail_on)})")
    regimes = ", ".join(sorted({f.regime for f in judged}))
    return CheckResult("fail-on", PASS, f"regime {regimes} (policy fails on {', '.join(fail_on)})")


def _check_clip_bugs(found: list, audited: bool, broken: bool = False) -> CheckResult:
    if found:
        n = len(found)
        text = "; ".join(_finding_text(f, found) for f in found)
        return CheckResult(CLIP_BUGS, FAIL, f"{n} clipping bug{'s' if n != 1 else ''}: {text}")
    if not audited:
        return CheckResult(CLIP_BUGS, SKIP, "no clip audit in this input (only runs recorded by `gradscope run` "
                                            "or gradscope.record() carry one)")
    if broken:
        return CheckResult(CLIP_BUGS, SKIP, "the clip audit stopped early in this run (see the note): it cannot "
                                            "say the run is free of clipping bugs")
    return CheckResult(CLIP_BUGS, PASS, "the clip audit found no clipping bug")


def _finding_text(f, found: list) -> str:
    """A finding as one line of `check`; the rank is named when several ranks differ."""
    where = f" (rank {f.rank})" if len({x.rank for x in found}) > 1 else ""
    return f"{f.line()}{where}"


def finding_lines(verdict: CheckVerdict) -> list[str]:
    """The findings as warnings (when no clip-bugs check carries them already)."""
    if any(c.name == CLIP_BUGS for c in verdict.checks):
        return []
    return [_finding_text(f, verdict.findings) for f in verdict.findings]


def _check_clip_fraction(limit: float, facts: list[SeriesFacts]) -> CheckResult:
    judged = [f for f in facts if f.clip_fraction is not None]
    if not judged:
        return CheckResult("max-clip-fraction", SKIP, "the run does not clip (no clip_grad_norm_ threshold known)")
    worst = max(judged, key=lambda f: f.clip_fraction)
    text = f"clips {worst.clip_fraction:.1%} of steady-state steps{_label(worst, facts)}"
    if worst.clip_norm is not None:
        text += f" at max_norm {_fmt(worst.clip_norm)}"
    if worst.clip_fraction > limit:
        return CheckResult("max-clip-fraction", FAIL, f"{text}, more than the allowed {limit:.1%}")
    return CheckResult("max-clip-fraction", PASS, f"{text} (allowed {limit:.1%})")


def _check_spikes(limit: int, facts: list[SeriesFacts]) -> CheckResult:
    judged = [f for f in facts if f.spikes is not None]
    if not judged:
        return CheckResult("max-spikes", SKIP, "spikes could not be counted (too few finite steps)")
    total = sum(f.spikes for f in judged)
    if total > limit:
        return CheckResult("max-spikes", FAIL, f"{total} gradient-norm spikes, more than the allowed {limit}")
    return CheckResult("max-spikes", PASS, f"{total} gradient-norm spikes (allowed {limit})")


def _check_skipped(limit: float, steps) -> CheckResult:
    if len(steps) == 0:
        return CheckResult("max-skipped-fraction", SKIP, "no steps recorded")
    frac = float(steps["skipped"].mean())
    n = int(steps["skipped"].sum())
    text = f"the loss scaler skipped {n} of {len(steps)} steps ({frac:.1%})"
    if frac > limit:
        return CheckResult("max-skipped-fraction", FAIL, f"{text}, more than the allowed {limit:.1%}")
    return CheckResult("max-skipped-fraction", PASS, f"{text} (allowed {limit:.1%})")


def blind_spots(run) -> list[BlindSpot]:
    """What a foreign log cannot show the non-finite check, from the importer's structured flags
    (rundir.IMPORT_FLAGS and meta "sampled"), never from the words of its notes."""
    from gradscope import rundir

    meta = run.meta or {}
    out = []
    if meta.get(rundir.NAN_LOSSES_DROPPED):
        out.append(BlindSpot(rundir.NAN_LOSSES_DROPPED))
    if meta.get(rundir.NORMS_UNTRUSTED):
        out.append(BlindSpot(rundir.NORMS_UNTRUSTED))
    elif meta.get(rundir.SHARDED_TRAINING):
        out.append(BlindSpot(rundir.SHARDED_TRAINING))
    if meta.get(SAMPLED):
        out.append(BlindSpot(SAMPLED, meta.get("logging_steps") or None))
    return out


def facts_from_analysis(analysis: Any) -> list[SeriesFacts]:
    """The analyzer's RunAnalysis -> the few facts the policy rules read."""
    out = []
    for o in getattr(analysis, "optimizers", []) or []:
        verdict = getattr(o, "verdict", None)
        spikes = getattr(o, "spikes", None)
        rank = getattr(o, "rank", None)
        out.append(
            SeriesFacts(
                rank=int(rank) if rank is not None else int(getattr(analysis, "rank", 0) or 0),
                optimizer=int(getattr(o, "optimizer", 0)),
                regime=getattr(o, "regime", None),
                clip_fraction=_maybe(getattr(o, "clip_fraction", None)),
                clip_norm=_maybe(getattr(verdict, "clip_norm", None)),
                spikes=getattr(spikes, "count", None),
            )
        )
    return out


def _maybe(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and x != x) else float(x)


def needs_analysis(policy: Policy) -> bool:
    return any(r in REGIMES for r in policy.fail_on) or policy.max_clip_fraction is not None or policy.max_spikes is not None
