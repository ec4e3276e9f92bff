"""Cross-rank consistency of a distributed run: do the ranks agree on the global norm?

Under DDP and FSDP2 gradscope records the global norm on every rank, and every
rank must record the same value: the gradients are all-reduced (DDP) or the
norms are summed across ranks (FSDP2). Ranks that disagree mean desynchronised
replicas (a rank that skipped an all-reduce, diverging weights, a broken
``no_sync`` pattern) or a parallelism gradscope cannot see through (plain-tensor
tensor parallelism, pipeline stages: there each rank's norm is its own part).
Analysis only (pandas): ``recommend`` and ``check`` report it through ``disagreement_note``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

DISAGREEMENT_RTOL = 1e-4

DISAGREEMENT_COLUMNS = ["optimizer", "step", "ranks", "grad_norm_min", "grad_norm_max", "rel_diff", "rank_min", "rank_max"]


def rank_disagreement(steps: Any, rtol: float = DISAGREEMENT_RTOL):
    """Steps where the ranks' ``grad_norm`` differ by more than ``rtol`` (relative).

    ``steps`` is a steps table with ``rank``, ``optimizer``, ``step`` and
    ``grad_norm`` (``Run.steps``). Returns a DataFrame with DISAGREEMENT_COLUMNS,
    one row per (optimizer, step) seen by two ranks or more that disagree:
    ``rel_diff = (max - min) / max(|max|, tiny)``; a step where some ranks
    recorded a finite norm and others NaN/inf counts (rel_diff = inf); a step
    all ranks recorded as NaN does not. Ranks missing a step (a crashed rank)
    are not a disagreement. Empty for single-process runs.
    """
    import pandas as pd

    empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in DISAGREEMENT_COLUMNS})
    if steps is None or len(steps) == 0 or "rank" not in steps or steps["rank"].nunique() < 2:
        return empty
    df = steps.loc[steps["rank"] < 1000, ["rank", "optimizer", "step", "grad_norm"]]  # >= 1000: not a replica
    df = df.assign(finite=np.isfinite(df["grad_norm"].to_numpy(dtype="float64")))
    keys = ["optimizer", "step"]
    fin = df[df["finite"]]
    agg = df.groupby(keys).agg(ranks=("rank", "size"), n_finite=("finite", "sum"))
    agg = agg.join(fin.groupby(keys)["grad_norm"].agg(grad_norm_min="min", grad_norm_max="max"))
    agg = agg[agg["ranks"] >= 2]
    lo, hi = agg["grad_norm_min"].to_numpy(), agg["grad_norm_max"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.nan_to_num((hi - lo) / np.maximum(np.abs(hi), np.finfo(np.float64).tiny), nan=0.0)
    mixed = ((agg["n_finite"] > 0) & (agg["n_finite"] < agg["ranks"])).to_numpy()
    agg["rel_diff"] = np.where(mixed, np.inf, rel)  # finite on some ranks, NaN/inf on others
    bad = agg[agg["rel_diff"] > rtol].reset_index()
    if bad.empty:
        return empty
    for col, how in (("rank_min", "idxmin"), ("rank_max", "idxmax")):
        at = getattr(fin.groupby(keys)["grad_norm"], how)()
        ranks = fin.loc[at.to_numpy(), keys + ["rank"]].rename(columns={"rank": col})
        bad = bad.merge(ranks, on=keys, how="left")
    bad[["rank_min", "rank_max"]] = bad[["rank_min", "rank_max"]].fillna(-1)
    return bad[DISAGREEMENT_COLUMNS].astype({"optimizer": "int64", "step": "int64", "ranks": "int64",
                                             "rank_min": "int64", "rank_max": "int64"})


def compared_steps(steps: Any) -> int:
    """How many (optimizer, step) pairs two replica ranks (< 1000) or more both recorded: what a
    "ranks agree" sentence rests on (0: nothing was compared)."""
    if steps is None or len(steps) == 0 or "rank" not in steps:
        return 0
    df = steps.loc[steps["rank"] < 1000, ["optimizer", "step"]]
    return int((df.groupby(["optimizer", "step"]).size() >= 2).sum())


def missing_ranks(run: Any) -> list[int]:
    """Ranks a run's processes say exist (``world_size``) but that recorded nothing.

    A launcher that does not pass the environment to its processes (ssh, pdsh,
    docker, a second node started outside ``gradscope run``) leaves ranks
    unrecorded; this says which. A run with no process files at all (another trainer's log, a
    table written by hand) says nothing about its ranks: none are reported missing.
    """
    processes = (getattr(run, "meta", None) or {}).get("processes") or []
    if not processes:
        return []
    world = max((int(p.get("world_size") or 1) for p in processes), default=1)
    seen = {int(p.get("rank", -1)) for p in processes}
    return [r for r in range(world) if r not in seen]


def disagreement_note(steps: Any, chosen: int | None, rtol: float = DISAGREEMENT_RTOL) -> str | None:
    """One line for the report when ranks disagree, naming the worst step; None when they agree.
    ``chosen``: the rank the report goes on to judge alone, if any."""
    bad = rank_disagreement(steps, rtol)
    if bad.empty:
        return None
    worst = bad.iloc[int(np.argmax(bad["rel_diff"].to_numpy()))]
    rel = float(worst["rel_diff"])
    how = "finite on some ranks, non-finite on others" if not np.isfinite(rel) else f"by up to {rel:.2g} (relative)"
    return (
        f"ranks disagree about the global grad_norm on {len(bad)} step{'s' if len(bad) != 1 else ''}: {how} at "
        f"optimizer {int(worst['optimizer'])}, step {int(worst['step'])} (ranks {int(worst['rank_min'])} and "
        f"{int(worst['rank_max'])}). gradscope records the global norm on every rank, so these are per-rank "
        f"norms: desynchronised replicas, or a parallelism it cannot see through (tensor/pipeline stages)"
        + (f"; judging rank {chosen} only" if chosen is not None else "")
    )
