"""The clip audit: clipping bugs found from call order and parameter identity, never from values.

The recorder feeds it events (a backward begins / ends, a clip call with its parameters,
GradScaler.scale / unscale_, an optimizer step begins / ends, zero_grad); it also patches
the zeroing calls itself (``Optimizer.zero_grad``, ``Module.zero_grad``, ``Tensor.zero_`` /
``fill_``, ``torch._foreach_zero_``). From the order of those events, the identity of the parameters
a clip call names and the identity and version counter of each gradient tensor (host-side
metadata: reading them never waits for the device) it finds, per optimizer:

    clip-before-unscale   a clip on gradients a GradScaler scaled and has not unscaled
    clip-after-step       a clip after the step of those parameters, before their next backward
    clip-per-microbatch   a clip, then a backward that writes into the clipped gradients, then the step
    clip-partial          the clipped parameters are only part of what the step updates
    no-zero-grad          a step on gradients that were neither zeroed nor replaced since the last step
    clip-local-norm       a clip_grad_norm_ that measures one rank's shard of sharded gradients (FSDP1 flat
                          shards or use_orig_params views) without reducing across ranks; its record keeps the
                          rank's local norm and threshold at the first step, for the message (the one value
                          the audit reads, when the process file is written)

Each is counted once per optimizer step, with the first step it was seen at. The rules
lean to silence: where the events cannot prove a bug (a backward that may not reach the
clipped gradients, an in-place zeroing by some other means) nothing is reported.
State is bounded: everything per step is dropped when the step ends.
Standard library and torch only; the messages are made in analysis (gradscope/analysis/audit.py).
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable

import torch

from gradscope import rundir

KINDS = rundir.AUDIT_KINDS  # defined once, by the format's owner
MAX_CLIPS = 64  # clip calls kept per optimizer step (a loop that clips without stepping must not grow)
MAX_ZERO_PTRS = 4096
MODULES_LISTED = 20  # left-out modules kept in the record (largest first)


def _guard(fn):
    """The audit must never break the training: a failure turns it off and is recorded."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # pragma: no cover - a bug in the audit
            self.error = f"{type(e).__name__}: {e}"
            self._live, self._opts = [], {}
            return None

    return wrapper


class _Clip:
    """One clip call of the script, until the step of its parameters ends."""

    __slots__ = ("seq", "fn", "threshold", "params", "ids", "scaled", "watch", "overwritten", "done")

    def __init__(self, seq: int, fn: str, threshold: float, params: list, ids: set, scaled: bool) -> None:
        self.seq, self.fn, self.threshold, self.params, self.ids = seq, fn, threshold, params, ids
        self.scaled = scaled  # on gradients a GradScaler had scaled and not unscaled for that optimizer
        self.watch: list | None = None  # (param, grad weakref, version) as a backward begins
        self.overwritten = False  # a later backward wrote into the clipped gradients
        self.done = False


class _Opt:
    """The audit's view of one optimizer (the recorder's _OptState is `st`)."""

    __slots__ = ("st", "begin", "end", "zero", "unscaled", "last_step", "clips", "covered", "snapshot", "param_ids")

    def __init__(self, st: Any) -> None:
        self.st = st
        self.begin = self.end = self.zero = self.unscaled = -1  # event sequence numbers
        self.last_step = -1  # index of the last step that ended
        self.clips: list[_Clip] = []  # since the last step ended
        self.covered: set = set()  # ids of the parameters those clips named
        self.snapshot: list | None = None  # (param, grad weakref, version) when the last step ended
        self.param_ids: frozenset | None = None


