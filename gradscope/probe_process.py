"""One probe's process, wherever it runs: start ``gradscope run ...`` with the user's working
directory and environment, give a launcher its own rendezvous port, wait, and say how it ended.

Standard library only: under ``--executor ray`` this module is shipped to the workers by value
(not imported there), so a worker needs Ray and the Python that runs the probe, nothing else of
gradscope's in its own interpreter.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

# Launchers gradscope knows, and the option each takes for its rendezvous port. A command is
# matched on its program's name (torchrun, accelerate launch, deepspeed) or on `python -m MODULE`.
_PORT_OPTIONS = {
    "torchrun": ("--master-port", ("--master-port", "--master_port")),
    "torch.distributed.run": ("--master-port", ("--master-port", "--master_port")),
    "torch.distributed.launch": ("--master-port", ("--master-port", "--master_port")),
    "accelerate launch": ("--main_process_port", ("--main_process_port", "--main-process-port")),
    "deepspeed": ("--master_port", ("--master_port", "--master-port")),
}
# Options that make torchrun pick its own port (nothing to add), or name the rendezvous host:port.
_SELF_PORTED = ("--standalone",)
_ENDPOINT = ("--rdzv-endpoint", "--rdzv_endpoint")


def _launcher(cmd: list[str]) -> tuple[str | None, int]:
    """(launcher key, index of its first own argument) of a command, or (None, 0)."""
    if not cmd:
        return None, 0
    prog = os.path.basename(cmd[0])
    if prog == "torchrun":
        return "torchrun", 1
    if prog == "deepspeed":
        return "deepspeed", 1
    if prog == "accelerate" and len(cmd) > 1 and cmd[1] == "launch":
        return "accelerate launch", 2
    if prog.startswith("python") and len(cmd) > 2 and cmd[1] == "-m" and cmd[2] in _PORT_OPTIONS:
        return cmd[2], 3
    if prog.startswith("python") and len(cmd) > 1 and cmd[1].startswith("-m") and cmd[1][2:] in _PORT_OPTIONS:
        return cmd[1][2:], 2
    return None, 0


_FLAGS = {"--standalone", "--no-python", "--no_python", "-m", "--module", "--run-path", "--run_path",
          "--use-env", "--use_env", "--multi_gpu", "--cpu", "--no_local_rank", "--autotune", "--force_multi",
          "--debug", "-q", "--quiet"}


def _launcher_span(cmd: list[str], start: int) -> int:
    """Index of the launcher's training script or program (its own options end there): the first
    ``*.py``, else the first argument that is neither an option nor the value of one."""
    for i in range(start, len(cmd)):
        if cmd[i] == "--" or cmd[i].endswith(".py"):
            return i
    i = start
    while i < len(cmd):
        a = cmd[i]
        if not a.startswith("-"):
            return i
        i += 1 if ("=" in a or a in _FLAGS) else 2
    return len(cmd)


def with_rendezvous_port(argv: list[str], port: int) -> list[str]:
    """``argv`` (a ``gradscope run ... -- COMMAND`` line) with the launcher's rendezvous port set
    to ``port``: the user's own port option is replaced, or the option is added right after the
    launcher. Not a known launcher, or one that picks its own port (``--standalone``): unchanged."""
    try:
        sep = argv.index("--")
    except ValueError:
        return list(argv)
    head, cmd = argv[: sep + 1], argv[sep + 1:]
    key, start = _launcher(cmd)
    if key is None:
        return list(argv)
    end = _launcher_span(cmd, start)
    own = cmd[start:end]
    if any(a in _SELF_PORTED for a in own):
        return list(argv)
    option, spellings = _PORT_OPTIONS[key]
    new = list(cmd)
    for i in range(start, end):
        a = new[i]
        for s in spellings:
            if a == s and i + 1 < end:
                new[i + 1] = str(port)
                return head + new
            if a.startswith(s + "="):
                new[i] = f"{s}={port}"
                return head + new
        for s in _ENDPOINT:
            if key in ("torchrun", "torch.distributed.run"):
                if a == s and i + 1 < end and ":" in new[i + 1]:
                    new[i + 1] = new[i + 1].rsplit(":", 1)[0] + f":{port}"
                    return head + new
                if a.startswith(s + "=") and ":" in a:
                    new[i] = a.rsplit(":", 1)[0] + f":{port}"
                    return head + new
    return head + new[:start] + [option, str(port)] + new[start:]


def without_rendezvous_port(command: list[str]) -> list[str]:
    """A launcher command with its rendezvous port option taken out: two probes that differ only
    by the port tune gave them are the same probe (resuming compares commands this way)."""
    key, start = _launcher(command)
    if key is None:
        return list(command)
    end = _launcher_span(command, start)
    spellings = _PORT_OPTIONS[key][1]
    out, i = list(command[:start]), start
    while i < end:
        a = command[i]
        if a in spellings and i + 1 < end:
            i += 2
            continue
        if any(a.startswith(s + "=") for s in spellings):
            i += 1
            continue
        if a in _ENDPOINT and i + 1 < end and ":" in command[i + 1]:
            out += [a, command[i + 1].rsplit(":", 1)[0] + ":*"]
            i += 2
            continue
        if any(a.startswith(s + "=") for s in _ENDPOINT) and ":" in a:
            out.append(a.rsplit(":", 1)[0] + ":*")
            i += 1
            continue
        out.append(a)
        i += 1
    return out + list(command[end:])


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it; the launcher binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux), so a
    probe whose Ray worker is killed stops too (its supervisor forwards SIGTERM to the training
    and records the outcome) instead of running on beside the retry."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort: not Linux
        pass


def run(argv: list[str], cwd: str, env: dict, log_path: str, *, port: int | None = None,
        cuda_visible_devices: str | None = None, die_with_parent: bool = False,
        attempts_path: str | None = None, on_start=None) -> dict:
    """Run one probe to its end, its output into ``log_path``. ``port``: the rendezvous port for a
    known launcher (0: a free one of this machine). ``attempts_path``: a line is appended there
    per attempt (a retry after a dead worker is the second line). ``on_start(proc)`` is called with
    the process once it runs. Returns {returncode, started, ended, host, argv}."""
    env = dict(env)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    if port is not None:
        argv = with_rendezvous_port(argv, port or free_port())
    if attempts_path:
        with open(attempts_path, "a") as f:
            f.write(f"{socket.gethostname()} {os.getpid()} {time.time():.3f}\n")
    started = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None)
        if on_start is not None:
            on_start(proc)
        try:
            # polled, not one blocking wait: Ray cancels a task by raising KeyboardInterrupt in its
            # thread, which lands between two bytecodes, never inside waitpid()
            while (rc := proc.poll()) is None:
                time.sleep(0.1)
        except BaseException:  # cancelled (Ray raises KeyboardInterrupt in the task): stop the probe too
            _stop(proc)
            raise
    return {"returncode": rc, "started": started, "ended": time.time(), "host": socket.gethostname(),
            "argv": argv}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the supervisor forwards it to the training and records the outcome), then SIGKILL."""
    try:
        proc.terminate()
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def ray_task(argv: list[str], cwd: str, env: dict, log_path: str, gpus: int, attempts_path: str) -> dict:
    """A probe as a Ray task: the GPUs Ray gave it (none when it asked for none), a free port of
    this node for a launcher, and the probe stops when its worker dies (Ray then retries it)."""
    import ray

    cvd = ",".join(str(i) for i in ray.get_gpu_ids()) if gpus else ""
    return run(argv, cwd, env, log_path, port=0, cuda_visible_devices=cvd, die_with_parent=True,
               attempts_path=attempts_path)


def check_worker(python: str, cwd: str, env: dict, out: str, token: str) -> dict:
    """Run on a worker before the first probe: can it run ``python`` with gradscope, and does a file
    it writes under ``out`` reach the driver (which then reads it back)?"""
    host = socket.gethostname()
    res = {"host": host, "python": python, "gradscope": None, "error": None, "wrote": None}
    if not os.path.isfile(python):
        res["error"] = f"no Python at {python}"
        return res
    try:
        p = subprocess.run([python, "-c", "import gradscope, sys; sys.stdout.write(gradscope.__file__)"],
                           cwd=cwd if os.path.isdir(cwd) else None, env=env, capture_output=True, text=True,
                           timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        res["error"] = f"{python} could not be run: {e}"
        return res
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        res["error"] = f"{python} cannot import gradscope ({last})"
        return res
    res["gradscope"] = p.stdout.strip()
    path = os.path.join(out, f".gradscope-shared-{token}-{host}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            f.write(token)
        res["wrote"] = path
    except OSError as e:
        res["wrote"] = path
        res["write_error"] = str(e)
    return res
