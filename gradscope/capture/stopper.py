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

A step is bad by the format's one rule, rundir.is_bad_step: its loss was recorded and is
non-finite, or its gradient norm is non-finite and no loss scaler absorbed it (a
GradScaler-skipped step's inf is the scaler working). A step with no loss recorded (gradients
from torch.autograd.grad, no backward()) is judged by its gradient norm alone.
"""
from __future__ import annotations

from typing import Any

import torch

from gradscope import rundir
from gradscope.capture.rows import FIELDS

is_bad = rundir.is_bad_step  # the format's one rule (kept under its old name here)

_RING = 4  # CUDA copies in flight at most; a row that finds no free slot is judged at the flush


class NanStop:
    """Watches rows (rows.ROW) for the first bad step."""

    def __init__(self) -> None:
        self._new: list[tuple[Any, int, bool]] = []  # (row, optimizer id, grad_norm pending)
        self._inflight: list[tuple[torch.Tensor, Any, Any, int, bool]] = []  # (host, event, row, opt, pending)
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
                self._judge(values.tolist(), row, opt, pending)
            elif values.device.type == "cuda":
                self._copy(values, row, opt, pending)
            # other devices (MPS, XLA): judged at the flush, as before
        still = []
        for host, event, row, opt, pending in self._inflight:
            if event.query():
                self._judge(host.tolist(), row, opt, pending)
                self._free.append(host)
            else:
                still.append((host, event, row, opt, pending))
        self._inflight = still
        return self.reason is not None

    def _copy(self, values: torch.Tensor, row: Any, opt: int, pending: bool) -> None:
        if not self._free and len(self._inflight) >= _RING:
            return  # every slot still in flight: this row is judged at the flush
        host = self._free.pop() if self._free else torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._inflight.append((host, event, row, opt, pending))

    def _judge(self, v: list, row: Any, opt: int, pending: bool) -> None:
        if self.reason is not None:
            return
        grad_norm, loss, _, skipped, _ = FIELDS(v)
        if pending:  # the global norm is still being reduced across ranks: judge the loss only
            grad_norm = 0.0
        what = rundir.bad_quantity(grad_norm, loss, skipped, row.loss_recorded)
        if what is not None:
            self.reason = f"non-finite {what} at step {row.step} of optimizer {opt}"
