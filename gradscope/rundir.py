"""The run directory: the one contract between capture and analysis.

Layout (format version 1), every file appendable or replaced atomically, so a
run killed at any moment still loads:

    RUN/
      meta.json              run-level facts, written by `gradscope run` or `record()`:
                             command, cwd, versions, start/end, status, exit_code
      process-r{R}.json      one per recording process (rank R): pid, device,
                             optimizers, clip calls seen, layer names, flush settings;
                             with --trace-nan also "nan_trace": {enabled, steps_traced,
                             origin: null or {step, optimizer, phase ("input"|"forward"|
                             "loss"|"backward"), module (str|null), detail, what, why}}
                             "clip_audit": {"findings": [{kind, optimizer, first_step,
                             count, ...details}], "error": str|null}, the clip audit's
                             record (capture/audit.py; read by analysis/audit.py)
      steps-r{R}.csv         one row per optimizer step of rank R (STEP_COLUMNS)
      layers-r{R}-o{O}.csv   per-parameter gradient norms of optimizer O on rank R:
                             `step` then one column per parameter name
      metrics-r{R}.csv       values the script reported on rank R (METRIC_COLUMNS:
                             step,name,value; `step` is optimizer 0's step the value was
                             reported after, -1 before its first): gradscope.log_metric,
                             HF Trainer eval_* keys, Lightning self.log names,
                             --metric-regex matches (capture/metrics.py). Optional: runs
                             without it (and older ones) load with an empty metrics table.
                             meta.json "metric_name"/"metric_regex": `run --metric-name`.

CSV files are written in whole lines, one block per flush; a reader drops a
trailing partial line (a process killed mid-write) instead of misreading it.
Writing needs only the standard library (it runs inside the training process);
reading uses pandas, imported lazily.
"""
from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from gradscope import validate
from gradscope.errors import GradscopeError

FORMAT_NAME = "gradscope-run"
FORMAT_VERSION = 1

META_FILE = "meta.json"

# Columns of steps-r{R}.csv, in file order. The names are a contract.
STEP_COLUMNS = [
    "optimizer",      # stable id per optimizer, creation order 0, 1, ...
    "step",           # 0-based count of that optimizer's steps
    "grad_norm",      # pre-clip global L2 norm of the gradients the step applies
    "loss",           # sum of the values passed to backward() since the previous step
    "clip_max_norm",  # max_norm the script passed to its clip call (nan: no clip)
    "clipped",        # grad_norm > clip_max_norm (0/1)
    "clip_value",     # clip_value of clip_grad_value_ (nan: none)
    "skipped",        # a GradScaler skipped this update (inf/nan gradients) (0/1)
    "loss_scale",     # GradScaler scale in effect (nan: no scaler)
    "lr",             # learning rate of the first parameter group
    "time",           # wall-clock time of the step (unix seconds)
]
# Columns of metrics-r{R}.csv (load_run's Run.metrics adds "rank" first).
METRIC_COLUMNS = ["step", "name", "value"]
# Columns that load_run adds: the rank the row came from.
TABLE_COLUMNS = ["rank", *STEP_COLUMNS]
BOOL_COLUMNS = ("clipped", "skipped")
# Parse types for steps-r{R}.csv: no inference, and 0/1 flags read straight as bool.
_STEP_DTYPES = {"optimizer": "int64", "step": "int64", "clipped": "bool", "skipped": "bool"}
INT_COLUMNS = ("rank", "optimizer", "step")

# Status values written to meta.json "status".
# "stopped": `gradscope run --max-steps` ended the training after that many steps (exit 0).
STATUSES = ("running", "completed", "stopped", "failed", "interrupted", "killed")


def steps_file(rank: int) -> str:
    return f"steps-r{rank}.csv"


def layers_file(rank: int, optimizer: int) -> str:
    return f"layers-r{rank}-o{optimizer}.csv"


def process_file(rank: int) -> str:
    return f"process-r{rank}.json"


def metrics_file(rank: int) -> str:
    return f"metrics-r{rank}.csv"


def is_run_file(name: str) -> bool:
    """True for every file name this format writes (what --force may remove)."""
    if name == META_FILE:
        return True
    stem, dot, ext = name.rpartition(".")
    return (ext == "csv" and stem.startswith(("steps-r", "layers-r", "metrics-r"))) or (
        ext == "json" and stem.startswith("process-r")
    ) or name.endswith(".tmp")


# ---------------------------------------------------------------- writing (stdlib only)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Replace a JSON file in one step: a reader sees the old or the new file, never half."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def fmt_float32(x: float) -> str:
    """Nine significant digits round-trip any float32 exactly."""
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "%.9g" % x


def fmt_float64(x: float) -> str:
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def csv_lines(rows: Iterable[Iterable[str]]) -> str:
    return "".join(",".join(r) + "\n" for r in rows)


