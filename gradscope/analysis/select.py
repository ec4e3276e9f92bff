"""Pick the rank and the optimizers to judge, and cut a steps table into per-optimizer arrays."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradscope.errors import GradscopeError


@dataclass
class Series:
    """One optimizer's steps as numpy arrays, in step order."""

    optimizer: int
    step: np.ndarray        # int64
    grad_norm: np.ndarray   # float64
    loss: np.ndarray
    skipped: np.ndarray     # bool
    clip_max_norm: np.ndarray
    clip_value: np.ndarray
    lr: np.ndarray

    def __len__(self) -> int:
        return len(self.step)


def choose_rank(steps, rank: int | None, where: str) -> tuple[int | None, list[int]]:
    """The rank to analyse (rank 0 by default, else the lowest) and all ranks present."""
    r = steps["rank"].to_numpy()
    if len(r) == 0:
        return None, []
    lo, hi = int(r.min()), int(r.max())
    ranks = [lo] if lo == hi else sorted(int(v) for v in np.unique(r))
    if rank is not None:
        if rank not in ranks:
            raise GradscopeError(f"'{where}' has no rank {rank} (ranks: {', '.join(map(str, ranks))})")
        return rank, ranks
    return (0 if 0 in ranks else ranks[0]), ranks


def split_optimizers(steps, optimizer: int | None, where: str) -> list[Series]:
    """One Series per optimizer (only `optimizer` when given), sorted by step."""
    o = steps["optimizer"].to_numpy()
    if len(o) and o.min() == o.max():
        ids = [int(o[0])]
        groups = {ids[0]: None}
    else:
        ids = sorted(int(v) for v in np.unique(o))
        groups = {i: o == i for i in ids}
    if optimizer is not None:
        if optimizer not in groups:
            raise GradscopeError(
                f"'{where}' has no optimizer {optimizer} (optimizers: {', '.join(map(str, ids))})"
            )
        ids = [optimizer]
    out = []
    for i in ids:
        mask = groups[i]

        def col(name, dtype, mask=mask):
            a = steps[name].to_numpy(dtype=dtype)
            return a if mask is None else a[mask]

        step = col("step", np.int64)
        arrays = dict(
            grad_norm=col("grad_norm", float), loss=col("loss", float), skipped=col("skipped", bool),
            clip_max_norm=col("clip_max_norm", float), clip_value=col("clip_value", float), lr=col("lr", float),
        )
        if len(step) > 1 and not (np.diff(step) >= 0).all():
            order = np.argsort(step, kind="stable")
            step = step[order]
            arrays = {k: v[order] for k, v in arrays.items()}
        out.append(Series(optimizer=i, step=step, **arrays))
    return out
