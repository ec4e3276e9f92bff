"""Closure steps: ``optimizer.step(closure)`` and Lightning's automatic optimization.

With a closure, the backward pass (and, under Lightning, ``on_before_optimizer_step`` and
the trainer's own gradient clipping, which its precision plugin runs right after the
closure) happens *inside* ``step()``, after the optimizer-step pre-hook. So the pre-hook
hands ``step()`` a wrapped closure instead (a pre-hook may return new ``(args, kwargs)``),
and the step's row is taken when the closure's first evaluation returns: after its
backward and its clip call, before the update. Closure optimizers that evaluate the
closure several times (LBFGS line searches) record the first evaluation, whose gradient
is the one the step starts from; later evaluations pass through untouched.
"""
from __future__ import annotations

from typing import Any, Callable


def wrap_closure(args: tuple, kwargs: dict, on_first_return: Callable[[], None]) -> tuple | None:
    """New ``(args, kwargs)`` for ``step()`` with the closure wrapped, or None without a closure.

    ``args`` is what torch hands a step pre-hook: the optimizer first, then step's own
    positional arguments (``opt.step(closure)`` -> ``(opt, closure)``).
    """
    if kwargs.get("closure") is not None:
        kwargs = dict(kwargs)
        kwargs["closure"] = _FirstReturn(kwargs["closure"], on_first_return)
        return args, kwargs
    if len(args) > 1 and callable(args[1]):
        return (args[0], _FirstReturn(args[1], on_first_return), *args[2:]), kwargs
    return None


class _FirstReturn:
    """Calls the closure; after its first evaluation returns, calls `on_first_return` once."""

    __slots__ = ("closure", "on_first_return", "called")

    def __init__(self, closure: Callable[[], Any], on_first_return: Callable[[], None]) -> None:
        self.closure = closure
        self.on_first_return = on_first_return
        self.called = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.closure(*args, **kwargs)
        if not self.called:
            self.called = True
            self.on_first_return()
        return result


def closure_called(args: tuple, kwargs: dict) -> bool | None:
    """In a step post-hook: whether the wrapped closure ran (None: the step had no wrapped closure)."""
    c = kwargs.get("closure")
    if not isinstance(c, _FirstReturn):
        c = args[1] if len(args) > 1 else None
    return c.called if isinstance(c, _FirstReturn) else None
