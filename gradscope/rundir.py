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
                             "run_id" (meta.json's), "closed", "recording_error" and per
                             optimizer "layer_rows": how complete it is (recording_gaps)
      steps-r{R}.csv         one row per optimizer step of rank R (STEP_COLUMNS)
      layers-r{R}-o{O}.csv   per-parameter gradient norms of optimizer O on rank R:
                             `step` then one column per parameter name

meta.json also holds "run_id" (the process files of that run carry it): `--force`
removes exactly the files that run's records name (previous_run_files).

CSV files are written in whole lines, one block per flush; a reader drops a
trailing partial line (a process killed mid-write) instead of misreading it.
Writing needs only the standard library (it runs inside the training process);
reading uses pandas, imported lazily.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import uuid
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


# ---------------------------------------------------------------- writing (stdlib only)


def write_json_atomic(path: str | os.PathLike, obj: Any, in_place_fallback: bool = False) -> None:
    """Replace a JSON file in one step: a reader sees the old or the new file, never half.

    A failed write leaves no temporary file behind. in_place_fallback: when the replace
    cannot be written (a full disk), overwrite the file in place instead: not atomic, but
    the old file's blocks are reused, so a status can still be recorded on a full disk.
    """
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    text = json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=True) + "\n"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not in_place_fallback:
            raise
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


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


_OWN_NAME = re.compile(r"^(meta\.json|steps-r\d+\.csv|layers-r\d+-o\d+\.csv|process-r\d+\.json)$")


