"""Checks of the recorder's options, shared by every way of starting it (boot, record(), the CLI)."""
from __future__ import annotations

import math
from typing import Any

from gradscope.errors import GradscopeError

# How `gradscope run` configures the recorder of every process it starts (capture/boot.py).
ENV_RUN_DIR = "GRADSCOPE_RUN_DIR"
ENV_LAYER_STRIDE = "GRADSCOPE_LAYER_STRIDE"
ENV_FLUSH_STEPS = "GRADSCOPE_FLUSH_STEPS"
ENV_FLUSH_SECONDS = "GRADSCOPE_FLUSH_SECONDS"
ENV_STOP_ON_NAN = "GRADSCOPE_STOP_ON_NAN"
ENV_CLIP_NORM = "GRADSCOPE_CLIP_NORM"
ENV_TRACE_NAN = "GRADSCOPE_TRACE_NAN"
ENV_MAX_STEPS = "GRADSCOPE_MAX_STEPS"
ENV_RUN_ID = "GRADSCOPE_RUN_ID"  # meta.json's run_id, into every process file of the run
ENV_METRIC_NAME = "GRADSCOPE_METRIC_NAME"  # --metric-name: the run is judged by it (--max-steps waits for it)
ENV_METRIC_REGEX = "GRADSCOPE_METRIC_REGEX"  # --metric-regex: searched in the script's stdout/stderr lines

def checked_clip_norm(value: Any) -> float | None:
    """`--clip-norm` / record(clip_norm=): None, or a positive, finite float (0 would zero every
    gradient, inf would clip nothing)."""
    if value is None:
        return None
    v = float(value)
    if not 0 < v < math.inf:
        raise GradscopeError(f"--clip-norm must be a positive, finite number, got {v:g}")
    return v
