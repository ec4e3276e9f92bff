"""TensorBoard event files (events.out.tfevents.*) with a grad-norm scalar -> Run.

Read with tensorboard's EventAccumulator (an optional extra). Tags seen in the wild:
`train/grad_norm` (HF TensorBoardCallback, which also writes the TrainingArguments JSON as
the text summary `args`), `grad_2.0_norm_total` (Lightning TensorBoardLogger), `grad_norm`.
Several event files in one directory (restarts) are merged; the last value per step wins.
"""
from __future__ import annotations

import json
from pathlib import Path

from gradscope.importers._common import (
    CLIP_KEYS,
    LOSS_NAMES,
    LR_NAMES,
    build_run,
    clip_from_value,
    fail,
    find_args,
    find_grad_norm_column,
    HF_ARGS_FILES,
    lookup,
    norm_name,
    pick_column,
    sampled_note,
    spacing,
)


def _accumulator(path: Path):
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        raise fail(
            f"reading TensorBoard event files ('{path}') needs the tensorboard package: "
            "pip install 'gradscope[tensorboard]'"
        ) from None
    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    try:
        acc.Reload()
    except Exception as e:  # noqa: BLE001 - corrupt records surface as assorted errors
        raise fail(f"cannot read TensorBoard events in '{path}': {e}") from None
    return acc


def _series(acc, tag: str) -> dict[int, float]:
    out: dict[int, tuple[float, float]] = {}
    for ev in acc.Scalars(tag):
        old = out.get(ev.step)
        if old is None or ev.wall_time >= old[0]:
            out[ev.step] = (ev.wall_time, ev.value)
    return {s: v for s, (_, v) in out.items()}


def _hf_args(acc) -> dict | None:
    """TrainingArguments JSON that HF's TensorBoardCallback writes as the text summary 'args'."""
    try:
        tags = acc.Tags().get("tensors", [])
        tag = next((t for t in tags if t in ("args/text_summary", "args")), None)
        if tag is None:
            return None
        ev = acc.Tensors(tag)[-1]
        raw = ev.tensor_proto.string_val[0].decode("utf-8", "replace")
        obj = json.loads(raw)
        return obj if isinstance(obj, dict) else None
    except Exception:  # noqa: BLE001 - optional metadata
        return None


def load(path: Path, column: str | None = None):
    acc = _accumulator(path)
    tags = list(acc.Tags().get("scalars", []))
    if not tags:
        raise fail(f"no scalar summaries in TensorBoard events at '{path}'")
    gtag = find_grad_norm_column(tags, column, str(path))
    grad = _series(acc, gtag)
    if not grad:
        raise fail(f"no gradient norms in '{path}' (tag '{gtag}' is empty)")
    ltag = pick_column(tags, LOSS_NAMES)
    rtag = pick_column(tags, LR_NAMES) or next((t for t in tags if norm_name(t).startswith("lr-")), None)
    loss = _series(acc, ltag) if ltag else {}
    lr = _series(acc, rtag) if rtag else {}
    rows = [{"step": s, "grad_norm": g, "loss": loss.get(s), "lr": lr.get(s)} for s, g in sorted(grad.items())]

    notes: list[str] = [f"grad norm read from the scalar tag '{gtag}'"]
    clip_norm = None
    args = _hf_args(acc)
    if args is not None and "max_grad_norm" in args:
        clip_norm = clip_from_value(args["max_grad_norm"])
        notes.append(f"clip threshold max_grad_norm={args['max_grad_norm']} read from the 'args' text summary")
        if args.get("logging_nan_inf_filter", True):
            notes.append(
                "Hugging Face drops NaN/inf losses from its logs (logging_nan_inf_filter=True): "
                "non-finite losses cannot be seen here"
            )
    else:
        d = path if path.is_dir() else path.parent
        found = find_args([d, d.parent, d.parent.parent], HF_ARGS_FILES)
        if found is not None:
            obj, f = found
            v = lookup(obj, CLIP_KEYS)
            clip_norm = clip_from_value(v)
            notes.append(f"clip threshold {v} read from '{f}'")
    k = spacing([r["step"] for r in rows])
    s = sampled_note(k)
    if s:
        notes.append(s)
    return build_run(path, "tensorboard", rows, notes=notes, clip_norm=clip_norm, dedupe=False)
