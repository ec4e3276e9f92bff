"""gradscope: does your gradient clipping protect you?

Public API: ``record`` (capture in-process), ``load_run`` (read a run back), ``log_metric``
(a value the script reports, for `tune --metric`; a no-op when not recorded).
Imports are lazy so that the recorder's start-up inside a training process
pulls in neither pandas nor rich.
"""
from __future__ import annotations

from gradscope._version import __version__
__all__ = ["record", "load_run", "log_metric", "Run", "GradscopeError", "__version__"]


def __getattr__(name: str):
    if name == "record":
        from gradscope.capture.api import record

        return record
    if name == "log_metric":  # stdlib-only module: cheap even where torch is not imported yet
        from gradscope.capture.metrics import log_metric

        return log_metric
    if name in ("load_run", "Run"):
        from gradscope import rundir

        return getattr(rundir, name)
    if name == "GradscopeError":
        from gradscope.errors import GradscopeError

        return GradscopeError
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
