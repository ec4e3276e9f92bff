"""Run the user's script, module or launcher command, recorded, and keep its exit status.

The training runs in a child process started exactly as the user would start
it (``python train.py args``, ``python -m pkg args``, or the command verbatim),
so sys.argv, sys.path[0], __main__, tracebacks, pdb and multiprocessing behave
as without gradscope. The recorder enters every Python process of the run
through a sitecustomize on PYTHONPATH (see capture/boot.py), which is also how
each rank of ``torchrun`` gets its own recorder.

This process stays as a small supervisor: it writes meta.json, forwards SIGTERM
and SIGHUP, lets Ctrl-C reach the child through the terminal as it would
anyway, and records the outcome even when the child is killed with SIGKILL.
The training dies with its supervisor: on Linux the child asks the kernel for
SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so a `kill -9` of
`gradscope run` never leaves the training running orphaned; the recorder's
SIGTERM handler then flushes and closes the recording, whose process files say
how it ended (rundir.run_status).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gradscope import rundir
from gradscope.capture.boot import (
    ENV_FLUSH_SECONDS,
    ENV_FLUSH_STEPS,
    ENV_LAYER_STRIDE,
    ENV_RUN_DIR,
    ENV_STOP_ON_NAN,
    ENV_CLIP_NORM,
    ENV_TRACE_NAN,
    ENV_MAX_STEPS,
    ENV_RUN_ID,
)
from gradscope.errors import GradscopeError

BOOTSTRAP_DIR = str(Path(__file__).resolve().parent / "_bootstrap")


@dataclass
class Target:
    kind: str  # "script", "module" or "command"
    name: str  # script path, module name, or the command's program
    args: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        if self.kind == "script":
            return [sys.executable, self.name, *self.args]
        if self.kind == "module":
            return [sys.executable, "-m", self.name, *self.args]
        return [self.name, *self.args]

    @property
    def label(self) -> str:
        if self.kind == "script":
            return Path(self.name).stem
        if self.kind == "module":
            return self.name.rsplit(".", 1)[-1]
        # torchrun --nproc-per-node 2 train.py -> "train"
        scripts = [a for a in self.args if a.endswith(".py")]
        return Path(scripts[0]).stem if scripts else Path(self.name).name


def check_target(target: Target) -> None:
    """Fail with one line before launching anything: missing file, syntax error, no module."""
    if target.kind == "script":
        path = Path(target.name)
        if not path.exists():
            raise GradscopeError(f"script '{target.name}' not found (run from the directory that holds it, or give its path)")
        if path.is_dir():
            if not (path / "__main__.py").is_file():
                raise GradscopeError(f"'{target.name}' is a directory without __main__.py; give a script or use -m")
            return
        try:
            source = path.read_bytes()
        except OSError as e:
            raise GradscopeError(f"cannot read script '{target.name}': {e.strerror}") from None
        try:
            compile(source, str(path), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:  # ValueError: null bytes on older Pythons
            raise GradscopeError(_compile_error(target.name, source, e)) from None
    elif target.kind == "module":
        # As `python -m` would look: the current directory first.
        sys.path.insert(0, os.getcwd())
        try:
            spec = importlib.util.find_spec(target.name)
        except (ImportError, ValueError) as e:
            raise GradscopeError(f"module '{target.name}' cannot be found: {e}") from None
        except Exception as e:  # the package's __init__ raised
            raise GradscopeError(f"module '{target.name}' cannot be imported: {type(e).__name__}: {e}") from None
        finally:
            sys.path.pop(0)
        if spec is None:
            raise GradscopeError(f"no module named '{target.name}' (from {os.getcwd()}); check the name or the directory")
    else:
        import shutil

        if os.sep not in target.name and shutil.which(target.name) is None:
            raise GradscopeError(f"command '{target.name}' not found on PATH")
        if os.sep in target.name and not os.access(target.name, os.X_OK):
            raise GradscopeError(f"command '{target.name}' is not an executable file")


def _compile_error(name: str, source: bytes, e: Exception) -> str:
    """One line naming where the script fails to compile; a null byte (a binary file) has no
    line in Python's own error, so it is located here."""
    line = getattr(e, "lineno", None)
    msg = getattr(e, "msg", None) or str(e)
    if b"\0" in source and ("null bytes" in msg or line is None):
        line = source.count(b"\n", 0, source.index(b"\0")) + 1
        return f"script '{name}' is not Python source: line {line} holds a null byte (a binary file?)"
    if line is None:
        return f"script '{name}' cannot be compiled: {msg}"
    return f"script '{name}' has a syntax error at {name}:{line}: {msg}"


