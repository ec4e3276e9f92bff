"""Many inputs per call: the runs and trainer logs that a list of paths stands for.

A file is one input. A gradscope run directory is one input. Any other directory is
searched recursively for gradscope run directories and directories holding a trainer's
log by its name (trainer_state.json, logging.jsonl, trainer_log.jsonl, metrics.csv,
TensorBoard event files); a directory whose logs are all in `checkpoint-N/`
subdirectories is one input (open_run reads the latest checkpoint). Generic CSV/JSON
Lines files are not guessed at inside a tree: name them. A directory where the search
finds nothing is handed on as it is, so open_run reads its one log or says why not.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from gradscope.importers import _CKPT, _specific_in
from gradscope.importers._common import fail

# Never searched: version control, caches, virtual environments.
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


def _skipped(d: Path) -> bool:
    return d.name.startswith(".") or d.name in _SKIP_DIRS or (d / "pyvenv.cfg").is_file()


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink() and not _skipped(p))
    except OSError:
        return []


def _walk(d: Path) -> list[Path]:
    from gradscope.rundir import looks_like_run

    if looks_like_run(d) or _specific_in(d):
        return [d]
    subs = _subdirs(d)
    with_logs = [s for s in subs if _specific_in(s)]
    if with_logs and all(_CKPT.search(s.name) for s in with_logs):
        return [d]  # checkpoints of one run: the latest holds the others' history
    found: list[Path] = []
    for s in subs:
        found.extend(_walk(s))
    return found


def find_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run or log the paths stand for, in the order given (then sorted within a tree),
    each once. A missing path is a GradscopeError (exit code 2)."""
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise fail(f"'{p}' does not exist (expected a gradscope run directory or a training log)")
        found = [p] if p.is_file() else (_walk(p) or [p])
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out
