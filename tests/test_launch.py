"""`gradscope run` behaves like `python train.py`: same view for the script, same exit
status, and the run directory survives exits, exceptions and signals."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gradscope
from gsutil import gradscope as gs, python, script

PROBE = """\
import json, sys
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "name": __name__, "file": __file__,
                  "spec": getattr(__spec__, "name", None), "package": __package__,
                  "gradscope_on_path": any("_bootstrap" in p for p in sys.path)}))
"""


def _json_line(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def test_script_sees_what_plain_python_shows_it(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    plain = python("probe.py", "--help", "-x", "a b", cwd=tmp_path)
    rec = gs("run", "--out", "r", "probe.py", "--help", "-x", "a b", cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    seen = _json_line(rec.stdout)
    assert seen == _json_line(plain.stdout)
    assert seen["argv"] == ["probe.py", "--help", "-x", "a b"] and seen["name"] == "__main__"
    assert not seen["gradscope_on_path"]


def test_module_sees_what_python_dash_m_shows_it(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(PROBE)
    plain = python("-m", "mypkg.train", "--config", "c.yaml", cwd=tmp_path)
    rec = gs("run", "--out", "r", "-m", "mypkg.train", "--config", "c.yaml", cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    assert _json_line(rec.stdout) == _json_line(plain.stdout)
    assert _json_line(rec.stdout)["spec"] == "mypkg.train"


def test_sys_exit_status_passes_through_and_data_is_kept(tmp_path):
    res = gs("run", "--out", "r", script("tiny_train.py"), "--steps", "7", "--exit", "3", cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    run = gradscope.load_run(tmp_path / "r")
    assert len(run.steps) == 7
    assert run.meta["status"] == "failed" and run.meta["exit_code"] == 3


def test_uncaught_exception_prints_the_users_traceback_and_exits_1(tmp_path):
    res = gs("run", "--out", "r", script("tiny_train.py"), "--steps", "9", "--raise-at", "4", cwd=tmp_path)
    assert res.returncode == 1
    tb = res.stderr[res.stderr.index("Traceback"):]
    assert "tiny_train.py" in tb and "RuntimeError: boom at step 4" in tb
    # No frame of the gradscope package in the user's traceback. Judged by the package's own
    # directory, not by the text "gradscope/": the checkout itself may be called gradscope.
    package = os.path.realpath(os.path.dirname(gradscope.__file__)) + os.sep
    frames = re.findall(r'^  File "([^"]+)"', tb, flags=re.M)
    assert frames and any(f.endswith("tiny_train.py") for f in frames)
    assert [f for f in frames if os.path.realpath(f).startswith(package)] == []
    run = gradscope.load_run(tmp_path / "r")
    assert len(run.steps) == 4 and run.meta["status"] == "failed" and run.meta["exit_code"] == 1


def _start(tmp_path, *extra, steps=100000):
    progress = tmp_path / "progress"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradscope", "run", "--out", str(tmp_path / "r"), "--flush-steps", "5",
         "--flush-seconds", "0.2", script("tiny_train.py"), "--steps", str(steps), "--sleep", "0.02",
         "--progress", str(progress), *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 15:
            return proc, progress
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not start: " + proc.communicate()[1])


def _child_pid(parent: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return int(children[0])


def test_ctrl_c_behaves_as_plain_python(tmp_path):
    proc, progress = _start(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "interrupted" and run.meta["signal"] == "SIGINT"
    # flushed at exit: every step the script finished is there
    assert len(run.steps) >= int(progress.read_text()) + 1


def test_sigterm_flushes_then_terminates_like_sigterm(tmp_path):
    proc, progress = _start(tmp_path)
    proc.send_signal(signal.SIGTERM)  # to gradscope only, as a job scheduler would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "killed" and run.meta["signal"] == "SIGTERM"
    assert len(run.steps) >= int(progress.read_text()) + 1
    assert run.meta["processes"][0]["status"] == "killed"


def test_sigkill_of_the_training_process_keeps_all_but_the_last_flush(tmp_path):
    proc, progress = _start(tmp_path)
    done_before = int(progress.read_text())
    os.kill(_child_pid(proc.pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "killed" and run.meta["signal"] == "SIGKILL"
    assert len(run.steps) >= done_before + 1 - 5  # at most one flush interval (5 steps) lost
    assert list(run.steps["step"]) == list(range(len(run.steps)))


def test_sigkill_of_everything_still_loads_and_says_killed(tmp_path):
    proc, progress = _start(tmp_path)
    done_before = int(progress.read_text())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "killed" and run.meta.get("status_inferred")
    assert len(run.steps) >= done_before + 1 - 5


@pytest.mark.parametrize("args, message", [
    (["missing.py"], "script 'missing.py' not found"),
    (["bad.py"], "syntax error at bad.py:2"),
    (["-m", "no_such_pkg.train"], "module 'no_such_pkg.train' cannot be found"),
    (["no-such-launcher", "x"], "command 'no-such-launcher' not found"),
    ([], "nothing to run"),
])
def test_bad_target_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "bad.py").write_text("x = 1\ndef f(:\n")
    res = gs("run", "--out", "r", *args, cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing launched, nothing written


def test_existing_run_dir_needs_force_and_force_keeps_foreign_files(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    res = gs("run", "--out", "r", script("tiny_train.py"), "--steps", "2", cwd=tmp_path)
    assert res.returncode == 2 and "--force" in res.stderr
    res = gs("run", "--out", "r", "--force", script("tiny_train.py"), "--steps", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert len(gradscope.load_run(tmp_path / "r").steps) == 2


def test_default_run_dir_is_named_after_the_script(tmp_path):
    res = gs("run", script("tiny_train.py"), "--steps", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "gradscope_runs").iterdir()
    assert run_dir.name.endswith("-tiny_train") and len(run_dir.name) == len("20261123-101500-tiny_train")
    assert len(gradscope.load_run(run_dir).steps) == 2


def test_a_launcher_command_is_recorded_through_its_python_child(tmp_path):
    res = gs("run", "--out", "r", "--", sys.executable, script("tiny_train.py"), "--steps", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = gradscope.load_run(tmp_path / "r")
    assert len(run.steps) == 3 and run.meta["target"] == "command"
