"""Presentation: rich reports, plots, CI output, JSON."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def make_parent(path: str | os.PathLike, what: str) -> None:
    """Create a missing output directory, and say so on stderr (never silently)."""
    parent = Path(path).parent
    if str(parent) in ("", ".") or parent.is_dir():
        return
    parent.mkdir(parents=True, exist_ok=True)
    print(f"gradscope: created directory '{parent}' for the {what}", file=sys.stderr)