def prepare_run_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Create the run directory; refuse to overwrite a non-empty one unless forced.

    With force, only files this format writes are removed: pointing --out at a
    directory holding anything else never deletes the user's files.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GradscopeError(f"run directory '{p}' is a file; choose another --out")
    if p.is_dir() and any(p.iterdir()):
        if not force:
            raise GradscopeError(
                f"run directory '{p}' already exists and is not empty; choose another --out or pass --force"
            )
        for f in p.iterdir():
            if f.is_file() and is_run_file(f.name):
                f.unlink()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradscopeError(f"cannot create run directory '{p}': {e.strerror}") from None
    probe = p / f".gradscope-write-test.{os.getpid()}.tmp"
    try:  # before the script starts: a run that cannot be saved should not train for hours first
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GradscopeError(f"cannot write in run directory '{p}': {e.strerror}; choose another --out") from None
    return p


def new_meta(command: list[str], target: str, torch_version: str | None = None) -> dict:
    """meta.json as written when a recording starts (status 'running')."""
    import platform
    import sys
    import time

    from gradscope import __version__

    if torch_version is None:
        try:
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:
            torch_version = None
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "gradscope_version": __version__,
        "target": target,
        "command": list(command),
        "cwd": os.getcwd(),
        "host": host_name(),
        "launcher_pid": os.getpid(),
        "python": platform.python_version(),
        "torch": torch_version,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ended": None,
        "status": "running",
        "exit_code": None,
        "signal": None,
    }


def finish_meta(meta: dict, status: str, exit_code: int | None, signal_name: str | None = None) -> dict:
    import time

    meta = dict(meta)
    meta.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), status=status, exit_code=exit_code, signal=signal_name)
    return meta


def read_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def host_name() -> str:
    try:
        return socket.gethostname()
    except OSError:  # pragma: no cover - exotic sandboxes
        return ""


# ---------------------------------------------------------------- reading (pandas)


@dataclass
class Run:
    """A run in memory: what every analysis reads, whatever wrote it.

    steps:  one row per optimizer step (TABLE_COLUMNS; foreign logs leave unknown
            columns as NaN/False).
    layers: per-parameter gradient norms, wide: rank, optimizer, step, then one
            column per parameter name (empty when none were recorded).
    meta:   meta.json plus "processes" (one dict per recording process); always has
            "status" and "exit_code".
    source: "gradscope" or the importer's format name.
    """

    path: Path
    steps: Any
    layers: Any
    meta: dict = field(default_factory=dict)
    source: str = "gradscope"
    metrics: Any = None  # rank, step, name, value (metrics-r{R}.csv); see empty_metrics

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = empty_metrics()

    def rank(self, rank: int) -> "Run":
        """The same run restricted to one rank."""
        steps = self.steps[self.steps["rank"] == rank].reset_index(drop=True)
        layers = self.layers
        if len(layers):
            layers = layers[layers["rank"] == rank].reset_index(drop=True)
        metrics = self.metrics[self.metrics["rank"] == rank].reset_index(drop=True)
        return Run(self.path, steps, layers, self.meta, self.source, metrics)


def _read_csv(path: Path, dtype: dict | None = None):
    """Parse a CSV this format wrote; a partial last line (a killed writer) is dropped."""
    import io

    import pandas as pd

    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return pd.DataFrame()
        f.seek(size - 1)
        whole = f.read(1) == b"\n"
    if whole:  # the usual case: let pandas read the file itself, no copy
        return pd.read_csv(path, dtype=dtype)
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    return pd.read_csv(io.BytesIO(data), dtype=dtype) if data.strip() else pd.DataFrame()


def _rank_of(name: str) -> int:
    # steps-r12.csv / layers-r12-o3.csv / process-r12.json
    return int(name.split("-r", 1)[1].split("-", 1)[0].split(".", 1)[0])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def empty_steps():
    """An empty steps table with the contract's columns and dtypes."""
    import pandas as pd

    df = pd.DataFrame({c: pd.Series(dtype="float64") for c in TABLE_COLUMNS})
    return normalize_steps(df)


def normalize_steps(df):
    """Give a steps table every contract column with its dtype (missing ones as NaN/False).

    Columns that already have the right dtype are left alone: on a million-step run
    this is most of the difference between loading and just parsing the file.
    """
    import numpy as np
    import pandas as pd

    missing = [c for c in TABLE_COLUMNS if c not in df.columns]
    if missing:
        df = df.copy()
        for c in missing:
            df[c] = False if c in BOOL_COLUMNS else (0 if c in ("rank", "optimizer") else np.nan)
    for c in TABLE_COLUMNS:
        if c in INT_COLUMNS:
            if df[c].dtype != np.int64:
                df[c] = pd.to_numeric(df[c], errors="coerce").fillna(-1).astype("int64")
        elif c in BOOL_COLUMNS:
            if df[c].dtype != np.bool_:
                df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0).astype(bool)
        elif df[c].dtype != np.float64:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    if list(df.columns[: len(TABLE_COLUMNS)]) != TABLE_COLUMNS:
        extra = [c for c in df.columns if c not in TABLE_COLUMNS]
        df = df[TABLE_COLUMNS + extra]
    return df


