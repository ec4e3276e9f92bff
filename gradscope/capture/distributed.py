"""Distributed training: exact global norms of sharded gradients, and recorders for late ranks.

Two concerns, both only reached when torch.distributed is in use:

1. **Sharded gradients (FSDP2, DTensor).** Under ``fully_shard`` every gradient
   is a DTensor and each rank holds a shard, so the norm of the local tensors is
   not the model's norm. :func:`global_norms` turns the per-tensor norms into the
   norms of the *full* parameters with one all-reduce of a small vector per step:

   - a DTensor norm (``torch._foreach_norm`` on DTensors, as ``clip_grad_norm_``
     computes it) carries a placement per mesh dimension: ``_NormPartial(2)``
     where the gradient is sharded (the full norm is the root of the sum of the
     ranks' squares) and ``Replicate`` where it is replicated (every rank holds
     the full value). The local squares are summed over the mesh and divided by
     the replication factor: ``full_i**2 = sum_ranks(local_i**2) / prod(replicated dims)``.
   - when the script clipped the same gradients, the total torch computed is
     already reduced (``Replicate``) and is reused as is; then, on steps without
     a per-layer row, no collective is issued at all.

   The collective happens inside the optimizer-step hook, a point every rank
   reaches in the same program order (SPMD: same optimizer, same step), so it
   is ordered like the script's own collectives and cannot cross them. It adds
   no per-step host synchronisation: on NCCL (and other stream-ordered
   backends) ``work.wait()`` only makes the current CUDA stream wait for the
   communication stream, so the values are used at once, stream-ordered, like
   any other kernel; on gloo (CPU) the all-reduce runs on gloo's own thread and
   the handle is waited for only when the row is flushed (every ``flush_steps``
   steps, long after it finished). Flushes themselves never communicate: their
   timing (``flush_seconds``) differs between ranks.

   DDP needs none of this: its gradients are all-reduced (averaged) before the
   step, every rank holds the same full gradient, and the local norm is the
   global one.

2. **Ranks Python did not start from the command line.** ``torch.multiprocessing.spawn``
   (``mp.spawn``) starts its ranks as multiprocessing spawn children, like
   DataLoader workers, which boot.py must not record. A training rank is the one
   that joins a process group: :func:`start_on_process_group` starts a recorder
   in a process that has none of its own (a spawn child, or a forked child
   whose inherited recorder belongs to its parent) when it does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Backends whose collectives are ordered on a device stream: waiting on them
# costs the host nothing (gloo and mpi block the calling thread instead).
_STREAM_ORDERED = ("nccl", "xccl", "hccl", "mccl")


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


@dataclass
class GlobalNorms:
    """Norms of the full parameters of one step; filled in once the reduction has landed.

    ``vector`` (per-tensor norms, gradient order) and ``total`` are final when
    ``works`` is empty; otherwise :meth:`finish` must be called first (at flush).
    """

    total: torch.Tensor | None
    vector: torch.Tensor | None
    works: list = field(default_factory=list)
    _squares: torch.Tensor | None = None
    _parts: list = field(default_factory=list)  # (indices, reduced copy) for partial reductions
    _divisor: torch.Tensor | None = None
    _scale: torch.Tensor | None = None

    @property
    def pending(self) -> bool:
        return bool(self.works)

    def finish(self) -> "GlobalNorms":
        for w in self.works:
            w.wait()
        self.works = []
        if self._squares is not None:
            self._complete()
        return self

    def _complete(self) -> None:
        squares = self._squares
        for index, reduced in self._parts:
            squares = squares.index_copy(0, index, reduced)
        if self._divisor is not None:
            squares = squares / self._divisor
        vector = squares.clamp_min(0).sqrt()
        if self._scale is not None:
            vector = vector / self._scale
        self.vector = vector
        if self.total is None:
            self.total = torch.linalg.vector_norm(vector)
        self._squares, self._parts, self._divisor = None, [], None


def global_norms(
    grads: list,
    norms: list,
    device: torch.device,
    *,
    total: torch.Tensor | None = None,
    want_vector: bool = True,
    grad_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> GlobalNorms:
    """The step's global norm and per-tensor norms when some gradients are DTensors.

    ``norms`` are the per-tensor L2 norms of ``grads`` (DTensors for DTensor
    gradients, as ``torch._foreach_norm`` returns them); ``total`` the script's
    own clip total of the same gradients, when it clipped. Every rank must call
    this at the same point with the same gradient structure.
    """
    import torch.distributed as dist

    if total is not None and is_dtensor(total):
        total = _replicated_local(total)  # None unless torch already reduced it
    if total is not None:
        total = total.to(device, dtype, non_blocking=True)
        if grad_scale is not None:
            total = total / grad_scale.to(device, non_blocking=True)
    if total is not None and not want_vector:
        return GlobalNorms(total=total, vector=None)  # nothing to reduce: no collective

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    locals_, divisors, groups = _local_parts(norms, world)
    # Squares in float64 (float32 on MPS): a norm of 1e20 must not overflow to inf.
    squares = torch.stack([t.to(device, dtype, non_blocking=True) for t in locals_]).square()
    out = GlobalNorms(total=total, vector=None, _squares=squares, _scale=grad_scale)
    if any(d != 1.0 for d in divisors):
        out._divisor = _constant(divisors, dtype, device)
    stream_ordered = False
    for key, index in groups.items():
        whole = len(index) == len(locals_)
        buf = squares if whole else squares[_constant(index, torch.long, device)]
        stream_ordered |= _all_reduce(buf, key, device, out)
        if not whole:
            out._parts.append((_constant(index, torch.long, device), buf))
    if not out.works:
        out._complete()
    elif stream_ordered:
        out.finish()
    return out


def _local_parts(norms: list, world: int) -> tuple[list, list, dict]:
    """(local values, replication factors, reduction group -> indices) of a step's per-tensor norms."""
    locals_: list[torch.Tensor] = []
    divisors: list[float] = []
    groups: dict[Any, list[int]] = {}  # reduction group -> element indices
    for i, n in enumerate(norms):
        if not is_dtensor(n):
            locals_.append(n)  # a plain tensor beside DTensors (an ignored parameter): local, as is
            divisors.append(1.0)
            continue
        local, divisor = _local_part(n)
        locals_.append(local)
        divisors.append(divisor)
        mesh = n.device_mesh
        key = "world" if mesh.size() == world else mesh
        groups.setdefault(key, []).append(i)
    return locals_, divisors, groups


