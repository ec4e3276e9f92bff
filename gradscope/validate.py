"""Damaged files and impossible values: found before any analysis, reported as one line naming the file and line.

A gradscope steps file is written in whole lines by one process, so every data line
has the header's fields, its numbers parse, a gradient norm is never negative, and each
optimizer's steps run 0, 1, 2, ... in file order. Anything else is damage (a file cut in
the middle, two writes run together, an edit) or not a gradscope file: judging it would
report made-up findings ("something skipped the update" for a norm that was text), so
it is refused with exit 2 instead.

The common case is cheap: cheap vectorised checks on the parsed table decide whether a
file needs a closer look, and only then is it scanned line by line to name the line.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

from gradscope.errors import GradscopeError

INT_FIELDS = ("optimizer", "step")
FLAG_FIELDS = ("clipped", "skipped")
NONNEGATIVE_FIELDS = ("grad_norm",)  # a norm; loss and lr may be anything
_FLAGS = {"0", "1", "true", "false", "True", "False"}


def damaged(path: str | Path, line: int | None, what: str) -> GradscopeError:
    where = f"'{path}' line {line}" if line is not None else f"'{path}'"
    return GradscopeError(f"{where}: {what}", exit_code=2)


def _whole_lines(path: Path) -> list[str]:
    """The file's complete lines (a partial last line, a killed writer's, is left out, as the reader does)."""
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    return data.decode("utf-8", "replace").split("\n")[:-1]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def scan_steps_csv(path: str | Path) -> tuple[int, str] | None:
    """(line number, what is wrong) for the first damaged line of a steps file, or None."""
    path = Path(path)
    lines = _whole_lines(path)
    if not lines:
        return None
    header = [h.strip() for h in lines[0].rstrip("\r").split(",")]
    col = {name: i for i, name in enumerate(header)}
    numeric = [(i, h) for i, h in enumerate(header) if h not in FLAG_FIELDS]
    expected: dict[str, int] = {}
    for n, raw in enumerate(lines[1:], start=2):
        text = raw.rstrip("\r")
        if not text.strip():
            continue  # the reader skips blank lines too
        fields = text.split(",")
        if len(fields) != len(header):
            return n, (f"{len(fields)} fields where the header has {len(header)}: the line is cut or "
                       "two writes ran together (the file is damaged)")
        for i, name in numeric:
            v = fields[i].strip()
            x = _number(v)
            if x is None:
                return n, f"{name} is {v!r}, not a number"
            if name in INT_FIELDS and (not math.isfinite(x) or x != int(x) or x < 0):
                return n, f"{name} is {v!r}, not a step count (0, 1, 2, ...)"
            if name in NONNEGATIVE_FIELDS and x < 0:
                return n, f"{name} is {v}: a norm cannot be negative"
        for name in FLAG_FIELDS:
            if name in col and fields[col[name]].strip() not in _FLAGS:
                return n, f"{name} is {fields[col[name]].strip()!r}, not 0 or 1"
        if "step" in col:
            opt = fields[col["optimizer"]].strip() if "optimizer" in col else "0"
            step = int(float(fields[col["step"]]))
            want = expected.get(opt, 0)
            if step != want:
                return n, _sequence_problem(opt, want, step)
            expected[opt] = step + 1
    return None


def _sequence_problem(opt: str, want: int, got: int) -> str:
    if want == 0:
        return (f"optimizer {opt}'s first step is {got}, not 0: the start of the steps file is missing "
                "(the file is damaged)")
    if got > want:
        return (f"optimizer {opt} jumps from step {want - 1} to {got}: {got - want} steps are missing "
                "(the file was cut in the middle)")
    return f"optimizer {opt}'s step {got} comes again after step {want - 1} (the file holds a repeated or edited block)"


def steps_look_damaged(df) -> bool:
    """Cheap checks on a parsed steps table: does the file need a line-by-line look?"""
    import numpy as np
    from pandas.api.types import is_numeric_dtype

    for name in df.columns:
        if name in FLAG_FIELDS or name in INT_FIELDS:
            continue
        if not is_numeric_dtype(df[name]):  # text where a number belongs
            return True
    if "grad_norm" in df and (df["grad_norm"].to_numpy(dtype=float) < 0).any():
        return True
    if "time" in df and np.isnan(df["time"].to_numpy(dtype=float)).any():
        return True  # every row the recorder writes has a time: NaN means trailing fields are missing
    if "step" in df:
        steps = df["step"].to_numpy()
        opts = df["optimizer"].to_numpy() if "optimizer" in df else np.zeros(len(steps), dtype=np.int64)
        for o in np.unique(opts):
            s = steps[opts == o]
            if s[0] != 0 or (len(s) > 1 and not (np.diff(s) == 1).all()):
                return True
    return False


def check_steps_file(path: str | Path, df) -> None:
    """Raise if the parsed steps file is damaged (exact line from a scan)."""
    if steps_look_damaged(df):
        found = scan_steps_csv(path)
        if found is not None:
            raise damaged(path, *found)


def steps_parse_error(path: str | Path, error: Exception) -> GradscopeError:
    """The reader could not parse the file: name the line when a scan finds it."""
    try:
        found = scan_steps_csv(path)
    except OSError:
        found = None
    if found is not None:
        return damaged(path, *found)
    return GradscopeError(f"cannot read '{path}': {error}", exit_code=2)


def scan_layers_csv(path: str | Path) -> tuple[int, str] | None:
    """(line, what) for the first damaged line of a layers file (step, then one norm per parameter)."""
    path = Path(path)
    lines = _whole_lines(path)
    if not lines:
        return None
    header = lines[0].rstrip("\r").split(",")
    for n, raw in enumerate(lines[1:], start=2):
        text = raw.rstrip("\r")
        if not text.strip():
            continue
        fields = text.split(",")
        if len(fields) != len(header):
            return n, (f"{len(fields)} fields where the header has {len(header)}: the line is cut or "
                       "two writes ran together (the file is damaged)")
        for name, v in zip(header, fields):
            x = _number(v.strip())
            if x is None:
                return n, f"{name} is {v.strip()!r}, not a number"
            if x < 0:
                return n, f"{name} is {v.strip()}: a norm cannot be negative"
    return None


def check_layers_file(path: str | Path, df) -> None:
    from pandas.api.types import is_numeric_dtype

    bad = not all(is_numeric_dtype(df[c]) for c in df.columns)
    if not bad:
        values = df.to_numpy(dtype=float)
        bad = bool((values < 0).any())
    if bad:
        found = scan_layers_csv(path)
        if found is not None:
            raise damaged(path, *found)


def check_process_counts(steps_path: str | Path, process: dict, df) -> None:
    """A process that ended normally wrote every row: fewer rows than it counted means the file was cut."""
    if not isinstance(process, dict) or not process.get("ended") or process.get("status") == "running":
        return
    if process.get("recording_error"):  # it stopped writing on purpose (a full disk): incomplete, not cut
        return
    for o in process.get("optimizers") or []:
        if not isinstance(o, dict) or not isinstance(o.get("steps"), int) or not isinstance(o.get("id"), int):
            continue
        rows = int((df["optimizer"] == o["id"]).sum()) if len(df) and "optimizer" in df else 0
        if rows < o["steps"]:
            raise damaged(
                steps_path, None,
                f"holds {rows} steps of optimizer {o['id']}, but its process file says the process, which "
                f"ended ({process.get('status')}), recorded {o['steps']}: the steps file was cut",
            )


# ---------------------------------------------------------------- other trainers' logs


def _raw_text(v: Any) -> str:
    return v.strip() if isinstance(v, str) else repr(v)


def impossible_grad_norm(v: Any) -> str | None:
    """Why a logged grad_norm value cannot be a gradient norm (text, a negative number), or None."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None
        x = _number(s)
        if x is None:
            return f"grad_norm is {s!r}, not a number"
        v = x
    if isinstance(v, (int, float)):
        if v < 0:
            return f"grad_norm is {_raw_text(v) if not isinstance(v, float) else repr(v)}: a norm cannot be negative"
        return None
    return f"grad_norm is {v!r}, not a number"


