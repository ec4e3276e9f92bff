"""The run directory: the one contract between capture and analysis. This module owns it.

Everything about the format lives here: file names, the steps file's columns and the text
of its lines, the process file's and meta.json's keys, the clip audit's finding kinds, the
rule for a bad step, and the readers. Capture supplies values; importers build the same
in-memory `Run`. The top half is standard library only (capture imports it inside the
training process); reading uses numpy/pandas, imported lazily.

FORMAT VERSION 2 (written by this gradscope; version 1 is still read, see below):

    RUN/
      meta.json               run-level facts, written by `gradscope run` or `record()`
                              (new_meta / finish_meta; keys META_KEYS): format,
                              format_version, gradscope_version, target, command, cwd,
                              host, launcher_pid, run_id, python, torch, started, ended,
                              status (STATUSES), exit_code, signal, clip_norm_override,
                              max_steps. run_id names the run's process files: `--force`
                              removes exactly the files that run's records name
                              (previous_run_files), and the directory is claimed atomically
                              (prepare_run_dir creates meta.json with O_EXCL). Importers' in-memory meta adds structured flags
                              (IMPORT_FLAGS: nan_losses_dropped, norms_untrusted,
                              sharded_training) beside their notes.
      process-r{R}.json       one per recording process (rank R), built by process_info():
                              format, format_version, gradscope_version, rank, world_size,
                              pid, host, python, torch, devices, started, ended, status,
                              layer_stride, flush_steps, flush_seconds, optimizers [{id,
                              class, kind, parameters, tensors, steps, momentum,
                              layers_file}], clip_calls, clip_thresholds,
                              clip_norm_override, script_max_norms_overridden,
                              "clip_audit": {"findings": [{kind (AUDIT_KINDS), optimizer,
                              first_step, count, ...details}], "error": str|null},
                              with --trace-nan "nan_trace" (NAN_TRACE_KEY): {enabled,
                              steps_traced, origin: null or {step, optimizer, phase
                              ("input"|"forward"|"loss"|"backward"), module, detail, what,
                              why}}; how complete it is (recording_gaps): "run_id"
                              (meta.json's), "closed" (true once the recorder's clean stop
                              wrote its last rows), "recording_error" (why it stopped
                              writing, e.g. a full disk, or null) and per optimizer
                              "layer_rows" (rows written to its layer store); "norm_scope":
                              "global" | "rank-local" (NORM_SCOPE_KEY): whether grad_norm is
                              the model's global norm or this rank's shard only (gradients
                              sharded by an engine gradscope cannot reduce; DeepSpeed's own
                              global norm is "global");
                              "layer_norm_scope" (LAYER_NORM_SCOPE_KEY), the same for the
                              per-layer norms; absent (older runs): "global". Keys this list
                              does not name pass through unchanged.
      steps-r{R}.csv          one line per optimizer step of rank R, columns STEP_COLUMNS,
                              each line formatted by step_line(): integers as %d, norms and
                              losses as %.9g (round-trips float32), other floats as repr,
                              time as %.6f; nan/inf spelled "nan"/"inf"/"-inf". A step with
                              no loss recorded (no backward() gradscope saw, e.g. gradients
                              from torch.autograd.grad) has an EMPTY loss field (NO_LOSS);
                              "nan" is a loss that was NaN.
      layers-r{R}-o{O}.json   the layer store's index for optimizer O of rank R (written once,
                              before any row): {"names": [...], "dtype": "float32",
                              "byteorder": "little"|"big", "norms": file, "steps": file}
      layers-r{R}-o{O}.f32    per-parameter gradient norms: append-only rows of
                              len(names) float32 values (no header)
      layers-r{R}-o{O}.i64    the step of each of those rows: append-only int64 values
      metrics-r{R}.csv        values the script reported on rank R (METRIC_COLUMNS:
                              step,name,value; `step` is optimizer 0's step the value was
                              reported after, -1 before its first): gradscope.log_metric,
                              HF Trainer eval_* keys, Lightning self.log names,
                              --metric-regex matches (capture/metrics.py). Optional: runs
                              without it (and older ones) load with an empty metrics table.
                              meta.json "metric_name"/"metric_regex": `run --metric-name`.

    Every file is append-only in whole lines/rows or replaced atomically, so a run killed at
    any moment still loads: a reader drops a trailing partial CSV line or partial binary row
    (a file size that is not a whole number of rows), and uses as many layer rows as both
    the .i64 and the .f32 file hold whole (the steps file is written first). Layer rows are
    read lazily (LayerNorms): `check` and `watch` never read them, `recommend` reads the rows
    of the steps it lists, `plot` streams them once into a heatmap as wide as the figure.

A BAD STEP (is_bad_step; analysis/bad_steps.py applies it to a table): its loss was recorded
and is inf/NaN, or its gradient norm is inf/NaN and no loss scaler skipped the update.

FORMAT VERSION 1 (read): the same except that the per-parameter norms are a CSV,
layers-r{R}-o{O}.csv (`step` then one column per parameter name), and a step with no loss
recorded has loss "nan" (read as NaN: "no loss recorded" where the series records none).

Changing the format: bump FORMAT_VERSION, describe the change here, keep reading every
older version (tests/test_rundir.py reads one run written in each), and make readers
refuse a newer version with one line (load_run does).
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any, Iterable

from gradscope import validate
from gradscope.errors import GradscopeError

FORMAT_NAME = "gradscope-run"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)

META_FILE = "meta.json"

# Columns of steps-r{R}.csv, in file order. The names are a contract.
STEP_COLUMNS = [
    "optimizer",      # stable id per optimizer, creation order 0, 1, ...
    "step",           # 0-based count of that optimizer's steps
    "grad_norm",      # pre-clip global L2 norm of the gradients the step applies
    "loss",           # sum of the values passed to backward() since the previous step (empty: none)
    "clip_max_norm",  # max_norm the script passed to its clip call (nan: no clip)
    "clipped",        # grad_norm > clip_max_norm (0/1)
    "clip_value",     # clip_value of clip_grad_value_ (nan: none)
    "skipped",        # a GradScaler skipped this update (inf/nan gradients) (0/1)
    "loss_scale",     # GradScaler scale in effect (nan: no scaler)
    "lr",             # learning rate of the first parameter group
    "time",           # wall-clock time of the step (unix seconds)
]
# How each column is spelled in a line (%-format). "%.9g" round-trips any float32 and "%r"
# any float64; both spell nan and inf as "nan", "inf", "-inf".
STEP_FORMATS = {
    "optimizer": "%d", "step": "%d", "grad_norm": "%.9g", "loss": "%.9g", "clip_max_norm": "%r",
    "clipped": "%d", "clip_value": "%r", "skipped": "%d", "loss_scale": "%r", "lr": "%r", "time": "%.6f",
}
NO_LOSS = ""  # the loss field of a step with no loss recorded (version 2; version 1 wrote "nan")
# A row of a step with no clip call and no loss scaler: the constant fields, as step_line() takes them.
NO_CLIP_NO_SCALER = {"clip_max_norm": "nan", "clipped": "0", "clip_value": "nan", "skipped": "0", "loss_scale": "nan"}
# Columns of metrics-r{R}.csv (load_run's Run.metrics adds "rank" first).
METRIC_COLUMNS = ["step", "name", "value"]
# Columns that load_run adds: the rank the row came from.
TABLE_COLUMNS = ["rank", *STEP_COLUMNS]
BOOL_COLUMNS = ("clipped", "skipped")
# Parse types for steps-r{R}.csv: no inference, and 0/1 flags read straight as bool.
_STEP_DTYPES = {"optimizer": "int64", "step": "int64", "clipped": "bool", "skipped": "bool"}
INT_COLUMNS = ("rank", "optimizer", "step")
# An optional column of the in-memory steps table: False where the step had no loss recorded.
# Present when the source says so exactly (format version 2); absent, NaN losses are judged by
# the per-series rule in analysis/bad_steps.py.
LOSS_RECORDED = "loss_recorded"

# process-r{R}.json: the scope of the recorded norms (read with norm_scope()).
NORM_SCOPE_KEY = "norm_scope"
LAYER_NORM_SCOPE_KEY = "layer_norm_scope"
NORM_SCOPES = ("global", "rank-local")


def norm_scope(process: dict, key: str = NORM_SCOPE_KEY) -> str:
    """A process file's norm scope: "rank-local" only when it says so (older runs: "global")."""
    return "rank-local" if isinstance(process, dict) and process.get(key) == "rank-local" else "global"


