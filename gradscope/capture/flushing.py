"""Flushing and writing: the rows' device-to-host copies, the steps/layers CSVs and process-r*.json.

Functions of the recorder (its first argument); the Recorder keeps them as methods of the same names.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from gradscope import __version__, rundir
from gradscope.capture import announce, distributed, rows as lean_rows
from gradscope.capture.boot import ENV_RUN_ID
from gradscope.capture.names import parameter_names
from gradscope.capture.stopper import is_bad
from gradscope.capture.writer import ProcessWriter


@dataclass
class Batch:
    """Rows whose device-to-host copy has been launched but maybe not finished."""

    st: Any  # recorder._OptState
    rows: list
    values: torch.Tensor
    lrs: torch.Tensor | None
    layers: torch.Tensor | None
    layer_steps: list
    event: Any


def flush(rec: Any) -> None:
    """Launch the device-to-host copy of every pending row; write what has arrived."""
    rec._pending = 0
    if rec._write_error is not None:  # nothing can be written any more: keep no rows either
        for st in rec._states:
            st.rows = []
        rec._last_flush = time.monotonic()
        return
    if rec._nantrace is not None:
        rec._nantrace.flush()  # before the rows' copies: their events cover it
    rec._last_flush = time.monotonic()
    for st in rec._states:
        if not st.rows:
            continue
        rows, st.rows = st.rows, []
        for r in rows:
            if r.norms is not None:
                rec._resolve(r)
        device = rows[0].values.device if rows[0].values is not None else rows[0].taken.device
        values, layers, layer_steps = lean_rows.values_and_layers(rows, device)
        tensor_lrs = [r.lr for r in rows if isinstance(r.lr, torch.Tensor)]
        lrs = torch.stack([t.float().to(device) for t in tensor_lrs]) if tensor_lrs else None
        batch = Batch(
            st=st,
            rows=rows,
            values=to_host(values),
            lrs=to_host(lrs) if lrs is not None else None,
            layers=to_host(layers) if layers is not None else None,
            layer_steps=layer_steps,
            event=None,
        )
        if device.type == "cuda":
            batch.event = torch.cuda.Event()
            batch.event.record()
        rec._inflight.append(batch)
    drain(rec, block=False)


def drain(rec: Any, block: bool) -> None:
    wrote = rows_written = False
    current = None  # the batch being written
    try:
        while rec._inflight:
            batch = rec._inflight[0]
            if batch.event is not None:
                if block:
                    batch.event.synchronize()
                elif not batch.event.query():
                    break  # not arrived yet; try again at the next flush
            current = rec._inflight.pop(0)
            write(rec, current)
            current, rows_written = None, True
        if rec._nantrace is not None and rec._nantrace.resolve():
            wrote = True  # the origin is known: into the process file now
        if wrote or (rows_written and process_due(rec, block)):
            write_process(rec)  # small, atomic: keeps step counts and optimizers current
    except OSError as e:  # a full disk, a vanished directory: never the training's problem
        stop_writing(rec, e, current.rows[0].step if current is not None and current.rows else None)
    if rec.stop_on_nan and rec._first_bad and rec._status == "running":
        # Values reach the host only here, so this is the earliest moment we can know,
        # without a per-step sync: within one flush interval of the bad step.
        print(f"gradscope: stopping the training (--stop-on-nan): {rec._first_bad}", file=sys.stderr)
        rec._status = "failed"
        raise SystemExit(1)


def stop_writing(rec: Any, error: OSError, step: int | None = None) -> None:
    """The run directory cannot be written: stop recording (say so once), let the training go on.

    Rows are dropped from now on (flush keeps none); the process file is rewritten, in place
    if it must, with "recording_error", so every reader says the recording is incomplete.
    """
    if rec._write_error is not None:
        return
    at = f" at step {step}" if step is not None else ""
    rec._write_error = f"cannot write in {rec.run_dir}{at}: {error.strerror or error}"
    print(f"gradscope: {rec._write_error}: recording stopped, the training goes on "
          "(the run is marked incomplete)", file=sys.stderr, flush=True)
    rec._inflight.clear()
    for st in rec._states:
        st.rows = []
    try:
        write_process(rec)
    except OSError:
        pass  # not even the process file: readers find it unclosed, which says as much


def process_due(rec: Any, block: bool) -> bool:
    """Rewrite process-r*.json after rows were written? When anything but the counts changed
    (an optimizer, a clip function or threshold), and the counts at most every flush_seconds:
    replacing a file costs milliseconds on some disks, more than a hundred small steps."""
    key = (len(rec._states), tuple(rec._clip_calls), tuple(map(len, rec._thresholds.values())),
           len(rec._script_max_norms), rec._status, len(getattr(rec._audit, "_found", ())),
           getattr(rec._audit, "error", None))  # a new clip-audit finding: written at once
    now = time.monotonic()
    if block or key != rec._process_key or now - rec._process_at >= rec.flush_seconds:
        rec._process_key, rec._process_at = key, now
        return True
    return False


def stop_now(rec: Any) -> None:
    """--stop-on-nan saw a bad step: write every row (waiting now is fine: we stop), then stop."""
    flush(rec)
    drain(rec, block=True)  # raises SystemExit once the bad row is written
    if rec._status == "running":  # the row was judged bad before its flush could say so
        rec._first_bad = rec._first_bad or rec._stopper.reason
        drain(rec, block=True)


def write(rec: Any, batch: Batch) -> None:
    first = rec._writer is None
    if first:
        rec._writer = ProcessWriter(rec.run_dir, rec.rank)
    st = batch.st
    # Any non-finite grad_norm or loss in the batch? One check on the host copy, not one per row.
    check = rec._first_bad is None and not bool(torch.isfinite(batch.values[:, :2]).all())
    values = batch.values.tolist()
    lrs = iter(batch.lrs.tolist()) if batch.lrs is not None else iter(())
    # One %-format per line (the bytes of rundir.fmt_float32 / fmt_float64: "%.9g" and repr
    # spell nan and inf the same way): formatting is most of a flush's cost.
    line = str(st.id) + ",%d,%.9g,%.9g,%r,%d,%r,%d,%r,%r,%.6f\n"
    lean = str(st.id) + ",%d,%.9g,%.9g,nan,0,nan,0,nan,%r,%.6f\n"  # a lean row's constant columns
    lines = []
    for r, (gn, loss, clipped, skipped, scale) in zip(batch.rows, values):
        lr = next(lrs) if isinstance(r.lr, torch.Tensor) else float(r.lr)
        if check and rec._first_bad is None and is_bad(gn, loss, skipped):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            rec._first_bad = f"non-finite {what} at step {r.step} of optimizer {st.id}"
        if r.values is None:  # lean (rows.py): no clip, no scaler
            lines.append(lean % (r.step, gn, loss, lr, r.time))
        else:
            lines.append(line % (r.step, gn, loss, r.clip_max_norm, clipped, r.clip_value, skipped, scale, lr,
                                 r.time))
    rec._writer.write_steps_text("".join(lines))
    if rec._nantrace is not None:
        rec._nantrace.note_rows(st.id, batch.rows, values)
    if first:  # once per process, at its first write: `gradscope run` says the recording is live
        announce.first_step(rec._writer.rank, batch.rows[0].step, st.id, st.cls, batch.rows[0].time)
    if batch.layers is not None:
        if st.names is None:
            st.names = parameter_names(st.params)
        layer_line = "%d" + ",%.9g" * len(st.names) + "\n"
        text = "".join(layer_line % (step, *row) for step, row in zip(batch.layer_steps, batch.layers.tolist()))
        rec._writer.write_layers_text(st.id, st.names, text)
        st.layer_rows += len(batch.layer_steps)


def write_process(rec: Any) -> None:
    if rec._writer is None:
        return
    if rec._run_id is None:  # the run's id, as meta.json says it: --force removes this run's files by it
        rec._run_id = os.environ.get(ENV_RUN_ID) or _meta_run_id(rec.run_dir)
    info = {
        "format": rundir.FORMAT_NAME,
        "format_version": rundir.FORMAT_VERSION,
        "gradscope_version": __version__,
        "rank": rec._writer.rank,
        "world_size": distributed.world_size(),
        "pid": rec._pid,
        "host": rundir.host_name(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "devices": sorted(rec._devices),
        "started": iso(rec._started_at),
        "ended": iso(time.time()) if rec._closed or rec._status != "running" else None,
        "status": rec._status,
        "run_id": rec._run_id,
        # recording_gaps (rundir.py): closed only at a clean stop, after the last rows were written
        "closed": bool(rec._closed) and rec._write_error is None,
        "recording_error": rec._write_error,
        "layer_stride": rec.layer_stride,
        "flush_steps": rec.flush_steps,
        "flush_seconds": rec.flush_seconds,
        "optimizers": [
            {
                "id": st.id,
                "class": st.cls,
                "kind": st.kind,
                "parameters": st.n_elements,
                "tensors": len(st.params),
                "steps": st.steps,
                "momentum": st.momentum,
                "layers_file": rundir.layers_file(rec._writer.rank, st.id) if st.names else None,
                "layer_rows": st.layer_rows,
            }
            for st in rec._states
        ],
        "clip_calls": dict(rec._clip_calls),
        "clip_thresholds": {k: v for k, v in rec._thresholds.items() if v},
        "clip_norm_override": rec.clip_norm,
        "script_max_norms_overridden": list(rec._script_max_norms),
        "clip_audit": rec._audit.record(lambda st: st.names or parameter_names(st.params)),
    }
    if rec._nantrace is not None:
        info["nan_trace"] = rec._nantrace.info()
    rec._writer.write_process(info, in_place_fallback=rec._write_error is not None)


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
