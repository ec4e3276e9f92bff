"""The one error type that carries a user-facing message and an exit code."""
from __future__ import annotations


class GradscopeError(Exception):
    """A problem the user can fix: printed as one line, never as a traceback.

    Exit codes (documented in the README): 2 = bad input (missing path, not a run,
    unreadable or unknown format, bad option); 1 = a check failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
