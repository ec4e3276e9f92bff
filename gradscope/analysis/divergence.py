"""The loss gate: did the loss rise far above its best and stay there?

Per series (rank, optimizer), in step order, over the logged losses:

  smoothed  S_i = median of the last SMOOTH logged losses up to i (a non-finite loss counts
            as +inf: a loss that blew up is above anything)
  minimum   M_i = min(S_0 .. S_i), the best the run has done so far
  diverged  S_i > factor * M_i for `steps` consecutive logged steps; the divergence starts at
            the first of them.

The median of a few logged steps makes one noisy batch, or a step a GradScaler skipped,
neither lower the minimum nor count as a rise; requiring `steps` logged steps in a row
makes a short excursion that recovers pass. Logs that hold every k-th step (Hugging Face's
window averages) count logged steps, not optimizer steps. A series whose losses are not all
positive is not judged: a multiple of its minimum means nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACTOR = 2.0   # documented defaults (configs/check.yaml): the loss doubled from its best...
STEPS = 20     # ...for 20 logged steps in a row
SMOOTH = 5


@dataclass
class Divergence:
    rank: int
    optimizer: int
    step: int            # first logged step of the run above factor x the running minimum
    confirmed_step: int  # the step where it had stayed there `steps` logged steps
    loss: float          # the smoothed loss at `step`
    minimum: float       # the running minimum it is compared with
    minimum_step: int    # where that minimum was reached
    factor: float
    steps: int

    @property
    def ratio(self) -> float:
        return self.loss / self.minimum if self.minimum > 0 else float("inf")


def running_median(x: np.ndarray, k: int) -> np.ndarray:
    """Median of the last k values up to each position (fewer at the start)."""
    n = len(x)
    if n == 0 or k <= 1:
        return x.copy()
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.concatenate([np.full(k - 1, np.nan), x])
    win = sliding_window_view(padded, k)
    with np.errstate(all="ignore"):
        return np.nanmedian(win, axis=1)


def series_divergence(step: np.ndarray, loss: np.ndarray, factor: float = FACTOR, steps: int = STEPS,
                      smooth: int = SMOOTH) -> tuple[int, int, float, float, int] | None:
    """(start step, confirmed step, smoothed loss at start, running minimum, its step), or None.

    loss: the logged losses in step order; NaN means "not logged" and is dropped before this
    is called; +-inf is a blown-up loss."""
    x = np.where(np.isfinite(loss), loss, np.inf)
    if len(x) == 0:
        return None
    s = running_median(x, smooth)
    m = np.minimum.accumulate(s)
    with np.errstate(invalid="ignore"):
        above = s > factor * m
    if steps <= 0:
        return None
    run = 0
    for i, a in enumerate(above):
        run = run + 1 if a else 0
        if run >= steps:
            i0 = i - steps + 1
            j = int(np.argmax(s[: i0 + 1] == m[i0]))
            return int(step[i0]), int(step[i]), float(s[i0]), float(m[i0]), int(step[j])
    return None


def find_divergence(run, factor: float = FACTOR, steps: int = STEPS) -> tuple[Divergence | None, int, list[str]]:
    """(the earliest divergence over every series of the run, how many series were judged,
    notes on series that could not be)."""
    st = run.steps
    notes: list[str] = []
    found: list[Divergence] = []
    judged = 0
    if st is None or len(st) == 0:
        return None, 0, ["no steps recorded"]
    multi = st[["rank", "optimizer"]].drop_duplicates()
    for rank, opt in multi.itertuples(index=False):
        sel = st[(st["rank"] == rank) & (st["optimizer"] == opt)].sort_values("step", kind="stable")
        loss = sel["loss"].to_numpy(dtype=float)
        step = sel["step"].to_numpy()
        records = np.isfinite(loss).any() or np.isinf(loss).any()
        if not records:
            continue
        if run.source == "gradscope":
            keep = np.ones(len(loss), dtype=bool)  # a NaN in a recorded series is a blown-up loss
        else:
            keep = ~np.isnan(loss)  # a foreign log's row without a loss is a gap
        loss, step = loss[keep], step[keep]
        fin = loss[np.isfinite(loss)]
        label = f"optimizer {opt}" + (f", rank {rank}" if st["rank"].nunique() > 1 else "")
        if len(fin) and fin.min() <= 0:
            notes.append(f"{label}: losses are not all positive ({fin.min():.4g}); a multiple of the running "
                         "minimum means nothing there, so the divergence rule did not judge it")
            continue
        judged += 1
        hit = series_divergence(step, loss, factor, steps)
        if hit is not None:
            found.append(Divergence(int(rank), int(opt), *hit, factor=factor, steps=steps))
    if not found:
        return None, judged, notes
    return min(found, key=lambda d: (d.step, d.rank, d.optimizer)), judged, notes


def describe(d: Divergence, multi: bool = False) -> str:
    where = f" (optimizer {d.optimizer}, rank {d.rank})" if multi else ""
    loss = "inf" if not np.isfinite(d.loss) else f"{d.loss:.4g}"
    return (f"loss diverged at step {d.step}{where}: {loss}, {d.ratio:.3g}x its running minimum {d.minimum:.4g} "
            f"(step {d.minimum_step}), and stayed above {d.factor:g}x it for {d.steps} logged steps "
            f"(through step {d.confirmed_step}; loss smoothed over {SMOOTH} logged steps)")
