"""Command-line entry point: one place maps errors to exit codes and one-line messages.

Exit codes: 0 success; 1 a check failed (or the recorded script's own status
for `gradscope run`); 2 bad input or usage; 3 an internal error (a bug: set
GRADSCOPE_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import os
import signal
import sys

import typer

from gradscope.cli.app import app
from gradscope.errors import GradscopeError

# Each module registers its command on `app` when imported.
from gradscope.cli import run as _run  # noqa: F401,E402
from gradscope.cli import recommend as _recommend  # noqa: F401,E402
from gradscope.cli import check as _check  # noqa: F401,E402
from gradscope.cli import plot as _plot  # noqa: F401,E402
from gradscope.cli import compare as _compare  # noqa: F401,E402
from gradscope.cli import tune as _tune  # noqa: F401,E402
from gradscope.cli import watch as _watch  # noqa: F401,E402

__all__ = ["app", "main"]

# typer <= 0.25 runs on the click package; typer >= 0.26 carries its own copy as
# typer._click and no longer installs click. Catch the exceptions of whichever runs.
try:
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as _cx

_EXIT = tuple({typer.Exit, getattr(_cx, "Exit", typer.Exit)})
_ABORT = tuple({typer.Abort, getattr(_cx, "Abort", typer.Abort), KeyboardInterrupt})


def _die_like(sig: int) -> None:
    """End this process by the same signal that ended the child, as a shell would see it."""
    try:
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    sys.exit(128 + sig)


def _wants_json(argv: list[str]) -> bool:
    """`--json` given to a command that has that option (not to a script `gradscope run` starts)."""
    import typer.main

    try:
        group = typer.main.get_command(app)
        name = next((a for a in argv if not a.startswith("-")), None)
        cmd = group.commands.get(name) if name is not None else None
    except Exception:  # noqa: BLE001 - deciding the error's format must never fail
        return False
    if cmd is None or not any("--json" in getattr(p, "opts", ()) for p in cmd.params):
        return False
    args = argv[argv.index(name) + 1:]
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _fail(message: str, exit_code: int, as_json: bool) -> None:
    """One line on stderr; with --json also the error as the one JSON object on stdout."""
    print(f"gradscope: {message}", file=sys.stderr)
    if as_json:
        import json

        text = message.split("error: ", 1)[1] if message.startswith(("error: ", "internal error: ")) else message
        print(json.dumps({"error": text, "exit_code": exit_code}))
        sys.stdout.flush()
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> None:
    debug = bool(os.environ.get("GRADSCOPE_DEBUG"))
    as_json = _wants_json(list(sys.argv[1:] if argv is None else argv))
    try:
        rv = app(args=argv, prog_name="gradscope", standalone_mode=False)
    except GradscopeError as e:
        if debug:
            raise
        _fail(f"error: {e.message}", e.exit_code, as_json)
    except _EXIT as e:
        sys.exit(e.exit_code)
    except _cx.ClickException as e:  # usage errors: click's own one-liner
        code = 2 if isinstance(e, _cx.UsageError) else e.exit_code
        if as_json:
            _fail(f"error: {e.format_message()}", code, True)
        e.show()
        sys.exit(code)
    except _ABORT:
        print("gradscope: interrupted", file=sys.stderr)
        _die_like(signal.SIGINT)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as e:  # a bug in gradscope, not the user's fault
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set GRADSCOPE_DEBUG=1 for the traceback)", 3, as_json)
    if isinstance(rv, int):
        if rv < 0:
            _die_like(-rv)
        sys.exit(rv)
    sys.exit(0)
