"""One-line sparklines: the shape of a series in a terminal or a CI log, a bad step marked."""
from __future__ import annotations

import numpy as np

BLOCKS = "▁▂▃▄▅▆▇█"
MARK = "✗"   # the bin holding the marked step (the first bad one)
GAP = " "    # a bin with no finite value


def sparkline(step: np.ndarray, y: np.ndarray, width: int = 40, log: bool = False,
              mark_step: int | None = None) -> str:
    """width characters, each the largest finite value of an equal-count bin of steps (so a
    one-step spike shows), scaled between the series' finite min and max (log10 with log)."""
    y = np.asarray(y, dtype=float)
    step = np.asarray(step)
    n = len(y)
    if n == 0:
        return ""
    width = max(1, min(width, n))
    edges = np.linspace(0, n, width + 1).astype(int)
    v = np.where(np.isfinite(y) & ((y > 0) if log else True), y, np.nan)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log10(v)
    fin = v[np.isfinite(v)]
    lo, hi = (float(fin.min()), float(fin.max())) if len(fin) else (0.0, 0.0)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = v[a:b]
        seg = seg[np.isfinite(seg)]
        if mark_step is not None and a < b and step[a] <= mark_step <= step[b - 1]:
            out.append(MARK)
            mark_step = None
        elif len(seg) == 0:
            out.append(GAP)
        else:
            k = 0 if hi == lo else int(round((seg.max() - lo) / (hi - lo) * (len(BLOCKS) - 1)))
            out.append(BLOCKS[k])
    return "".join(out)
