"""`gradscope tune --executor ray` on a real Ray cluster on the loopback address (started by the
fixture with `ray start --head --block`, stopped by it: only that cluster): the probes are
bit-identical to the local executor's and the choice is the same, Ctrl-C cancels the probes in
flight and a second tune resumes from the finished ones, a probe whose worker is killed is retried
once and then reported as failed (not diverged), and a probe larger than any node stops the tune
with one line instead of waiting forever."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gsutil import gradscope as gs, script

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="finds processes in /proc")]

TASK = script("tune_task.py")
T = 30
ARGS = ["--steps", str(T), "--candidates", "0.5,2"]  # one rung: the pilot (as is) and two probes, 30 steps each
FINISHED = ("stopped", "completed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def _start_head(tmp: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    opts = ["--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", tmp, "--include-dashboard", "false",
           "--disable-usage-stats"]
    for o in opts:
        cmd += [o, str(_free_port())]
    with open(Path(tmp) / "start.log", "w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"127.0.0.1:{port}"


def _stop_head(head: subprocess.Popen) -> None:
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    for pid in _session(head.pid):  # whatever of this cluster outlived it
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU head node on 127.0.0.1, every port a free one, its own temp dir; `--block` keeps
    `ray start` in front, and its session holds the whole cluster: stopping it stops this cluster
    and no other (`ray stop` would stop every cluster on the machine). Ray gives its raylet 30 s to
    start, which a loaded machine can miss: up to three tries. Ray turns token authentication on
    when ~/.ray/auth_token exists, a file other clusters on this machine may write at any moment:
    this cluster and its drivers run without it (RAY_AUTH_MODE=disabled), on the loopback address."""
    head = None
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # inherited by `ray start` and every tune the tests start
    try:
        for _ in range(3):
            tmp = tempfile.mkdtemp(prefix="gsray", dir="/tmp")  # short: Ray's socket paths live under it
            head, address = _start_head(tmp)
            deadline = time.time() + 240
            while head.poll() is None and time.time() < deadline:
                if "Ray runtime started" in (Path(tmp) / "start.log").read_text(errors="replace"):
                    break
                time.sleep(1)
            if head.poll() is None and time.time() < deadline:
                break
            _stop_head(head)
        else:
            pytest.fail("the Ray head node did not start in 3 tries: " + (Path(tmp) / "start.log").read_text()[-2000:])
        yield address, head.pid
    finally:
        if head is not None:
            _stop_head(head)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture
