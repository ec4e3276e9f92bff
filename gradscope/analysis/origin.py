"""Where the first non-finite value came from, as `gradscope run --trace-nan` recorded it.

Pure: reads the ``nan_trace`` entry of a run's process files (see rundir.py); the words
for people are built here once so check, recommend and plot say the same thing.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from gradscope import rundir

PHASES = ("input", "forward", "backward", "loss")


@dataclass
class Origin:
    step: int
    phase: str                 # one of PHASES
    module: str | None         # named as model.named_modules() names it; None: outside every module
    detail: str                # one sentence: what went non-finite and what was still finite
    optimizer: int = 0
    rank: int = 0
    what: str = ""             # "the forward output of `encoder.1.gate` (Gate)"
    why: str = ""              # "its inputs were finite"

    def json(self) -> dict:
        """The `nonfinite.origin` object of `recommend --json` (a contract: step, phase, module, detail)."""
        return {"step": self.step, "phase": self.phase, "module": self.module, "detail": self.detail,
                "optimizer": self.optimizer, "rank": self.rank}

    @property
    def sentence(self) -> str:
        """'the first non-finite value was the forward output of `x` at step 37; its inputs were finite'"""
        text = f"the first non-finite value was {self.what or self.phase} at step {self.step}"
        return text + (f"; {self.why}" if self.why else "")


def _processes(run, rank: int | None) -> list[dict]:
    procs = [p for p in (run.meta or {}).get("processes", []) or [] if isinstance(p, dict)]
    if rank is not None:
        procs = [p for p in procs if p.get("rank", 0) == rank]
    return procs


def traced(run, rank: int | None = None) -> bool:
    """True when the run (that rank) was recorded with --trace-nan."""
    key = rundir.NAN_TRACE_KEY
    return any(isinstance(p.get(key), dict) and p[key].get("enabled") for p in _processes(run, rank))


def nan_origin(run, rank: int | None = None) -> Origin | None:
    """The recorded origin (of that rank, else the lowest rank that has one), or None."""
    for p in sorted(_processes(run, rank), key=lambda p: p.get("rank", 0)):
        trace = p.get(rundir.NAN_TRACE_KEY)
        o = trace.get("origin") if isinstance(trace, dict) else None
        if not isinstance(o, dict) or o.get("phase") not in PHASES:
            continue
        try:
            return Origin(step=int(o["step"]), phase=o["phase"], module=o.get("module"),
                          detail=str(o.get("detail") or ""), optimizer=int(o.get("optimizer", 0)),
                          rank=int(p.get("rank", 0)), what=str(o.get("what") or ""), why=str(o.get("why") or ""))
        except (KeyError, TypeError, ValueError):
            continue
    return None


def trace_command(run) -> str:
    """The command that would record the origin: this run's own, under `gradscope run --trace-nan`."""
    meta = run.meta or {}
    cmd = meta.get("command")
    target = meta.get("target")
    if getattr(run, "source", "gradscope") == "gradscope" and isinstance(cmd, list) and cmd:
        if target == "script" and len(cmd) >= 2:
            args = cmd[1:]
        elif target == "module" and len(cmd) >= 3 and cmd[1] == "-m":
            args = cmd[1:]
        elif target == "command":
            args = ["--", *cmd]
        else:
            args = None
        if args is not None:
            return "gradscope run --trace-nan " + " ".join(shlex.quote(str(a)) for a in args)
    return "gradscope run --trace-nan train.py ..."