def _all_reduce(buf: torch.Tensor, key: Any, device: torch.device, out: GlobalNorms) -> bool:
    """Sum ``buf`` in place over the group ``key`` ("world" or a mesh: each of its dimensions in turn);
    a gloo handle still running goes to ``out.works``. True when the backend is stream-ordered."""
    import torch.distributed as dist

    stream_ordered = False
    pgs = [None] if key == "world" else _mesh_groups(key)
    for k, pg in enumerate(pgs):
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg, async_op=True)
        if _is_stream_ordered(pg, device):
            work.wait()  # NCCL: the current stream waits for the collective; the host does not
            stream_ordered = True
        elif k + 1 < len(pgs):
            work.wait()  # gloo, a mesh that is not the whole world: dims one after the other
        else:
            out.works.append(work)
    return stream_ordered


_CONSTANTS: dict = {}


def _constant(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, built once per pattern (a host-to-device copy per step would not be free)."""
    key = (tuple(values), dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype).to(device)
    return t


def _local_part(n) -> tuple[torch.Tensor, float]:
    """(local value, replication factor) of a DTensor norm: summing local**2 over the mesh
    and dividing by the factor gives the full norm squared."""
    placements = n.placements
    if all(p.is_replicate() or _is_norm_partial(p) for p in placements):
        divisor = 1.0
        for dim, p in enumerate(placements):
            if p.is_replicate():
                divisor *= n.device_mesh.size(dim)
        return n.to_local(), divisor
    # Any other placement (never produced by foreach_norm today): let DTensor reduce it.
    from torch.distributed.tensor import Replicate

    full = n.redistribute(placements=[Replicate()] * len(placements)).to_local()
    return full, float(n.device_mesh.size())


def _is_norm_partial(p) -> bool:
    return p.is_partial() and float(getattr(p, "norm_type", 0.0)) == 2.0


def _replicated_local(t) -> torch.Tensor | None:
    if all(p.is_replicate() for p in t.placements):
        return t.to_local()
    return None


def _mesh_groups(mesh) -> list:
    if mesh.ndim == 1:
        return [mesh.get_group()]
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def _is_stream_ordered(pg, device: torch.device) -> bool:
    if device.type == "cpu":
        return False
    import torch.distributed as dist

    try:
        backend = str(dist.get_backend(pg))
    except Exception:
        return False
    return any(b in backend for b in _STREAM_ORDERED)


def fill_layers(positions: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Per-layer row from a row of positions into ``vector`` (NaN: no gradient that step)."""
    missing = positions.isnan()
    picked = vector[positions.nan_to_num(0.0).long()]
    return torch.where(missing, positions, picked)


# ---------------------------------------------------------------------- this process


def group_exists() -> bool:
    """Whether this process is in a default process group now."""
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except Exception:
        return False


def current_rank() -> int:
    """The group's rank, else torchrun's RANK, else 0."""
    if group_exists():
        try:
            return torch.distributed.get_rank()  # loaded: group_exists() imported it
        except Exception:
            pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size() -> int:
    """The group's size, else torchrun's WORLD_SIZE, else 1."""
    if group_exists():
        try:
            return torch.distributed.get_world_size()  # loaded: group_exists() imported it
        except Exception:
            pass
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


# ---------------------------------------------------------------------- late ranks


def start_on_process_group(start: Callable[[], Any]) -> None:
    """Call ``start`` when this process joins a process group (boot: if it has no recorder of its own).

    Hooks ``distributed_c10d._update_default_pg``, which ``init_process_group``
    (and ``init_device_mesh`` through it) calls once the default group exists,
    whatever name the script imported it under.
    """
    try:
        from torch.distributed import distributed_c10d as c10d
    except ImportError:  # a torch built without distributed
        return
    original = c10d._update_default_pg
    if getattr(original, "_gradscope", False):
        return

    def _update_default_pg(pg):
        original(pg)
        if pg is None:
            return
        start()  # boot decides whether this process needs a recorder of its own

    _update_default_pg._gradscope = True  # type: ignore[attr-defined]
    c10d._update_default_pg = _update_default_pg
