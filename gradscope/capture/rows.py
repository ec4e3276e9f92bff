"""The lean per-step path: the common step's row in three small kernels, its values at flush.

Most steps are plain: one optimizer whose parameters all have gradients of one device and
dtype (plain tensors), no clip call, no loss scaler, no distributed reduction, no per-step
watch. For those the recorder keeps only what must be taken at the step -- the per-tensor
norms and a copy of the losses, in one ``torch._foreach_norm`` pass and one ``stack`` -- and
this module builds the rows' values (``ROW``, the layout named here once) for a whole
flush at once, with the full path's operations batched over the rows (the float64
``vector_norm`` of the float32 per-tensor norms; the float32 sum of several losses), which
give the same bits as one row at a time (checked in tests/test_capture.py).
"""
from __future__ import annotations

from operator import itemgetter
from typing import Any

import torch
from torch.utils._foreach_utils import _device_has_foreach_support

# The row layout, named once: a step's values on the device (float64; float32 on MPS), in this
# order. Every reader and writer of a row uses these names (the steps file's columns of the same
# names are rundir.STEP_COLUMNS).
ROW = ("grad_norm", "loss", "clipped", "skipped", "loss_scale")
GRAD_NORM, LOSS, CLIPPED, SKIPPED, LOSS_SCALE = range(len(ROW))
FIELDS = itemgetter(GRAD_NORM, LOSS, CLIPPED, SKIPPED, LOSS_SCALE)  # a row's values, unpacked by name


def stack_row(device: torch.device, dtype: torch.dtype, *, grad_norm: torch.Tensor, loss: torch.Tensor,
              clipped: torch.Tensor, skipped: torch.Tensor, loss_scale: torch.Tensor) -> torch.Tensor:
    """One full-path row: its five 0-d tensors stacked in ROW order on ``device`` as ``dtype``
    (the keywords are ROW's names, in its order: tests/test_capture.py checks it)."""
    return torch.stack([t.to(device, dtype, non_blocking=True) for t in (grad_norm, loss, clipped, skipped, loss_scale)])


def plain_grads(params: list, st_params: list, sig: tuple) -> list | None:
    """The gradients of a plain step in the optimizer's fixed order, or None when it is not one.

    ``sig`` is the optimizer's (device, dtype) from its first plain step. torch keeps a
    gradient on its parameter's device and dtype, so per gradient the dtype and the type (a
    tensor subclass such as DTensor means the full path) are checked, the device once.
    """
    if len(params) != len(st_params):
        return None
    dtype = sig[1]
    grads = [p.grad for p in params]
    for p, q, g in zip(params, st_params, grads):
        # requires_grad (create_graph=True): norms taken under no_grad, on the full path
        if p is not q or g is None or type(g) is not torch.Tensor or g.dtype is not dtype or g.requires_grad:
            return None
    return grads if grads[0].device == sig[0] else None


def signature(params: list) -> tuple | None:
    """(device, dtype) shared by every gradient, when the foreach kernels serve that device."""
    grads = [p.grad for p in params]
    if not grads or any(g is None or type(g) is not torch.Tensor for g in grads):
        return None
    device, dtype = grads[0].device, grads[0].dtype
    if device.type == "mps" or not _device_has_foreach_support(device):
        return None
    if any(g.dtype is not dtype or g.device != device for g in grads):
        return None
    return device, dtype


def take(grads: list, losses: list) -> torch.Tensor | None:
    """One step's per-tensor norms followed by its losses, in one tensor (two kernels: the
    ``_foreach_norm`` pass and one ``stack``, which also copies the losses, so a later in-place
    change of the user's tensor cannot reach them). None when they live on several devices.

    ``stack`` promotes to a dtype that holds every input exactly, so the norms read back as the
    float32 vector per_tensor_norms + stack_norms give, and the losses keep their value.
    """
    norms = torch._foreach_norm(grads, 2.0)
    try:
        return torch.stack([*norms, *losses] if losses else norms)
    except RuntimeError:  # tensors on several devices (a model moved in part; a loss elsewhere)
        return None


def values_and_layers(rows: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """A flush's rows -> their [n, 5] float64 values, the per-layer rows and those rows' steps.

    Lean rows (``values is None``) are computed here; a lean row's ``layers`` is True when its
    step has a per-layer row (the float32 per-tensor norms in `taken`).
    """
    lean = [r for r in rows if r.values is None]
    if lean:
        groups = _groups(lean)
        if len(lean) == len(rows) and len(groups) == 1:  # the common flush: one kind of row
            values, norms = _lean_values(lean, groups[0], device)
            want = [i for i, r in enumerate(rows) if r.layers is not None]
            if not want:
                return values, None, []
            layers = norms if len(want) == len(rows) else norms[torch.tensor(want, device=device)]
            return values, layers, [rows[i].step for i in want]
        for key in groups:
            idx = [r for r in lean if _key(r) == key]
            values, norms = _lean_values(idx, key, device)
            for j, r in enumerate(idx):
                r.values = values[j]
                if r.layers is True:
                    r.layers = norms[j]
    values = torch.stack([r.values.to(device, non_blocking=True) for r in rows])
    layer_rows = [r for r in rows if r.layers is not None]
    layers = torch.stack([r.layers.to(device, non_blocking=True) for r in layer_rows]) if layer_rows else None
    return values, layers, [r.step for r in layer_rows]


def _key(r: Any) -> tuple[int, int]:
    return r.n_norms, r.taken.shape[0] - r.n_norms


def _groups(rows: list) -> list:
    """The distinct _key of the rows, in order of first appearance."""
    return list(dict.fromkeys(map(_key, rows)))


def _lean_values(rows: list, key: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows alike (as many tensors and losses): [n, 5] values and [n, tensors] float32 norms,
    with the full path's operations batched (bit-identical to one row at a time)."""
    n, k = key
    taken = torch.stack([r.taken for r in rows])
    norms = taken[:, :n].float()  # the per-layer norms, as the full path keeps them
    out = torch.empty((len(rows), 5), dtype=torch.float64, device=device)
    out[:, GRAD_NORM] = torch.linalg.vector_norm(norms.to(torch.float64), dim=1)
    if k == 0:
        out[:, LOSS] = float("nan")
    elif k == 1:
        out[:, LOSS] = taken[:, n]
    else:  # accumulation: the sum of the micro-batch losses in float32, as the full path sums them
        out[:, LOSS] = taken[:, n:].float().sum(dim=1)
    out[:, CLIPPED] = 0.0  # a lean row has no clip call
    out[:, SKIPPED] = 0.0  # and no scaler
    out[:, LOSS_SCALE] = float("nan")
    return out, norms
