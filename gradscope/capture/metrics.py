"""Metrics the script reports, into metrics-r{R}.csv: ``gradscope.log_metric``, Hugging Face
``Trainer`` evaluations (its ``eval_*`` keys), Lightning's ``self.log`` names, and the lines
``--metric-regex`` matches in the script's own stdout/stderr.

Every value is stamped with the step it was reported after: the ``step`` of optimizer 0's
last recorded row (-1 before its first), read from the recorder's own row count, a Python
int, at the moment the value is reported; so the step is exact, whatever the flush interval.
A tensor value stays on its device (a detached copy, no host read) and is copied to the host
in batches at flush, as the step rows are (flushing.py). Nothing here imports transformers or
lightning: their classes are patched when the script imports them (an import hook, as boot.py
waits for torch), and the patches go with the recorder's other patches at stop.

The regex source scans the script's writes in its own process (every rank its own): a thin
proxy around ``sys.stdout`` / ``sys.stderr`` passes each write through untouched and at once,
then searches each complete line. In-process, not in the supervisor: the stamp is the row
count at the write itself (a supervisor reading a pipe would see a line late, and the steps
file only every flush), and the script's streams stay the terminal (no pipe: isatty, line
buffering and progress bars are as without gradscope). Lines written to the file descriptors
directly (a C extension, a non-Python child) are not scanned.
"""
from __future__ import annotations

import csv
import importlib.abc
import importlib.util
import io
import math
import os
import re
import sys
import threading
from typing import Any, Callable

from gradscope.capture.options import ENV_METRIC_NAME, ENV_METRIC_REGEX

MAX_PENDING = 10_000  # values held between flushes before they are flushed anyway (no growth)
_MAX_PARTIAL = 1 << 16  # an unterminated line longer than this is searched as it is, then dropped

_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"gradscope: {msg}", file=sys.stderr)


class MetricBuffer:
    """The values reported since the last flush: (step, name, value), value a float or a
    0-dim tensor on its device (read at flush)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, Any]] = []
        self.held: list[tuple[int, str, float]] = []  # on the host, waiting for the steps file to exist
        self.inflight: list[tuple[list, Any, Any]] = []  # (rows, host tensor, cuda event)
        self.lock = threading.Lock()

    def add(self, step: int, name: str, value: Any) -> None:
        with self.lock:
            self.rows.append((step, name, value))


def current_step(rec: Any) -> int:
    """The step of optimizer 0's last recorded row (-1: none yet); a Python int, no host read."""
    return rec.current_step()


def _recorder() -> Any:
    """The active recorder of this process, or None (without importing the recorder: a script
    that calls log_metric without gradscope must not pay for importing it)."""
    active = getattr(sys.modules.get("gradscope.capture.recorder"), "active_recorder", None)
    rec = active() if active is not None else None
    return rec if rec is not None and rec.recording() and not rec.closed else None


def log_metric(name: str, value: Any) -> None:
    """Record ``value`` under ``name`` at the current optimizer step (metrics-r<rank>.csv).

    A no-op when the process is not recorded by gradscope. A tensor (one element) is kept on
    its device and read when the rows are flushed, never at the call; anything float() accepts
    (a number, a numpy scalar) is taken as it is. A value of another kind is dropped with one
    warning: recording never breaks the training.
    """
    rec = _recorder()
    if rec is None:
        return
    note(rec, name, value)


def note(rec: Any, name: Any, value: Any) -> None:
    if not isinstance(name, str) or not name or "\n" in name or "\r" in name:
        _warn_once("name", f"log_metric: the name must be a non-empty one-line string, got {name!r}; dropped")
        return
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1:  # metadata: no host read
            _warn_once("numel:" + name, f"log_metric: {name!r} is a tensor of {value.numel()} elements, not one; dropped")
            return
        # A detached copy, launched asynchronously: the script may change its tensor in place.
        value = value.detach().reshape(()).clone()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            _warn_once("type:" + name, f"log_metric: {name!r} = {type(value).__name__}, not a number; dropped")
            return
    else:
        value = float(value)
    buf = rec.metrics
    buf.add(current_step(rec), name, value)
    if len(buf.rows) >= MAX_PENDING:
        flush(buf)


