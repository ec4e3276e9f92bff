"""Start recording in a process launched by `gradscope run` (configured by environment).

The launcher puts gradscope/_bootstrap on PYTHONPATH; its sitecustomize calls
``start_from_env`` in every Python process of the run. Recording starts when the
script imports torch (a one-shot import hook), not before: the script may set
environment variables that torch reads at import.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


from gradscope.capture.options import (  # noqa: F401  (the launcher reads them here)
    ENV_CLIP_NORM, ENV_FLUSH_SECONDS, ENV_FLUSH_STEPS, ENV_LAYER_STRIDE, ENV_MAX_STEPS, ENV_METRIC_NAME,
    ENV_METRIC_REGEX, ENV_RUN_DIR, ENV_RUN_ID, ENV_STOP_ON_NAN, ENV_TRACE_NAN,
)




def _start() -> None:
    from gradscope.capture.recorder import Recorder

    Recorder(
        os.environ[ENV_RUN_DIR],
        layer_stride=int(os.environ.get(ENV_LAYER_STRIDE, "1")),
        flush_steps=int(os.environ.get(ENV_FLUSH_STEPS, "100")),
        flush_seconds=float(os.environ.get(ENV_FLUSH_SECONDS, "2.0")),
        stop_on_nan=os.environ.get(ENV_STOP_ON_NAN) == "1",
        clip_norm=float(os.environ[ENV_CLIP_NORM]) if os.environ.get(ENV_CLIP_NORM) else None,
        trace_nan=os.environ.get(ENV_TRACE_NAN) == "1",
        max_steps=int(os.environ[ENV_MAX_STEPS]) if os.environ.get(ENV_MAX_STEPS) else None,
        stop_before_next_step=bool(os.environ.get(ENV_METRIC_NAME)),
    ).start()


def _start_quietly() -> None:
    try:
        _start()
    except Exception as e:  # never break the user's training because recording failed
        print(f"gradscope: recording disabled in this process: {type(e).__name__}: {e}", file=sys.stderr)


def _start_for_rank() -> None:
    """A process joined a process group: record it unless it already records itself."""
    from gradscope.capture import recorder

    rec = recorder.active_recorder()
    if rec is not None and rec.recording():
        return
    if rec is not None:
        recorder.forget_inherited()  # a forked child's copy of its parent's recorder: inert here
    _start_quietly()


def _on_torch() -> None:
    """torch is imported: record this process, and any child of it that becomes a rank.

    multiprocessing spawn/forkserver children are DataLoader workers or the
    ranks of ``mp.spawn``; only a rank joins a process group, so those start
    recording when they do (see capture/distributed.py). The hook also covers
    ranks forked from this process (``start_method="fork"``).
    """
    if "--multiprocessing-fork" not in sys.argv:
        _start_quietly()
    try:
        from gradscope.capture.distributed import start_on_process_group

        start_on_process_group(_start_for_rank)
    except Exception as e:
        print(f"gradscope: ranks started by this process will not be recorded: {type(e).__name__}: {e}",
              file=sys.stderr)


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Runs a callback once `import torch` has finished executing torch/__init__.py."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_start(module):
            exec_module(module)
            _on_torch()

        loader.exec_module = exec_then_start
        return spec


def start_from_env() -> None:
    if not os.environ.get(ENV_RUN_DIR):
        return
    if os.environ.get(ENV_METRIC_REGEX):
        from gradscope.capture.metrics import scan_streams_from_env

        scan_streams_from_env()  # before the script runs: a logging handler made early writes through it too
    if "torch" in sys.modules:
        _on_torch()
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
