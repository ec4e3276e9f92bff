"""`--stop-on-nan`'s per-step watch: learn that a step went non-finite within a step or two.

The recorder keeps every step's values on the device and copies them to the host in
batches; waiting for a flush let a run train dozens of steps past its first NaN. This
watch looks at each step's row as soon as the step is complete, without a device sync:

- CPU rows are read directly (reading a CPU tensor waits for nothing; five numbers).
- CUDA rows are copied into a small ring of pinned host buffers with a non-blocking copy
  and a CUDA event; each later step polls the events (``query()``, never ``synchronize()``)
  and reads the rows whose copy has arrived. The stop therefore comes as soon as the GPU has
  finished the bad step, which is within a step or two of the host's position unless the
  host runs further ahead of the GPU than that.

A step is bad when its loss is non-finite, or its gradient norm is non-finite and no loss
scaler absorbed it (a GradScaler-skipped step's inf is the scaler working).
"""
from __future__ import annotations

import math
from typing import Any

import torch

_RING = 4  # CUDA copies in flight at most; a row that finds no free slot is judged at the flush


def is_bad(grad_norm: float, loss: float, skipped: float) -> bool:
    """The stop rule, on a row's host values."""
    return not math.isfinite(loss) or (not math.isfinite(grad_norm) and not skipped)


class NanStop:
    """Watches rows ([grad_norm, loss, clipped, skipped, loss_scale]) for the first bad step."""

    def __init__(self) -> None:
        self._new: list[tuple[Any, int, int]] = []  # (row, optimizer id, grad_norm pending)
        self._inflight: list[tuple[torch.Tensor, Any, int, int, bool]] = []
        self._free: list[torch.Tensor] = []
        self.reason: str | None = None

    def add(self, row: Any, optimizer: int) -> None:
        """A row was recorded; it is looked at by the next poll (after its step completed)."""
        self._new.append((row, optimizer, row.norms is not None))

    def poll(self) -> bool:
        """True once a bad step has been seen. Never waits for the device."""
        if self.reason is not None:
            return True
        new, self._new = self._new, []
        for row, opt, pending in new:
            values = row.values
            if values.device.type == "cpu":
                self._judge(values.tolist(), row.step, opt, pending)
            elif values.device.type == "cuda":
                self._copy(values, row.step, opt, pending)
            # other devices (MPS, XLA): judged at the flush, as before
        still = []
        for host, event, step, opt, pending in self._inflight:
            if event.query():
                self._judge(host.tolist(), step, opt, pending)
                self._free.append(host)
            else:
                still.append((host, event, step, opt, pending))
        self._inflight = still
        return self.reason is not None

    def _copy(self, values: torch.Tensor, step: int, opt: int, pending: bool) -> None:
        if not self._free and len(self._inflight) >= _RING:
            return  # every slot still in flight: this row is judged at the flush
        host = self._free.pop() if self._free else torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._inflight.append((host, event, step, opt, pending))

    def _judge(self, v: list, step: int, opt: int, pending: bool) -> None:
        if self.reason is not None:
            return
        grad_norm, loss, _, skipped, _ = v
        if pending:  # the global norm is still being reduced across ranks: judge the loss only
            grad_norm = 0.0
        if is_bad(grad_norm, loss, skipped):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            self.reason = f"non-finite {what} at step {step} of optimizer {opt}"
