"""Faults never cost the user's training or pass as a complete run (issue 26, items 1-6).

Each test makes the fault happen for real: a full tmpfs or a write that fails with ENOSPC
inside a real training, real concurrent `gradscope run`s, a real SIGKILL of the supervisor
and of the training, real damaged files; and each fails on the code before the fix.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope import rundir
from gradscope.errors import GradscopeError
from gsutil import gradscope as _gs, python, script


def gs(*args, **kw):
    kw.setdefault("timeout", 600)  # a shared, busy machine: generous, never a timing assertion
    return _gs(*args, **kw)


TINY = script("tiny_train.py")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its new parent) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _child_pid(parent: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no child process")


def _start(tmp_path, *extra, out=None, target=(TINY,), steps=100000, min_progress=15):
    """`gradscope run` of a long training in its own session; returns once it took min_progress steps."""
    progress = tmp_path / "progress"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradscope", "run", "--out", str(out or tmp_path / "r"), "--flush-steps", "5",
         "--flush-seconds", "0.2", *extra, *target, "--steps", str(steps), "--sleep", "0.02",
         "--progress", str(progress)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= min_progress:
            return proc, progress
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not start: " + proc.communicate()[1])


def _check(run, *args):
    return gs("check", run, *args)


# ----------------------------------------------------------------------------- 1. a full disk


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _full_disk_outcome(tmp_path, res, run_dir):
    """What a full disk may and may not do to `gradscope run` (item 1)."""
    assert res.returncode == 0, res.stderr  # the script's own status
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert res.stderr.count("recording stopped, the training goes on") == 1, res.stderr
    assert "No space left on device" in res.stderr
    # the training finished, and as without gradscope: bit-identical weights
    plain = python(TINY, "--steps", "200", "--save", tmp_path / "plain.pt", timeout=600)
    assert plain.returncode == 0, plain.stderr
    a, b = torch.load(tmp_path / "rec.pt"), torch.load(tmp_path / "plain.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["exit_code"] == 0  # not left 'running'
    assert [f.name for f in run_dir.iterdir() if f.name.endswith(".tmp")] == []
    proc = json.loads((run_dir / "process-r0.json").read_text())
    assert "No space left on device" in proc["recording_error"] and proc["closed"] is False
    # never a PASS: check fails on it, and says so first
    chk = _check(run_dir)
    assert chk.returncode == 1, chk.stdout + chk.stderr
    first = chk.stdout.splitlines()[0]
    assert first.startswith("FAIL incomplete:") and "stopped recording" in first and "No space left" in first
    assert "  incomplete recording: rank 0 stopped recording" in res.stderr  # the run's own summary
    if len(gradscope.load_run(run_dir).steps) >= 50:  # enough steps for a recommendation
        rec = gs("recommend", run_dir)
        assert rec.stdout.splitlines()[0].startswith("gradscope: incomplete recording: rank 0 stopped recording")


@pytest.mark.slow  # real trainings in subprocesses
def test_full_tmpfs_stops_the_recording_not_the_training(tmp_path):
    """A 32 KB tmpfs fills up mid-run: the training still finishes, exit 0, the run is incomplete."""
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "32k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the /dev/full variant covers this")
    try:
        res = gs("run", "--out", mnt / "r", "--flush-steps", "5", TINY, "--steps", "200",
                 "--save", tmp_path / "rec.pt", cwd=tmp_path, timeout=600)
        steps = len(gradscope.load_run(mnt / "r").steps)
        assert 0 < steps < 200  # it really ran out of space part-way
        _full_disk_outcome(tmp_path, res, mnt / "r")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


FILL_UP = """
import os, runpy, sys
# The run directory's layers file becomes /dev/full before the first flush: every write to it
# fails with ENOSPC, as on a full disk, inside the real training below.
os.symlink("/dev/full", os.path.join(os.environ["GRADSCOPE_RUN_DIR"], "layers-r0-o0.csv"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # real trainings in subprocesses
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_enospc_in_a_flush_never_reaches_the_script(tmp_path):
    """Any OSError in a flush (here ENOSPC from /dev/full): no traceback, the script's status, incomplete."""
    (tmp_path / "fill_up.py").write_text(FILL_UP)
    res = gs("run", "--out", tmp_path / "r", "--flush-steps", "5", tmp_path / "fill_up.py", TINY, "--steps", "200",
             "--save", tmp_path / "rec.pt", cwd=tmp_path, timeout=600)
    _full_disk_outcome(tmp_path, res, tmp_path / "r")


def test_a_failed_json_write_leaves_no_tmp_file(tmp_path):
    with pytest.raises(OSError):
        rundir.write_json_atomic(tmp_path / "missing-dir" / "x.json", {"a": 1})
    target = tmp_path / "x.json"
    os.symlink("/dev/full", tmp_path / f"x.json.{os.getpid()}.tmp")  # the temporary file cannot be written
    if os.path.exists("/dev/full"):
        rundir.write_json_atomic(target, {"a": 1}, in_place_fallback=True)  # written in place instead
        assert json.loads(target.read_text()) == {"a": 1}
        assert not os.path.lexists(tmp_path / f"x.json.{os.getpid()}.tmp")


# ----------------------------------------------------------------------------- 2. one --out, two runs


def _claim(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        rundir.prepare_run_dir(path)
        results.put("won")
    except GradscopeError as e:
        results.put(f"lost:{e.exit_code}")


def test_prepare_run_dir_is_claimed_by_exactly_one_of_many_racing_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(25):
        out = str(tmp_path / f"r{round_}")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(out, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = sorted(results.get(timeout=10) for _ in procs)
        assert got == ["lost:2"] * 5 + ["won"], (round_, got)


NOOP = "import sys\nprint('trained', sys.argv[1:])\n"


@pytest.mark.slow
def test_two_gradscope_runs_into_one_out_exactly_one_wins(tmp_path):
    """Real concurrent `gradscope run`s, started back to back: one records, the other fails with one line."""
    (tmp_path / "noop.py").write_text(NOOP)
    for round_ in range(8):
        out = tmp_path / f"r{round_}"
        cmd = [sys.executable, "-m", "gradscope", "run", "--quiet", "--out", str(out), "noop.py"]
        procs = [subprocess.Popen(cmd + [str(i)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(2)]
        done = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        codes = sorted(d[2] for d in done)
        assert codes == [0, 2], (round_, done)
        loser = next(d for d in done if d[2] == 2)
        assert len(loser[1].strip().splitlines()) == 1 and "choose another --out" in loser[1], loser
        assert "trained" not in loser[0]  # its script never started
        meta = json.loads((out / "meta.json").read_text())
        winner = next(i for i, d in enumerate(done) if d[2] == 0)
        assert meta["command"][-1] == str(winner) and meta["status"] == "completed"


def test_ranks_agree_only_when_ranks_were_compared(tmp_path):
    """Two processes that both recorded as rank 0 (rank 0 and 1000) were never compared: no 'agree'."""
    from test_recommend_cli import norms, write_run

    from gradscope.analysis import analyze

    write_run(tmp_path / "mixed", norms(300, seed=1), rank=0)
    write_run(tmp_path / "mixed", norms(300, seed=2), rank=1000)
    notes = analyze(gradscope.load_run(tmp_path / "mixed")).notes
    assert not any("agree" in n for n in notes)
    assert any("were not compared" in n for n in notes)
    write_run(tmp_path / "ddp", norms(300, seed=1), rank=0)
    write_run(tmp_path / "ddp", norms(300, seed=1), rank=1)
    notes = analyze(gradscope.load_run(tmp_path / "ddp")).notes
    assert any("2 ranks agree within 0.0001 (relative) on the 300 steps they share" in n for n in notes)


# ----------------------------------------------------------------------------- 3. --force


USER_FILES = {
    "data.tmp": "user data", "checkpoint.ckpt.tmp": "weights", "steps-rX.csv": "mine",
    "layers-r-final.csv": "mine", "process-results.json": "{}", "notes.txt": "mine",
}


@pytest.mark.slow  # real trainings in subprocesses
def test_force_removes_only_the_files_the_previous_run_names(tmp_path):
    r = gs("run", "--quiet", "--out", "r", TINY, "--steps", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "r"
    old_id = json.loads((d / "meta.json").read_text())["run_id"]
    for name, text in USER_FILES.items():
        (d / name).write_text(text)
    r = gs("run", "--quiet", "--out", "r", "--force", TINY, "--steps", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name, text in USER_FILES.items():
        assert (d / name).read_text() == text, name
    run = gradscope.load_run(d)
    assert len(run.steps) == 4 and run.meta["run_id"] != old_id and run.meta["incomplete"] == []
    assert run.meta["processes"][0]["run_id"] == run.meta["run_id"]


@pytest.mark.parametrize("name, text", [
    ("process-r9.json", '{"results": [1, 2]}'),
    ("steps-r3.csv", "my own table\n"),
])
@pytest.mark.slow  # real trainings in subprocesses
def test_force_refuses_a_file_named_like_gradscope_s_that_no_record_claims(tmp_path, name, text):
    assert gs("run", "--quiet", "--out", "r", TINY, "--steps", "3", cwd=tmp_path).returncode == 0
    d = tmp_path / "r"
    (d / name).write_text(text)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    r = gs("run", "--quiet", "--out", "r", "--force", TINY, "--steps", "4", cwd=tmp_path)
    assert r.returncode == 2 and name in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before  # nothing removed, nothing written


@pytest.mark.slow  # real trainings in subprocesses
def test_force_never_overwrites_a_meta_json_that_is_not_gradscope_s(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "meta.json").write_text('{"experiment": "mine"}')
    r = gs("run", "--quiet", "--out", "r", "--force", TINY, "--steps", "2", cwd=tmp_path)
    assert r.returncode == 2 and "not a gradscope run's meta.json" in r.stderr, r.stderr
    assert (d / "meta.json").read_text() == '{"experiment": "mine"}'
    assert sorted(f.name for f in d.iterdir()) == ["meta.json"]


@pytest.mark.slow  # real trainings in subprocesses
def test_force_refuses_a_run_still_recording(tmp_path):
    proc, _ = _start(tmp_path)
    try:
        r = gs("run", "--quiet", "--out", "r", "--force", TINY, "--steps", "2", cwd=tmp_path)
        assert r.returncode == 2 and "is in use" in r.stderr, r.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)


# ----------------------------------------------------------------------------- 4. the supervisor killed


@pytest.mark.slow  # real trainings in subprocesses
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_supervisor_takes_the_training_with_it(tmp_path):
    proc, progress = _start(tmp_path)
    child = _child_pid(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the supervisor only
    proc.wait(timeout=60)  # not communicate(): a surviving child would hold the pipes open
    assert _wait_dead(child, 60), "the training runs on, orphaned"
    done = int(progress.read_text())
    run = gradscope.load_run(tmp_path / "r")
    # the training's own record says how it ended: SIGTERM from its dying supervisor, flushed and closed
    assert run.meta["processes"][0]["status"] == "killed" and run.meta["processes"][0]["closed"] is True
    assert run.meta["status"] == "killed" and run.meta["status_inferred"] is True
    assert run.meta["incomplete"] == [] and len(run.steps) >= done + 1


IGNORES_TERM = """
import runpy, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a training that outlives its supervisor
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # real trainings in subprocesses
def test_watch_does_not_end_while_an_orphaned_training_goes_on(tmp_path):
    """The supervisor dies but the training survives it: watch --exit-on-end waits for the training."""
    (tmp_path / "ignores_term.py").write_text(IGNORES_TERM)
    proc, progress = _start(tmp_path, target=(str(tmp_path / "ignores_term.py"), TINY))
    child = _child_pid(proc.pid)
    watch = subprocess.Popen([sys.executable, "-m", "gradscope", "watch", "--exit-on-end", "--interval", "0.1",
                              str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)  # not communicate(): the surviving child holds the pipes open
        at = int(progress.read_text())
        deadline = time.time() + 60
        while int(progress.read_text()) < at + 20 and time.time() < deadline:  # it trains on...
            time.sleep(0.1)
        assert _alive(child) and int(progress.read_text()) >= at + 20
        assert watch.poll() is None, watch.communicate()  # ...and watch has not ended
        st, _ = rundir.run_status(json.loads((tmp_path / "r" / "meta.json").read_text()),
                                  [json.loads((tmp_path / "r" / "process-r0.json").read_text())])
        assert st == "running"
    finally:
        os.kill(child, signal.SIGKILL)
    out, err = watch.communicate(timeout=600)
    assert watch.returncode == 1, out + err  # ended with the training: killed unflushed, incomplete
    assert "FAIL incomplete: rank 0's recording was not closed" in out


# ----------------------------------------------------------------------------- 5. incomplete is never a PASS


@pytest.mark.slow  # real trainings in subprocesses
def test_kill_9_of_the_training_is_incomplete_in_every_report(tmp_path):
    proc, _ = _start(tmp_path)
    os.kill(_child_pid(proc.pid), signal.SIGKILL)
    proc.communicate(timeout=60)
    d = tmp_path / "r"
    chk = _check(d)
    assert chk.returncode == 1
    assert chk.stdout.splitlines()[0].startswith("FAIL incomplete: rank 0's recording was not closed")
    # --fail-on another rule keeps `incomplete` on (the config file has it)
    chk = _check(d, "--fail-on", "clip-bugs")
    assert chk.returncode == 1 and chk.stdout.splitlines()[0].startswith("FAIL incomplete:")
    rec = gs("recommend", d)
    assert rec.stdout.splitlines()[0].startswith("gradscope: incomplete recording: rank 0's recording was not closed")
    rec_json = json.loads(gs("recommend", d, "--json").stdout)
    assert rec_json["notes"][0].startswith("incomplete recording:")
    plot = gs("plot", d, "-o", tmp_path / "p.png")
    assert plot.returncode == 0 and plot.stdout.splitlines()[0].startswith("gradscope: incomplete recording:")
    cmp = gs("compare", d, d, "--no-plot")
    assert cmp.stdout.splitlines()[0].startswith(f"gradscope: {d}: incomplete recording:")
    watch = gs("watch", "--exit-on-end", d)
    assert watch.returncode == 1 and "FAIL incomplete:" in watch.stdout


OS_EXIT = """
import os, runpy, sys
import torch
n = 0
def after_step(opt, args, kwargs):  # os._exit(0) right after step 250: no atexit, no final flush
    global n
    n += 1
    if n == 250:
        os._exit(0)
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(after_step)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One complete real recording (300 steps, layer table every step) to damage in copies."""
    d = tmp_path_factory.mktemp("rec")
    r = gs("run", "--quiet", "--out", d / "r", "--flush-steps", "7", TINY, "--steps", "300", cwd=d, timeout=600)
    assert r.returncode == 0, r.stderr
    assert gradscope.load_run(d / "r").meta["incomplete"] == []
    return d / "r"


def _copy(recorded, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(recorded, d)
    return d


@pytest.mark.slow  # real trainings in subprocesses
def test_a_complete_recording_passes_incomplete(recorded):
    chk = _check(recorded)
    assert chk.returncode == 0, chk.stdout
    assert chk.stdout.splitlines()[0] == "PASS incomplete: the recording is complete (every recording process closed it)"


@pytest.mark.slow  # real trainings in subprocesses
def test_os_exit_mid_run_is_incomplete_though_meta_says_completed(tmp_path):
    (tmp_path / "os_exit.py").write_text(OS_EXIT)
    r = gs("run", "--quiet", "--out", "r", "--flush-steps", "7", "os_exit.py", TINY, "--steps", "400",
           cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "completed" and len(run.steps) <= 250
    chk = _check(tmp_path / "r")
    assert chk.returncode == 1 and chk.stdout.splitlines()[0].startswith("FAIL incomplete: rank 0's recording was not closed")


@pytest.mark.slow  # real trainings in subprocesses
def test_a_layers_file_cut_mid_file_is_incomplete(recorded, tmp_path):
    d = _copy(recorded, tmp_path)
    layers = d / "layers-r0-o0.csv"
    data = layers.read_bytes()
    layers.write_bytes(data[: len(data) // 2])  # cut mid-line, as a copy or a disk might
    kept = len(data[: len(data) // 2].splitlines()) - 2  # the header and the partial line are not rows
    chk = _check(d)
    assert chk.returncode == 1
    assert chk.stdout.splitlines()[0] == f"FAIL incomplete: layers-r0-o0.csv holds {kept} of the 300 rows rank 0 wrote (the file was cut)"


@pytest.mark.parametrize("damage, said", [
    ("delete", "process-r0.json is missing"),
    ("garbage", "process-r0.json cannot be read"),
])
@pytest.mark.slow  # real trainings in subprocesses
def test_a_missing_or_unreadable_process_file_fails_clip_bugs_too(recorded, tmp_path, damage, said):
    d = _copy(recorded, tmp_path)
    if damage == "delete":
        (d / "process-r0.json").unlink()
    else:
        (d / "process-r0.json").write_text('{"rank": 0, "optim')
    for args in ((), ("--fail-on", "clip-bugs")):
        chk = _check(d, *args)
        assert chk.returncode == 1, (args, chk.stdout)
        assert chk.stdout.splitlines()[0].startswith(f"FAIL incomplete: {said}")


@pytest.mark.slow  # real trainings in subprocesses
def test_a_config_without_incomplete_turns_it_off(recorded, tmp_path):
    d = _copy(recorded, tmp_path)
    (d / "process-r0.json").unlink()
    (tmp_path / "check.yaml").write_text("fail_on: []\n")
    chk = _check(d, "--config", tmp_path / "check.yaml")
    assert chk.returncode == 0 and "incomplete" not in chk.stdout.splitlines()[0]


def test_recording_gaps_rule():
    closed = {"rank": 0, "closed": True, "status": "completed", "optimizers": [
        {"id": 0, "layers_file": "layers-r0-o0.csv", "layer_rows": 10}]}
    meta = {"format": "gradscope-run", "gradscope_version": "x", "status": "completed"}
    assert rundir.recording_gaps(meta, [closed], [0], (), {"layers-r0-o0.csv": 10}) == []
    assert rundir.recording_gaps(meta, [closed], [0], (), {"layers-r0-o0.csv": 9}) == [
        "layers-r0-o0.csv holds 9 of the 10 rows rank 0 wrote (the file was cut)"]
    assert rundir.recording_gaps(meta, [closed], [0, 1], (), None) == [
        "process-r1.json is missing: rank 1's optimizers, clip calls and clip audit are unknown"]
    assert rundir.recording_gaps(None, [closed], [0], (), None) == ["meta.json is missing"]
    old = {"rank": 0, "ended": "2026-01-01T00:00:00", "status": "completed"}  # before "closed" existed
    assert rundir.recording_gaps(meta, [old], [0], (), None) == []
    # a table written by hand (no process file, no recorder's meta): nothing says what it should hold
    assert rundir.recording_gaps({"format": "gradscope-run", "status": "completed"}, [], [0], (), None) == []


# ----------------------------------------------------------------------------- 6. watch


def _watch(d, timeout=600):
    return gs("watch", "--exit-on-end", "--interval", "0.1", d, timeout=timeout)


@pytest.mark.slow  # real trainings in subprocesses
@pytest.mark.parametrize("damage", ["unparseable", "unreadable"])
def test_watch_ends_with_exit_2_on_a_damaged_meta_json(recorded, tmp_path, damage):
    d = _copy(recorded, tmp_path)
    if damage == "unparseable":
        (d / "meta.json").write_text('{"status": "runn')
    else:  # a directory in its place: reading it fails (root reads any file, whatever its mode)
        (d / "meta.json").unlink()
        (d / "meta.json").mkdir()
    res = _watch(d)
    assert res.returncode == 2 and "meta.json" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _check(d).returncode == 2


@pytest.mark.slow  # real trainings in subprocesses
def test_watch_ends_when_meta_json_is_missing(recorded, tmp_path):
    d = _copy(recorded, tmp_path)
    (d / "meta.json").unlink()
    res = _watch(d)
    assert res.returncode == 1 and "FAIL incomplete: meta.json is missing" in res.stdout, res.stdout + res.stderr
    assert _check(d).returncode == 1


@pytest.mark.slow  # real trainings in subprocesses
@pytest.mark.parametrize("damage", ["damaged", "unreadable"])
def test_watch_exits_2_on_a_bad_steps_file_like_check(recorded, tmp_path, damage):
    d = _copy(recorded, tmp_path)
    steps = d / "steps-r0.csv"
    if damage == "damaged":
        lines = steps.read_text().splitlines(keepends=True)
        lines[40] = "0,39,1.2,oops,\"unterminated\n"
        steps.write_text("".join(lines))
    else:
        steps.unlink()
        steps.mkdir()
    res = _watch(d)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "internal error" not in res.stderr and "steps-r0.csv" in res.stderr
    assert _check(d).returncode == 2
