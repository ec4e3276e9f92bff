"""Loaded by every Python process that `gradscope run` starts (via PYTHONPATH).

It starts the recorder, removes its own directory from sys.path (the script
must see the sys.path plain Python gives it) and then imports the
sitecustomize it shadowed, if there is one.
"""
import os
import sys


def _gradscope_boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != here]
    try:
        from gradscope.capture.boot import start_from_env

        start_from_env()
    except Exception as e:  # an unusable install must not stop the user's script
        print(f"gradscope: recording disabled: {type(e).__name__}: {e}", file=sys.stderr)
    me = sys.modules.pop("sitecustomize")
    try:
        import sitecustomize  # noqa: F401  (the one we shadowed, now that our directory is gone)
    except ImportError:
        sys.modules["sitecustomize"] = me  # the import system expects to find a module here


_gradscope_boot()