# ---------------------------------------------------------------------- flushing (flushing.py calls these)


def flush(buf: MetricBuffer) -> None:
    """Launch the host copy of the pending tensor values (one stack per device and dtype)."""
    with buf.lock:
        rows, buf.rows = buf.rows, []
    if not rows:
        return
    import torch

    tensors: dict[Any, list[int]] = {}
    for i, (_, _, v) in enumerate(rows):
        if isinstance(v, torch.Tensor):
            tensors.setdefault((v.device, v.dtype), []).append(i)
    copies = []
    for (device, _), idx in tensors.items():
        stacked = torch.stack([rows[i][2] for i in idx]).to(torch.float64 if device.type != "mps" else torch.float32)
        host = stacked if device.type == "cpu" else stacked.to("cpu", non_blocking=True)
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        copies.append((idx, host, event))
    buf.inflight.append((rows, copies, None))


def drain(buf: MetricBuffer, writer: Any, block: bool) -> None:
    """Write the values whose copies have arrived, in report order, once ``writer`` (the process's
    ProcessWriter, None before its first flush) has begun the steps file."""
    while buf.inflight:
        rows, copies, _ = buf.inflight[0]
        events = [e for _, _, e in copies if e is not None]
        if block:
            for e in events:
                e.synchronize()
        elif not all(e.query() for e in events):
            break  # not arrived yet; the next flush tries again
        buf.inflight.pop(0)
        values = [v for _, _, v in rows]
        for idx, host, _ in copies:
            for i, x in zip(idx, host.tolist()):
                values[i] = x
        buf.held.extend((s, n, float(v)) for (s, n, _), v in zip(rows, values))
    if buf.held and writer is not None and writer.started:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        for s, n, v in buf.held:
            w.writerow((s, n, _fmt(v)))
        buf.held = []
        writer.write_metrics_text(out.getvalue())
    elif len(buf.held) > MAX_PENDING:  # no step yet: keep the latest values only
        del buf.held[: len(buf.held) - MAX_PENDING]


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


# ---------------------------------------------------------------------- Hugging Face Trainer, Lightning


def _hf_patch(rec: Any, module: Any) -> list:
    trainer = getattr(module, "Trainer", None)
    if trainer is None or not hasattr(trainer, "log"):
        return []

    def make(orig: Callable) -> Callable:
        def log(self, logs, *args, **kwargs):
            if rec.recording() and isinstance(logs, dict):
                for k, v in logs.items():
                    if isinstance(k, str) and k.startswith("eval_") and isinstance(v, (int, float)) \
                            and not isinstance(v, bool):
                        note(rec, k, v)
            return orig(self, logs, *args, **kwargs)

        return log

    return [(trainer, "log", make)]


def _lightning_patch(rec: Any, module: Any) -> list:
    connector = getattr(module, "_LoggerConnector", None)
    if connector is None or not isinstance(getattr(connector, "metrics", None), property):
        return []
    inside = threading.local()

    def make_end(orig: Callable) -> Callable:
        # The points where Lightning computes what every self.log call left: after a batch
        # (on_step values), at an epoch's end (on_epoch values, validation's included).
        def end(self, *args, **kwargs):
            inside.on = not getattr(self.trainer, "sanity_checking", False)
            try:
                return orig(self, *args, **kwargs)
            finally:
                inside.on = False

        return end

    def make_metrics(orig: property) -> property:
        def metrics(self):
            out = orig.fget(self)
            if getattr(inside, "on", False) and rec.recording():
                inside.on = False  # once per end call
                try:
                    for k, v in (out.get("callback") or {}).items():
                        note(rec, k, v)
                except Exception as e:  # never break the training
                    _warn_once("lightning", f"Lightning metrics not recorded: {type(e).__name__}: {e}")
            return out

        return property(metrics)

    return [(connector, "on_batch_end", make_end), (connector, "on_epoch_end", make_end),
            (connector, "metrics", make_metrics)]