# Status values written to meta.json "status".
# "stopped": `gradscope run --max-steps` ended the training after that many steps (exit 0).
STATUSES = ("running", "completed", "stopped", "failed", "interrupted", "killed")

# meta.json keys (new_meta writes them all; finish_meta sets the last four).
META_KEYS = ("format", "format_version", "gradscope_version", "target", "command", "cwd", "host", "launcher_pid", "run_id",
             "python", "torch", "clip_norm_override", "max_steps", "started", "ended", "status", "exit_code",
             "signal", "metric_name", "metric_regex")
# Structured flags an importer sets in its Run's meta (true when set; analysis decides from
# them, never from the words of meta["notes"], which are for people):
NAN_LOSSES_DROPPED = "nan_losses_dropped"  # the trainer dropped NaN/inf losses before logging them
NORMS_UNTRUSTED = "norms_untrusted"        # the logged norms look per-rank/per-shard or unset
SHARDED_TRAINING = "sharded_training"      # the trainer ran DeepSpeed/FSDP: its norm may be rank-local
IMPORT_FLAGS = (NAN_LOSSES_DROPPED, NORMS_UNTRUSTED, SHARDED_TRAINING)

# process-r{R}.json entries written by capture modules of their own.
CLIP_AUDIT_KEY = "clip_audit"   # capture/audit.py -> analysis/audit.py
NAN_TRACE_KEY = "nan_trace"     # capture/nantrace.py -> analysis/origin.py
# Kinds of clip-audit findings (process file "clip_audit" -> "findings" -> "kind"), in report order.
AUDIT_KINDS = ("clip-before-unscale", "clip-after-step", "clip-per-microbatch", "clip-partial", "no-zero-grad",
               "clip-local-norm")


