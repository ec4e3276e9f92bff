"""Flushing and writing: the rows' device-to-host copies, then their lines, layer rows and process-r*.json
(spelled by rundir.py, the format's owner).

A :class:`Flusher` takes rows, never the recorder: ``flush`` is handed each optimizer's pending
rows (with the optimizer's state: its id, class, parameters, names and layer-row count, which the
layer store and the process file need), and the process file is written from a snapshot, a plain
dict the recorder builds when the flusher asks for one (``snapshot(rank)``).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gradscope import rundir
from gradscope.capture import announce, metrics, rows as lean_rows
from gradscope.capture.options import ENV_RUN_ID
from gradscope.capture.names import parameter_names
from gradscope.capture.writer import ProcessWriter


@dataclass
class Batch:
    """Rows whose device-to-host copy has been launched but maybe not finished."""

    st: Any  # the optimizer's state (recorder._OptState)
    rows: list
    values: torch.Tensor
    lrs: torch.Tensor | None
    layers: torch.Tensor | None
    layer_steps: list
    event: Any


class Flusher:
    """Copies rows to the host in batches and writes them into one process's files.

    ``snapshot(rank)`` returns the process file's values as the recorder knows them (the values
    rundir.process_info spells, in order, with ``run_id`` and ``recording_error`` left for the
    flusher to fill in); ``changes()`` a cheap tuple that differs when anything but the counts changed.
    """

    def __init__(self, run_dir: str, *, rank: Callable[[], int], flush_seconds: float,
                 snapshot: Callable[[int], dict], changes: Callable[[], tuple],
                 nantrace: Any = None, metric_buffer: Any = None) -> None:
        self.run_dir = run_dir
        self._rank = rank
        self._flush_seconds = flush_seconds
        self._snapshot = snapshot
        self._changes = changes
        self._nantrace = nantrace
        self._metrics = metric_buffer
        self.writer: ProcessWriter | None = None
        self.inflight: list[Batch] = []
        self.error: str | None = None  # the run directory could not be written: recording stopped
        self.first_bad: str | None = None  # first non-finite step seen on the host
        self._process_key: tuple | None = None  # what process-r*.json last said, besides counts
        self._process_at = 0.0
        self._run_id: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def flush(self, pending: list[tuple[Any, list]]) -> None:
        """Launch the device-to-host copy of each optimizer's rows, ``(state, rows)``; write what has arrived."""
        for st, rows in pending:
            device = rows[0].values.device if rows[0].values is not None else rows[0].taken.device
            values, layers, layer_steps = lean_rows.values_and_layers(rows, device)
            tensor_lrs = [r.lr for r in rows if isinstance(r.lr, torch.Tensor)]
            lrs = torch.stack([t.float().to(device) for t in tensor_lrs]) if tensor_lrs else None
            batch = Batch(st=st, rows=rows, values=to_host(values), lrs=to_host(lrs) if lrs is not None else None,
                          layers=to_host(layers) if layers is not None else None, layer_steps=layer_steps,
                          event=None)
            if device.type == "cuda":
                batch.event = torch.cuda.Event()
                batch.event.record()
            self.inflight.append(batch)
        if self._metrics is not None:
            metrics.flush(self._metrics)  # the reported values (metrics-r*.csv): host copies launched the same way
        self.drain(block=False)

    def drain(self, block: bool) -> None:
        """Write the batches whose copies have arrived (all of them, waiting, when ``block``)."""
        wrote = rows_written = False
        current = None  # the batch being written
        try:
            while self.inflight:
                batch = self.inflight[0]
                if batch.event is not None:
                    if block:
                        batch.event.synchronize()
                    elif not batch.event.query():
                        break  # not arrived yet; try again at the next flush
                current = self.inflight.pop(0)
                self._write(current)
                current, rows_written = None, True
            if self._metrics is not None:  # after the step rows: a value's step is in the steps file first
                metrics.drain(self._metrics, self.writer, block)
            if self._nantrace is not None and self._nantrace.resolve():
                wrote = True  # the origin is known: into the process file now
            if wrote or (rows_written and self._process_due(block)):
                self.write_process()  # small, atomic: keeps step counts and optimizers current
        except OSError as e:  # a full disk, a vanished directory: never the training's problem
            self.stop_writing(e, current.rows[0].step if current is not None and current.rows else None)

    def stop_writing(self, error: OSError, step: int | None = None) -> None:
        """The run directory cannot be written: stop recording (say so once), let the training go on.

        Rows are dropped from now on (the recorder hands none); the process file is rewritten, in
        place if it must, with "recording_error", so every reader says the recording is incomplete.
        """
        if self.error is not None:
            return
        at = f" at step {step}" if step is not None else ""
        self.error = f"cannot write in {self.run_dir}{at}: {error.strerror or error}"
        print(f"gradscope: {self.error}: recording stopped, the training goes on "
              "(the run is marked incomplete)", file=sys.stderr, flush=True)
        self.inflight.clear()
        try:
            self.write_process()
        except OSError:
            pass  # not even the process file: readers find it unclosed, which says as much

    def _process_due(self, block: bool) -> bool:
        """Rewrite process-r*.json after rows were written? When anything but the counts changed
        (an optimizer, a clip function or threshold), and the counts at most every flush_seconds:
        replacing a file costs milliseconds on some disks, more than a hundred small steps."""
        key = self._changes()
        now = time.monotonic()
        if block or key != self._process_key or now - self._process_at >= self._flush_seconds:
            self._process_key, self._process_at = key, now
            return True
        return False

    def _write(self, batch: Batch) -> None:
        first = self.writer is None
        if first:
            self.writer = ProcessWriter(self.run_dir, self._rank())
        st = batch.st
        # Any non-finite grad_norm or loss in the batch? One check on the host copy, not one per row.
        check = self.first_bad is None and not bool(
            torch.isfinite(batch.values[:, [lean_rows.GRAD_NORM, lean_rows.LOSS]]).all())
        values = batch.values.tolist()
        lines = _lines(st, batch, values, check and self._judge)
        self.writer.write_steps_text("".join(lines))
        if self._nantrace is not None:
            self._nantrace.note_rows(st.id, batch.rows, values)
        if first:  # once per process, at its first write: `gradscope run` says the recording is live
            announce.first_step(self.writer.rank, batch.rows[0].step, st.id, st.cls, batch.rows[0].time)
        if batch.layers is not None:
            if st.names is None:
                st.names = parameter_names(st.params)
            self.writer.write_layer_rows(st.id, st.names, batch.layer_steps, batch.layers)
            st.layer_rows += len(batch.layer_steps)

    def _judge(self, st: Any, r: Any, gn: float, loss: float, skipped: float) -> None:
        if self.first_bad is None:
            what = rundir.bad_quantity(gn, loss, skipped, r.loss_recorded)
            if what is not None:
                self.first_bad = f"non-finite {what} at step {r.step} of optimizer {st.id}"

    def write_process(self) -> None:
        """process-r*.json from the recorder's snapshot (nothing before this process's first row)."""
        if self.writer is None:
            return
        if self._run_id is None:  # the run's id, as meta.json says it: --force removes this run's files by it
            self._run_id = os.environ.get(ENV_RUN_ID) or _meta_run_id(self.run_dir)
        snap = self._snapshot(self.writer.rank)
        snap["run_id"] = self._run_id
        # recording_gaps (rundir.py): closed only at a clean stop, after the last rows were written
        snap["closed"] = bool(snap["closed"]) and self.error is None
        snap["recording_error"] = self.error
        self.writer.write_process(rundir.process_info(**snap), in_place_fallback=self.error is not None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _lines(st: Any, batch: Batch, values: list, judge: Any) -> list:
    """The batch's step lines; ``judge(st, row, grad_norm, loss, skipped)`` sees each row when given."""
    lrs = iter(batch.lrs.tolist()) if batch.lrs is not None else iter(())
    lines = []
    fmt = _line_formats(st)
    for r, (gn, loss, clipped, skipped, scale) in zip(batch.rows, map(lean_rows.FIELDS, values)):
        lr = next(lrs) if isinstance(r.lr, torch.Tensor) else float(r.lr)
        if judge:
            judge(st, r, gn, loss, skipped)
        # One %-format per line (rundir.step_line): formatting is most of a flush's cost.
        lean, recorded = r.values is None, r.loss_recorded
        if lean:  # lean (rows.py): no clip, no scaler
            line = fmt[0] % (r.step, gn, loss, lr, r.time) if recorded else fmt[1] % (r.step, gn, lr, r.time)
        elif recorded:
            line = fmt[2] % (r.step, gn, loss, r.clip_max_norm, clipped, r.clip_value, skipped, scale, lr, r.time)
        else:
            line = fmt[3] % (r.step, gn, r.clip_max_norm, clipped, r.clip_value, skipped, scale, lr, r.time)
        lines.append(line)
    return lines


_FORMATS: dict[int, tuple[str, str, str, str]] = {}


def _line_formats(st: Any) -> tuple[str, str, str, str]:
    """An optimizer's four line formats: lean / lean without loss / full / full without loss."""
    fmt = _FORMATS.get(st.id)
    if fmt is None:
        opt = {"optimizer": str(st.id)}
        no_loss = {"loss": rundir.NO_LOSS}
        fmt = _FORMATS[st.id] = (
            rundir.step_line({**opt, **rundir.NO_CLIP_NO_SCALER}),
            rundir.step_line({**opt, **rundir.NO_CLIP_NO_SCALER, **no_loss}),
            rundir.step_line(opt),
            rundir.step_line({**opt, **no_loss}),
        )
    return fmt


def _meta_run_id(run_dir: str) -> str | None:
    try:
        return rundir.read_json(os.path.join(run_dir, rundir.META_FILE)).get("run_id") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def to_host(t: torch.Tensor) -> torch.Tensor:
    # CUDA: an asynchronous copy into pinned memory, completion tracked by an event.
    if t.device.type == "cpu":
        return t
    return t.to("cpu", non_blocking=True)


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + ("%.3f" % (t % 1))[1:]
