"""FSDP1 (torch ``FullyShardedDataParallel``): the global norm and the user's layers from one rank's shards.

Under FSDP1 with a sharded strategy (FULL_SHARD, SHARD_GRAD_OP, HYBRID_*) each rank's
optimizer holds a shard: with flat parameters (``use_orig_params=False``) one
``FlatParameter`` per FSDP unit whose gradient is this rank's slice of the unit's
concatenated (padded) gradients; with ``use_orig_params=True`` the original parameters,
whose gradients are 1-D views of the part of them in this rank's slice (``None`` where
none is). A norm over those is this rank's shard norm, not the model's.

A :class:`Layout`, built once per optimizer (a gc scan for FSDP's ``FlatParamHandle``
objects, at its first clip or step), maps every gradient piece to a column: one column
per *original* parameter, named as the user's ``named_parameters()`` names it. Per step
the pieces' norms are taken in one ``torch._foreach_norm`` pass; the squares of the
sharded columns are summed over the ranks with one asynchronous all-reduce of that small
vector (as distributed.py does for FSDP2; divided by the replication factor under hybrid
sharding), the columns of unsharded units (NO_SHARD, parameters FSDP does not manage)
are counted once, as ``FullyShardedDataParallel.clip_grad_norm_`` counts them.

When the script calls FSDP's ``clip_grad_norm_`` the recorder reuses the total it
returns (already reduced) and takes the pre-clip column norms before it scales the
gradients (``Shards``, the recorder's ``on_fsdp1_clip``); then, on steps without a per-layer row, nothing
is communicated. A ``FlatParameter`` whose handle cannot be found is an unknown shard:
the optimizer's norms are marked rank-local instead (process key ``norm_scope``).
"""
from __future__ import annotations

import gc
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from gradscope.capture.names import clean_name, parameter_names

_MODULE = "torch.distributed.fsdp._flat_param"
UNKNOWN = "unknown"  # an optimizer with flat shards gradscope cannot map: rank-local norms


def loaded() -> bool:
    """Whether FSDP1 is imported (nothing here imports it: that costs seconds)."""
    return _MODULE in sys.modules


def is_flat_param(p: Any) -> bool:
    return bool(getattr(p, "_is_flat_param", False))


@dataclass
class Layout:
    """How one optimizer's gradients (fixed parameter order) map to the original parameters."""

    names: list  # one per column: the user's parameter names
    pieces: list  # per optimizer parameter: ((offset, numel, column), ...) into its 1-D gradient; () none
    sharded: list  # per column: summed over the ranks (True) or counted once (False)
    divisor: list  # per column: replication factor of a sharded column (hybrid sharding), else 1.0
    any_sharded: bool
    roots: list = field(default_factory=list)  # weak references to the FSDP roots holding them (--clip-norm)
    _index: dict = field(default_factory=dict)

    @property
    def columns(self) -> int:
        return len(self.names)

    def local_norms(self, params: list, device: torch.device) -> torch.Tensor:
        """This rank's norm of each column's pieces (float32; 0 where it holds none): one foreach pass."""
        views: list[torch.Tensor] = []
        cols: list[int] = []
        for p, pieces in zip(params, self.pieces):
            g = p.grad
            if g is None or not pieces:
                continue
            flat = g.reshape(-1) if g.dim() != 1 else g
            for offset, numel, col in pieces:
                views.append(flat if offset is None else flat[offset:offset + numel])
                cols.append(col)
        out = torch.zeros(self.columns, dtype=torch.float32, device=device)
        if not views:
            return out
        from gradscope.capture.norms import per_tensor_norms, stack_norms

        norms = stack_norms(per_tensor_norms(views), device)
        key = (tuple(cols), device)
        index = self._index.get(key)
        if index is None:
            if len(self._index) > 64:
                self._index.clear()
            index = self._index[key] = torch.tensor(cols, dtype=torch.long).to(device)
        return out.index_copy_(0, index, norms)

    def global_norms(self, local: torch.Tensor, *, total: torch.Tensor | None, want_vector: bool,
                     dtype: torch.dtype, grad_scale: torch.Tensor | None = None) -> Any:
        """The columns' full norms and the total from this rank's column norms (distributed.GlobalNorms).

        One asynchronous all-reduce (gloo: waited for at flush; NCCL: stream-ordered), none
        when ``total`` is FSDP's own and no per-layer row is wanted."""
        import torch.distributed as dist

        from gradscope.capture import distributed

        device = local.device
        if total is not None:
            total = total.to(device, dtype, non_blocking=True)
            if grad_scale is not None:  # a fused optimizer under GradScaler: the gradients still carry it
                total = total / grad_scale.to(device, non_blocking=True)
            if not want_vector:
                return distributed.GlobalNorms(total=total, vector=None)
        squares = local.to(dtype).square()
        out = distributed.GlobalNorms(total=total, vector=None, _squares=squares, _scale=grad_scale)
        if not self.any_sharded or not (dist.is_available() and dist.is_initialized()):
            out._complete()
            return out
        if any(d != 1.0 for d in self.divisor):
            out._divisor = distributed._constant(self.divisor, dtype, device)
        if all(self.sharded):
            buf = squares
        else:  # unsharded columns are counted once: reduce the sharded ones only
            index = distributed._constant([i for i, s in enumerate(self.sharded) if s], torch.long, device)
            buf = squares[index]
            out._parts.append((index, buf))
            # the divisor divides every column; unsharded ones have factor 1
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)
        if distributed._is_stream_ordered(None, device):
            work.wait()  # the current stream waits for the collective; the host does not
            out._complete()
        else:
            out.works.append(work)
        return out