class ClipAudit:
    """The state machine. `owner(id(param))` gives the recorder's optimizer state of a parameter;
    `active()` is false in forked children and after stop; `scaler()` is the GradScaler whose
    step() is running (None outside GradScaler.step)."""

    def __init__(self, owner: Callable[[int], Any], active: Callable[[], bool],
                 scaler: Callable[[], Any] = lambda: None) -> None:
        self._owner = owner
        self._active = active
        self._scaler = scaler
        self._seq = 0
        self._backward = -1  # seq of the last backward
        self._scale = -1  # seq of the last GradScaler.scale that scaled
        self._opts: dict[int, _Opt] = {}
        self._live: list[_Clip] = []  # clips a later backward may still write into
        self._zero_ptrs: dict[int, int] = {}  # data_ptr -> seq of a Tensor.zero_ outside zero_grad
        self._zero_unknown = -1  # seq of a zeroing we could not place (no data pointer, _foreach_zero_)
        self._in_zero_grad = False
        self._found: dict[tuple[str, int], dict] = {}
        self._names: dict[int, list] = {}
        self.error: str | None = None  # set when the audit itself failed: it then stops

    # ------------------------------------------------------------------ patches

    def patches(self) -> list[tuple[Any, str, Callable[[Any], Any]]]:
        """(owner, attribute, make(original) -> replacement) for patches.install (capture/patches.py)."""
        return [
            (torch.optim.Optimizer, "zero_grad", lambda orig: _make_opt_zero(self, orig)),
            (torch.nn.Module, "zero_grad", lambda orig: _make_module_zero(self, orig)),
            (torch.Tensor, "zero_", lambda orig: _make_tensor_zero(self, orig)),
            (torch.Tensor, "fill_", lambda orig: _make_tensor_fill(self, orig)),
            (torch, "_foreach_zero_", lambda orig: _make_foreach_zero(self, orig)),
            (torch.amp.GradScaler, "unscale_", lambda orig: _make_unscale(self, orig)),
        ]

    def _zeroing(self, orig, obj, *args, **kwargs):
        outer, self._in_zero_grad = self._in_zero_grad, True  # its own zero_() calls are this event
        try:
            return orig(obj, *args, **kwargs)
        finally:
            self._in_zero_grad = outer

    # ------------------------------------------------------------------ events

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _opt(self, st: Any) -> _Opt | None:
        if st is None or getattr(st, "kind", "optimizer") != "optimizer":
            return None
        o = self._opts.get(st.id)
        if o is None:
            o = self._opts[st.id] = _Opt(st)
        return o

    def _owners_of_groups(self, opt: Any) -> list[_Opt]:
        out = []
        for group in getattr(opt, "param_groups", None) or []:
            params = group.get("params") or []
            if params:
                o = self._opt(self._owner(id(params[0])))
                if o is not None and o not in out:
                    out.append(o)
        return out

    # The per-step events (backward, step, zero_grad) come first in a cheap form that only moves
    # counters; the guarded methods behind them do the work when there is any (a live clip call).

    def backward_begin(self) -> None:
        self._seq += 1
        self._backward = self._seq
        if self._live:
            self._watch_live()

    def backward_end(self) -> None:
        if self._live:
            self._check_live()

    @_guard
    def _watch_live(self) -> None:
        for c in self._live:
            c.watch = [(p, weakref.ref(g), g._version) for p in c.params if (g := p.grad) is not None]

    @_guard
    def _check_live(self) -> None:
        for c in self._live:
            for p, ref, version in c.watch or ():
                g = p.grad
                # Written in place (version moved) or accumulated out of place (a new tensor).
                if g is not None and (g is not ref() or g._version != version):
                    c.overwritten = True
                    break
            c.watch = None
        self._live = [c for c in self._live if not c.overwritten and not c.done]

    @_guard
    def scaled(self) -> None:
        self._scale = self._next()

    @_guard
    def unscaled(self, optimizer: Any) -> None:
        seq = self._next()
        for o in self._owners_of_groups(optimizer):
            o.unscaled = seq

    def optimizer_zero(self, opt: Any) -> None:
        self._seq += 1
        groups = opt.__dict__.get("param_groups")
        if groups and len(groups) == 1:  # the usual optimizer: one group, one owner already known
            params = groups[0].get("params") if isinstance(groups[0], dict) else None
            st = self._owner(id(params[0])) if params else None
            o = self._opts.get(st.id) if st is not None else None
            if o is not None and o.st is st:
                o.zero = self._seq
                return
        self._zero_groups(opt, self._seq)

    @_guard
    def _zero_groups(self, opt: Any, seq: int) -> None:
        for o in self._owners_of_groups(opt):
            o.zero = seq

    @_guard
    def module_zero(self, module: torch.nn.Module) -> None:
        seq = self._next()
        if not self._opts:
            return
        left = len(self._opts)
        seen: set = set()
        for p in module.parameters():
            o = self._opt(self._owner(id(p)))
            if o is not None and o.st.id not in seen:
                seen.add(o.st.id)
                o.zero = seq
                left -= 1
                if left <= 0:
                    break

    @_guard
    def tensor_zero(self, t: torch.Tensor) -> None:
        seq = self._next()
        try:
            ptr = t.data_ptr()
        except Exception:  # no storage (DTensor, meta): cannot say whose gradient it was
            self._zero_unknown = seq
            return
        if len(self._zero_ptrs) >= MAX_ZERO_PTRS:
            self._zero_ptrs.clear()
            self._zero_unknown = seq
        self._zero_ptrs[ptr] = seq

    @_guard
    def unknown_zero(self) -> None:
        self._zero_unknown = self._next()

    @_guard
    def clip(self, params: list, fn: str, threshold: float) -> None:
        """A clip call of the script (not gradscope's own --clip-norm call)."""
        seq = self._next()
        if not math.isfinite(threshold):
            return  # max_norm=inf clips nothing: a way to measure the norm, not a clip
        ids = set(map(id, params))
        owners: list[_Opt] = []
        for st in {id(s): s for s in map(self._owner, ids) if s is not None}.values():
            o = self._opt(st)
            if o is not None:
                owners.append(o)
        kept = None
        for o in owners:
            if o.end >= 0 and o.end > self._backward and o.end > o.begin:
                # After this optimizer's step, before any backward: the step applied its gradients already.
                self._hit("clip-after-step", o, o.last_step, function=fn)
                continue
            scaled = self._scale > o.end and o.unscaled <= o.end
            if kept is None:
                kept = _Clip(seq, fn, threshold, params, ids, scaled)
                self._live.append(kept)
                if len(self._live) > MAX_CLIPS:
                    del self._live[0]
            elif scaled and not kept.scaled:
                kept.scaled = True
            if len(o.clips) < MAX_CLIPS:
                o.clips.append(kept)
            o.covered |= ids

    @_guard
    def local_norm_clip(self, st: Any, fn: str, threshold: float, local_total: Any) -> None:
        """A clip call measured this rank's shard only (the recorder knows the gradients are sharded)."""
        o = self._opt(st)
        if o is None or not math.isfinite(threshold):
            return
        key = ("clip-local-norm", st.id)
        first = key not in self._found
        self._hit("clip-local-norm", o, st.steps, function=fn, threshold=threshold)
        if first and isinstance(local_total, torch.Tensor):
            self._found[key]["_local"] = local_total.detach()  # read when the record is written

    def step_begin(self, st: Any) -> None:
        o = self._opts.get(st.id)
        if o is None or o.st is not st:
            o = self._guarded_opt(st)
            if o is None:
                return
        self._seq += 1
        o.begin = self._seq

    def step_end(self, st: Any, via_scaler: bool | None = None) -> None:
        """The step of `st` is over (its update applied, or skipped by a GradScaler)."""
        o = self._opts.get(st.id)
        if o is not None and o.st is st and not o.clips and o.zero > o.end:
            # The common step: no clip call to judge, and zeroed since the last step (so not
            # accumulated): what the full method below concludes, without its loops.
            self._seq += 1
            o.snapshot = None
            o.end, o.last_step = self._seq, st.steps - 1
            return
        self._step_end(st, via_scaler)

    @_guard
    def _guarded_opt(self, st: Any) -> _Opt | None:
        return self._opt(st)

    @_guard
    def _step_end(self, st: Any, via_scaler: bool | None) -> None:
        o = self._opt(st)
        if o is None:
            return
        seq = self._next()
        step = st.steps - 1  # the recorder counts the step when its row is taken
        params = st.params
        if o.param_ids is None or len(o.param_ids) != len(params):
            o.param_ids = frozenset(map(id, params))
        if via_scaler is None:
            via_scaler = self._scaler() is not None
        for c in o.clips if via_scaler else ():  # a step made by GradScaler.step, which unscales
            if c.scaled:
                self._hit("clip-before-unscale", o, step, function=c.fn, threshold=c.threshold)
                break
        for c in o.clips:
            if c.overwritten and c.seq > o.zero:
                self._hit("clip-per-microbatch", o, step, function=c.fn)
                break
        if o.covered and not o.param_ids <= o.covered:  # the usual case, every parameter clipped: no loop
            have = [p for p in params if p.grad is not None]
            out = [i for i, p in enumerate(params) if p.grad is not None and id(p) not in o.covered]
            if out and len(out) < len(have):
                key = ("clip-partial", st.id)
                detail = None
                if key not in self._found:
                    detail = _partial_detail(params, have, out, o.clips[0].fn if o.clips else None)
                self._hit("clip-partial", o, step, **(detail or {}))
        if self._accumulated(o):
            self._hit("no-zero-grad", o, step)
        if o.zero > o.end:
            o.snapshot = None  # zeroed by zero_grad this step: the next one is judged only if it is not
        else:
            o.snapshot = [(p, weakref.ref(g), g._version) for p, g in zip(params, [p.grad for p in params])
                          if g is not None]
        for c in o.clips:
            c.done = True
        if o.clips:
            self._live = [c for c in self._live if not c.done]
        o.clips = []
        o.covered = set()
        o.end, o.last_step = seq, step

    def _accumulated(self, o: _Opt) -> bool:
        """Every gradient this step applies is the tensor the previous step applied, a backward wrote
        into it since (its version moved), and nothing zeroed it."""
        if not o.snapshot or o.zero > o.end or self._backward < o.end or self._zero_unknown > o.end:
            return False
        written = False
        for p, ref, version in o.snapshot:
            g = p.grad
            if g is None or g is not ref():
                return False
            written = written or g._version != version
        if not written:
            return False
        if self._zero_ptrs:
            for p, _, _ in o.snapshot:
                try:
                    if self._zero_ptrs.get(p.grad.data_ptr(), -1) > o.end:
                        return False
                except Exception:
                    return False
        return True

    def _hit(self, kind: str, o: _Opt, step: int, **detail: Any) -> None:
        key = (kind, o.st.id)
        f = self._found.get(key)
        if f is None:
            f = self._found[key] = {"kind": kind, "optimizer": o.st.id, "first_step": step, "count": 0,
                                    "_last": None, **detail}
        if f["_last"] != step:
            f["_last"] = step
            f["count"] += 1

    # ------------------------------------------------------------------ the record

    def record(self, names: Callable[[Any], list]) -> dict:
        """What the process file keeps under "clip_audit" (see rundir.py)."""
        found = []
        for f in sorted(self._found.values(), key=lambda f: (f["optimizer"], f["first_step"], KINDS.index(f["kind"]))):
            local = f.get("_local")
            f = {k: v for k, v in f.items() if k not in ("_last", "_local")}
            if local is not None:
                f["local_norm"] = float(local)  # at the process file's writing (a flush), not per step
            if f["kind"] == "clip-partial" and "left_out" in f:
                modules = self._left_out_modules(f, names)
                f["left_out"], f["left_out_modules"] = modules[:MODULES_LISTED], len(modules)
            found.append(f)
        return {"findings": found, "error": self.error}

    def _left_out_modules(self, f: dict, names: Callable[[Any], list]) -> list:
        """The modules holding the left-out parameters, largest first: [{module, tensors, elements}]."""
        o = self._opts.get(f["optimizer"])
        if o is None:
            return []
        if f["optimizer"] not in self._names:
            try:
                self._names[f["optimizer"]] = list(names(o.st))
            except Exception:
                self._names[f["optimizer"]] = []
        all_names = self._names[f["optimizer"]]
        modules: dict[str, list] = {}
        for i, n in f["left_out"]:
            name = all_names[i] if i < len(all_names) else f"parameter {i}"
            module = name.rsplit(".", 1)[0] if "." in name else name
            m = modules.setdefault(module, [0, 0])
            m[0] += 1
            m[1] += n
        ranked = sorted(modules.items(), key=lambda kv: -kv[1][1])
        return [{"module": k, "tensors": t, "elements": e} for k, (t, e) in ranked]