def drivers():
    """The tune processes a test starts: killed at its end whatever happened (never left behind)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ray_worker(pid: int, sid: int) -> bool:
    """A Ray worker process of the test's cluster (its title is ray::...; its session the cluster's)."""
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::")
                and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3]) == sid)
    except (OSError, ValueError, IndexError):
        return False


def _probe_processes(run_dir: Path) -> list[tuple[int, int]]:
    """(pid, parent pid) of each `gradscope run --out RUN_DIR` process (the probe's supervisor,
    started by the Ray worker that runs the probe's task)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if b"--out" in argv and argv[argv.index(b"--out") + 1] == str(run_dir).encode() and b"run" in argv:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found.append((int(d.name), ppid))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _steps_without_time(run_dir: Path) -> dict[str, list[str]]:
    """Every steps file of a run, each line without its `time` column (wall-clock: differs by nature)."""
    out = {}
    for f in sorted(run_dir.glob("steps-r*.csv")):
        lines = f.read_text().splitlines()
        t = lines[0].split(",").index("time")
        out[f.name] = [",".join(c for i, c in enumerate(line.split(",")) if i != t) for line in lines]
    return out


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "meta.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def test_ray_probes_equal_the_local_ones_and_a_ctrl_c_tune_resumes(cluster, drivers, tmp_path):
    cluster, _ = cluster
    """Local (--jobs 2) and Ray tunes of the same seeded script: the same run directories, each
    probe's steps file identical line for line but for the time column, the same choice. The Ray
    tune is interrupted with SIGINT (Ctrl-C) once the pilot has finished and the probes run: the
    probes in flight are stopped (no probe process is left), and the second tune reuses the pilot
    untouched and runs the probes again."""
    local = tmp_path / "local"
    res = gs("tune", *ARGS, "--jobs", "2", "--out", local, "--json", TASK, "--steps", str(T), cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    jl = json.loads(res.stdout)
    assert jl["executor"] == "local" and jl["parallelism"] == 2 and jl["wall_seconds"] > 0

    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "gradscope", "tune", "--executor", "ray", "--ray-address", cluster, *ARGS,
           "--out", str(out), "--json", TASK, "--steps", str(T)]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drivers.append(driver)
    deadline = time.time() + 600
    finished: list[Path] = []
    while time.time() < deadline and driver.poll() is None:
        finished = [out / "pilot"] if _status(out / "pilot") in FINISHED else []
        if finished and any(_probe_processes(d) for d in out.glob("probe-*")):
            break
        time.sleep(0.2)
    assert finished and driver.poll() is None, "the tune ended before it could be interrupted"
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)  # not the probes' own time: they are stopped
    assert driver.returncode in (130, -signal.SIGINT), err  # as Ctrl-C ends a program
    assert "Traceback" not in err
    time.sleep(2)
    left = [p for d in out.glob("probe-*") for p in _probe_processes(d)]
    assert not left, f"probe processes still running after Ctrl-C: {left}"
    interrupted = [d for d in out.glob("probe-*") if _status(d) not in ("stopped", "completed")]
    assert interrupted
    mtimes = {d: (d / "steps-r0.csv").stat().st_mtime_ns for d in finished}

    res = gs("tune", "--executor", "ray", "--ray-address", cluster, *ARGS, "--out", out, "--json", TASK,
             "--steps", str(T), cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    jr = json.loads(res.stdout)
    for d, m in mtimes.items():
        assert (d / "steps-r0.csv").stat().st_mtime_ns == m and f"reusing {d.name}" in res.stderr
    for d in interrupted:
        assert f"reusing {d.name}" not in res.stderr and _status(d) in FINISHED  # run again, to its end

    assert jr["recommended_clip_norm"] == jl["recommended_clip_norm"] is not None
    assert jr["executor"] == "ray" and 1 <= jr["parallelism"] <= 2 and jr["wall_seconds"] > 0
    assert jr["steps_reused"] >= sum(len(_steps_without_time(d)["steps-r0.csv"]) - 1 for d in finished)
    dirs = sorted(d.name for d in local.iterdir() if (d / "meta.json").is_file())
    assert dirs == sorted(d.name for d in out.iterdir() if (d / "meta.json").is_file()) and len(dirs) == 3
    for name in dirs:
        a, b = _steps_without_time(local / name), _steps_without_time(out / name)
        assert a == b and len(a["steps-r0.csv"]) > 1, name
    def strip(j):
        return [{k: v for k, v in c.items() if k != "probes"} for c in j["candidates"]]
    assert strip(jr) == strip(jl)


SLOW_TASK = """\
import time, runpy, sys
time.sleep(2)  # time to find the probe's process (and kill its worker) before it ends
sys.argv = [{task!r}] + sys.argv[1:]
import torch
_step = torch.optim.SGD.step
def step(self, *a, **k):
    time.sleep(0.1)
    return _step(self, *a, **k)
torch.optim.SGD.step = step
runpy.run_path({task!r}, run_name="__main__")
"""


def test_a_probe_whose_worker_dies_is_retried_once_then_reported_failed(cluster, drivers, tmp_path):
    cluster, sid = cluster
    """SIGKILL the Ray worker running the pilot once: Ray runs it again and the tune goes on. SIGKILL
    the worker of the probe of 2 twice (the first run and its retry): that probe is reported as
    failed, with why, not as diverged; the tune chooses among the others. No probe process of a
    killed worker runs on."""
    slow = tmp_path / "slow_task.py"
    slow.write_text(SLOW_TASK.format(task=TASK))
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "gradscope", "tune", "--executor", "ray", "--ray-address", cluster, *ARGS,
           "--out", str(out), "--json", str(slow), "--steps", str(T)]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drivers.append(driver)
    killed: dict[str, list[int]] = {"pilot": [], "probe-tau2-n30": []}
    want = {"pilot": 1, "probe-tau2-n30": 2}
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and any(len(killed[k]) < want[k] for k in want):
        for name in want:
            if len(killed[name]) >= want[name]:
                continue
            for pid, worker in _probe_processes(out / name):
                if worker not in killed[name] and _ray_worker(worker, sid):
                    time.sleep(0.5)  # mid-probe: it has started
                    os.kill(worker, signal.SIGKILL)
                    killed[name].append(worker)
                    break
        time.sleep(0.1)
    got, err = driver.communicate(timeout=900)
    assert {k: len(v) for k, v in killed.items()} == want, err
    assert driver.returncode == 0, err
    j = json.loads(got)
    assert "pilot: its Ray worker died; retried once, and the retry finished" in err
    assert _status(out / "pilot") in FINISHED
    two = next(c for c in j["candidates"] if c["clip_norm"] == 2.0)
    assert two["diverged"] is False and two["failed"] and not two["chosen"]
    probe = next(p for p in two["probes"] if p["run_dir"].endswith("probe-tau2-n30"))
    assert probe["status"] == "failed" and "worker died" in probe["failure"] and "2 attempts" in probe["failure"]
    assert "probe-tau2-n30 failed: its Ray worker died" in err
    assert not _probe_processes(out / "probe-tau2-n30")  # the killed workers' probes did not run on
    assert j["recommended_clip_norm"] is not None or j["choice"] == "as-is"


def test_a_probe_larger_than_any_node_stops_with_one_line(cluster, tmp_path):
    cluster, _ = cluster
    for opt, n in (("--gpus-per-probe", "1"), ("--cpus-per-probe", "3")):
        t0 = time.time()
        res = gs("tune", "--executor", "ray", "--ray-address", cluster, opt, n, "--out", tmp_path / "t", TASK,
                 cwd=tmp_path, timeout=300)
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.startswith("gradscope: ")]
        assert len(lines) == 1 and "no node of the Ray cluster at " + cluster in lines[0], res.stderr
        assert "its nodes have 2 CPUs and 0 GPUs" in lines[0] and "Traceback" not in res.stderr
        assert not (tmp_path / "t" / "pilot").exists()  # nothing ran
        assert time.time() - t0 < 280
