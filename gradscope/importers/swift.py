"""ms-swift `logging.jsonl` -> Run.

Facts (modelscope/ms-swift swift/trainers/callback.py `add_train_message`, swift/llm/sft.py):
- each on_log appends the Trainer's logs plus `'global_step/max_steps': '10/438'` (the only
  step), `percentage`, `elapsed_time`, `remaining_time`; floats rounded to 8 decimals.
- eval entries (`eval_*`) and the final summary (`train_runtime`...) get the same fields.
- at the end a run-info line is appended whose `log_history` repeats the whole history
  (with `step`, not the string): counted once here, used only for steps the lines lack.
- older versions wrote every line twice (two callbacks appended); repeats count once.
- the threshold is `max_grad_norm` in `args.json` beside the log.
"""
from __future__ import annotations

import re
from pathlib import Path

from gradscope.importers._common import (
    build_run,
    clip_from_value,
    fail,
    find_args,
    lookup,
    read_records,
    sampled_note,
    spacing,
    trainer_default,
)
from gradscope.importers.hf import history_rows, is_train_row

STEP_KEY = "global_step/max_steps"
_STEP = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def looks_like(records: list[dict]) -> bool:
    return any(STEP_KEY in r for r in records[:50])


def load(path: Path, column: str | None = None, records: list[dict] | None = None):
    if records is None:
        records, _, _ = read_records(path)
    gn_key = column or "grad_norm"
    rows: list[dict] = []
    history: list[dict] = []
    last_step = max_steps = None
    completed = False
    for r in records:
        if isinstance(r.get("log_history"), list):
            history = r["log_history"]
            completed = True
            continue
        if "train_runtime" in r:
            completed = True
        m = _STEP.match(str(r.get(STEP_KEY, "")))
        if not m:
            continue
        step, max_steps = int(m.group(1)), int(m.group(2))
        last_step = step
        if not (is_train_row(r) or gn_key in r):
            continue  # eval / summary entry
        rows.append({"step": step, "grad_norm": r.get(gn_key), "loss": r.get("loss"), "lr": r.get("learning_rate")})
    if not rows and not history:
        raise fail(f"no '{STEP_KEY}' training entries in '{path}' (expected an ms-swift logging.jsonl)")

    notes: list[str] = []
    if history:
        have = {r["step"] for r in rows}
        hist_rows, _ = history_rows(history)
        if column is not None:
            hist_rows = [
                {"step": int(h["step"]), "grad_norm": h.get(column), "loss": h.get("loss"), "lr": h.get("learning_rate")}
                for h in history
                if isinstance(h, dict) and h.get("step") is not None and column in h
            ]
        added = [h for h in hist_rows if h["step"] not in have]
        notes.append(
            f"the last line repeats the whole log history ({len(hist_rows)} train entries): counted once"
            + (f", {len(added)} steps missing from the lines taken from it" if added else "")
        )
        rows.extend(added)
        rows.sort(key=lambda r: r["step"])
    if all(r.get("grad_norm") is None for r in rows):
        raise fail(f"no {gn_key} in the training entries of '{path}'; name the column with --column")

    clip_norm = None
    found = find_args([path.parent, path.parent.parent], ("args.json",), keys=("max_grad_norm",))
    if found is not None:
        obj, f = found
        clip_norm = clip_from_value(lookup(obj, ("max_grad_norm",)))
        notes.append(f"clip threshold max_grad_norm={lookup(obj, ('max_grad_norm',))} read from '{f}'")
        if lookup(obj, ("deepspeed",)) or lookup(obj, ("fsdp",)):
            notes.append("trained with DeepSpeed/FSDP: check grad_norm is the global norm, not a per-rank/per-shard one")
    notes.append("ms-swift rounds logged values to 8 decimals")
    notes.append(
        "Hugging Face drops NaN/inf losses from its logs (logging_nan_inf_filter=True): "
        "non-finite losses cannot be seen here"
    )
    k = spacing(sorted({r["step"] for r in rows}))
    s = sampled_note(k)
    if s:
        notes.append(s)
        notes.append(
            "grad_norm is the norm of the last optimizer step before each entry, loss the mean over the window"
        )
    status = "completed" if completed else "unknown"
    if not completed and last_step is not None and max_steps and last_step < max_steps:
        notes.append(f"the log ends at global_step {last_step} of max_steps {max_steps} (still running or stopped)")
    return build_run(
        path, "swift", rows, notes=notes, clip_norm=clip_norm, status=status,
        extra_meta={"global_step": last_step, "max_steps": max_steps},
        default_clip_norm=None if found is not None else trainer_default("ms-swift", "args.json"),
    )
