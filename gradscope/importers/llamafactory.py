"""LLaMA-Factory `trainer_log.jsonl` -> Run.

Facts (hiyouga/LLaMA-Factory src/llamafactory/train/callbacks.py `LogCallback.on_log`,
extras/constants.py): one JSON object per Trainer log with `current_steps`, `total_steps`,
`loss`, `eval_loss`, `lr` (`learning_rate` in old versions, which also wrote nulls),
`epoch`, `percentage`, `elapsed_time`, `remaining_time`; newer builds may add `grad_norm`.
Eval progress lines carry only the step counters. The web UI saves the arguments as
`training_args.yaml` (and `llamaboard_config.yaml`, keys like `train.max_grad_norm`) in the
same output directory; the HF Trainer beside it writes `trainer_state.json` and
`training_args.bin`.
"""
from __future__ import annotations

from pathlib import Path

from gradscope.importers._common import (
    build_run,
    clip_from_value,
    fail,
    find_args,
    lookup,
    pickle_scalars,
    read_records,
    sampled_note,
    spacing,
    trainer_default,
)

LF_ARGS_FILES = (
    "training_args.yaml",
    "training_args.yml",
    "train_args.yaml",
    "train_args.yml",
    "train_args.json",
    "training_args.json",
    "llamaboard_config.yaml",
    "args.json",
)


def looks_like(records: list[dict]) -> bool:
    return any("current_steps" in r and "total_steps" in r for r in records[:50])


def load(path: Path, column: str | None = None, records: list[dict] | None = None):
    if records is None:
        records, _, _ = read_records(path)
    gn_key = column or "grad_norm"
    rows = []
    last = total = None
    for r in records:
        if "current_steps" not in r:
            continue
        last, total = r.get("current_steps"), r.get("total_steps")
        if r.get("loss") is None and r.get(gn_key) is None:
            continue  # eval, predict and progress lines
        rows.append(
            {
                "step": int(r["current_steps"]),
                "grad_norm": r.get(gn_key),
                "loss": r.get("loss"),
                "lr": r.get("lr", r.get("learning_rate")),
            }
        )
    if not rows:
        raise fail(f"no training entries in '{path}' (expected a LLaMA-Factory trainer_log.jsonl)")
    notes: list[str] = []
    if all(r.get("grad_norm") is None for r in rows):
        state = path.parent / "trainer_state.json"
        if column is None and state.is_file():
            from gradscope.importers import hf

            run = hf.load(state)
            run.meta["notes"].insert(
                0, f"'{path.name}' has no grad_norm (LLaMA-Factory's LogCallback does not copy it): "
                f"read '{state}' beside it instead"
            )
            return run
        raise fail(
            f"no {gn_key} in '{path}' (LLaMA-Factory's trainer_log.jsonl often lacks it); open the "
            "trainer_state.json of the same run (output dir or a checkpoint-N dir) instead"
        )

    clip_norm = None
    named = False
    dirs = [path.parent, path.parent.parent]
    found = find_args(dirs, LF_ARGS_FILES, keys=("max_grad_norm",))
    if found is not None:
        obj, f = found
        v = lookup(obj, ("max_grad_norm",))
        clip_norm, named = clip_from_value(v), True
        notes.append(f"clip threshold max_grad_norm={v} read from '{f}'")
    elif (path.parent / "training_args.bin").is_file():
        v = pickle_scalars(path.parent / "training_args.bin", ("max_grad_norm",)).get("max_grad_norm")
        if v is not None:
            clip_norm, named = clip_from_value(v), True
            notes.append(f"clip threshold max_grad_norm={v} read from training_args.bin (opcodes only, nothing unpickled)")
    notes.append(
        "Hugging Face drops NaN/inf losses from its logs (logging_nan_inf_filter=True): "
        "non-finite losses cannot be seen here"
    )
    k = spacing(sorted({r["step"] for r in rows}))
    s = sampled_note(k)
    if s:
        notes.append(s)
    status = "unknown"
    if isinstance(last, int) and isinstance(total, int) and total > 0:
        if last >= total:
            status = "completed"
        else:
            notes.append(f"the log ends at step {last} of {total} (still running or stopped)")
    return build_run(
        path, "llamafactory", rows, notes=notes, clip_norm=clip_norm, status=status,
        extra_meta={"global_step": last, "max_steps": total},
        default_clip_norm=None if named else trainer_default("LLaMA-Factory (Hugging Face TrainingArguments)",
                                                             "training_args.yaml or training_args.bin"),
    )