def steps_file(rank: int) -> str:
    return f"steps-r{rank}.csv"


def layers_file(rank: int, optimizer: int) -> str:
    """The layer store's index (format version 2); its rows are in layer_norms_file / layer_steps_file."""
    return f"layers-r{rank}-o{optimizer}.json"


def layer_norms_file(rank: int, optimizer: int) -> str:
    return f"layers-r{rank}-o{optimizer}.f32"


def layer_steps_file(rank: int, optimizer: int) -> str:
    return f"layers-r{rank}-o{optimizer}.i64"


def layers_csv_file(rank: int, optimizer: int) -> str:
    """Format version 1's per-layer CSV (read only)."""
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
        ext == "json" and (stem.startswith("process-r") or stem.startswith("layers-r"))
    ) or (ext in ("f32", "i64") and stem.startswith("layers-r")) or name.endswith(".tmp")


# ---------------------------------------------------------------- the rules (stdlib only)


def is_bad_step(grad_norm: float, loss: float, skipped: float, loss_recorded: bool = True) -> bool:
    """THE bad-step rule, for one row's host values: its loss was recorded and is inf/NaN, or its
    gradient norm is inf/NaN and no loss scaler absorbed it (a GradScaler-skipped step's inf is
    the scaler working). analysis/bad_steps.py applies the same rule to a whole table."""
    return bad_quantity(grad_norm, loss, skipped, loss_recorded) is not None


def bad_quantity(grad_norm: float, loss: float, skipped: float, loss_recorded: bool = True) -> str | None:
    """What made a step bad by is_bad_step ("loss", "gradient norm"), or None."""
    if loss_recorded and not math.isfinite(loss):
        return "loss"
    if not math.isfinite(grad_norm) and not skipped:
        return "gradient norm"
    return None


