"""Gradient norms computed the way torch.nn.utils.clip_grad computes them: one pass.

Tensors are grouped by (device, dtype) and each group goes through one
``torch._foreach_norm`` call; the per-tensor norms are kept (they are the
per-layer table) and the global norm is the L2 norm of their stack. Nothing here
reads a value back to the host.
"""
from __future__ import annotations

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)


def per_tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor, as 0-d tensors on the tensor's device, in input order."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
    for (device, _), ([group], indices) in grouped.items():
        if _has_foreach_support(group, device):
            norms = torch._foreach_norm(group, 2.0)
        else:
            norms = tuple(torch.linalg.vector_norm(t, 2.0) for t in group)
        for i, n in zip(indices, norms):
            out[i] = n
    return out  # type: ignore[return-value]


def stack_norms(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-tensor norms as one float32 vector on `device` (mixed dtypes promoted)."""
    same = [n if n.device == device else n.to(device, non_blocking=True) for n in norms]
    return torch.stack(same).float() if same else torch.zeros(0, device=device)


def total_norm_like_torch(tensors: list[torch.Tensor], foreach: bool | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Exactly the L2 branch of ``torch.nn.utils.get_total_norm``, also returning the per-tensor norms.

    The operations and their order are torch's own (same grouping, same foreach
    kernels, same stack and vector_norm), so the total is bit-identical and the
    clip that follows scales the gradients exactly as it would without gradscope.
    """
    first_device = tensors[0].device
    # with_indices only adds the indices; the grouping and its order are torch's.
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
    norms: list[torch.Tensor] = []
    for (device, _), ([group], _) in grouped.items():
        if (foreach is None and _has_foreach_support(group, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            norms.extend(torch._foreach_norm(group, 2.0))
        elif foreach:
            raise RuntimeError(
                f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
            )
        else:
            norms.extend([torch.linalg.vector_norm(g, 2.0) for g in group])
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2.0)
    # torch's grouping reorders tensors by group; map the norms back to input order.
    return total, _in_input_order(tensors, grouped, norms)


def _in_input_order(tensors, grouped, norms_in_group_order):
    out: list[torch.Tensor | None] = [None] * len(tensors)
    k = 0
    for _, ([group], indices) in grouped.items():
        for i in indices:
            out[i] = norms_in_group_order[k]
            k += 1
    if any(n is None for n in out):  # pragma: no cover - torch changed its grouping contract
        raise RuntimeError("gradscope: unexpected tensor grouping")
    return out
