"""The clip audit's findings: the process files' `clip_audit` records -> Finding, with the words.

Pure: a Run in, dataclasses out. The recorder (gradscope/capture/audit.py) decides what it
saw from call order and parameter identity; here each record becomes one sentence that says
what happens and what to do. The loss scale a `clip-before-unscale` message names is read
from the steps table (`loss_scale` at the finding's first step), so capture never reads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gradscope import rundir

KINDS = rundir.AUDIT_KINDS  # defined once, by the format's owner
AUDIT_KEY = rundir.CLIP_AUDIT_KEY  # the key of process-r{R}.json that holds the record
MODULES_NAMED = 3


@dataclass
class Finding:
    kind: str  # one of KINDS
    first_step: int  # the optimizer's `step` where it was first seen
    count: int  # optimizer steps it was seen at
    message: str  # what happens and what to do, one sentence
    optimizer: int = 0
    rank: int = 0
    detail: dict = field(default_factory=dict)  # the record as capture wrote it

    def as_json(self) -> dict:
        """The contract of `recommend --json` / `check --json`: {kind, first_step, count, message}."""
        return {"kind": self.kind, "first_step": self.first_step, "count": self.count, "message": self.message}

    def line(self) -> str:
        steps = "1 step" if self.count == 1 else f"{self.count} steps"
        return f"{self.kind} from step {self.first_step} ({steps}): {self.message}"


def audited(run, rank: int | None = None) -> bool:
    """True when the run carries the audit's record (a gradscope recording; not a foreign log)."""
    return any(isinstance(p.get(AUDIT_KEY), dict) for p in _processes(run, rank))


def errors(run, rank: int | None = None) -> list[str]:
    """Why the audit stopped early in a process (a failure of the audit itself), one note each."""
    out = []
    for p in _processes(run, rank):
        record = p.get(AUDIT_KEY)
        if isinstance(record, dict) and record.get("error"):
            out.append(f"the clip audit stopped early on rank {int(p.get('rank', 0) or 0)} ({record['error']}): "
                       "clipping bugs after that point are not reported")
    return out


def findings(run, rank: int | None = None) -> list[Finding]:
    """Every finding of the given rank (None: every rank, identical findings of several ranks once)."""
    out: list[Finding] = []
    seen: set = set()
    classes = {o.get("id"): o.get("class") for o in run.meta.get("optimizers") or [] if isinstance(o, dict)}
    several = len({o.get("id") for o in run.meta.get("optimizers") or [] if isinstance(o, dict)}) > 1
    for proc in _processes(run, rank):
        record = proc.get(AUDIT_KEY)
        if not isinstance(record, dict):
            continue
        r = int(proc.get("rank", 0) or 0)
        for d in record.get("findings") or []:
            if not isinstance(d, dict) or d.get("kind") not in KINDS:
                continue
            key = (d.get("kind"), d.get("optimizer"), d.get("first_step"), d.get("count"))
            if key in seen:
                continue  # DDP ranks see the same calls: report them once
            seen.add(key)
            opt = int(d.get("optimizer", 0) or 0)
            if d.get("kind") == "clip-local-norm":
                d = {**d, "ranks": _local_norms(run, opt, d.get("first_step"))}
            message = describe(d, _loss_scale(run, r, opt, d.get("first_step")))
            if several:
                cls = classes.get(opt)
                message = f"optimizer {opt}" + (f" ({cls})" if cls else "") + ": " + message
            out.append(Finding(kind=d["kind"], first_step=int(d.get("first_step", 0)), count=int(d.get("count", 0)),
                               message=message, optimizer=opt, rank=r, detail=dict(d)))
    out.sort(key=lambda f: (f.rank, f.optimizer, f.first_step, KINDS.index(f.kind)))
    return out


def _processes(run, rank: int | None) -> list[dict]:
    procs = [p for p in (run.meta.get("processes") or []) if isinstance(p, dict)]
    if rank is not None:
        procs = [p for p in procs if int(p.get("rank", 0) or 0) == rank]
    return procs


def _loss_scale(run, rank: int, optimizer: int, step: Any) -> float | None:
    steps = run.steps
    if steps is None or len(steps) == 0 or step is None:
        return None
    sel = steps[(steps["rank"] == rank) & (steps["optimizer"] == optimizer) & (steps["step"] == step)]
    if sel.empty:
        return None
    s = float(sel["loss_scale"].iloc[0])
    return s if math.isfinite(s) and s > 0 else None


def _local_norms(run, optimizer: int, step: Any) -> list:
    """clip-local-norm: [(rank, its shard's norm, the global grad_norm)] at ``step``, every rank that
    recorded the finding (the recorded grad_norm is the global one: gradscope reduces FSDP1 shards)."""
    out = []
    steps = run.steps
    for p in _processes(run, None):
        record = p.get(AUDIT_KEY)
        r = int(p.get("rank", 0) or 0)
        for d in (record.get("findings") or []) if isinstance(record, dict) else []:
            if not (isinstance(d, dict) and d.get("kind") == "clip-local-norm" and d.get("optimizer") == optimizer
                    and d.get("first_step") == step and isinstance(d.get("local_norm"), (int, float))):
                continue
            g = None
            if steps is not None and len(steps):
                sel = steps[(steps["rank"] == r) & (steps["optimizer"] == optimizer) & (steps["step"] == step)]
                if not sel.empty:
                    g = float(sel["grad_norm"].iloc[0])
            out.append((r, float(d["local_norm"]), g))
    return sorted(out)


