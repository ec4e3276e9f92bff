"""Checks of the recorder's options, shared by every way of starting it (boot, record(), the CLI)."""
from __future__ import annotations

import math
from typing import Any

from gradscope.errors import GradscopeError

def checked_clip_norm(value: Any) -> float | None:
    """`--clip-norm` / record(clip_norm=): None, or a positive, finite float (0 would zero every
    gradient, inf would clip nothing)."""
    if value is None:
        return None
    v = float(value)
    if not 0 < v < math.inf:
        raise GradscopeError(f"--clip-norm must be a positive, finite number, got {v:g}")
    return v