def prepare_run_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Create and claim the run directory; refuse a non-empty one unless forced.

    The claim is atomic: meta.json is created with O_EXCL (under an flock of the
    directory), so of two `gradscope run`s into one --out exactly one wins and the
    other fails (exit 2) before starting anything. With force, only the files the
    previous run's own records name are removed (previous_run_files).
    """
    import fcntl

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GradscopeError(f"run directory '{p}' is a file; choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradscopeError(f"cannot create run directory '{p}': {e.strerror}") from None
    try:
        dfd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise GradscopeError(f"cannot open run directory '{p}': {e.strerror}; choose another --out") from None
    try:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)  # one claim at a time on this host; O_EXCL decides anywhere
        except OSError:
            pass  # no locks on this filesystem (some NFS): the O_EXCL claim below still decides
        if any(p.iterdir()):
            _refuse_if_in_use(p)
            if not force:
                raise GradscopeError(
                    f"run directory '{p}' already exists and is not empty; choose another --out or pass --force"
                )
            for name in previous_run_files(p):
                try:
                    (p / name).unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise GradscopeError(f"--force: cannot remove '{p / name}': {e.strerror}") from None
        probe = p / f".gradscope-write-test.{os.getpid()}.tmp"
        try:  # before the script starts: a run that cannot be saved should not train for hours first
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise GradscopeError(f"cannot write in run directory '{p}': {e.strerror}; choose another --out") from None
        try:
            fd = os.open(p / META_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise GradscopeError(f"run directory '{p}' was just claimed by another gradscope run; choose another --out") from None
        claim = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "status": "running",
                 "host": host_name(), "launcher_pid": os.getpid()}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(claim) + "\n")
    finally:
        os.close(dfd)
    return p


def _refuse_if_in_use(p: Path) -> None:
    try:
        meta = read_json(p / META_FILE)
    except (OSError, ValueError):
        return
    if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME and meta.get("status") == "running":
        pid = meta.get("launcher_pid")
        if meta.get("host") == host_name() and isinstance(pid, int) and _pid_alive(pid):
            raise GradscopeError(f"run directory '{p}' is in use: a gradscope run (pid {pid}) is recording "
                                 "into it; choose another --out")


def previous_run_files(p: Path) -> list[str]:
    """The files of the gradscope run recorded in p, by its own records (what --force removes).

    meta.json must be a gradscope run's; each process-r{R}.json of that run (same run_id,
    or any gradscope process file for runs recorded before run_id existed) names its
    steps and layers files; temporary files are those of the run's own pids. Any other
    file named like one of gradscope's that no record claims makes this refuse (exit 2):
    it may be the user's, or a run that cannot be told apart, and must not be mixed in.
    """
    names: set[str] = set()
    pids: set[int] = set()
    meta: Any = None
    if (p / META_FILE).exists():
        try:
            meta = read_json(p / META_FILE)
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise GradscopeError(f"--force: '{p / META_FILE}' is not a gradscope run's meta.json; --force removes "
                                 "only a gradscope run's files (move it away, or choose another --out)")
        names.add(META_FILE)
        if isinstance(meta.get("launcher_pid"), int):
            pids.add(meta["launcher_pid"])
    run_id = meta.get("run_id") if isinstance(meta, dict) else None
    for f in p.glob("process-r*.json"):
        if not _OWN_NAME.match(f.name):
            continue
        try:
            proc = read_json(f)
        except (OSError, ValueError):
            continue
        if not isinstance(proc, dict) or proc.get("format") != FORMAT_NAME or proc.get("rank") != _rank_of(f.name):
            continue
        if run_id is not None and proc.get("run_id") != run_id:
            continue
        names.update((f.name, steps_file(proc["rank"])))
        for o in proc.get("optimizers") or []:
            lf = o.get("layers_file") if isinstance(o, dict) else None
            if isinstance(lf, str) and _OWN_NAME.match(lf) and lf.startswith(f"layers-r{proc['rank']}-"):
                names.add(lf)
        if isinstance(proc.get("pid"), int):
            pids.add(proc["pid"])
    unclaimed = sorted(f.name for f in p.iterdir() if _OWN_NAME.match(f.name) and f.name not in names)
    if unclaimed:
        raise GradscopeError(f"--force: {', '.join(unclaimed)} in '{p}' belong to no record of the run recorded "
                             "there; --force removes only that run's files (move them away, or choose another --out)")
    tmps = {f"{n}.{pid}.tmp" for n in names | {META_FILE} for pid in pids}
    return sorted(n for n in names | tmps if (p / n).is_file())


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
        "run_id": uuid.uuid4().hex,
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

    def rank(self, rank: int) -> "Run":
        """The same run restricted to one rank."""
        steps = self.steps[self.steps["rank"] == rank].reset_index(drop=True)
        layers = self.layers
        if len(layers):
            layers = layers[layers["rank"] == rank].reset_index(drop=True)
        return Run(self.path, steps, layers, self.meta, self.source)


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


def _own(p: Path, pattern: str) -> list[Path]:
    """Files of p named exactly as this format names them (not a user's steps-rX.csv or process-results.json)."""
    return [f for f in p.glob(pattern) if _OWN_NAME.match(f.name)]


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
    try:  # a zombie is dead (its parent gone and not reaping: PID 1 in a container may never reap it)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


def run_status(meta: dict, processes: list[dict]) -> tuple[str, bool]:
    """(status, inferred) of a run. meta.json's status, unless it still says 'running' while the
    supervisor that would finish it is gone (same host): then the training processes' own
    records decide: one still alive -> 'running'; all closed -> their status; else 'killed'."""
    status = meta.get("status", "unknown")
    pid = meta.get("launcher_pid")
    if status != "running" or meta.get("host") != host_name() or not isinstance(pid, int) or _pid_alive(pid):
        return status, False
    if any(_process_alive(pr) for pr in processes):
        return "running", True
    if processes and all(_closed(pr) for pr in processes):
        said = [pr.get("status") for pr in processes]
        return next((s for s in ("failed", "killed", "interrupted", "stopped") if s in said), "completed"), True
    return "killed", True


def _closed(process: dict) -> bool:
    # Process files written before "closed" existed: a clean stop set "ended" and a final status.
    return bool(process.get("closed", bool(process.get("ended")) and process.get("status") != "running"))


def _process_alive(process: dict) -> bool:
    pid = process.get("pid")
    return (process.get("host") == host_name() and isinstance(pid, int) and not _closed(process)
            and _pid_alive(pid))


def recording_gaps(meta: dict | None, processes: list[dict], step_ranks: Iterable[int],
                   unreadable: Iterable[str] = (), layer_rows: dict[str, int] | None = None) -> list[str]:
    """What a gradscope recording is missing, one sentence each; [] when it is complete.

    The rule: a recording is complete when meta.json is there and the run is no longer
    running (run_status); every rank with a steps file has a readable process-r{R}.json;
    every process file is "closed" (the recorder writes closed: true at its clean stop,
    after its last rows reached the disk; SIGKILL, os._exit or a crash leave it false) and
    has no "recording_error" (the recorder stopped writing, e.g. a full disk); and every
    layers file a closed process names holds the "layer_rows" rows it says it wrote
    (layer_rows: rows found on disk by file name). A directory no recorder wrote (no process
    file, and a meta.json without "gradscope_version": a table written by hand) has no gaps.
    """
    gaps: list[str] = []
    unreadable = list(unreadable)
    if not processes and not unreadable and not (meta or {}).get("gradscope_version"):
        return gaps
    if meta is None:
        gaps.append("meta.json is missing")
    elif run_status(meta, processes)[0] == "running":
        gaps.append("the run is still being recorded")
    by_rank = {pr.get("rank"): pr for pr in processes}
    for name in sorted(unreadable):
        gaps.append(f"{name} cannot be read: that rank's optimizers, clip calls and clip audit are unknown")
    for r in sorted(set(step_ranks)):
        if r not in by_rank and process_file(r) not in set(unreadable):
            gaps.append(f"{process_file(r)} is missing: rank {r}'s optimizers, clip calls and clip audit are unknown")
    for pr in processes:
        r = pr.get("rank")
        if pr.get("recording_error"):
            gaps.append(f"rank {r} stopped recording: {pr['recording_error']}")
        elif not _closed(pr):
            if not _process_alive(pr):
                gaps.append(f"rank {r}'s recording was not closed: its process ended without gradscope's final "
                            "flush (SIGKILL, os._exit or a crash), so its last steps are missing")
        elif layer_rows is not None:
            for o in pr.get("optimizers") or []:
                want, name = (o.get("layer_rows"), o.get("layers_file")) if isinstance(o, dict) else (None, None)
                if isinstance(want, int) and name and layer_rows.get(name, 0) < want:
                    gaps.append(f"{name} holds {layer_rows.get(name, 0)} of the {want} rows rank {r} wrote "
                                "(the file was cut)")
    return gaps


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
    if (p / META_FILE).exists():  # a directory or an unreadable file there is damage, not "no meta"
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

    processes, unreadable = [], []
    for f in sorted(_own(p, "process-r*.json"), key=lambda f: _rank_of(f.name)):
        try:
            proc = read_json(f)
        except (OSError, ValueError):
            proc = None  # replaced atomically: unreadable is damage, and the recording is incomplete
        if isinstance(proc, dict):
            processes.append(proc)
        else:
            unreadable.append(f.name)
    meta["processes"] = processes
    if "optimizers" not in meta:
        meta["optimizers"] = processes[0].get("optimizers", []) if processes else []
    had_meta = (p / META_FILE).exists()
    meta.setdefault("status", "unknown")
    meta.setdefault("exit_code", None)
    status, inferred = run_status(meta, processes)  # a supervisor gone: the training's own records decide
    if inferred:
        meta["status"], meta["status_inferred"] = status, True

    frames = []
    step_ranks = []
    for f in sorted(_own(p, "steps-r*.csv"), key=lambda f: _rank_of(f.name)):
        r = _rank_of(f.name)
        step_ranks.append(r)
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
    layer_rows = {}
    for f in sorted(_own(p, "layers-r*-o*.csv")):
        r = _rank_of(f.name)
        if rank is not None and r != rank:
            continue
        o = int(f.stem.rsplit("-o", 1)[1])
        try:
            df = _read_csv(f)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            found = validate.scan_layers_csv(f) if not isinstance(e, OSError) else None
            raise (validate.damaged(f, *found) if found else GradscopeError(f"cannot read '{f}': {e}")) from None
        layer_rows[f.name] = len(df)
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

    # What the recording is missing (recording_gaps); one rank's view does not count the others' layer rows.
    meta["incomplete"] = recording_gaps(meta if had_meta else None, processes, step_ranks, unreadable,
                                        layer_rows if rank is None else None)
    return Run(path=p, steps=steps, layers=layers, meta=meta, source="gradscope")