def layout(params: list) -> "Layout | str | None":
    """The layout of an optimizer's parameters; None when none is an FSDP1 parameter;
    UNKNOWN when some are flat shards whose FSDP handle cannot be found."""
    if not loaded():
        return None
    flat = [p for p in params if is_flat_param(p)]
    handles = _handles()
    by_flat = {id(h.flat_param): h for h in handles}
    by_orig: dict[int, tuple[Any, int]] = {}
    for h in handles:
        fp = h.flat_param
        if getattr(h, "_use_orig_params", False) and getattr(fp, "_params", None):
            for i, p in enumerate(fp._params):
                by_orig[id(p)] = (h, i)
    if any(id(p) not in by_flat for p in flat):
        return UNKNOWN
    if not flat and not any(id(p) in by_orig for p in params):
        return None
    world = _world()
    flat_names = dict(zip(map(id, flat), parameter_names(flat))) if flat else {}
    other = [p for p in params if not is_flat_param(p)]
    other_names = dict(zip(map(id, other), parameter_names(other))) if other else {}
    names: list[str] = []
    sharded: list[bool] = []
    divisor: list[float] = []
    pieces: list[tuple] = []

    def column(name: str, h: Any) -> int:
        names.append(name)
        on = bool(h is not None and h.uses_sharded_strategy)
        sharded.append(on)
        divisor.append(float(max(1, world // max(1, h.world_size))) if on else 1.0)
        return len(names) - 1

    for p in params:
        h = by_flat.get(id(p))
        if h is not None:  # a flat parameter: one column per original parameter in its unit
            fp = h.flat_param
            prefix = flat_names[id(p)]
            prefix = prefix[: -len("_flat_param")] if prefix.endswith("_flat_param") else prefix + "."
            mine = []
            for fqn, info in zip(fp._fqns, fp._shard_param_infos):
                col = column(prefix + clean_name(fqn), h)
                if info.in_shard and info.numel_in_shard:
                    mine.append((int(info.offset_in_shard), int(info.numel_in_shard), col))
            pieces.append(tuple(mine))
            continue
        owner = by_orig.get(id(p))
        col = column(other_names.get(id(p), "param"), owner[0] if owner else None)
        pieces.append(((None, None, col),))  # the whole local gradient (a view of this rank's part)
    # keep column names unique, as parameter_names does
    seen: set = set()
    for i, n in enumerate(names):
        if n in seen:
            names[i] = f"{n}#{i}"
        seen.add(names[i])
    return Layout(names=names, pieces=pieces, sharded=sharded, divisor=divisor, any_sharded=any(sharded))


def roots_for(params: list) -> list:
    """The FSDP1 root modules that hold any of ``params`` (their ``clip_grad_norm_`` is the global clip)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wanted = {id(p) for p in params}
    out = []
    for o in gc.get_objects():
        if isinstance(o, FSDP) and getattr(o, "_is_root", None):
            if any(id(p) in wanted for p in o.parameters()):
                out.append(o)
    return out


def _handles() -> list:
    mod = sys.modules.get(_MODULE)
    cls = getattr(mod, "FlatParamHandle", None)
    if cls is None:
        return []
    return [o for o in gc.get_objects() if type(o) is cls]


def _world() -> int:
    from gradscope.capture import distributed

    return distributed.world_size()


def sharded_module(module: Any) -> bool:
    """Whether an FSDP1 module clips as a sharded engine (initialised, a sharded strategy): else its
    ``clip_grad_norm_`` calls torch's, which the recorder sees as such."""
    handles = getattr(module, "_all_handles", None)
    return bool(handles) and any(h.uses_sharded_strategy for h in handles)


class Shards:
    """The recorder's FSDP1 side: each optimizer's layout, and the pre-clip column norms taken
    before FSDP's (or torch's) clip scales the shards.

    The recorder's optimizer states (``st``) carry the layout (``st.layout``): False until known,
    then a :class:`Layout`, :data:`UNKNOWN` or None (not FSDP1).
    """

    def __init__(self) -> None:
        self.on = False  # some optimizer has an FSDP1 layout
        self._pre: dict[int, tuple] = {}  # optimizer id -> (first grad weakref, pre-clip column norms)

    def settle(self, st: Any) -> None:
        """Once per optimizer, at its first clip or step: are its gradients FSDP1 shards?"""
        try:
            lay = layout(st.params) if st.kind == "optimizer" and st.params else None
        except Exception:  # FSDP internals that differ from those known: never break the training,
            lay = UNKNOWN  # and never call the shard's norm global
        st.layout = lay
        if lay is None:
            return
        st.lean = None  # the full path: the lean one takes local norms
        if lay == UNKNOWN:
            st.norm_scope = "rank-local"
            return
        self.on = True
        st.names = lay.names  # type: ignore[union-attr]  # a Layout here: UNKNOWN returned above

    def sharded_states(self, states: list, grad_ids: set) -> list:
        """Optimizers with FSDP1-sharded gradients among ``grad_ids``."""
        return [st for st in states if isinstance(st.layout, Layout) and st.layout.any_sharded
                and any(p.grad is not None and id(p.grad) in grad_ids for p in st.params)]

    def remember_pre(self, states: list, grads: list) -> None:
        """Before a clip scales them: this rank's pre-clip column norms of every FSDP1 optimizer
        whose gradients are among ``grads`` (the first measurement of each since its last step)."""
        ids = {id(g) for g in grads}
        for st in states:
            if st.kind != "optimizer":
                continue
            if st.layout is False:
                if not any(p.grad is not None and id(p.grad) in ids for p in st.params):
                    continue
                self.settle(st)
            lay = st.layout
            if not isinstance(lay, Layout):
                continue
            first = next((p.grad for p in st.params if p.grad is not None), None)
            seen = self._pre.get(st.id)
            if first is None or (seen is not None and seen[0]() is first):
                continue
            if not any(p.grad is not None and id(p.grad) in ids for p in st.params):
                continue
            self._pre[st.id] = (weakref.ref(first), lay.local_norms(st.params, first.device))

    def local_norms(self, st: Any, lay: Layout, device: torch.device) -> torch.Tensor:
        """The step's column norms on this rank: those taken before a clip of these very gradients
        (consumed), else measured now."""
        pre = self._pre.pop(st.id, None)
        first = next((p.grad for p in st.params if p.grad is not None), None)
        if pre is not None and first is not None and pre[0]() is first:
            return pre[1]
        return lay.local_norms(st.params, device)

    @staticmethod
    def roots(st: Any) -> list:
        """The FSDP1 roots holding the optimizer's parameters (``--clip-norm`` clips through them),
        found once and held weakly: the recorder must not keep a model alive."""
        lay = st.layout
        roots = [r() for r in lay.roots]
        if not roots or any(r is None for r in roots):
            roots = roots_for(st.params)
            lay.roots = [weakref.ref(r) for r in roots]
        return roots