# ---------------------------------------------------------------------- the audit's patches (ClipAudit.patches)


def _make_opt_zero(audit: Any, orig: Callable) -> Callable:
    @functools.wraps(orig)
    def zero_grad(opt, *args, **kwargs):
        if not audit._active():
            return orig(opt, *args, **kwargs)
        audit.optimizer_zero(opt)
        return audit._zeroing(orig, opt, *args, **kwargs)

    return zero_grad


def _make_module_zero(audit: Any, orig: Callable) -> Callable:
    @functools.wraps(orig)
    def zero_grad(module, *args, **kwargs):
        if not audit._active():
            return orig(module, *args, **kwargs)
        audit.module_zero(module)
        return audit._zeroing(orig, module, *args, **kwargs)

    return zero_grad


def _make_tensor_zero(audit: Any, orig: Callable) -> Callable:
    def zero_(t):
        if not audit._in_zero_grad and audit._active():
            audit.tensor_zero(t)
        return orig(t)

    return zero_


def _make_tensor_fill(audit: Any, orig: Callable) -> Callable:
    def fill_(t, value):
        if not audit._in_zero_grad and audit._active():
            audit.tensor_zero(t)  # the value is not read: any fill counts as a reset
        return orig(t, value)

    return fill_


def _make_foreach_zero(audit: Any, orig: Callable) -> Callable:
    def _foreach_zero_(tensors):
        if not audit._in_zero_grad and audit._active():
            audit.unknown_zero()
        return orig(tensors)

    return _foreach_zero_


def _make_unscale(audit: Any, orig: Callable) -> Callable:
    @functools.wraps(orig)
    def unscale_(scaler, optimizer):
        if audit._active():
            audit.unscaled(optimizer)
        return orig(scaler, optimizer)

    return unscale_


def _partial_detail(params: list, have: list, out: list, fn: str | None) -> dict:
    elements = sum(p.numel() for p in have)
    left = [(i, params[i].numel()) for i in out]
    left_elements = sum(n for _, n in left)
    return {
        "function": fn,
        "tensors": len(have),
        "clipped_tensors": len(have) - len(out),
        "elements": elements,
        "clipped_elements": elements - left_elements,
        "left_out": left,  # (position, elements); turned into modules when written
    }