def find_line(path: str | Path, value: Any, *near: Any) -> int | None:
    """The first line of a text log holding `value` as a token together with one of `near`
    (the step number, the column's name), or None when no line shows them together."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except (OSError, ValueError):
        return None
    token = value.strip() if isinstance(value, str) else repr(value)
    pat = re.compile(r"(?<![\w.+\-])" + re.escape(token) + r"(?![\w.])")
    near_pats = [re.compile(r"(?<![\w.])" + re.escape(str(x)) + r"(?![\w.])") for x in near if x is not None]
    for n, line in enumerate(lines, start=1):
        if pat.search(line) and any(p.search(line) for p in near_pats):
            return n
    return None


def check_logged_norms(path: str | Path, rows: Iterable[dict], column: str = "grad_norm") -> None:
    """Refuse a foreign log whose grad_norm values are text or negative, naming the line when it can be found."""
    for r in rows:
        why = impossible_grad_norm(r.get("grad_norm"))
        if why is None:
            continue
        if column != "grad_norm":
            why = why.replace("grad_norm", column, 1)
        line = find_line(path, r.get("grad_norm"), column, r.get("step")) if Path(path).is_file() else None
        step = r.get("step")
        at = f" (step {step})" if step is not None else ""
        raise damaged(path, line, f"{why}{at}; not a gradient norm, so this log cannot be judged")


# ---------------------------------------------------------------- a run without steps


def why_no_steps(run) -> str:
    """What a run with no steps holds instead, in a few words (for 'nothing to check')."""
    p = Path(run.path)
    meta = run.meta or {}
    status = meta.get("status")
    said = f" (status {status})" if status and status != "unknown" else ""
    if run.source != "gradscope" or not p.is_dir():
        return f"'{p}' holds no optimizer steps{said}"
    counted = sum(
        o.get("steps", 0) for proc in meta.get("processes", []) or [] if isinstance(proc, dict)
        for o in proc.get("optimizers", []) or [] if isinstance(o, dict) and isinstance(o.get("steps"), int)
    )
    files = sorted(p.glob("steps-r*.csv"))
    if counted and not files:
        return f"run '{p}' has no steps file, but its process files count {counted} steps: the steps file was deleted{said}"
    if files:
        return f"run '{p}' holds no optimizer steps: {', '.join(f.name for f in files)} holds only its header{said}"
    return f"run '{p}' holds no optimizer steps: the script never completed one while recorded{said}"
