"""The recorder: global, removable hooks that capture one row per optimizer step.

What it hooks, and why there:
- ``register_optimizer_step_pre_hook``: the step boundary, after accumulation,
  after the AMP unscale and after the DDP all-reduce: the gradient the step applies.
- ``torch.nn.utils.clip_grad``'s ``_get_total_norm`` / ``_clip_grads_with_norm_``
  (module globals, which ``clip_grad_norm_`` looks up at call time, so every way of
  importing it is covered) and ``clip_grad_value_``: to reuse the script's own
  pre-clip norm and learn its threshold.
- ``torch.autograd.backward`` (which ``Tensor.backward`` calls): the loss values.
- ``GradScaler.scale`` / ``GradScaler.step``: the unscaled loss, the scale, and
  the steps the scaler skips (it never calls ``optimizer.step`` for those).
- ``Optimizer.__init__``: optimizer ids in creation order.

Per step everything stays on the device: a handful of small kernels, no
``.item()``, no data-dependent branch. Rows are copied to the host in batches
(every ``flush_steps`` steps or ``flush_seconds`` seconds, and at stop) with a
non-blocking copy whose completion is polled, never waited for, until stop.
The user's gradients, RNG state and dtypes are never touched.

This module keeps the lifecycle, the per-step bookkeeping and the device-side rows;
``patches.py`` installs the hooks listed above, as handles that call the recorder's events
(``on_step``, ``on_backward``, ``on_clip``, ...), and
``flushing.py``'s ``Flusher`` copies the rows it is handed to the host and writes them, with
the process file from a snapshot this recorder builds; ``fsdp1.py`` (``Shards``) and
``deepspeed_engine.py`` keep what sharded engines need.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from gradscope import rundir
from gradscope._version import __version__
from gradscope.capture import closure, distributed, flushing, fsdp1, metrics, patches, rows as lean_rows
from gradscope.capture.audit import ClipAudit
from gradscope.capture.options import checked_clip_norm
from gradscope.capture.step_limit import StepLimit
from gradscope.capture.norms import per_tensor_norms, stack_norms, total_norm_like_torch
from gradscope.capture.nantrace import NanTrace
from gradscope.capture.patches import UNSCALED_ATTR as _UNSCALED_ATTR
from gradscope.capture.stopper import NanStop
from gradscope.capture.names import parameter_names

_ACTIVE: "Recorder | None" = None
_NAN = float("nan")


def active_recorder() -> "Recorder | None":
    return _ACTIVE


def forget_inherited() -> None:
    """Forget a recorder this process inherited from its parent (a forked rank): it stays inert."""
    global _ACTIVE
    _ACTIVE = None


def _forked_child() -> None:
    """In a forked child (a DataLoader worker), which inherits the hooks: record nothing."""
    if _ACTIVE is not None:
        _ACTIVE._on = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


@dataclass
class _Clip:
    """One clipping call since the last step: its threshold and, when known, its total norm."""

    kind: str  # "norm" or "value"
    threshold: float
    grad_ids: set
    total: torch.Tensor | None = None  # pre-clip L2 total, as the script computed it
    first: Any = None  # weak reference to one of its gradients: dead = no step can apply them any more
    scope: str = ""  # "global": a sharded engine's own reduced total (FSDP1); "local": a shard's own norm


@dataclass(slots=True)
class _Row:
    step: int
    clip_max_norm: float
    clip_value: float
    lr: Any  # float, or a tensor for tensor learning rates
    time: float
    values: torch.Tensor | None  # rows.ROW on the device; None: lean row (filled in at flush)
    layers: Any  # per-layer norms on the device; lean rows: True (filled in at flush) or None
    norms: Any = None  # distributed.GlobalNorms still being reduced across ranks (gloo): see _resolve
    taken: torch.Tensor | None = None  # lean rows (rows.py): per-tensor norms then losses; values at flush
    n_norms: int = 0  # lean rows: how many of `taken` are norms
    loss_recorded: bool = True  # False: no backward() since the previous step (the loss field stays empty)
    own_clipped: bool = False  # `clipped` says what a rank-local clip did, not global norm > threshold


@dataclass
class _OptState:
    id: int
    cls: str
    kind: str  # "optimizer" or "manual" (a loop that clips and updates by hand)
    params: list = field(default_factory=list)  # every parameter, fixed order: the layer columns
    n_elements: int = 0
    steps: int = 0
    loss_from: int = 0
    names: list | None = None
    rows: list = field(default_factory=list)
    ref: Any = None
    momentum: float | None = None  # SGD-style heavy-ball momentum: updates are ~1/(1-momentum) x lr x grad
    lean: Any = False  # rows.signature of its gradients once seen (None: its steps take the full path)
    layer_rows: int = 0  # per-layer rows written to its layers file (process file: layer_rows)
    layout: Any = False  # FSDP1 (capture/fsdp1.py): a Layout, fsdp1.UNKNOWN, None (not FSDP1); False: not yet known
    norm_scope: str = "global"  # "rank-local": its grad_norm is this rank's shard only (process key norm_scope)
    partitions: bool = False  # an engine (DeepSpeed ZeRO) steps it on flat partitions of this rank


class Recorder:
    """Records every optimizer step of this process into a run directory."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        layer_stride: int = 1,
        flush_steps: int = 100,
        flush_seconds: float = 2.0,
        rank: int | None = None,
        handle_sigterm: bool = True,
        stop_on_nan: bool = False,
        clip_norm: float | None = None,
        trace_nan: bool = False,
        max_steps: int | None = None,
        stop_before_next_step: bool = False,
    ) -> None:
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.layer_stride = max(0, int(layer_stride))  # 0 = no per-layer table
        self.flush_steps = max(1, int(flush_steps))
        self.flush_seconds = float(flush_seconds)
        self._rank = rank
        self._handle_sigterm = handle_sigterm
        self.stop_on_nan = stop_on_nan
        # `gradscope run --clip-norm`: the threshold every step is clipped at, whether or not
        # the script clips (a script's own clip_grad_norm_ call runs with this max_norm instead).
        self.clip_norm = checked_clip_norm(clip_norm)
        # `gradscope run --max-steps`; with --metric-name, the stop waits for the next step to begin,
        # so that what the script reports after its last step (an evaluation) is recorded
        self._limit = StepLimit(max_steps, before_next=stop_before_next_step) if max_steps else None
        self._metrics = metrics.MetricBuffer()  # values the script reports (capture/metrics.py)
        self._stopper = NanStop() if stop_on_nan else None  # --stop-on-nan: looks at every step (stopper.py)
        self._nantrace = NanTrace() if trace_nan else None  # --trace-nan: module hooks (nantrace.py)
        self._init_step_state()
        self._init_process_state()

    def _init_step_state(self) -> None:
        """What the events keep between steps: optimizers, losses, clip calls, pre-clip norms."""
        self._lock = threading.RLock()
        self._opts: "weakref.WeakKeyDictionary[torch.optim.Optimizer, _OptState]" = weakref.WeakKeyDictionary()
        self._states: list[_OptState] = []
        self._owned: dict[int, _OptState] = {}  # id(param) -> optimizer that owns it
        self._manual: _OptState | None = None
        self._last_state: _OptState | None = None  # _register's one-entry cache
        self._losses: list[torch.Tensor] = []
        self._loss_base = 0
        self._in_backward = False
        self._scaled = False  # a GradScaler.scale output was seen: losses may carry their unscaled value
        self._pre_norms: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(grad) -> (grad, norm)
        self._clips: list[_Clip] = []
        self._active_scaler: Any = None
        self._applying = False  # inside our own --clip-norm call: not a call of the script's
        self._fused_warned = False
        self._clip_orders: dict[int, tuple] = {}  # id(optimizer) -> (its parameter ids, the order --clip-norm clips in, as indices)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._fsdp1 = fsdp1.Shards()  # FSDP1 layouts and pre-clip shard norms (capture/fsdp1.py)
        self._fsdp1_patched = False
        self._deepspeed_installed = False  # capture/deepspeed_engine.py, once the script imports deepspeed
        self._framework_step = False  # inside an engine's own step (DeepSpeed): its torch steps are no rows
        self._audit = ClipAudit(owner=self._owned.get, active=self.recording,  # capture/audit.py
                                scaler=lambda: self._active_scaler)

    def _init_process_state(self) -> None:
        """The lifecycle, and what the process file says besides the rows (flushing.Flusher writes them)."""
        self._pid = os.getpid()
        self._on = False  # recording here and now: set by start, cleared by stop and in forked children
        self._handles: list[Any] = []  # hooks and patches (each with remove()), in the order installed
        self._started_at = time.time()
        self._closed = False
        self._status = "running"
        self._prev_sigterm: Any = None
        self._atexit: Callable | None = None
        self._script_max_norms: list[float] = []  # what the script passed, replaced by clip_norm
        self._clip_calls: dict[str, int] = {}
        self._thresholds: dict[str, list] = {"clip_grad_norm_": [], "clip_grad_value_": []}
        self._devices: set[str] = set()
        # process-r*.json "norm_scope": "global", or "rank-local" when grad_norm is one rank's shard
        self._norm_scope = "global"
        self._pending = 0  # rows since the last flush
        self._last_flush = time.monotonic()
        self._flusher = flushing.Flusher(self.run_dir, rank=lambda: self.rank, flush_seconds=self.flush_seconds,
                                         snapshot=self._process_snapshot, changes=self._process_changes,
                                         nantrace=self._nantrace, metric_buffer=self._metrics)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Recorder":
        global _ACTIVE
        if _ACTIVE is not None and not _ACTIVE._closed:
            raise RuntimeError("gradscope: a recorder is already active in this process")
        _ACTIVE = self
        self._on = True
        self._handles += patches.install(self)  # capture/patches.py
        self._handles.append(metrics.install(self))  # HF Trainer / Lightning metrics, now or at their import
        if self._nantrace is not None:
            self._nantrace.start()
        self._settle_rank()
        for opt in _existing_optimizers():
            self._register(opt)
        self._frameworks()
        self._atexit = lambda: self.stop("completed" if self._status == "running" else self._status)
        atexit.register(self._atexit)
        if self._handle_sigterm and threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            except (ValueError, OSError):
                pass
        return self

    def stop(self, status: str = "completed") -> None:
        """Flush everything, wait for the last copies, write the process file, unhook."""
        global _ACTIVE
        if self._closed or os.getpid() != self._pid:
            return
        with self._lock:
            self._status = status
            try:
                self._flush()
                self._drain(block=True)
                self._closed = True  # every row is written: the process file says closed
                try:
                    self._flusher.write_process()
                except OSError as e:
                    self._flusher.stop_writing(e)
            finally:
                self._closed = True
                self._on = False
                self._uninstall()
                self._flusher.close()
                if self._atexit is not None:
                    atexit.unregister(self._atexit)
                if self._prev_sigterm is not None:
                    try:
                        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                            signal.signal(signal.SIGTERM, self._prev_sigterm)
                    except (ValueError, OSError):
                        pass
                if _ACTIVE is self:
                    _ACTIVE = None

    def _on_sigterm(self, signum, frame) -> None:
        # Flush, then die by SIGTERM as the process would have without us.
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt the flush
            self.stop("killed")
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _settle_rank(self) -> None:
        # Take the rank while the process group exists: the files are named at the first flush,
        # which can come after the script destroyed its group (a short mp.spawn rank, whose
        # environment has no RANK to fall back on, would otherwise be named rank 0).
        if self._rank is None and distributed.group_exists():
            self._rank = distributed.current_rank()

    @property
    def rank(self) -> int:
        if self._rank is None:
            self._rank = distributed.current_rank()
        return self._rank

    def recording(self) -> bool:
        """Whether this recorder records here and now (every patch asks before it reports an event).

        Forked children (DataLoader workers) inherit the hooks; only the owner records. A flag,
        not a getpid() per call: _forked_child clears it in the child (os.register_at_fork)."""
        return self._on

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def status(self) -> str:
        """What the process file's ``status`` says: "running" until the training ends (or is ended)."""
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        self._status = value

    @property
    def metrics(self) -> metrics.MetricBuffer:
        """The values the script reports (capture/metrics.py), written at each flush."""
        return self._metrics

    def current_step(self) -> int:
        """The step of optimizer 0's last recorded row (-1: none yet); a Python int, no host read."""
        return self._states[0].steps - 1 if self._states else -1

    # ------------------------------------------------------------------ hooks

    def patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        """Replace ``owner.name`` by ``make(original)`` until stop (frameworks' patches: metrics.py,
        deepspeed_engine.py)."""
        self._handles.append(patches.patch(owner, name, make))

    def audit_patches(self) -> list:
        """The clip audit's patches, as (owner, name, make) (capture/audit.py)."""
        return self._audit.patches()

    def _uninstall(self) -> None:
        if self._nantrace is not None:
            self._nantrace.stop()
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ events (the patches call these)

    def _register(self, opt: torch.optim.Optimizer) -> _OptState:
        last = self._last_state  # the optimizer of the previous call, nearly always this one
        if last is not None and last.ref is not None and last.ref() is opt:
            return last
        st = self._opts.get(opt)
        if st is None:
            self._settle_rank()  # once per optimizer: DDP ones are made after init_process_group
            params = [p for g in opt.param_groups for p in g["params"]]
            st = _OptState(
                id=len(self._states),
                cls=type(opt).__name__,
                kind="optimizer",
                params=params,
                n_elements=sum(p.numel() for p in params),
                loss_from=self._loss_base + len(self._losses),
                ref=weakref.ref(opt),
                momentum=_momentum(opt),
            )
            self._opts[opt] = st
            self._states.append(st)
            for p in params:
                self._owned[id(p)] = st
            if not self._fsdp1_patched and fsdp1.loaded():  # before the script's first clip call
                self._fsdp1_patched = True
                self._handles += patches.install_fsdp1(self)
            self._frameworks()  # once per optimizer: engines that wrap it were imported by now
        self._last_state = st
        return st

    def on_optimizer_init(self, opt: torch.optim.Optimizer) -> None:
        """An optimizer was made: its id is its creation order."""
        self._register(opt)

    def on_backward(self, tensors: Any) -> bool:
        """``torch.autograd.backward(tensors)`` begins: note its loss. False: pass it through
        unrecorded (not recording, or a backward inside one: checkpointing re-enters it)."""
        if self._in_backward or not self._on:
            return False
        t = tensors[0] if isinstance(tensors, (list, tuple)) and len(tensors) == 1 else tensors
        # a vector backward with explicit gradients has no scalar loss
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            # GradScaler.scale's output carries the unscaled loss (a missing attribute is a slow lookup)
            value = getattr(t, _UNSCALED_ATTR, None) if self._scaled else None
            value = (value if value is not None else t).detach()
            self._losses.append(value if value.dim() == 0 else value.reshape(()))  # a [1]-shaped loss too
            if self._nantrace is not None:
                self._nantrace.on_loss(self._losses[-1])
        self._audit.backward_begin()
        self._in_backward = True
        return True

    def after_backward(self, ok: bool) -> None:
        """The backward that ``on_backward`` let through returned (``ok``) or raised."""
        try:
            if ok:
                self._audit.backward_end()
        finally:
            self._in_backward = False

    def on_scaled_loss(self, value: Any, scaled: Any, *, by_scaler: bool) -> None:
        """A loss scaler returned ``scaled`` for ``value`` (GradScaler.scale, or DeepSpeed's ZeRO
        loss scale: ``by_scaler`` False): a backward of it records the unscaled value."""
        self._scaled = True  # from now on, backward looks for the unscaled loss
        if by_scaler:
            self._audit.scaled()
        if isinstance(value, torch.Tensor):
            try:
                setattr(scaled, _UNSCALED_ATTR, value.detach())
            except (AttributeError, RuntimeError):
                pass

    def _remember_norms(self, grads: list[torch.Tensor], norms: list[torch.Tensor] | None = None) -> None:
        """Keep the first (pre-clip) norm seen for each gradient since the last step."""
        if not grads:
            return
        self._forget_stale()
        if norms is None:
            todo = [g for g in grads if self._pre_norm(g) is None]
            if not todo:
                return
            grads, norms = todo, per_tensor_norms(todo)
        for g, n in zip(grads, norms):
            # Weakly: a measured gradient that no step applies (replaced by the next backward)
            # must not be kept alive; its entry goes when it dies (_forget_stale).
            if self._pre_norm(g) is None:
                self._pre_norms[id(g)] = (weakref.ref(g), n)

    def _pre_norm(self, g: torch.Tensor) -> torch.Tensor | None:
        """The pre-clip norm measured for this very gradient since the last step, if any."""
        seen = self._pre_norms.get(id(g))
        return seen[1] if seen is not None and seen[0]() is g else None

    def on_total_norm(self, orig: Callable, tensors: Any, norm_type: Any, error_if_nonfinite: bool,
                      foreach: Any) -> torch.Tensor:
        """``clip_grad``'s ``_get_total_norm``: compute it as torch does and keep the per-tensor norms."""
        self._count("get_total_norm")
        grads = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        norm_type = float(norm_type)  # as torch does; read once (see clip_grads_with_norm_)
        if self._fsdp1.on or fsdp1.loaded():
            with torch.no_grad():
                self._fsdp1.remember_pre(self._states, grads)
        # DTensor gradients (FSDP2) too: the same ops dispatch to DTensor, so the total is torch's.
        if norm_type == 2.0 and not error_if_nonfinite and grads:
            with torch.no_grad():
                total, norms = total_norm_like_torch(grads, foreach)
            self._remember_norms(grads, norms)
            return total
        # Other norms, or the erroring variant: torch computes; we measure L2 beforehand.
        with torch.no_grad():
            self._remember_norms(grads)
        return orig(grads, norm_type, error_if_nonfinite, foreach)

    def clip_threshold(self, max_norm: float) -> float:
        """The max_norm a clip of the script's runs with: --clip-norm's, which replaces the script's."""
        if self.clip_norm is None:
            return max_norm
        if not self._applying:
            self._note_script_threshold(max_norm)
        return self.clip_norm

    def on_clip(self, params: list, kind: str, threshold: float, total: torch.Tensor | None,
                scope: str = "") -> None:
        """A clip of ``params`` ("norm": at max_norm ``threshold`` with its pre-clip ``total``;
        "value": at clip_value ``threshold``) is about to scale their gradients."""
        if kind == "value":
            with torch.no_grad():
                self._remember_norms([p.grad for p in params if p.grad is not None])
        fn = "clip_grad_norm_" if kind == "norm" else "clip_grad_value_"
        grads = [p.grad for p in params if p.grad is not None]
        ids = {id(g) for g in grads}
        if kind == "norm" and not scope and self._fsdp1.on and grads:
            # torch's clip_grad_norm_ on FSDP1 shards: it measured this rank's shard only
            local = self._fsdp1.sharded_states(self._states, ids)
            if local:
                scope = "local"
                if not self._applying:
                    for st in local:
                        self._audit.local_norm_clip(st, fn, threshold, total)
        if not self._applying:  # our own --clip-norm call is not one of the script's
            self._audit.clip(params, fn, threshold)
            self._count(fn)
            if threshold not in self._thresholds[fn] and len(self._thresholds[fn]) < 20:
                self._thresholds[fn].append(threshold)
        if not grads:
            return
        # The total passed in is pre-clip and L2 only if it came from an L2 measurement of these grads
        # (or is a sharded engine's own reduced total, measured before it clipped).
        l2 = kind == "norm" and isinstance(total, torch.Tensor) and (
            scope == "global" or all(self._pre_norm(g) is not None for g in grads))
        self._clips.append(_Clip(kind, threshold, ids, total if l2 else None, weakref.ref(grads[0]), scope))
        if not any(id(p) in self._owned for p in params):
            # No optimizer owns these parameters: a hand-written update follows the clip,
            # so the clip call is the step (as in PyTorch's word_language_model example).
            if self._limit is not None:
                self._limit.before_step(self)
            st = self._manual_state(params)
            self._record(st, [{"params": params, "lr": float("nan")}])
            self._maybe_flush()

    def _manual_state(self, params: list) -> _OptState:
        st = self._manual
        if st is None:
            st = _OptState(
                id=len(self._states),
                cls="(no optimizer: clip_grad_*_ call)",
                kind="manual",
                params=list(params),
                n_elements=sum(p.numel() for p in params),
            )
            self._manual = st
            self._states.append(st)
        return st

    def _count(self, name: str) -> None:
        self._clip_calls[name] = self._clip_calls.get(name, 0) + 1

    def on_scaler_step(self, orig: Callable, scaler: Any, optimizer: torch.optim.Optimizer, args: tuple,
                       kwargs: dict) -> Any:
        """``GradScaler.step``: run it; a step it skips (inf/nan found) never reaches the optimizer's
        pre-hook, and is still a row."""
        if self._limit is not None:
            self._limit.before_step(self)
        st = self._register(optimizer)
        before = st.steps
        outer, self._active_scaler = self._active_scaler, scaler
        try:
            result = orig(scaler, optimizer, *args, **kwargs)
        finally:
            self._active_scaler = outer
        if st.steps == before:
            self._record(st, optimizer.param_groups, skipped=True, scaler=scaler)
            self._audit.step_end(st, via_scaler=True)
            self._maybe_flush()
        return result

    def on_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple | None:
        """The optimizer step pre-hook: the step's gradients are final (or, with a closure, will be)."""
        if not self._on or self._framework_step:
            return None
        if self._limit is not None:
            self._limit.before_step(self)
        st = self._register(opt)
        self._audit.step_begin(st)
        if len(args) > 1 or kwargs:  # args[0] is the optimizer; step(closure) or step(closure=...)
            # A closure runs backward (and Lightning's clipping) inside step(): take the row when
            # its first evaluation returns (capture/closure.py).
            wrapped = closure.wrap_closure(args, kwargs, lambda: self._take_row(opt, st))
            if wrapped is not None:
                return wrapped
        self._take_row(opt, st)
        return None

    def _take_row(self, opt: torch.optim.Optimizer, st: _OptState) -> None:
        """The step's gradients are final here: apply --clip-norm, then record the row."""
        if st.layout is False:
            self._fsdp1.settle(st)
        d = opt.__dict__
        if (self.clip_norm is None and self._active_scaler is None and "found_inf" not in d
                and "grad_scale" not in d and self._record_lean(st, opt.param_groups)):
            return  # the common step: the lean path (rows.py)
        if self.clip_norm is not None:
            self._apply_clip_norm(opt)
        skipped = getattr(opt, "found_inf", None)  # fused optimizers skip inside step()
        self._record(st, opt.param_groups, skipped=skipped, scaler=self._active_scaler,
                     grad_scale=getattr(opt, "grad_scale", None))

    def _apply_clip_norm(self, opt: torch.optim.Optimizer) -> None:
        """Clip this step's gradients at `clip_norm` unless the script already clipped them.

        The step pre-hook is the point where the gradients are final: accumulated, all-reduced
        and (GradScaler.step having called unscale_) unscaled. Going through clip_grad_norm_
        makes the result bit-identical to a script that calls it itself right before step(),
        and the recorder reuses the norm that call measures.
        """
        if getattr(opt, "grad_scale", None) is not None:
            # A fused optimizer under GradScaler unscales inside step(): its gradients are still
            # scaled here, and clipping them at clip_norm would cut by the wrong amount.
            if not self._fused_warned:
                self._fused_warned = True
                print("gradscope: --clip-norm is not applied to a fused optimizer under GradScaler "
                      "(its gradients are unscaled inside step()); clip in the script instead", file=sys.stderr)
            return
        params = [p for p in self._clip_params(opt) if p.grad is not None]
        ids = {id(p.grad) for p in params}
        self._forget_stale()
        if not params or any(c.kind == "norm" and c.grad_ids & ids for c in self._clips):
            return  # the script clipped this step itself, with clip_norm as its max_norm
        st = self._opts.get(opt)
        self._applying = True
        try:
            if st is not None and isinstance(st.layout, fsdp1.Layout) and st.layout.any_sharded:
                # FSDP's own global clip, as if the script called model.clip_grad_norm_(clip_norm)
                for root in self._fsdp1.roots(st):
                    root.clip_grad_norm_(self.clip_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        finally:
            self._applying = False

    def on_fsdp1_clip(self, module: Any, orig: Any, max_norm: Any, norm_type: Any) -> torch.Tensor:
        """FullyShardedDataParallel.clip_grad_norm_ (patches.install_fsdp1): reuse its global total."""
        if not fsdp1.sharded_module(module):
            # not initialised yet, or NO_SHARD: FSDP calls torch's clip_grad_norm_, recorded as such
            return orig(module, max_norm, norm_type)
        params = list(module.parameters())
        with torch.no_grad():
            self._fsdp1.remember_pre(self._states, [p.grad for p in params if p.grad is not None])
        max_norm = self.clip_threshold(float(max_norm))  # FSDP reads it with float() too
        total = orig(module, max_norm, norm_type)
        self.on_clip(params, "norm", max_norm, total if float(norm_type) == 2.0 else None, scope="global")
        return total

    def _clip_params(self, opt: torch.optim.Optimizer) -> list:
        """The optimizer's parameters in the order the trainer's own clip passes them (names.clip_order),
        found once per optimizer and parameter set."""
        listed = [p for g in opt.param_groups for p in g["params"]]
        key = tuple(id(p) for p in listed)
        cached = self._clip_orders.get(id(opt))
        if cached is None or cached[0] != key:
            from gradscope.capture.names import clip_order

            at = {id(p): i for i, p in enumerate(listed)}
            cached = (key, [at[id(p)] for p in clip_order(listed)])  # indices: no reference kept to a tensor
            self._clip_orders[id(opt)] = cached
        return [listed[i] for i in cached[1]]

    def _note_script_threshold(self, max_norm: float) -> None:
        if max_norm not in self._script_max_norms and len(self._script_max_norms) < 20:
            self._script_max_norms.append(max_norm)

    def after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """The optimizer step post-hook: the step is complete."""
        last = self._last_state
        st = last if last is not None and last.ref is not None and last.ref() is opt else self._opts.get(opt)
        if st is None or not self._on or self._framework_step:
            return
        called = closure.closure_called(args, kwargs) if len(args) > 1 or kwargs else None
        if called is False:  # step() never evaluated its closure: the gradients are as they were
            self._take_row(opt, st)
        self._audit.step_end(st)
        if called is not None:
            # The step's loss is what reached backward() up to its closure's first value;
            # later evaluations (LBFGS line searches) belong to no step.
            st.loss_from = self._loss_base + len(self._losses)
            self._trim_losses()
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        # Called after a step is complete (never inside _record), so a row is whole when copied.
        if self._stopper is not None and self._stopper.poll():
            self._stop_now()
        if self._pending >= self.flush_steps or time.monotonic() - self._last_flush >= self.flush_seconds:
            self._flush()
        if self._limit is not None:  # every completed step passes here (post-step, skipped, manual)
            self._limit.after_step(self)

    # ------------------------------------------------------------------ the row

    def _const(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self._consts.get(device)
        if c is None:
            nan_, zero_, one_ = (torch.full((), v, dtype=torch.float32, device=device) for v in (float("nan"), 0.0, 1.0))
            c = (nan_, zero_, one_)
            self._consts[device] = c  # type: ignore[assignment]
        return c  # type: ignore[return-value]

    def _record(self, st: _OptState, param_groups: list, *, skipped: Any = False, scaler: Any = None,
                grad_scale: Any = None) -> None:
        """The full path: one row with everything a step can carry (a clip, a scaler, shards)."""
        if (scaler is None and grad_scale is None and (skipped is None or skipped is False)
                and self._record_lean(st, param_groups)):
            return
        with self._lock, torch.no_grad():
            params = [p for g in param_groups for p in g["params"]]
            grads = [p.grad for p in params if p.grad is not None]
            device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
            nan, zero, one = self._const(device)
            # Rows are float64 (MPS has none): a norm past float32's range (3.4e38) stays finite.
            wide = torch.float32 if device.type == "mps" else torch.float64

            lay = st.layout if isinstance(st.layout, fsdp1.Layout) else None
            norms = self._pre_clip_norms(grads, zero if lay is not None else None)
            grad_ids = {id(g) for g in grads}
            clip = next((c for c in self._clips if c.grad_ids & grad_ids), None)
            want_layers = bool(self.layer_stride and st.steps % self.layer_stride == 0 and st.params)
            reuse = clip is not None and clip.total is not None and clip.grad_ids == grad_ids
            dist_norms = None
            if lay is not None or _has_dtensor(grads):  # shards: norms summed across ranks
                scale_t = grad_scale if isinstance(grad_scale, torch.Tensor) else None
                grad_scale = None  # applied there
                total, vector, dist_norms = self._sharded_norms(st, lay, grads, norms, clip if reuse else None,
                                                                want_layers, device, wide, scale_t)
            elif reuse:
                vector = stack_norms(norms, device)
                total = clip.total.to(device, non_blocking=True)  # type: ignore[union-attr]  # the script's own number
            else:
                vector = stack_norms(norms, device)
                total = torch.linalg.vector_norm(vector.to(wide)) if grads else zero
            if isinstance(grad_scale, torch.Tensor):  # fused AMP: grads still carry the scale
                total = total / grad_scale.to(device, non_blocking=True)
                vector = vector / grad_scale.to(device, non_blocking=True)

            # Loss: everything passed to backward() since this optimizer's previous step.
            loss, losses = self._take_loss(st, nan)
            clip_max_norm, clip_value, clipped, own_clipped = _clip_columns(clip, total, device, zero)
            if isinstance(skipped, torch.Tensor):
                skipped_t = (skipped.to(device, non_blocking=True) > 0).float()
            else:
                skipped_t = one if skipped else zero
            scale = getattr(scaler, "_scale", None) if scaler is not None else None
            scale_t = scale.to(device, non_blocking=True).float().clone() if isinstance(scale, torch.Tensor) else nan
            values = lean_rows.stack_row(device, wide, grad_norm=total, loss=loss, clipped=clipped,
                                         skipped=skipped_t, loss_scale=scale_t)
            layers = None
            if want_layers:
                layers = vector if lay is not None else self._layer_vector(st, params, grads, vector, device)
            lr = param_groups[0].get("lr", _NAN) if param_groups else _NAN
            if isinstance(lr, torch.Tensor):
                lr = lr.detach().clone()
            row = _Row(st.steps, clip_max_norm, clip_value, lr, time.time(), values, layers, dist_norms,
                       loss_recorded=bool(losses), own_clipped=own_clipped)
            if self._nantrace is not None:
                self._nantrace.close_step(st.id, st.steps, params,
                                          vector if dist_norms is None and lay is None else None)
            self._add_row(st, row, device, grad_ids)

    def _pre_clip_norms(self, grads: list, fill: torch.Tensor | None) -> list:
        """Pre-clip per-tensor norms: what a clip call measured, computed for the rest (``fill``
        for every gradient instead: FSDP1, whose column norms are taken apart)."""
        norms: list[Any] = [None] * len(grads)
        missing = []
        self._forget_stale()  # before matching by id: a dead gradient's id may be reused
        for i, g in enumerate(grads):
            seen = self._pre_norm(g) if fill is None else fill
            if seen is not None:
                norms[i] = seen
            else:
                missing.append(i)
        if missing:
            for i, n in zip(missing, per_tensor_norms([grads[i] for i in missing])):
                norms[i] = n
        return norms

    def _sharded_norms(self, st: _OptState, lay: fsdp1.Layout | None, grads: list, norms: list, clip: _Clip | None,
                       want_layers: bool, device: torch.device, wide: torch.dtype,
                       grad_scale: torch.Tensor | None) -> tuple:
        """(total, vector, norms still being reduced or None) of sharded gradients: FSDP1's column
        norms (capture/fsdp1.py) or FSDP2's DTensors (distributed.py), summed across ranks.
        ``clip``: the script's clip of these very gradients, whose total is reused when global."""
        nan = self._const(device)[0]
        if lay is not None:
            local = self._fsdp1.local_norms(st, lay, device)
            given = clip.total if clip is not None and clip.scope == "global" else None
            dist_norms = lay.global_norms(local, total=given, want_vector=want_layers, dtype=wide,
                                          grad_scale=grad_scale)
            if dist_norms.pending:  # placeholders until the flush: grad_norm, and positions for layers
                return nan, self._positions(lay.columns, device), dist_norms
            vector = dist_norms.vector
            # no per-layer row this step: no vector
            return dist_norms.total, vector if vector is not None else self._positions(0, device), None
        dist_norms = distributed.global_norms(grads, norms, device, total=clip.total if clip is not None else None,
                                              want_vector=want_layers, grad_scale=grad_scale, dtype=wide)
        if dist_norms.pending:
            return nan, self._positions(len(grads), device), dist_norms
        return dist_norms.total, dist_norms.vector, None

    def _add_row(self, st: _OptState, row: _Row, device: torch.device, grad_ids: set) -> None:
        """Keep the full path's row; its step consumed the clip calls and pre-clip norms of its gradients."""
        st.rows.append(row)
        if self._stopper is not None:
            self._stopper.add(row, st.id)
        st.steps += 1
        self._devices.add(str(device))
        self._clips = [c for c in self._clips if not (c.grad_ids & grad_ids)]
        for i in grad_ids:
            self._pre_norms.pop(i, None)
        self._pending += 1

    def _frameworks(self) -> None:
        """Hook the training engines the script has imported (never importing one ourselves)."""
        if not self._deepspeed_installed and "deepspeed" in sys.modules:
            from gradscope.capture import deepspeed_engine

            self._deepspeed_installed = deepspeed_engine.maybe_install(self)

    # ------------------------------------------------------------------ events of an engine that steps itself

    def in_engine_step(self) -> bool:
        """Inside an engine's own step (``engine_step``): its torch optimizer steps are no rows."""
        return self._framework_step

    @contextmanager
    def engine_step(self) -> Iterator[None]:
        self._framework_step = True
        try:
            yield
        finally:
            self._framework_step = False

    def on_engine_optimizer(self, opt: torch.optim.Optimizer, n_elements: Callable[[], int] | None = None) -> None:
        """An engine steps ``opt``; with ``n_elements`` (ZeRO) it holds this rank's flat partitions:
        its rows count the model's ``n_elements()`` parameters and have no per-layer norms."""
        st = self._register(opt)
        if n_elements is not None and not st.partitions:
            st.partitions = True
            st.params = []
            st.n_elements = n_elements()

    def on_engine_step(self, opt: torch.optim.Optimizer, total: Any, clip_max_norm: float, *,
                       skipped: Any = False, loss_scale: Any = None) -> None:
        """An engine made ``opt``'s step; ``total`` is its own global pre-clip norm (a tensor, a float,
        or None: unknown), ``clip_max_norm`` its threshold."""
        self._record_given(self._register(opt), total, clip_max_norm, opt.param_groups, skipped=skipped,
                           loss_scale=loss_scale)
        self._maybe_flush()

    def mark_rank_local(self) -> None:
        """Some gradient norm of this process is one rank's own (process key norm_scope)."""
        self._norm_scope = "rank-local"

    def _record_given(self, st: _OptState, total: Any, clip_max_norm: float, param_groups: list, *,
                      skipped: Any = False, loss_scale: Any = None) -> None:
        """A row whose grad_norm an engine computed (DeepSpeed's global pre-clip norm).

        `total` is the engine's own value (a tensor, a float, or None: unknown); no gradient
        is read here, and nothing waits for the device."""
        with self._lock, torch.no_grad():
            device = total.device if isinstance(total, torch.Tensor) else torch.device("cpu")
            nan, zero, one = self._const(device)
            wide = torch.float32 if device.type == "mps" else torch.float64
            if isinstance(total, torch.Tensor):
                total = total.detach().reshape(()).to(wide)
            else:
                total = torch.tensor(_NAN if total is None else float(total), dtype=wide)
            loss, losses = self._take_loss(st, nan)
            if not clip_max_norm > 0:  # DeepSpeed's gradient_clipping 0: no clip
                clip_max_norm = _NAN
            clipped = (total > clip_max_norm).to(wide) if clip_max_norm == clip_max_norm else zero
            skipped_t = (skipped.to(device) > 0) if isinstance(skipped, torch.Tensor) else (one if skipped else zero)
            if isinstance(loss_scale, torch.Tensor):
                scale_t = loss_scale.detach().reshape(()).clone()
            else:
                scale_t = nan if loss_scale is None else torch.tensor(float(loss_scale), dtype=wide)
            values = lean_rows.stack_row(device, wide, grad_norm=total, loss=loss, clipped=clipped,
                                         skipped=skipped_t, loss_scale=scale_t)
            lr = param_groups[0].get("lr", _NAN) if param_groups else _NAN
            if isinstance(lr, torch.Tensor):
                lr = lr.detach().clone()
            row = _Row(st.steps, clip_max_norm, _NAN, lr, time.time(), values, None, loss_recorded=bool(losses))
            st.rows.append(row)
            if self._stopper is not None:
                self._stopper.add(row, st.id)
            st.steps += 1
            self._devices.add(str(device))
            self._pending += 1

    def _take_loss(self, st: _OptState, nan: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The step's loss (the sum of what reached backward() since the optimizer's previous step,
        on the device; ``nan`` when nothing did) and those values; consumes them."""
        losses = self._losses[max(0, st.loss_from - self._loss_base):]
        if not losses:
            loss = nan
        elif len(losses) == 1:
            loss = losses[0].float()
        else:
            loss = torch.stack([v.float().to(losses[0].device, non_blocking=True) for v in losses]).sum()
        st.loss_from = self._loss_base + len(self._losses)
        self._trim_losses()
        return loss, losses

    def _record_lean(self, st: _OptState, param_groups: list) -> bool:
        """The common step's row without its host-side bookkeeping (rows.py); False: not one."""
        if (self._clips or self._pre_norms or self._stopper is not None or self._nantrace is not None
                or st.kind != "optimizer" or st.lean is None):
            return False
        params = param_groups[0]["params"] if len(param_groups) == 1 else [p for g in param_groups for p in g["params"]]
        if st.lean is False:  # first step: are its gradients all of one device and dtype?
            st.lean = lean_rows.signature(params) if len(params) == len(st.params) else None
            if st.lean is None:
                return False
            self._devices.add(str(st.lean[0]))
        grads = lean_rows.plain_grads(params, st.params, st.lean)
        if grads is None:
            return False
        with self._lock:
            start = st.loss_from - self._loss_base
            # No gradient requires grad (plain_grads) and the losses are detached: nothing here
            # can record a graph, so no no_grad context is needed.
            losses = self._losses[start:] if start > 0 else self._losses
            recorded = bool(losses)  # before _trim_losses, which may clear this very list
            taken = lean_rows.take(grads, losses)
            if taken is None:
                return False
            st.loss_from = self._loss_base + len(self._losses)
            if self._losses:
                self._trim_losses()
            lr = param_groups[0].get("lr", _NAN)
            if isinstance(lr, torch.Tensor):
                lr = lr.detach().clone()
            # layers True: the per-layer norms, filled in at flush (rows.values_of)
            want_layers = True if self.layer_stride and st.steps % self.layer_stride == 0 else None
            st.rows.append(_Row(st.steps, _NAN, _NAN, lr, time.time(), None, want_layers,
                                taken=taken, n_norms=len(grads), loss_recorded=recorded))
            st.steps += 1
            self._pending += 1
        return True

    def _forget_stale(self) -> None:
        """Drop measurements and clip calls of gradients that no longer exist (a clip after the
        step, a norm taken for logging): no step will apply them, and nothing may grow per step."""
        if self._pre_norms:
            dead = [k for k, (ref, _) in self._pre_norms.items() if ref() is None]
            for k in dead:
                del self._pre_norms[k]
        if self._clips:
            self._clips = [c for c in self._clips if c.first() is not None][-64:]

    def _layer_vector(self, st: _OptState, params: list, grads: list, vector: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
        """Norms in the optimizer's fixed parameter order; NaN for parameters without a gradient."""
        if len(grads) == len(st.params) and all(a is b for a, b in zip(params, st.params)):
            return vector
        position = {id(p): i for i, p in enumerate(st.params)}
        key = tuple(position.get(id(p), -1) for p in params if p.grad is not None)
        if -1 in key:  # parameters added after the optimizer was first seen: no column for them
            keep = [i for i, k in enumerate(key) if k >= 0]
            vector, key = vector[keep], tuple(key[i] for i in keep)
        index = self._index_cache.get((device, key))
        if index is None:  # the pattern of missing gradients rarely changes: build once
            index = torch.tensor(key, dtype=torch.long).to(device)
            self._index_cache[(device, key)] = index
        out = self._const(device)[0].expand(len(st.params)).clone()
        return out.index_copy_(0, index, vector)

    def _positions(self, n: int, device: torch.device) -> torch.Tensor:
        key = ("positions", device, n)
        pos = self._index_cache.get(key)
        if pos is None:
            pos = torch.arange(n, dtype=torch.float32).to(device)
            self._index_cache[key] = pos
        return pos

    def _resolve(self, row: _Row) -> None:
        """Fill in a row whose global norms were reduced asynchronously (gloo): at flush, not per step."""
        try:
            g = row.norms.finish()
            total, vector = g.total, g.vector
        except Exception:  # a peer died mid-reduction: the row stays, its norms unknown
            total = vector = None
        row.norms = None
        if total is None:
            row.values[lean_rows.GRAD_NORM] = float("nan")
            if row.layers is not None:
                row.layers = torch.full_like(row.layers, float("nan"))
            return
        row.values[lean_rows.GRAD_NORM] = total
        if row.clip_max_norm == row.clip_max_norm and not row.own_clipped:
            row.values[lean_rows.CLIPPED] = (total > row.clip_max_norm).to(row.values.dtype)
        if row.layers is not None:  # positions into the gradient order -> the full norms
            row.layers = distributed.fill_layers(row.layers, vector)

    def _trim_losses(self) -> None:
        if len(self._states) == 1 and len(self._losses) <= 10_000:  # one optimizer: its step consumed them all
            self._loss_base += len(self._losses)
            self._losses.clear()
            return
        keep_from = min((s.loss_from for s in self._states if s.kind == "optimizer"), default=None)
        if keep_from is None or len(self._states) == 1:
            keep_from = self._loss_base + len(self._losses)
        if len(self._losses) > 10_000:  # an optimizer that stopped stepping must not pin memory
            keep_from = max(keep_from, self._loss_base + len(self._losses) - 10_000)
        drop = keep_from - self._loss_base
        if drop > 0:
            del self._losses[:drop]
            self._loss_base = keep_from

    # ------------------------------------------------------------------ flushing (capture/flushing.py)

    def _flush(self) -> None:
        """Hand every pending row to the flusher (its host copy is launched); write what has arrived."""
        self._pending = 0
        if self._flusher.failed:  # nothing can be written any more: keep no rows either
            for st in self._states:
                st.rows = []
            self._last_flush = time.monotonic()
            return
        if self._nantrace is not None:
            self._nantrace.flush()  # before the rows' copies: their events cover it
        self._last_flush = time.monotonic()
        pending = []
        for st in self._states:
            if st.rows:
                rows, st.rows = st.rows, []
                for r in rows:
                    if r.norms is not None:
                        self._resolve(r)
                pending.append((st, rows))
        self._flusher.flush(pending)
        self._stop_if_bad()

    def _drain(self, block: bool) -> None:
        self._flusher.drain(block)
        self._stop_if_bad()

    def _stop_if_bad(self) -> None:
        if self.stop_on_nan and self._flusher.first_bad and self._status == "running":
            # Values reach the host only at a flush, so this is the earliest moment we can know,
            # without a per-step sync: within one flush interval of the bad step.
            print(f"gradscope: stopping the training (--stop-on-nan): {self._flusher.first_bad}", file=sys.stderr)
            self._status = "failed"
            raise SystemExit(1)

    def _stop_now(self) -> None:
        """--stop-on-nan saw a bad step: write every row (waiting now is fine: we stop), then stop."""
        self._flush()
        self._drain(block=True)  # raises SystemExit once the bad row is written
        if self._status == "running":  # the row was judged bad before its flush could say so
            self._flusher.first_bad = self._flusher.first_bad or self._stopper.reason  # type: ignore[union-attr]
            self._drain(block=True)

    def _process_changes(self) -> tuple:
        """What the process file says besides the counts: a new optimizer, clip function or threshold,
        a status, a clip-audit finding (written at once)."""
        return (len(self._states), tuple(self._clip_calls), tuple(map(len, self._thresholds.values())),
                len(self._script_max_norms), self._status, len(getattr(self._audit, "_found", ())),
                getattr(self._audit, "error", None))

    def _process_snapshot(self, rank: int) -> dict:
        """process-r*.json's values as this recorder knows them, in the file's order (rank: the
        writer's); the flusher fills in run_id and recording_error."""
        snap: dict[str, Any] = dict(
            gradscope_version=__version__, rank=rank, world_size=distributed.world_size(), pid=self._pid,
            host=rundir.host_name(), python=sys.version.split()[0], torch=torch.__version__,
            devices=sorted(self._devices), started=flushing.iso(self._started_at),
            ended=flushing.iso(time.time()) if self._closed or self._status != "running" else None,
            status=self._status, run_id=None, closed=bool(self._closed), recording_error=None,
            layer_stride=self.layer_stride, flush_steps=self.flush_steps, flush_seconds=self.flush_seconds,
            optimizers=[_optimizer_info(st, rank) for st in self._states],
            clip_calls=dict(self._clip_calls),
            clip_thresholds={k: v for k, v in self._thresholds.items() if v},
            clip_norm_override=self.clip_norm,
            script_max_norms_overridden=list(self._script_max_norms),
        )
        snap[rundir.CLIP_AUDIT_KEY] = self._audit.record(lambda st: st.names or parameter_names(st.params))
        # rank-local: some optimizer's gradients are shards gradscope cannot reduce
        # (FSDP1: capture/fsdp1.py, per optimizer; an engine gradscope cannot read: capture/deepspeed_engine.py)
        local = self._norm_scope == "rank-local" or any(st.norm_scope == "rank-local" for st in self._states)
        snap[rundir.NORM_SCOPE_KEY] = snap[rundir.LAYER_NORM_SCOPE_KEY] = "rank-local" if local else "global"
        if self._nantrace is not None:
            snap[rundir.NAN_TRACE_KEY] = self._nantrace.info()
        return snap


# ---------------------------------------------------------------------- helpers


def _optimizer_info(st: _OptState, rank: int) -> dict:
    """One optimizer's entry in process-r*.json."""
    return {
        "id": st.id,
        "class": st.cls,
        "kind": st.kind,
        "parameters": st.n_elements,
        "tensors": len(st.params),
        "steps": st.steps,
        "momentum": st.momentum,
        "layers_file": rundir.layers_file(rank, st.id) if st.names else None,
        "layer_rows": st.layer_rows,
    }


def _clip_columns(clip: _Clip | None, total: torch.Tensor, device: torch.device, zero: torch.Tensor) -> tuple:
    """(clip_max_norm, clip_value, clipped, own_clipped) of a step and the clip call it applies."""
    clip_max_norm = clip.threshold if clip is not None and clip.kind == "norm" else _NAN
    clip_value = clip.threshold if clip is not None and clip.kind == "value" else _NAN
    clipped = (total > clip_max_norm).float() if clip_max_norm == clip_max_norm else zero
    own_clipped = clip is not None and clip.scope == "local" and clip.total is not None
    if own_clipped:  # a rank-local clip: this rank's gradients were scaled when its own norm exceeded
        clipped = (clip.total.to(device, non_blocking=True) > clip_max_norm).float()  # type: ignore[union-attr]
    return clip_max_norm, clip_value, clipped, own_clipped


def _momentum(opt: Any) -> float | None:
    """The heavy-ball momentum of an SGD/RMSprop-style optimizer (Adam's betas are not one)."""
    try:
        m = opt.param_groups[0].get("momentum")
        return float(m) if isinstance(m, (int, float)) and not isinstance(m, bool) else None
    except Exception:
        return None


def _has_dtensor(tensors: list) -> bool:
    return any(type(t).__name__ == "DTensor" for t in tensors)


def _existing_optimizers() -> list:
    """Optimizers created before recording started (the Python API inside a notebook)."""
    import gc

    return [o for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer)]


