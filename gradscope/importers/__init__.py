"""Other trainers' logs -> the same in-memory Run that a gradscope run directory loads into.

`open_run(path)` accepts a gradscope run directory, a log file, or a directory holding one
recognisable log; `format=` forces a reader and `column=` names the grad-norm column.
Every problem with the input is a GradscopeError (exit code 2) naming the path.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from gradscope.errors import GradscopeError
from gradscope.importers._common import fail, read_records

# name -> one line for --help
FORMATS: dict[str, str] = {
    "gradscope": "a gradscope run directory (meta.json, steps-r*.csv)",
    "hf": "Hugging Face Trainer trainer_state.json (log_history; checkpoint-N/ or output dir)",
    "swift": "ms-swift logging.jsonl ('global_step/max_steps' entries; args.json beside it)",
    "llamafactory": "LLaMA-Factory trainer_log.jsonl (current_steps/total_steps; training_args.yaml beside it)",
    "lightning": "PyTorch Lightning CSVLogger metrics.csv (grad_2.0_norm_total, per-parameter grad_2.0_norm/*)",
    "tensorboard": "TensorBoard event files events.out.tfevents.* with a grad-norm scalar (needs tensorboard)",
    "csv": "any CSV/TSV table with a grad-norm column (--column to name it)",
    "jsonl": "JSON Lines, or a console log of printed Python dicts, with a grad-norm key (--column to name it)",
}

_SPECIFIC = {
    "logging.jsonl": "swift",
    "trainer_log.jsonl": "llamafactory",
    "trainer_state.json": "hf",
    "metrics.csv": "lightning",
}
# When one output directory holds several of them they are views of the same run: the
# trainer's own log first (it is appended live), the HF state next.
_PRIORITY = ("swift", "llamafactory", "hf", "lightning", "tensorboard")
_GENERIC_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".log": "jsonl", ".txt": "jsonl"}
_CKPT = re.compile(r"checkpoint-(\d+)$")


def _is_tfevents(p: Path) -> bool:
    return p.is_file() and p.name.startswith("events.out.tfevents")


def _specific_in(d: Path) -> list[tuple[str, Path]]:
    """Known trainer logs directly inside d, best first."""
    found = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return []
    for p in entries:
        if p.is_file() and p.name in _SPECIFIC:
            found.append((_SPECIFIC[p.name], p))
    if any(_is_tfevents(p) for p in entries):
        found.append(("tensorboard", d))
    found.sort(key=lambda fp: _PRIORITY.index(fp[0]))
    return found


def _resolve_dir(d: Path, fmt: str | None, notes: list[str]) -> tuple[str, Path]:
    """The one log a directory stands for (top level first, then one level down)."""
    def wanted(cands):
        return [c for c in cands if fmt is None or c[0] == fmt]

    top = wanted(_specific_in(d))
    if top:
        return top[0]
    if fmt in (None, "csv", "jsonl"):
        generic = sorted(
            (p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _GENERIC_SUFFIXES
             and (fmt is None or _GENERIC_SUFFIXES[p.suffix.lower()] == fmt)),
            key=lambda p: p.name,
        )
        if len(generic) == 1:
            return fmt or _GENERIC_SUFFIXES[generic[0].suffix.lower()], generic[0]
        if len(generic) > 1 and fmt is None:
            raise fail(
                f"'{d}' holds several possible logs ({', '.join(p.name for p in generic[:8])}); name the file"
            )
    subs = []
    for s in sorted(p for p in d.iterdir() if p.is_dir()):
        c = wanted(_specific_in(s))
        if c:
            subs.append(c[0])
    if len(subs) == 1:
        return subs[0]
    if subs and all(f == "hf" and _CKPT.search(p.parent.name) for f, p in subs):
        latest = max(subs, key=lambda fp: int(_CKPT.search(fp[1].parent.name).group(1)))
        notes.append(
            f"read the latest of {len(subs)} checkpoints, {latest[1].parent.name} (its log_history holds the earlier ones)"
        )
        return latest
    if subs:
        listed = ", ".join(str(p.relative_to(d)) for _, p in subs[:8])
        raise fail(f"'{d}' holds several logs ({listed}); name one of them")
    if not any(d.iterdir()):
        raise fail(f"'{d}' is an empty directory (expected a gradscope run or a trainer's log)")
    what = f"{fmt} log" if fmt else "gradscope run or trainer log (" + ", ".join(_SPECIFIC) + ", events.out.tfevents.*)"
    raise fail(f"found no {what} in '{d}'")


def _sniff_file(p: Path) -> tuple[str, object]:
    """Format of one file by name, then by content. Returns (format, parsed records or None)."""
    if _is_tfevents(p):
        return "tensorboard", None
    name = p.name
    if name == "trainer_state.json":
        return "hf", None
    try:
        with open(p, "rb") as f:
            head = f.read(65536)
    except OSError as e:
        raise fail(f"cannot read '{p}': {e.strerror or e}") from None
    if not head.strip():
        raise fail(f"'{p}' is empty (expected a training log)")
    if b"\x00" in head:
        raise fail(f"'{p}' is a binary file in no format gradscope reads (expected one of: {', '.join(FORMATS)})")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        first = head.split(b"\n", 1)[0].decode("utf-8", "replace")
        if name == "metrics.csv" or ("grad_2.0_norm" in first and "step" in first.split(",")):
            return "lightning", None
        return "csv", None
    if suffix == ".json" and head.lstrip().startswith(b"{") and b'"log_history"' in head:
        return "hf", None
    parsed = read_records(p)
    records = parsed[0]
    if records:
        from gradscope.importers import llamafactory, swift

        if swift.looks_like(records):
            return "swift", parsed
        if llamafactory.looks_like(records):
            return "llamafactory", parsed
        if len(records) == 1 and isinstance(records[0].get("log_history"), list):
            return "hf", None
        return "jsonl", parsed
    raise fail(
        f"'{p}' is in no log format gradscope knows (expected a trainer_state.json, logging.jsonl, "
        "trainer_log.jsonl, metrics.csv, TensorBoard events, or a CSV/JSON Lines file with a "
        "grad-norm column); force one with --format"
    )


def _load(fmt: str, p: Path, column: str | None, parsed=None):
    from gradscope.importers import generic, hf, lightning, llamafactory, swift, tensorboard

    if fmt == "hf":
        return hf.load(p, column)
    if fmt == "swift":
        return swift.load(p, column, records=parsed[0] if parsed else None)
    if fmt == "llamafactory":
        return llamafactory.load(p, column, records=parsed[0] if parsed else None)
    if fmt == "lightning":
        return lightning.load(p, column)
    if fmt == "tensorboard":
        return tensorboard.load(p, column)
    if fmt == "csv":
        return generic.load_csv(p, column)
    if fmt == "jsonl":
        return generic.load_jsonl(p, column, parsed)
    raise AssertionError(fmt)


def open_run(path: str | os.PathLike, format: str | None = None, column: str | None = None):
    """A gradscope run directory or another trainer's log as a Run (see FORMATS)."""
    from gradscope import rundir

    p = Path(path)
    if format is not None and format not in FORMATS:
        raise fail(f"unknown format '{format}' for '{p}' (choose from: {', '.join(FORMATS)})")
    if not p.exists():
        raise fail(f"'{p}' does not exist (expected a gradscope run directory or a training log)")
    if format == "gradscope" or (format is None and rundir.looks_like_run(p)):
        return rundir.load_run(p)

    notes: list[str] = []
    parsed = None
    if p.is_dir():
        fmt, target = _resolve_dir(p, format, notes)
    else:
        target = p
        if format is None:
            fmt, parsed = _sniff_file(p)
        else:
            fmt = format
            if fmt in ("swift", "llamafactory", "jsonl"):
                parsed = read_records(p)
    try:
        run = _load(fmt, target, column, parsed)
    except GradscopeError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError, OSError) as e:
        raise fail(f"cannot read '{target}' as {fmt} ({FORMATS[fmt]}): {type(e).__name__}: {e}") from e
    run.meta["notes"] = notes + run.meta.get("notes", [])
    return run


__all__ = ["FORMATS", "open_run"]
