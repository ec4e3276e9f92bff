"""The line a recording prints when its first optimizer step reaches the run directory.

`gradscope run` sets ENV_ANNOUNCE to its start time (unix seconds) unless --quiet; the
recorder calls first_step() once, from its first write (a flush, never a step), so the
announcement adds no per-step work and reads no tensor. Only rank 0 speaks, so a
`torchrun` job prints one line, not one per rank. Standard library only.
"""
from __future__ import annotations

import os
import sys

ENV_ANNOUNCE = "GRADSCOPE_ANNOUNCE"


def first_step(rank: int, step: int, optimizer: int, optimizer_class: str | None, step_time: float) -> None:
    start = os.environ.get(ENV_ANNOUNCE)
    if not start or rank != 0:
        return
    try:
        waited = step_time - float(start)
    except ValueError:
        return
    what = f"optimizer {optimizer}" + (f" {optimizer_class}" if optimizer_class else "")
    print(f"gradscope: first optimizer step recorded ({what}, step {step}), {waited:.1f} s after start",
          file=sys.stderr, flush=True)
