"""Plain aligned tables: nothing is cut or folded, in a terminal and in a CI log alike."""
from __future__ import annotations

from typing import Sequence


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Lines of a table: columns in `left` left-aligned, the others right-aligned (numbers)."""
    width = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(values) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, width))).rstrip()

    return [line(header), *(line(r) for r in rows)]