def step_line(fixed: dict[str, str] | None = None) -> str:
    """The %-format of one steps-file line: STEP_COLUMNS in order, each by STEP_FORMATS, except
    the columns in `fixed`, written as the text given (a constant of the row kind, such as the
    optimizer id, NO_LOSS or NO_CLIP_NO_SCALER). The values to fill in follow STEP_COLUMNS order."""
    fixed = fixed or {}
    return ",".join(fixed[c].replace("%", "%%") if c in fixed else STEP_FORMATS[c] for c in STEP_COLUMNS) + "\n"


def steps_header() -> str:
    return ",".join(STEP_COLUMNS) + "\n"


def process_info(**values: Any) -> dict:
    """process-r{R}.json as capture writes it: the format's own keys first, then the values
    given (the keys listed in this module's docstring; any others pass through unchanged)."""
    info: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if "gradscope_version" not in values:
        from gradscope import __version__

        info["gradscope_version"] = __version__
    info.update(values)
    return info


def layer_index(names: list[str], rank: int, optimizer: int) -> dict:
    """The layer store's index file (layers_file) for one optimizer of one rank."""
    import sys

    return {"names": list(names), "dtype": "float32", "byteorder": sys.byteorder,
            "norms": layer_norms_file(rank, optimizer), "steps": layer_steps_file(rank, optimizer)}


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


_OWN_NAME = re.compile(r"^(meta\.json|steps-r\d+\.csv|layers-r\d+-o\d+\.(csv|json|f32|i64)|process-r\d+\.json|metrics-r\d+\.csv)$")


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
        names.update((f.name, steps_file(proc["rank"]), metrics_file(proc["rank"])))
        for o in proc.get("optimizers") or []:
            lf = o.get("layers_file") if isinstance(o, dict) else None
            if isinstance(lf, str) and _OWN_NAME.match(lf) and lf.startswith(f"layers-r{proc['rank']}-"):
                names.add(lf)
                if lf.endswith(".json"):  # format version 2: the store's rows beside its index
                    names.update((lf[:-5] + ".f32", lf[:-5] + ".i64"))
        if isinstance(proc.get("pid"), int):
            pids.add(proc["pid"])
    unclaimed = sorted(f.name for f in p.iterdir() if _OWN_NAME.match(f.name) and f.name not in names)
    if unclaimed:
        raise GradscopeError(f"--force: {', '.join(unclaimed)} in '{p}' belong to no record of the run recorded "
                             "there; --force removes only that run's files (move them away, or choose another --out)")
    tmps = {f"{n}.{pid}.tmp" for n in names | {META_FILE} for pid in pids}
    return sorted(n for n in names | tmps if (p / n).is_file())


def new_meta(command: list[str], target: str, torch_version: str | None = None, *,
             clip_norm_override: float | None = None, max_steps: int | None = None) -> dict:
    """meta.json as written when a recording starts (status 'running'); keys META_KEYS."""
    import platform
    import time

    from gradscope._version import __version__

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
        "clip_norm_override": clip_norm_override,
        "max_steps": max_steps,
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


class Run:
    """A run in memory: what every analysis reads, whatever wrote it.

    steps:  one row per optimizer step (TABLE_COLUMNS; foreign logs leave unknown
            columns as NaN/False; LOSS_RECORDED where the source says exactly).
    layer_norms: per-parameter gradient norms, read on demand (LayerNorms).
    layers: the same as one wide DataFrame (rank, optimizer, step, then one column per
            parameter name; empty when none were recorded). Built on first use: on a long
            run prefer layer_norms, which reads only the rows asked for.
    meta:   meta.json plus "processes" (one dict per recording process); always has
            "status" and "exit_code".
    source: "gradscope" or the importer's format name.
    """

    def __init__(self, path: Any, steps: Any, layers: Any = None, meta: dict | None = None,
                 source: str = "gradscope", layer_norms: LayerNorms | None = None,
                 metrics: Any = None) -> None:
        self.path = Path(path)
        self.metrics = metrics if metrics is not None else empty_metrics()  # rank, step, name, value
        self.steps = steps
        self.meta = meta if meta is not None else {}
        self.source = source
        self._layers = layers
        self._layer_norms = layer_norms

    @property
    def layers(self):
        if self._layers is None:
            self._layers = self._layer_norms.frame() if self._layer_norms is not None else empty_layers()
        return self._layers

    @layers.setter
    def layers(self, value) -> None:
        self._layers, self._layer_norms = value, None

    @property
    def layer_norms(self) -> LayerNorms:
        if self._layer_norms is None:
            self._layer_norms = FrameLayerNorms(self.layers)
        return self._layer_norms

    def __repr__(self) -> str:
        return f"Run(path={str(self.path)!r}, steps={len(self.steps)} rows, source={self.source!r})"

    def rank(self, rank: int) -> Run:
        """The same run restricted to one rank."""
        steps = self.steps[self.steps["rank"] == rank].reset_index(drop=True)
        if self._layers is None and isinstance(self._layer_norms, StoreLayerNorms):
            return Run(self.path, steps, None, self.meta, self.source, self._layer_norms.only_rank(rank))
        layers = self.layers
        if len(layers):
            layers = layers[layers["rank"] == rank].reset_index(drop=True)
        metrics = self.metrics[self.metrics["rank"] == rank].reset_index(drop=True)
        return Run(self.path, steps, layers, self.meta, self.source, metrics)