# the module whose import makes the patch possible -> what patches it
FRAMEWORKS: dict[str, Callable[[Any, Any], list]] = {
    "transformers.trainer": _hf_patch,
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector": _lightning_patch,
    "pytorch_lightning.trainer.connectors.logger_connector.logger_connector": _lightning_patch,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``on_module(module)`` once one of ``names`` has finished importing."""

    def __init__(self, names: set, on_module: Callable[[Any], None]) -> None:
        self.names, self.on_module, self._busy = set(names), on_module, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        self.names.discard(fullname)
        exec_module, on_module = loader.exec_module, self.on_module

        def exec_then_patch(module):
            exec_module(module)
            on_module(module)

        loader.exec_module = exec_then_patch
        return spec


class _ImportHook:
    """The handle of install's import hook: ``remove()`` takes it off ``sys.meta_path``."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def remove(self) -> None:
        if self.hook in sys.meta_path:
            sys.meta_path.remove(self.hook)


def install(rec: Any) -> _ImportHook:
    """Patch the frameworks the script imported, and those it will import (``rec.patch``: the recorder
    removes them at stop); returns the handle of the import hook."""

    def patch(module: Any) -> None:
        if rec.closed:
            return
        try:
            for owner, name, make in FRAMEWORKS[module.__name__](rec, module):
                rec.patch(owner, name, make)
        except Exception as e:  # an unexpected version: record the steps, say so once
            _warn_once(module.__name__, f"metrics of {module.__name__} not recorded: {type(e).__name__}: {e}")

    waiting = set()
    for name in FRAMEWORKS:
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        else:
            waiting.add(name)
    hook = _AfterImport(waiting, patch)
    sys.meta_path.insert(0, hook)
    return _ImportHook(hook)


# ---------------------------------------------------------------------- --metric-regex


class _Scanned:
    """A stream whose writes pass through unchanged; complete lines are searched afterwards."""

    def __init__(self, stream: Any, regex: re.Pattern, name: str) -> None:
        self.__dict__.update(_stream=stream, _regex=regex, _name=name, _partial="")

    def write(self, text):
        n = self._stream.write(text)
        try:
            if isinstance(text, str) and text:
                self._scan(text)
        except Exception:  # the script's output matters more than a metric
            pass
        return n

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def _scan(self, text: str) -> None:
        parts = re.split(r"[\r\n]", self._partial + text)
        partial = parts.pop()
        if len(partial) > _MAX_PARTIAL:
            parts.append(partial)
            partial = ""
        self.__dict__["_partial"] = partial
        rec = None
        for line in parts:
            m = self._regex.search(line) if line else None
            if m is None:
                continue
            rec = rec or _recorder()
            if rec is None:
                return
            try:
                value = float(m.group(1))
            except (TypeError, ValueError, IndexError):
                continue
            note(rec, self._name, value)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __setattr__(self, name, value):
        setattr(self._stream, name, value)

    def __iter__(self):
        return iter(self._stream)


def scan_streams_from_env() -> None:
    """`--metric-regex`: wrap this process's sys.stdout and sys.stderr (boot, before the script)."""
    pattern, name = os.environ.get(ENV_METRIC_REGEX), os.environ.get(ENV_METRIC_NAME)
    if not pattern or not name:
        return
    try:
        regex = re.compile(pattern)
    except re.error as e:
        _warn_once("regex", f"--metric-regex {pattern!r} is not a regular expression ({e}); not scanned")
        return
    for attr in ("stdout", "stderr"):
        stream = getattr(sys, attr, None)
        if stream is not None and not isinstance(stream, _Scanned):
            setattr(sys, attr, _Scanned(stream, regex, name))
