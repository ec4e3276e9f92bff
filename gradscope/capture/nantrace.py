"""NaN provenance (`gradscope run --trace-nan`): where the first non-finite value appeared.

Global, removable module hooks flag every module call of a training forward (grad mode on),
and gradient hooks on the tensors those calls take and return flag the backward. Each flag is
a 0-d bool computed on the device (the sum of the tensor is finite: see _all_finite) and written into a small
per-step device buffer, in the order the events happen; nothing is read on the host per step.
The buffer travels to the host with the recorder's flush, where the first flagged event of the
first failing step is named:

    input     a floating-point tensor given to a root module (the model) was already non-finite
    forward   a module's output was non-finite while its inputs were finite
    loss      the loss was non-finite while the model's outputs were finite (a loss module's
              output, or the value passed to backward())
    backward  every forward value finite, but a module's gradient with respect to its input, the
              gradient flowing into a module from its parent's own code, or a parameter's gradient
              was non-finite while the gradient flowing into it was finite

Events of a step that did not fail (finite loss and gradient norm) are remembered as benign:
a module that returns -inf by design (an attention mask) is not blamed for a later failure.
A scaler-skipped step is neither. Once the origin is known the hooks are removed.
Only torch and the standard library are imported here (capture code).
"""
from __future__ import annotations

import gc
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from gradscope.capture.names import strip_wrappers
from gradscope.capture.rows import FIELDS
from gradscope import rundir

IN, FWD, LOSS, GOUT, BWD, PARAM = range(6)
_SHIFT = 1 << 32
_CACHE_MAX = 4096  # finiteness flags kept per forward, by tensor identity and version


class _Call:
    """One module call: its inputs' finiteness and, once backward reaches it, its output gradient's."""

    __slots__ = ("mod", "in_ok", "in_slot", "gout_ok", "window")

    def __init__(self, mod: int, in_ok: Any, window: int) -> None:
        self.mod, self.in_ok, self.gout_ok, self.window = mod, in_ok, None, window
        self.in_slot: int | None = None


class _Probe:
    """The one gradient hook on a tensor: the calls that consumed it, then those that returned it.

    Consumers first: a gradient that is bad here was made by the consumer's backward, so its
    event must come before the producers' "bad gradient flowing in" events. Producers outermost
    first: a bad gradient arriving at a tensor several nested modules returned came from code of
    the module around the outermost one.
    """

    __slots__ = ("trace", "consumers", "producers")

    def __init__(self, trace: "NanTrace") -> None:
        self.trace = trace
        self.consumers: list = []
        self.producers: list = []

    def __call__(self, grad: torch.Tensor) -> None:
        tr = self.trace
        if not tr.active or not _plain(grad):
            return None
        ok = tr._finite_one(grad)
        for call in self.consumers:
            tr._event(BWD, call.mod, torch.gt, call.gout_ok if call.gout_ok is not None else tr._true(ok), ok)
        for call in reversed(self.producers):
            tr._event(GOUT, call.mod, torch.logical_not, ok)
            call.gout_ok = ok if call.gout_ok is None else torch.logical_and(call.gout_ok, _on(ok, call.gout_ok))
        return None


@dataclass
class _Window:
    """The events between two optimizer steps, closed by step `key` = (optimizer, step)."""

    key: tuple[int, int]
    flags: torch.Tensor  # device bool, one per event
    codes: tuple


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool on t's device: every element finite. One reduction pass, no tensor-sized temporary.

    The sum of a tensor is non-finite when any element is (NaN, or an inf; +inf and -inf make
    NaN), and s - s == 0 exactly when s is finite. `torch.isfinite(t).all()` gives the same
    answer at many times the cost (it materialises several tensor-sized masks). The one
    difference: finite values whose sum overflows (|sum| > 3.4e38 in float32) count as
    non-finite. float16 would overflow at 65504, so there the largest magnitude is used.
    """
    if t.dtype == torch.float16:
        if t.numel() == 0:
            return torch.ones((), dtype=torch.bool, device=t.device)
        s = t.detach().abs().amax()
    else:
        s = t.detach().sum()
    return (s - s) == 0


def _on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # .to() of a tensor already there still costs a call; most models live on one device
    return t if t.device == like.device else t.to(like.device, non_blocking=True)


def _plain(t: Any) -> bool:
    # Tensor subclasses (DTensor, ...) are skipped: their reductions do not write into a plain buffer.
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def _tensors(obj: Any, depth: int = 0) -> list:
    """The floating-point tensors in a module's inputs or outputs (tuples, lists, dicts; 3 levels)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if _plain(obj) and (obj.is_floating_point() or obj.is_complex()) else []
    if depth >= 3:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o, depth + 1)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o, depth + 1)]
    return []