def empty_metrics():
    import pandas as pd

    return pd.DataFrame({"rank": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"),
                         "name": pd.Series(dtype="object"), "value": pd.Series(dtype="float64")})


def _load_metrics(p: Path, rank: int | None):
    """Every metrics-r{R}.csv, in report order per rank (empty when there is none)."""
    import pandas as pd

    frames = []
    for f in sorted(p.glob("metrics-r*.csv"), key=lambda f: _rank_of(f.name)):
        r = _rank_of(f.name)
        if rank is not None and r != rank:
            continue
        try:
            df = _read_csv(f, dtype={"step": "int64", "name": "str", "value": "float64"})
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise GradscopeError(f"cannot read '{f}': {e}") from None
        if df.empty:
            continue
        if list(df.columns) != METRIC_COLUMNS:
            raise GradscopeError(f"'{f}' has columns {','.join(map(str, df.columns))}, not "
                                 f"{','.join(METRIC_COLUMNS)} (is it a gradscope metrics file?)")
        df.insert(0, "rank", r)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else empty_metrics()


def looks_like_run(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (
        (p / META_FILE).is_file() or any(p.glob("steps-r*.csv")) or any(p.glob("process-r*.json"))
    )


def load_run(path: str | os.PathLike, rank: int | None = None) -> Run:
    """Read a gradscope run directory (every rank merged, or one rank)."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise GradscopeError(f"run directory '{p}' does not exist")
    if not p.is_dir():
        raise GradscopeError(f"'{p}' is a file, not a gradscope run directory")
    if not looks_like_run(p):
        raise GradscopeError(
            f"'{p}' has no meta.json or steps file (is it a gradscope run? record one with `gradscope run`)"
        )

    meta: dict = {}
    if (p / META_FILE).is_file():
        try:
            meta = read_json(p / META_FILE)
        except (OSError, ValueError) as e:
            raise GradscopeError(f"cannot read '{p / META_FILE}': {e}") from None
        version = meta.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise GradscopeError(
                f"run '{p}' uses run-format version {version}; this gradscope reads up to "
                f"{FORMAT_VERSION} (upgrade gradscope)"
            )

    processes = []
    for f in sorted(p.glob("process-r*.json"), key=lambda f: _rank_of(f.name)):
        try:
            processes.append(read_json(f))
        except (OSError, ValueError):
            continue  # a process file is replaced atomically; unreadable means foreign junk
    meta["processes"] = processes
    if "optimizers" not in meta:
        meta["optimizers"] = processes[0].get("optimizers", []) if processes else []
    meta.setdefault("status", "unknown")
    meta.setdefault("exit_code", None)
    if meta["status"] == "running" and meta.get("host") == host_name():
        pid = meta.get("launcher_pid")
        if isinstance(pid, int) and not _pid_alive(pid):
            # The recording process ended without writing its status (SIGKILL, power loss).
            meta["status"] = "killed"
            meta["status_inferred"] = True

    frames = []
    for f in sorted(p.glob("steps-r*.csv"), key=lambda f: _rank_of(f.name)):
        r = _rank_of(f.name)
        if rank is not None and r != rank:
            continue
        try:
            df = _read_csv(f, dtype=_STEP_DTYPES)
        except OSError as e:
            raise GradscopeError(f"cannot read '{f}': {e.strerror or e}") from None
        except (ValueError, pd.errors.ParserError) as e:
            raise validate.steps_parse_error(f, e) from None
        if df.empty:
            continue
        # Damage and impossible values are refused here, before any analysis sees them.
        validate.check_steps_file(f, df)
        for proc in processes:
            if proc.get("rank", 0) == r:
                validate.check_process_counts(f, proc, df)
        df.insert(0, "rank", r)
        frames.append(df)
    if not frames:
        steps = empty_steps()
    else:
        steps = normalize_steps(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True))

    layer_frames = []
    for f in sorted(p.glob("layers-r*-o*.csv")):
        r = _rank_of(f.name)
        if rank is not None and r != rank:
            continue
        o = int(f.stem.rsplit("-o", 1)[1])
        try:
            df = _read_csv(f)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            found = validate.scan_layers_csv(f) if not isinstance(e, OSError) else None
            raise (validate.damaged(f, *found) if found else GradscopeError(f"cannot read '{f}': {e}")) from None
        if df.empty:
            continue
        validate.check_layers_file(f, df)
        df.insert(0, "optimizer", o)
        df.insert(0, "rank", r)
        layer_frames.append(df)
    if layer_frames:
        layers = pd.concat(layer_frames, ignore_index=True)
    else:
        layers = pd.DataFrame({"rank": [], "optimizer": [], "step": []}, dtype="int64")

    return Run(path=p, steps=steps, layers=layers, meta=meta, source="gradscope", metrics=_load_metrics(p, rank))