def _g(x: float, digits: int = 6) -> str:
    return f"{x:.{digits}g}"


def describe(d: dict, loss_scale: float | None = None) -> str:
    """The one sentence of a finding (d: the record capture wrote)."""
    kind = d.get("kind")
    fn = d.get("function") or "the clip call"
    if kind == "clip-before-unscale":
        return _before_unscale(d, fn, loss_scale)
    if kind in _FIXED:
        return _FIXED[kind].format(fn=fn)
    if kind == "clip-partial":
        return _partial(d, fn)
    if kind == "clip-local-norm":
        return _local_norm(d, fn)
    return str(kind)


# Findings whose sentence names only the clip function.
_FIXED = {
    "clip-after-step": (
        "{fn} is called after optimizer.step() and before the next backward(), so it clips gradients "
        "the step has already applied, not the update; move it between the last backward() and "
        "optimizer.step()."),
    "clip-per-microbatch": (
        "{fn} is called between backward() passes that add to the same gradients before "
        "optimizer.step() (inside the gradient-accumulation loop), so each micro-batch's partial sum is "
        "clipped, not the accumulated gradient the step applies; clip once, after the last micro-batch's "
        "backward()."),
    "no-zero-grad": (
        "optimizer.step() runs again on gradients that were neither zeroed nor set to None since its "
        "previous step, so gradients accumulate across steps; call optimizer.zero_grad() once per step."),
}


def _before_unscale(d: dict, fn: str, loss_scale: float | None) -> str:
    tau = d.get("threshold")
    what = "max_norm" if fn == "clip_grad_norm_" else "clip_value"
    if isinstance(tau, (int, float)) and loss_scale:
        effect = (f"the loss scale ({_g(loss_scale)} at step {d.get('first_step')}), so the real gradients are "
                  f"clipped at {what} / loss scale = {_g(tau)} / {_g(loss_scale)} = {_g(tau / loss_scale, 3)}, "
                  f"not at {_g(tau)}")
    else:
        effect = f"the loss scale, so the real gradients are clipped at {what} divided by the loss scale"
    return (f"{fn} runs on gradients the GradScaler has scaled and not yet unscaled, still multiplied by "
            f"{effect}; call scaler.unscale_(optimizer) right before clipping.")


def _partial(d: dict, fn: str) -> str:
    n, k = d.get("tensors"), d.get("clipped_tensors")
    e, ke = d.get("elements"), d.get("clipped_elements")
    share = ""
    if isinstance(n, int) and isinstance(k, int):
        share = f" {k} of the {n} parameter tensors the optimizer updates"
        if isinstance(e, int) and isinstance(ke, int) and e > 0:
            share += f" ({ke:,} of {e:,} elements, {ke / e:.1%})"
    else:
        share = " only part of the parameters the optimizer updates"
    modules = [m for m in d.get("left_out") or [] if isinstance(m, dict)]
    left = ""
    if modules:
        named = ", ".join(f"{m.get('module')} ({int(m.get('elements', 0)):,} elements)"
                          for m in modules[:MODULES_NAMED])
        total = d.get("left_out_modules")
        more = (total if isinstance(total, int) else len(modules)) - MODULES_NAMED
        left = f"; left out: {named}" + (f" and {more} more module{'s' if more != 1 else ''}" if more > 0 else "")
    return (f"{fn} covers{share}{left}; their gradients reach the update unclipped: pass every parameter the "
            f"optimizer updates to the clip call (e.g. [p for g in optimizer.param_groups for p in g['params']]).")


def _local_norm(d: dict, fn: str) -> str:
    tau = d.get("threshold")
    said = []
    for r, local, g in d.get("ranks") or []:
        if isinstance(tau, (int, float)) and g is not None and math.isfinite(g) and local > 0:
            eff = tau * g / local
            said.append(f"rank {r} measured {_g(local, 4)} of the global {_g(g, 4)}, so it clipped as if "
                        f"max_norm were {_g(eff, 4)} ({_g(eff / tau, 3)}x the threshold)")
    at = f" (at step {d.get('first_step')}: " + "; ".join(said) + ")" if said else ""
    return (f"{fn} runs on this rank's shard of gradients that are sharded across the ranks (FSDP) and measures "
            f"the shard's norm only, so each rank clips by its own norm, not the global one, and the ranks "
            f"scale their shards differently{at}; clip with the sharded module's own method "
            f"(model.clip_grad_norm_(max_norm) for FullyShardedDataParallel), which reduces the norm across "
            f"ranks.")
