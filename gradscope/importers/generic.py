"""Generic logs with a grad-norm column: CSV/TSV tables, JSON Lines, and console logs of
printed Python dicts (`{'loss': 2.4, 'grad_norm': inf, 'learning_rate': 1e-05}`)."""
from __future__ import annotations

from pathlib import Path

from gradscope.rundir import NAN_LOSSES_DROPPED
from gradscope.importers._common import (
    CLIP_KEYS,
    HF_ARGS_FILES,
    LOSS_NAMES,
    LR_NAMES,
    STEP_NAMES,
    build_run,
    clip_from_value,
    fail,
    find_args,
    find_grad_norm_column,
    lookup,
    pick_column,
    group_first,
    read_records,
    read_sparse_csv,
    sampled_note,
    spacing,
    to_float,
    trainer_default,
)

NUMBERED_NOTE = (
    "the log has no step numbers: entries are numbered 1, 2, ... in file order, which are not "
    "optimizer steps when it logs every k-th step"
)
MICRO_NOTE = "'Step' printed in a console log may count micro-batches (gradient accumulation), not optimizer steps"


def _clip(path: Path, notes: list[str]) -> tuple[float | None, bool]:
    """The clip threshold of an args file beside the log, and whether a file named one."""
    found = find_args([path.parent, path.parent.parent], HF_ARGS_FILES)
    if found is None:
        return None, False
    obj, f = found
    v = lookup(obj, CLIP_KEYS)
    notes.append(f"clip threshold {v} read from '{f}'")
    return clip_from_value(v), True


def load_csv(path: Path, column: str | None = None):
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    df = read_sparse_csv(path, sep)
    if df.empty or len(df.columns) == 0:
        raise fail(f"'{path}' has no rows (expected a CSV with a gradient-norm column)")
    cols = list(df.columns)
    gcol = find_grad_norm_column(cols, column, str(path))
    notes: list[str] = []
    scol = pick_column(cols, STEP_NAMES)
    if scol is None:
        df = df.assign(__step=[str(i) for i in range(1, len(df) + 1)])
        scol = "__step"
        notes.append(NUMBERED_NOTE)
    # Sparse loggers (one metric per row) spread a step over several rows.
    wide = group_first(df, scol)
    wide = wide[wide[gcol].notna()]
    lcol, rcol = pick_column(cols, LOSS_NAMES), pick_column(cols, LR_NAMES)
    rows = [
        {
            "step": int(s),
            "grad_norm": wide.at[s, gcol],  # raw: build_run refuses text and negative norms
            "loss": to_float(wide.at[s, lcol]) if lcol else None,
            "lr": to_float(wide.at[s, rcol]) if rcol else None,
        }
        for s in wide.index
    ]
    if not rows:
        raise fail(f"no gradient norms in '{path}' (column '{gcol}' is empty)")
    return _finish(path, "csv", rows, gcol, notes)


def _flatten(rec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def load_jsonl(path: Path, column: str | None = None, parsed=None):
    records, prefix_steps, other = parsed if parsed is not None else read_records(path)
    if not records:
        raise fail(f"no JSON objects or Python dicts in '{path}' (expected one log entry per line)")
    records = [_flatten(r) for r in records]
    keys: list[str] = []
    seen = set()
    for r in records:
        for k in r:
            if k not in seen:
                seen.add(k)
                keys.append(str(k))
    gcol = find_grad_norm_column(keys, column, str(path))
    notes: list[str] = []
    scol = pick_column(keys, STEP_NAMES)
    lcol, rcol = pick_column(keys, LOSS_NAMES), pick_column(keys, LR_NAMES)
    have_prefix = any(p is not None for p in prefix_steps)
    rows = []
    n = 0
    for r, p in zip(records, prefix_steps):
        if gcol not in r:
            continue
        n += 1
        if scol is not None and r.get(scol) is not None:
            step = r[scol]
        elif have_prefix:
            step = p
        else:
            step = n
        try:
            step = int(step)
        except (TypeError, ValueError):
            continue
        rows.append({"step": step, "grad_norm": r.get(gcol), "loss": r.get(lcol) if lcol else None,
                     "lr": r.get(rcol) if rcol else None})
    if not rows:
        raise fail(f"no entries with '{gcol}' in '{path}'")
    counter = scol is None and have_prefix
    if scol is None:
        k = spacing(sorted({r["step"] for r in rows}))
        notes.append(_counter_note(k) if counter else NUMBERED_NOTE)
    if other:
        notes.append(f"{other} lines without a log entry were ignored")
    hf_console = "learning_rate" in keys and "epoch" in keys and "grad_norm" in keys and gcol == "grad_norm"
    if hf_console:
        notes.append(
            "these look like Hugging Face console logs: NaN/inf losses are dropped by logging_nan_inf_filter, "
            "and grad_norm is the norm of the last step before each entry"
        )
    default = trainer_default("Hugging Face TrainingArguments", "args file") if hf_console else None
    flags = {NAN_LOSSES_DROPPED: True} if hf_console else {}
    return _finish(path, "jsonl", rows, gcol, notes, counter=counter, default=default, flags=flags)


def _counter_note(k: int | None) -> str:
    """What a 'Step N' printed before each entry tells, and what it does not."""
    if k is None or k <= 1:
        return MICRO_NOTE
    return (
        f"the 'Step' counter printed before each entry rises by {k} per entry: that is one entry every {k} "
        f"optimizer steps, or one entry per optimizer step with the counter counting micro-batches (gradient "
        f"accumulation {k}); the log cannot tell which, so step numbers here are that counter's and the log "
        "is not treated as sampled"
    )


def _finish(path: Path, fmt: str, rows: list[dict], gcol: str, notes: list[str], counter: bool = False,
            default: tuple[float, str] | None = None, flags: dict | None = None):
    notes.insert(0, f"grad norm read from column '{gcol}'")
    clip_norm, named = _clip(path, notes)
    k = spacing(sorted({r["step"] for r in rows}))
    s = sampled_note(k)
    if s and not counter:
        notes.append(s)
    extra = {"sampled": False, "step_counter": "printed"} if counter else {}
    extra.update(flags or {})
    return build_run(path, fmt, rows, notes=notes, clip_norm=clip_norm, extra_meta=extra,
                     default_clip_norm=None if named else default)