class NanTrace:
    """Flags where the first non-finite value appeared; the recorder drives it (see recorder.py)."""

    def __init__(self) -> None:
        self.active = False
        self.origin: dict | None = None
        self.steps_traced = 0
        self._pid = os.getpid()
        self._handles: list[Any] = []
        self._mods: list[Any] = []  # index -> weakref to the module
        self._mod_index: dict[int, tuple[Any, int]] = {}
        self._loss_mod: list[bool] = []
        self._free: list[int] = []  # indices of modules that died
        self._params: list[Any] = []
        self._param_index: dict[int, tuple[Any, int]] = {}
        self._param_codes: dict[tuple, tuple] = {}
        self._param_sets: dict[int, list] = {}
        self._stack: list[_Call] = []
        self._probes: dict[int, tuple[Any, _Probe]] = {}
        self._ok: dict[int, tuple[Any, int, torch.Tensor]] = {}
        self._trues: dict[torch.device, torch.Tensor] = {}
        self._buf: torch.Tensor | None = None
        self._codes: list[int] = []
        self._cap = 64
        self._window = 0
        self._closed: list[_Window] = []
        self._copied: list[list] = []  # [host flags, event, windows, next window position, offset]
        self._status: dict[tuple[int, int], str] = {}
        self._benign: set[int] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from torch.nn.modules import module as m

        self._handles.append(m.register_module_forward_pre_hook(self._pre))
        self._handles.append(m.register_module_forward_hook(self._post, with_kwargs=True, always_call=True))
        self.active = True

    def stop(self) -> None:
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._probes.clear()
        self._ok.clear()

    # ------------------------------------------------------------------ events (per step, on the device)

    def _true(self, like: torch.Tensor) -> torch.Tensor:
        t = self._trues.get(like.device)
        if t is None:
            t = self._trues[like.device] = torch.ones((), dtype=torch.bool, device=like.device)
        return t

    def _slot(self, kind: int, idx: int, device: torch.device, n: int = 1) -> int:
        k = len(self._codes)
        buf = self._buf
        if buf is None or k + n > buf.numel():
            size = max(self._cap, 2 * (k + n))
            new = torch.zeros(size, dtype=torch.bool, device=buf.device if buf is not None else device)
            if buf is not None and k:
                new[:k].copy_(buf[:k])
            self._buf = new
        self._codes.append(kind * _SHIFT + idx)
        return k

    def _event(self, kind: int, idx: int, op: Any, *args: torch.Tensor) -> None:
        """Write op(*args) (a 0-d bool: bad) into the next slot, without leaving the device."""
        k = self._slot(kind, idx, args[0].device)
        self._write(k, op, *args)

    def _write(self, k: int, op: Any, *args: torch.Tensor) -> None:
        out = self._buf[k]
        if all(a.device == out.device for a in args):
            op(*args, out=out)
        else:  # a model spread over devices: a small copy, still asynchronous
            out.copy_(op(*[a.to(out.device, non_blocking=True) for a in args]), non_blocking=True)

    def _finite_one(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        hit = self._ok.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        ok = _all_finite(t)
        if len(self._ok) >= _CACHE_MAX:
            self._ok.clear()
        self._ok[key] = (weakref.ref(t), t._version, ok)
        return ok

    def _finite(self, tensors: list) -> torch.Tensor | None:
        ok = None
        for t in tensors:
            o = self._finite_one(t)
            ok = o if ok is None else torch.logical_and(ok, _on(o, ok))
        return ok

    def _index(self, module: Any) -> int:
        hit = self._mod_index.get(id(module))
        if hit is not None and hit[0]() is module:
            return hit[1]
        key = id(module)
        # A module made anew every step (`nn.Softmax(-1)(x)` inline) frees its index when it dies,
        # so the registry holds live modules only and does not grow with the step count.
        idx = self._free.pop() if self._free else len(self._mods)
        ref = weakref.ref(module, lambda _, i=idx, k=key: self._release(i, k))  # type: ignore[misc]
        loss = isinstance(module, torch.nn.modules.loss._Loss)
        if idx == len(self._mods):
            self._mods.append(ref)
            self._loss_mod.append(loss)
        else:
            self._mods[idx], self._loss_mod[idx] = ref, loss
        self._mod_index[key] = (ref, idx)
        return idx

    def _release(self, idx: int, key: int) -> None:
        hit = self._mod_index.get(key)
        if hit is not None and hit[1] == idx:
            del self._mod_index[key]
        self._free.append(idx)

    def _probe(self, t: torch.Tensor) -> _Probe:
        hit = self._probes.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        p = _Probe(self)
        t.register_hook(p)
        if len(self._probes) >= _CACHE_MAX:
            self._probes.clear()
        self._probes[id(t)] = (weakref.ref(t), p)
        return p

    def _pre(self, module: Any, args: tuple) -> None:
        if not self.active or not torch.is_grad_enabled():
            return
        root = not self._stack
        if root:
            if os.getpid() != self._pid:  # a forked child inherited the hooks
                self.active = False
                return
            # tensors of an earlier forward are not this one's inputs
            self._probes.clear()
            self._ok.clear()
        call = _Call(self._index(module), self._finite(_tensors(args)), self._window)
        if root:
            dev = call.in_ok.device if call.in_ok is not None else None
            if dev is not None:
                call.in_slot = self._slot(IN, call.mod, dev)
        self._stack.append(call)

    def _post(self, module: Any, args: tuple, *rest: Any) -> None:
        if not self._stack or not self.active or not torch.is_grad_enabled():
            return
        call = self._stack.pop()
        if self._mods[call.mod]() is not module or call.window != self._window:
            self._stack.clear()  # out of step (an exception unwound a forward): start afresh
            return
        kwargs, out = (rest[0], rest[1]) if len(rest) == 2 else ({}, rest[0])
        in_tensors = _tensors(args)
        kw_tensors = _tensors(kwargs) if kwargs else []
        in_ok = call.in_ok
        if kw_tensors:
            kw_ok = self._finite(kw_tensors)
            in_ok = kw_ok if in_ok is None else torch.logical_and(in_ok, _on(kw_ok, in_ok))
        if call.in_slot is not None and in_ok is not None:
            self._write(call.in_slot, torch.logical_not, in_ok)
        outs = _tensors(out)
        if not outs:
            return
        out_ok = self._finite(outs)
        self._event(FWD, call.mod, torch.gt, in_ok if in_ok is not None else self._true(out_ok), out_ok)
        for t in outs:
            if t.requires_grad:
                self._probe(t).producers.append(call)
        for t in in_tensors + kw_tensors:
            if t.requires_grad:
                self._probe(t).consumers.append(call)

    def on_loss(self, loss: torch.Tensor) -> None:
        """The recorder saw a scalar passed to backward()."""
        if self.active and _plain(loss) and (loss.is_floating_point() or loss.is_complex()):
            self._event(LOSS, 0, torch.logical_not, _all_finite(loss))

    def close_step(self, optimizer: int, step: int, params: list, norms: torch.Tensor | None) -> None:
        """An optimizer step: its parameters' gradients (per-tensor norms) are the last events."""
        if not self.active:
            return
        self._param_sets[optimizer] = params
        if norms is not None and norms.numel():
            with_grad = [p for p in params if p.grad is not None]
            if len(with_grad) == norms.numel():
                key = tuple(map(id, with_grad))
                codes = self._param_codes.get(key)
                if codes is None:
                    if len(self._param_codes) > 64:
                        self._param_codes.clear()
                    codes = self._param_codes[key] = tuple(PARAM * _SHIFT + self._param(p) for p in with_grad)
                k = self._slot(PARAM, 0, norms.device, n=len(codes))
                self._codes.pop()
                self._codes.extend(codes)
                out = self._buf[k:k + len(codes)]
                bad = torch.logical_not(torch.isfinite(_on(norms, out)))
                out.copy_(bad)
        n = len(self._codes)
        if self._buf is None:
            self._buf = torch.zeros(0, dtype=torch.bool)
        self._closed.append(_Window((optimizer, step), self._buf[:n], tuple(self._codes)))
        self._cap = max(64, n + 8)
        self._buf, self._codes = None, []
        self._window += 1
        self._stack.clear()
        self._probes.clear()
        self._ok.clear()
        self.steps_traced += 1

    def _param(self, p: Any) -> int:
        hit = self._param_index.get(id(p))
        if hit is not None and hit[0]() is p:
            return hit[1]
        idx = len(self._params)
        self._params.append(weakref.ref(p))
        self._param_index[id(p)] = (self._params[-1], idx)
        return idx

    # ------------------------------------------------------------------ at flush (host)

    def flush(self) -> None:
        """Launch one device-to-host copy of every closed step's flags (with the recorder's flush)."""
        if not self._closed:
            return
        windows, self._closed = self._closed, []
        devices = {w.flags.device for w in windows if w.flags.numel()}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        flat = torch.cat([w.flags.to(device, non_blocking=True) for w in windows]) if windows else None
        event = None
        if device.type == "cuda":
            flat = flat.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._copied.append([flat, event, windows, 0, 0])

    def note_rows(self, optimizer: int, rows: list, values: list) -> None:
        """The recorder wrote these rows: which steps failed, which were clean, which skipped."""
        if self.origin is not None:
            return
        if len(self._status) > 100_000:  # rows no window will ever ask about
            self._status.clear()
        for r, (gn, loss, _, skipped, _) in zip(rows, map(FIELDS, values)):
            self._status[(optimizer, r.step)] = (
                "bad" if rundir.is_bad_step(gn, loss, skipped, r.loss_recorded) else "skipped" if skipped else "ok")

    def resolve(self) -> bool:
        """Judge the steps whose flags and rows have both arrived; True when the origin was just found."""
        while self._copied and self.origin is None:
            entry = self._copied[0]
            flat, event, windows, pos, offset = entry
            if event is not None and not event.query():
                return False
            flags = flat.tolist() if not isinstance(flat, list) else flat
            entry[0] = flags
            while pos < len(windows):
                w = windows[pos]
                status = self._status.get(w.key)
                if status is None:  # its row has not been written yet
                    entry[3], entry[4] = pos, offset
                    return False
                del self._status[w.key]
                n = len(w.codes)
                flagged = [c for c, f in zip(w.codes, flags[offset:offset + n]) if f]
                pos, offset = pos + 1, offset + n
                if status == "ok":
                    self._benign.update(flagged)
                elif status == "bad":
                    self.origin = self._name(w.key, [c for c in flagged if c not in self._benign])
                    self._copied.clear()
                    self._status.clear()
                    self.stop()  # the first origin is what was asked for: full speed from here
                    return True
            self._copied.pop(0)
        return False

    def info(self) -> dict:
        """What process-r{R}.json holds under "nan_trace"."""
        return {"enabled": True, "steps_traced": self.steps_traced, "origin": self.origin}

    # ------------------------------------------------------------------ naming (once, at the origin)

    def _name(self, key: tuple[int, int], flagged: list[int]) -> dict:
        optimizer, step = key
        names, parents, main = _module_names(self._param_sets.get(optimizer, []))
        origin: dict = {"step": step, "optimizer": optimizer, "phase": "backward", "module": None}
        if not flagged:
            origin.update(what="the loss or the gradient norm",
                          why="no module input or output, loss, module gradient or parameter gradient the trace "
                              "saw was non-finite (an operation outside every module, or on the gradients)")
            origin["detail"] = f"{origin['what']} was non-finite; {origin['why']}"
            return origin
        kind, idx = divmod(flagged[0], _SHIFT)
        m = self._mods[idx]() if kind not in (LOSS, PARAM) and idx < len(self._mods) else None
        name = names.get(id(m)) if m is not None else None
        cls = type(m).__name__ if m is not None else "?"
        if kind == IN:
            origin.update(phase="input", module=name, what=f"an input of `{name}` ({cls})",
                          why="it arrived that way (bad data: nothing in the model made it)")
        elif kind == FWD and self._loss_mod[idx]:
            origin.update(phase="loss", module=name, what=f"the loss computed by `{name}` ({cls})",
                          why="its inputs (the model's outputs and the targets) were finite")
        elif kind == FWD:
            origin.update(phase="forward", module=name, what=f"the forward output of `{name}` ({cls})",
                          why="its inputs were finite")
        elif kind == LOSS:
            origin.update(phase="loss", what="the loss passed to backward()", why="every module output was finite")
        elif kind == BWD:
            origin.update(module=name, what=f"the gradient with respect to the input of `{name}` ({cls})",
                          why="the gradient flowing into its output was finite")
        elif kind == GOUT:
            parent = parents.get(id(m)) if m is not None else None
            if parent is None:
                origin.update(what=f"the gradient of the loss with respect to the output of `{name}` ({cls})",
                              why="the backward of the loss computation (outside any module) produced it")
            else:
                pname = names.get(id(parent))
                origin.update(module=pname, what=f"the gradient flowing into `{name}` ({cls}) inside `{pname}`",
                              why=f"the gradients of `{pname}`'s outputs were finite: an operation in "
                                  f"`{pname}`'s own forward code produced it in backward")
        elif kind == PARAM:
            p = self._params[idx]() if idx < len(self._params) else None
            owner, pname = _owner(p, names, main)
            origin.update(module=owner, what=f"the gradient of parameter `{pname}`",
                          why="the gradient flowing into its module's output was finite")
        origin["detail"] = f"{origin['what']} was non-finite; {origin['why']}"
        return origin


def _module_names(params: list) -> tuple[dict[int, str], dict[int, Any], Any]:
    """(id(module) -> name, id(module) -> its parent module, the main root).

    Names are those of named_modules() on the root that holds most of `params`, the same
    naming as the layer table (capture/names.py): modules of further roots are prefixed by the
    variable that holds the root in __main__; a root itself is called by that variable, or by
    its class when no variable holds it.
    """
    wanted = {id(p) for p in params}
    modules = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)]
    parents: dict[int, Any] = {}
    for m in modules:
        try:
            for c in m.children():
                parents.setdefault(id(c), m)
        except Exception:
            continue
    roots = []
    for m in modules:
        if id(m) in parents:
            continue
        try:
            held = sum(1 for p in m.parameters() if id(p) in wanted)
        except Exception:
            continue
        roots.append((held, m))
    roots.sort(key=lambda r: -r[0])
    main_vars = {id(v): k for k, v in vars(sys.modules.get("__main__", sys)).items() if not k.startswith("_")}
    names: dict[int, str] = {}
    for rank, (_, root) in enumerate(roots):
        var = main_vars.get(id(root))
        prefix = "" if rank == 0 else (var or f"module{rank}") + "."
        try:
            for n, m in root.named_modules(remove_duplicate=False):
                n = strip_wrappers(n)
                names.setdefault(id(m), prefix + n if n else (var or type(m).__name__))
        except Exception:
            continue
    return names, parents, roots[0][1] if roots else None


def _owner(p: Any, names: dict[int, str], main: Any) -> tuple[str | None, str | None]:
    """(module name, parameter name) of a parameter, named as the layer table names it."""
    if p is None:
        return None, None
    modules = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)]
    for m in modules:
        try:
            for n, q in m.named_parameters(recurse=False):
                if q is p and id(m) in names:
                    mod = names[id(m)]
                    return mod, (n if m is main else f"{mod}.{n}")
        except Exception:
            continue
    return None, None
