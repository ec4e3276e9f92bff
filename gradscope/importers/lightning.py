"""PyTorch Lightning CSVLogger `metrics.csv` -> Run (per-parameter norms -> layers).

Facts (Lightning src/lightning/pytorch/utilities/grads.py `grad_norm`,
src/lightning/fabric/loggers/csv_logs.py `_ExperimentWriter`):
- `grad_norm(module, norm_type)` returns `grad_{float(norm_type)}_norm/<param name>` per
  parameter and `grad_{norm_type}_norm_total`; only `grad_2.0_norm*` is the L2 norm.
  Logged from `on_before_optimizer_step`, i.e. before clipping. With on_epoch=True the keys
  gain `_step`/`_epoch` suffixes.
- metrics.csv has one row per log call (sorted columns, a `step` column, NaN where a metric
  was not logged), so one step spreads over several sparse rows.
- `hparams.yaml` beside it (save_hyperparameters) or LightningCLI's `config.yaml`
  (`trainer.gradient_clip_val`, `gradient_clip_algorithm`) may give the threshold.
"""
from __future__ import annotations

from pathlib import Path

from gradscope.errors import GradscopeError
from gradscope.importers._common import (
    LOSS_NAMES,
    LR_NAMES,
    build_run,
    clip_from_value,
    fail,
    find_args,
    find_grad_norm_column,
    lookup,
    norm_name,
    pick_column,
    group_first,
    read_sparse_csv,
    sampled_note,
    spacing,
    to_float,
)

LAYER_PREFIX = "grad_2.0_norm/"


def _layer_name(col: str) -> str | None:
    if LAYER_PREFIX not in col:  # also prefixed keys, e.g. log_dict({"grad/" + k: v})
        return None
    name = col.split(LAYER_PREFIX, 1)[1]
    if name.endswith("_epoch"):
        return None
    return name[: -len("_step")] if name.endswith("_step") else name


def load(path: Path, column: str | None = None):
    import numpy as np

    df = read_sparse_csv(path)
    if "step" not in df.columns:
        raise fail(f"no 'step' column in '{path}' (expected a Lightning CSVLogger metrics.csv)")
    # Sparse rows: each metric on its own row; the first value per step and column wins.
    wide = group_first(df, "step")
    wide = wide.apply(lambda c: c.map(to_float))

    layer_cols = {c: _layer_name(c) for c in wide.columns}
    layer_cols = {c: n for c, n in layer_cols.items() if n}
    notes: list[str] = []
    cols = [c for c in wide.columns]
    try:
        gcol = find_grad_norm_column(cols, column, str(path))
    except GradscopeError:
        gcol = None
        if column is not None:
            raise
        if not layer_cols:
            other = [c for c in cols if c.startswith("grad_") and "_norm" in c]
            if other:
                raise fail(
                    f"'{path}' has only non-L2 gradient norms ({', '.join(other[:4])}); gradscope needs the "
                    "2-norm: log grad_norm(self, norm_type=2), or name a column with --column"
                ) from None
            raise
    grad = wide[gcol].astype("float64") if gcol is not None else None
    if grad is None:
        # The total is the 2-norm of the per-parameter 2-norms, as grad_norm() computes it.
        sq = wide[list(layer_cols)].astype("float64") ** 2
        grad = np.sqrt(sq.sum(axis=1, min_count=1))
        notes.append(f"no grad_2.0_norm_total column: the total was computed from {len(layer_cols)} per-parameter norms")
    keep = grad.notna()
    if not keep.any():
        raise fail(f"no gradient norms in '{path}' (column '{gcol}' is empty)")
    wide = wide[keep]
    grad = grad[keep]

    loss_col = pick_column(cols, LOSS_NAMES)
    lr_col = pick_column(cols, LR_NAMES) or next((c for c in cols if norm_name(c).startswith("lr-")), None)
    rows = [
        {
            "step": int(s),
            "grad_norm": float(g),
            "loss": wide.at[s, loss_col] if loss_col else None,
            "lr": wide.at[s, lr_col] if lr_col else None,
        }
        for s, g in grad.items()
    ]

    layers = None
    if layer_cols:
        lay = wide[list(layer_cols)].rename(columns=layer_cols).astype("float64")
        lay = lay[lay.notna().any(axis=1)]
        lay.insert(0, "step", lay.index.astype("int64"))
        lay.insert(0, "optimizer", 0)
        lay.insert(0, "rank", 0)
        layers = lay.reset_index(drop=True)
        layers = layers.loc[:, ~layers.columns.duplicated()]

    clip_norm = None
    found = find_args([path.parent], ("hparams.yaml", "config.yaml"), keys=("gradient_clip_val",))
    if found is not None:
        obj, f = found
        v = lookup(obj, ("gradient_clip_val",))
        algo = str(lookup(obj, ("gradient_clip_algorithm",)) or "norm").lower()
        if algo == "value":
            notes.append(f"'{f}' clips by value (gradient_clip_val={v}), not by norm: no clip norm")
        else:
            clip_norm = clip_from_value(v)
            notes.append(f"clip threshold gradient_clip_val={v} read from '{f}'")
    k = spacing([r["step"] for r in rows])
    s = sampled_note(k)
    if s:
        notes.append(s + " (Lightning's log_every_n_steps)")
    if gcol is not None and not norm_name(gcol).startswith("grad_2.0_norm"):
        notes.append(f"grad-norm column '{gcol}' was chosen by name; check it is the pre-clip global L2 norm")
    return build_run(path, "lightning", rows, notes=notes, clip_norm=clip_norm, layers=layers)
