"""Hugging Face Trainer `trainer_state.json` (TrainerState.save_to_json) -> Run.

Facts (transformers src/transformers/trainer.py, trainer_callback.py):
- `log_history` is a list of dicts; Trainer.log() appends `{**logs, "step": global_step}`
  with `epoch` added. Train rows carry `loss` (mean over the logging window, rounded to 4
  decimals by older versions), `grad_norm` (the value clip_grad_norm_ returned at the last
  optimizer step before the entry: pre-clip, only logged when max_grad_norm > 0) and
  `learning_rate`. Eval rows (`eval_*`, custom prefixes such as `eval_g0_loss`) share steps
  with train rows; `predict_*` rows can lack `step`; the last row is a summary with
  `train_runtime`/`train_loss`.
- json.dumps writes NaN/Infinity as bare tokens, which json.loads reads back.
- `max_grad_norm` is in training_args.bin (a pickle): read from its opcodes, never unpickled.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from gradscope.rundir import NAN_LOSSES_DROPPED, SHARDED_TRAINING
from gradscope.importers._common import (
    HF_ARGS_FILES,
    build_run,
    clip_from_value,
    fail,
    find_args,
    lookup,
    pickle_scalars,
    sampled_note,
    spacing,
    to_float,
    trainer_default,
)

NAN_FILTER_NOTE = (
    "Hugging Face drops NaN/inf losses from its logs (logging_nan_inf_filter=True, the default): "
    "non-finite losses cannot be seen here"
)
WINDOW_NOTE = (
    "Hugging Face logs grad_norm of the last optimizer step before each entry but loss averaged "
    "over the whole logging window: the two are not from the same step"
)


def is_train_row(row: dict) -> bool:
    if "train_runtime" in row or "train_loss" in row and "loss" not in row:
        return False
    return "grad_norm" in row or "loss" in row


def read_state(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise fail(f"cannot read '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise fail(f"'{path}' is not a text file (expected a Hugging Face trainer_state.json)") from None
    try:
        state = json.loads(text)  # NaN / Infinity / -Infinity tokens are accepted
    except ValueError as e:
        raise fail(
            f"cannot parse '{path}' as JSON ({e}); is the file complete? (expected a Hugging Face "
            "trainer_state.json)"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise fail(f"'{path}' has no log_history list (expected a Hugging Face trainer_state.json)")
    return state


def history_rows(log_history: list) -> tuple[list[dict], int]:
    """Train rows of a log_history as {'step', 'grad_norm', 'loss', 'lr'}; and the eval/other count."""
    rows, skipped = [], 0
    for row in log_history:
        if not isinstance(row, dict) or not is_train_row(row) or row.get("step") is None:
            skipped += 1
            continue
        rows.append(
            {
                "step": int(row["step"]),
                "grad_norm": row.get("grad_norm"),
                "loss": row.get("loss"),
                "lr": row.get("learning_rate"),
            }
        )
    return rows, skipped


def hf_clip_norm(path: Path, notes: list[str]) -> tuple[float | None, dict]:
    """max_grad_norm from an args file beside the state (or one directory up), else from
    training_args.bin's pickle opcodes. Also returns other args found (for notes)."""
    dirs = [path.parent, path.parent.parent]
    found = find_args(dirs, HF_ARGS_FILES, keys=("max_grad_norm",))
    if found is not None:
        obj, f = found
        args = {k: lookup(obj, (k,)) for k in ("max_grad_norm", "logging_nan_inf_filter", "deepspeed", "fsdp")}
        notes.append(f"clip threshold max_grad_norm={args['max_grad_norm']} read from '{f}'")
        return clip_from_value(args["max_grad_norm"]), args
    for d in dirs:
        b = d / "training_args.bin"
        if b.is_file():
            args = pickle_scalars(b, ("max_grad_norm", "logging_nan_inf_filter", "deepspeed", "fsdp"))
            if "max_grad_norm" in args:
                notes.append(
                    f"clip threshold max_grad_norm={args['max_grad_norm']} read from '{b}' "
                    "(pickle opcodes inspected, nothing unpickled)"
                )
                return clip_from_value(args["max_grad_norm"]), args
            notes.append(
                f"max_grad_norm not found in '{b}'; save TrainingArguments as JSON "
                "(args.to_json_string()) beside the log to give the threshold"
            )
            return None, {}
    return None, {}


def load(path: Path, column: str | None = None):
    state = read_state(path)
    notes: list[str] = []
    rows, skipped = history_rows(state["log_history"])
    if column is not None and column != "grad_norm":
        # a custom key in log_history (e.g. logged by a callback)
        rows = [
            {"step": int(r["step"]), "grad_norm": r.get(column), "loss": r.get("loss"), "lr": r.get("learning_rate")}
            for r in state["log_history"]
            if isinstance(r, dict) and r.get("step") is not None and column in r
        ]
    if not rows or all(r.get("grad_norm") is None for r in rows):
        raise fail(
            f"no grad_norm in the log_history of '{path}' ({len(state['log_history'])} entries): "
            "older transformers versions, and runs with max_grad_norm=0 (no clipping), do not log it"
        )

    clip_norm, args = hf_clip_norm(path, notes)
    flags = {}
    if args.get("logging_nan_inf_filter", True) is not False:
        notes.append(NAN_FILTER_NOTE)
        flags[NAN_LOSSES_DROPPED] = True
    if args.get("deepspeed") or args.get("fsdp"):
        flags[SHARDED_TRAINING] = True
        notes.append(
            "trained with DeepSpeed/FSDP: check grad_norm is the global norm, not a per-rank/per-shard one"
        )

    steps = sorted({r["step"] for r in rows})
    k = spacing(steps)
    s = sampled_note(k)
    if s:
        notes.append(s)
    if k and k > 1:
        notes.append(WINDOW_NOTE)
    header_k = state.get("logging_steps")
    if isinstance(header_k, (int, float)) and k and int(header_k) != k and header_k >= 1:
        notes.append(f"the header says logging_steps={header_k} but entries are {k} steps apart")

    losses = [to_float(r.get("loss")) for r in rows if r.get("loss") is not None]
    finite = [x for x in losses if math.isfinite(x)]
    if len(finite) >= 3 and all(round(x, 4) == x for x in finite):
        notes.append("losses are rounded to 4 decimals in this log")

    gstep, max_steps = state.get("global_step"), state.get("max_steps")
    completed = any(isinstance(r, dict) and "train_runtime" in r for r in state["log_history"])
    status = "completed" if completed else "unknown"
    if isinstance(gstep, int) and isinstance(max_steps, int) and max_steps > 0 and gstep < max_steps:
        notes.append(f"this is a mid-run checkpoint: global_step {gstep} of max_steps {max_steps}")
        status = "unknown"
    m = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
    extra = {"global_step": gstep, "max_steps": max_steps, "eval_rows_skipped": skipped, **flags}
    if m:
        extra["checkpoint"] = path.parent.name
    default = None if "max_grad_norm" in args else trainer_default(
        "Hugging Face TrainingArguments", "args file (training_args.json, args.json, ...) or training_args.bin")
    return build_run(path, "hf", rows, notes=notes, clip_norm=clip_norm, status=status, extra_meta=extra,
                     default_clip_norm=default)