def default_run_dir(target: Target) -> Path:
    return Path("gradscope_runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{target.label}"


def child_env(run_dir: Path, layer_stride: int, flush_steps: int, flush_seconds: float,
              stop_on_nan: bool = False, clip_norm: float | None = None,
              trace_nan: bool = False, max_steps: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = BOOTSTRAP_DIR + (os.pathsep + old if old else "")
    env[ENV_RUN_DIR] = str(run_dir.resolve())
    env[ENV_LAYER_STRIDE] = str(layer_stride)
    env[ENV_FLUSH_STEPS] = str(flush_steps)
    env[ENV_FLUSH_SECONDS] = str(flush_seconds)
    env[ENV_STOP_ON_NAN] = "1" if stop_on_nan else "0"
    env[ENV_CLIP_NORM] = repr(float(clip_norm)) if clip_norm is not None else ""
    env[ENV_TRACE_NAN] = "1" if trace_nan else "0"
    env[ENV_MAX_STEPS] = str(int(max_steps)) if max_steps is not None else ""
    return env


def status_of(returncode: int) -> tuple[str, str | None]:
    """(status, signal name) of a child's return code as subprocess reports it."""
    if returncode == 0:
        return "completed", None
    if returncode < 0:
        sig = signal.Signals(-returncode)
        return ("interrupted" if sig == signal.SIGINT else "killed"), sig.name
    if returncode == 130:  # a shell-like launcher reporting SIGINT
        return "interrupted", None
    return "failed", None


def run_recorded(
    target: Target,
    run_dir: Path,
    *,
    layer_stride: int = 1,
    flush_steps: int = 100,
    flush_seconds: float = 2.0,
    stop_on_nan: bool = False,
    clip_norm: float | None = None,
    trace_nan: bool = False,
    max_steps: int | None = None,
    announce: bool = False,
) -> int:
    """Launch the target, wait for it, finish meta.json. Returns the child's return code
    (negative: killed by that signal). announce: print when recording starts, and let the
    recorder say when the first step is recorded (capture/announce.py)."""
    argv = target.argv()
    meta = rundir.new_meta(argv, target=target.kind)
    meta["clip_norm_override"] = clip_norm
    meta["max_steps"] = max_steps
    try:
        rundir.write_json_atomic(run_dir / rundir.META_FILE, meta)
    except OSError as e:
        raise GradscopeError(f"cannot write in run directory '{run_dir}': {e.strerror or e}; choose another --out") from None
    env = child_env(run_dir, layer_stride, flush_steps, flush_seconds, stop_on_nan, clip_norm, trace_nan, max_steps)
    env[ENV_RUN_ID] = meta["run_id"]
    if announce:
        from gradscope.capture.announce import ENV_ANNOUNCE

        env[ENV_ANNOUNCE] = repr(time.time())

    try:
        child = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent())
    except OSError as e:
        rundir.write_json_atomic(run_dir / rundir.META_FILE, rundir.finish_meta(meta, "failed", 2))
        raise GradscopeError(f"cannot start {argv[0]}: {e.strerror}") from None
    if announce:  # once it has really started (the script takes far longer to print its first line)
        print(f"gradscope: recording into {run_dir}   watch it live: gradscope watch {run_dir}",
              file=sys.stderr, flush=True)

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    # Ctrl-C reaches the child from the terminal (same process group); we must
    # outlive it to record the outcome, and not add a second interrupt.
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status, sig_name = status_of(returncode)
    if status == "completed" and max_steps is not None and _stopped_by_step_limit(run_dir):
        status = "stopped"
    exit_code = returncode if returncode >= 0 else 128 - returncode
    try:  # in place if it must (a full disk): the status must not stay 'running', and the script's
        # exit status is returned whatever happens here
        rundir.write_json_atomic(run_dir / rundir.META_FILE, rundir.finish_meta(meta, status, exit_code, sig_name),
                                 in_place_fallback=True)
    except OSError as e:
        print(f"gradscope: cannot write {run_dir / rundir.META_FILE}: {e.strerror or e}", file=sys.stderr)
    return returncode


def _die_with_parent():
    """A preexec_fn that makes the child receive SIGTERM when this supervisor dies (Linux
    PR_SET_PDEATHSIG), or None where that does not exist. SIGTERM, not SIGKILL: the recorder
    flushes and closes its recording, and a launcher (torchrun) passes it on to its ranks."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # in the child, between fork and exec: async-signal-safe calls only
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _stopped_by_step_limit(run_dir: Path) -> bool:
    """A recording process ended the training at --max-steps (its process file says so)."""
    for f in run_dir.glob("process-r*.json"):
        try:
            if rundir.read_json(f).get("status") == "stopped":
                return True
        except (OSError, ValueError):
            continue
    return False