def empty_layers():
    import pandas as pd

    return pd.DataFrame({"rank": [], "optimizer": [], "step": []}, dtype="int64")


class LayerNorms:
    """Per-parameter gradient norms, by series (rank, optimizer), read only as asked.

    Rows of a series are in step order. Values come back as float64 arrays [rows, names].
    """

    def series(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def names(self, rank: int, optimizer: int) -> list[str]:
        raise NotImplementedError

    def steps(self, rank: int, optimizer: int):
        """The step of every row of the series (int64 array)."""
        raise NotImplementedError

    def rows(self, rank: int, optimizer: int, index, native: bool = False):
        """The rows at these positions (an int array or a slice) as float64 [k, names]
        (native: in the dtype stored, float32 for the layer store, to save a conversion)."""
        raise NotImplementedError

    def frame(self):
        """Everything as one wide DataFrame (rank, optimizer, step, names...)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(len(self.steps(r, o)) for r, o in self.series())

    def at_steps(self, rank: int, optimizer: int, want):
        """(steps, values) of the rows whose step is in `want`, in row order."""
        import numpy as np

        steps = self.steps(rank, optimizer)
        idx = np.flatnonzero(np.isin(steps, np.asarray(list(want), dtype=np.int64)))
        return steps[idx], self.rows(rank, optimizer, idx)

    def chunks(self, rank: int, optimizer: int, start: int = 0, rows: int = 8192, native: bool = False):
        """(first row index, values) blocks from row `start` on: a whole series in bounded memory."""
        n = len(self.steps(rank, optimizer))
        for i in range(start, n, rows):
            yield i, self.rows(rank, optimizer, slice(i, min(n, i + rows)), native)


class FrameLayerNorms(LayerNorms):
    """LayerNorms over a wide DataFrame (format version 1, importers, tests)."""

    def __init__(self, df) -> None:
        self.df = df
        self._by: dict = {}
        if df is not None and len(df):
            keys = df[["rank", "optimizer"]].drop_duplicates()
            for r, o in keys.itertuples(index=False):
                sel = df[(df["rank"] == r) & (df["optimizer"] == o)]
                sel = sel.sort_values("step", kind="stable")
                names = [c for c in sel.columns if c not in ("rank", "optimizer", "step")]
                self._by[(int(r), int(o))] = (sel, names)

    def series(self):
        return list(self._by)

    def names(self, rank, optimizer):
        return self._by[(rank, optimizer)][1] if (rank, optimizer) in self._by else []

    def steps(self, rank, optimizer):
        import numpy as np

        if (rank, optimizer) not in self._by:
            return np.zeros(0, dtype=np.int64)
        return self._by[(rank, optimizer)][0]["step"].to_numpy(dtype=np.int64)

    def rows(self, rank, optimizer, index, native=False):
        import numpy as np

        if (rank, optimizer) not in self._by:
            return np.zeros((0, 0))
        sel, names = self._by[(rank, optimizer)]
        return sel[names].to_numpy(dtype=float)[index]

    def frame(self):
        return self.df if self.df is not None else empty_layers()


class StoreLayerNorms(LayerNorms):
    """LayerNorms over format version 2's binary layer store, memory-mapped: a row is read
    when asked for, and only the steps arrays (8 bytes a row) are read whole."""

    def __init__(self, path: Path, entries: dict) -> None:
        self.path = path
        self._entries = entries  # (rank, optimizer) -> (names, norms path, steps path, dtype, rows)
        self._steps: dict = {}

    @classmethod
    def open(cls, path: Path, rank: int | None = None) -> StoreLayerNorms:
        entries = {}
        for f in sorted(path.glob("layers-r*-o*.json"), key=lambda f: (_rank_of(f.name), f.name)):
            r = _rank_of(f.name)
            if rank is not None and r != rank:
                continue
            o = int(f.name[: -len(".json")].rsplit("-o", 1)[1])
            try:
                index = read_json(f)
                names = [str(n) for n in index["names"]]
                dtype = ("<" if index.get("byteorder", "little") == "little" else ">") + "f4"
                norms, steps = path / str(index["norms"]), path / str(index["steps"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise GradscopeError(f"cannot read the layer index '{f}': {e}", exit_code=2) from None
            if not names or not norms.is_file() or not steps.is_file():
                continue
            row = 4 * len(names)
            rows = min(norms.stat().st_size // row, steps.stat().st_size // 8)  # whole rows of both
            entries[(r, o)] = (names, norms, steps, dtype, rows)
        return cls(path, entries)

    def only_rank(self, rank: int) -> StoreLayerNorms:
        return StoreLayerNorms(self.path, {k: v for k, v in self._entries.items() if k[0] == rank})

    def __bool__(self) -> bool:
        return any(e[4] for e in self._entries.values())

    def series(self):
        return [k for k, e in self._entries.items() if e[4]]

    def names(self, rank, optimizer):
        e = self._entries.get((rank, optimizer))
        return list(e[0]) if e else []

    def steps(self, rank, optimizer):
        import numpy as np

        key = (rank, optimizer)
        if key not in self._steps:
            e = self._entries.get(key)
            if not e or not e[4]:
                self._steps[key] = np.zeros(0, dtype=np.int64)
            else:
                with open(e[2], "rb") as f:
                    self._steps[key] = np.fromfile(f, dtype=e[3][0] + "i8", count=e[4]).astype(np.int64)
        return self._steps[key]

    def rows(self, rank, optimizer, index, native=False):
        import numpy as np

        e = self._entries.get((rank, optimizer))
        if not e or not e[4]:
            return np.zeros((0, len(e[0]) if e else 0))
        names, norms, _, dtype, n = e
        width = len(names)
        if isinstance(index, slice):
            start, stop, _ = index.indices(n)
            count = max(0, stop - start)
            with open(norms, "rb") as f:  # plain reads: the pages do not stay in this process
                f.seek(start * 4 * width)
                block = np.fromfile(f, dtype=dtype, count=count * width)
            block = block.reshape(count, width)
            return block if native else block.astype(np.float64)
        idx = np.asarray(index, dtype=np.int64)
        out = np.empty((len(idx), width), dtype=np.float64)
        with open(norms, "rb") as f:
            for j, i in enumerate(idx):
                f.seek(int(i) * 4 * width)
                out[j] = np.fromfile(f, dtype=dtype, count=width)
        return out

    def frame(self):
        import numpy as np
        import pandas as pd

        frames = []
        for r, o in self.series():
            names = self.names(r, o)
            steps = self.steps(r, o)
            df = pd.DataFrame(self.rows(r, o, slice(None)), columns=names)
            head = pd.DataFrame({"rank": np.full(len(steps), r, dtype=np.int64),
                                 "optimizer": np.full(len(steps), o, dtype=np.int64), "step": steps})
            frames.append(pd.concat([head, df], axis=1))
        if not frames:
            return empty_layers()
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _whole_lines_only(path: Path):
    """The file's bytes up to its last newline when it ends in a partial line, else None."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return b""
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def _read_csv(path: Path, dtype: dict | None = None, **kwargs: Any):
    """Parse a CSV this format wrote; a partial last line (a killed writer) is dropped."""
    import io

    import pandas as pd

    data = _whole_lines_only(path)
    if data is None:  # the usual case: let pandas read the file itself, no copy
        return pd.read_csv(path, dtype=dtype, **kwargs)
    return pd.read_csv(io.BytesIO(data), dtype=dtype, **kwargs) if data.strip() else pd.DataFrame()


def _loss_recorded(path: Path):
    """Format version 2: False where the loss field is empty (NO_LOSS), True where it holds a value."""
    import io

    import pandas as pd

    data = _whole_lines_only(path)
    src = path if data is None else io.BytesIO(data)
    raw = pd.read_csv(src, usecols=["loss"], dtype=str, keep_default_na=False, na_filter=False)["loss"]
    return (raw.str.strip() != NO_LOSS).to_numpy()


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
    """Read a gradscope run directory (every rank merged, or one rank). The layer store of
    format version 2 is opened, not read: Run.layer_norms reads its rows when asked."""
    import numpy as np
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
        version = meta.get("format_version", 1)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise GradscopeError(
                f"run '{p}' uses run-format version {version}; this gradscope reads up to "
                f"{FORMAT_VERSION} (upgrade gradscope)"
            )

    processes: list[dict] = []
    unreadable: list[str] = []
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
        if _file_version(meta, processes, r) >= 2 and "loss" in df:
            # Version 2 tells "no loss recorded" (an empty field) from a NaN loss exactly.
            nan = df["loss"].isna().to_numpy()
            df[LOSS_RECORDED] = _loss_recorded(f) if nan.any() else True
        df.insert(0, "rank", r)
        frames.append(df)
    if not frames:
        steps = empty_steps()
    else:
        steps = normalize_steps(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True))
        if LOSS_RECORDED in steps and steps[LOSS_RECORDED].isna().any():  # a rank of version 1 among them
            steps[LOSS_RECORDED] = steps[LOSS_RECORDED].fillna(True).astype(bool)

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
        # One concat, not insert() into a 300-column frame: that fragments it (PerformanceWarning)
        head = pd.DataFrame({"rank": np.full(len(df), r, dtype=np.int64),
                             "optimizer": np.full(len(df), o, dtype=np.int64)}, index=df.index)
        layer_frames.append(pd.concat([head, df], axis=1))
    for f in sorted(_own(p, "layers-r*-o*.json")):  # format version 2: whole rows on disk, nothing read
        layer_rows[f.name] = _store_rows(f)
    # What the recording is missing (recording_gaps); one rank's view does not count the others' layer rows.
    meta["incomplete"] = recording_gaps(meta if had_meta else None, processes, step_ranks, unreadable,
                                        layer_rows if rank is None else None)
    store = StoreLayerNorms.open(p, rank)  # format version 2: nothing is read until asked
    if layer_frames:
        layers = pd.concat(layer_frames, ignore_index=True)
        return Run(path=p, steps=steps, layers=layers, meta=meta, source="gradscope", metrics=_load_metrics(p, rank))
    return Run(path=p, steps=steps, layers=None if store else empty_layers(), meta=meta, source="gradscope",
               layer_norms=store if store else None, metrics=_load_metrics(p, rank))


def _store_rows(index: Path) -> int:
    """Whole rows of a layer store (format version 2) on disk: as many as both its files hold."""
    try:
        names = read_json(index).get("names") or []
        steps = (index.parent / index.with_suffix(".i64").name).stat().st_size // 8
        norms = (index.parent / index.with_suffix(".f32").name).stat().st_size // (4 * max(1, len(names)))
    except (OSError, ValueError, AttributeError):
        return 0
    return min(steps, norms)


def _file_version(meta: dict, processes: list, rank: int) -> int:
    """The format version rank `rank`'s files were written in (its process file, else meta.json)."""
    for proc in processes:
        if proc.get("rank", 0) == rank and isinstance(proc.get("format_version"), int):
            return proc["format_version"]
    v = meta.get("format_version", 1)
    return v if isinstance(v, int) else 1
