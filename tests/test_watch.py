"""`gradscope run` says it is recording; `gradscope watch` follows a run while a real `gradscope run` writes it."""
from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradscope.analysis.config import load_config
from gradscope.analysis.live import SpikeTracker
from gradscope.follow import RunFollower
from gradscope.report.spark import sparkline
from gsutil import gradscope, script

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"
HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time\n"


def _popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradscope", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _announced(stderr: str, out: Path) -> None:
    """`gradscope run`'s own lines: recording starts (where, how to watch), the first step recorded."""
    lines = stderr.splitlines()
    assert lines[0] == f"gradscope: recording into {out}   watch it live: gradscope watch {out}"
    first = [line for line in lines if "first optimizer step recorded" in line]
    assert len(first) == 1  # once, not per step or per flush
    m = re.fullmatch(r"gradscope: first optimizer step recorded \(optimizer 0 SGD, step 0\), (\d+\.\d) s after start",
                     first[0])
    assert m and 0 < float(m.group(1)) < 120
    assert lines.index(first[0]) < lines.index("gradscope: completed (exit code 0)")


@pytest.mark.slow
def test_run_quiet_prints_no_lines_of_its_own(tmp_path):
    q = gradscope("run", "--quiet", "--out", tmp_path / "q", script("tiny_train.py"), "--steps", "3")
    assert q.returncode == 0 and q.stderr == ""


@pytest.mark.slow
def test_watch_follows_a_run_being_recorded_without_a_tty(tmp_path):
    """watch starts before the run directory exists, prints one line per update while a real
    `gradscope run` trains slowly, notices the end and exits with check's code."""
    out = tmp_path / "live"
    watch = _popen("watch", str(out), "--exit-on-end", "--interval", "0.2")
    first = watch.stdout.readline()  # watch is up and waiting before the run starts
    assert "waiting for" in first and f"{out} to appear" in first
    run = _popen("run", "--out", str(out), "--flush-seconds", "0.2", script("tiny_train.py"),
                 "--steps", "60", "--sleep", "0.05", "--clip", "2.0")
    run_out, run_err = run.communicate(timeout=180)
    rest, err = watch.communicate(timeout=60)
    text = first + rest
    assert run.returncode == 0, run_err
    assert watch.returncode == 0, err
    _announced(run_err, out)
    lines = text.splitlines()
    assert "waiting for" in lines[0]
    updates = [line for line in lines if re.search(r"\((\d+) steps", line)]
    counts = [int(re.search(r"\((\d+) steps", line).group(1)) for line in updates]
    assert len(counts) >= 3 and counts == sorted(counts) and len(set(counts)) >= 3, lines  # it really followed
    assert "running" in updates[0] and "completed" in updates[-1]
    assert counts[-1] == 60
    # the last line's figures, recomputed from the CSV the run wrote
    with open(out / "steps-r0.csv") as f:
        rows = list(csv.DictReader(f))
    g = np.array([float(r["grad_norm"]) for r in rows])[-200:]
    p50, p90, p99 = np.percentile(g, [50, 90, 99])
    assert f"p50 {p50:.4g} p90 {p90:.4g} p99 {p99:.4g} (last 60)" in updates[-1]
    assert f"grad_norm last {float(rows[-1]['grad_norm']):.4g}" in updates[-1]
    assert f"clips {np.mean(g > 2.0):.1%} at max_norm 2" in updates[-1]
    assert lines[-1] == f"gradscope check: {out}: ok (2 checks)"  # incomplete and non-finite (issue 26)


def test_watch_on_a_finished_nan_run_alerts_and_exits_1():
    r = gradscope("watch", SAMPLES / "lstm_nan", "--exit-on-end", "--interval", "0.1")
    assert r.returncode == 1
    first = r.stdout.splitlines()[0]
    with open(SAMPLES / "lstm_nan" / "steps-r0.csv") as f:
        bad = next(row for row in csv.DictReader(f)
                   if not (math.isfinite(float(row["loss"])) and math.isfinite(float(row["grad_norm"]))))
    what = " and ".join(q for q, v in (("loss", bad["loss"]), ("gradient", bad["grad_norm"]))
                        if not math.isfinite(float(v)))
    assert "completed" in first and f"ALERT non-finite {what} at step {bad['step']}" in first
    assert "✗" in first  # the sparklines mark the bad step
    assert "FAIL non-finite" in r.stdout


def test_watch_a_file_is_exit_2(tmp_path):
    f = tmp_path / "trainer_state.json"
    f.write_text("{}")
    r = gradscope("watch", f)
    assert r.returncode == 2 and r.stderr.startswith("gradscope: error:") and r.stderr.count("\n") == 1


# ---------------------------------------------------------------- the pieces


def test_follower_reads_only_complete_lines_and_starts_over_when_the_file_is_replaced(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    path = d / "steps-r0.csv"
    f = RunFollower(d)
    assert f.poll() == 0 and f.series == {}
    row = "0,{s},{g},2.0,nan,0,nan,0,nan,0.1,{t}\n"
    path.write_text(HEADER + row.format(s=0, g=1.5, t=10.0) + "0,1,2.5,2.")  # a half-written line
    assert f.poll() == 1 and list(f.series[0]["grad_norm"]) == [1.5]
    with open(path, "a") as fh:
        fh.write("0,nan,0,nan,0,nan,0.1,11.0\n" + row.format(s=2, g=3.5, t=12.0))
    assert f.poll() == 2
    assert list(f.series[0]["step"]) == [0, 1, 2] and list(f.series[0]["grad_norm"]) == [1.5, 2.5, 3.5]
    assert f.poll() == 0  # nothing new: nothing re-read
    os.replace(_write(tmp_path / "new.csv", HEADER + row.format(s=0, g=9.0, t=20.0)), path)
    assert f.poll() == 1 and f.generation == 1 and list(f.series[0]["grad_norm"]) == [9.0]


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_spike_tracker_finds_the_spike_incrementally_as_the_rule_says():
    cfg = load_config()
    rng = np.random.default_rng(0)
    g = np.exp(rng.normal(0, 0.1, 300))
    g[150] *= 20  # one step 20x its level
    step = np.arange(300)
    skipped = np.zeros(300, dtype=bool)
    whole, parts = SpikeTracker(), SpikeTracker()
    whole.update(step, g, skipped, cfg)
    for n in (50, 149, 151, 300):  # the same answer, read in pieces
        parts.update(step[:n], g[:n], skipped[:n], cfg)
    # the rule by hand for step 150: z and ratio against the previous level.window log-norms
    x = np.log(g)
    prev = x[max(0, 150 - cfg.level.window):150]
    level = np.median(prev)
    z = (x[150] - level) / max(1.4826 * np.median(np.abs(prev - level)), cfg.spikes.mad_floor)
    assert z >= cfg.spikes.z_threshold
    assert whole.count == parts.count == 1 and whole.first_step == parts.first_step == 150
    assert whole.largest[1] == pytest.approx(math.exp(x[150] - level))


def test_sparkline_scales_bins_by_their_max_and_marks_the_bad_step():
    step = np.arange(8)
    assert sparkline(step, np.array([1, 2, 3, 4, 5, 6, 7, 8.0]), width=8) == "▁▂▃▄▅▆▇█"
    assert sparkline(step, np.array([1, 1, 1, 1, 1, 1, 1, 9.0]), width=4) == "▁▁▁█"  # a one-step spike shows
    assert sparkline(step, np.array([1, 10, 100, 1000, 1, 1, np.nan, np.nan]), width=8, log=True,
                     mark_step=6) == "▁▃▆█▁▁✗ "


def test_watch_shows_clip_audit_findings_when_the_process_file_has_them(tmp_path):
    import json
    import shutil

    run = tmp_path / "r"
    shutil.copytree(SAMPLES / "healthy_transformer", run)
    proc = json.loads((run / "process-r0.json").read_text())
    proc["clip_audit"] = {"findings": [{"kind": "clip-after-step", "optimizer": 0, "first_step": 3, "count": 5}],
                          "error": None}
    (run / "process-r0.json").write_text(json.dumps(proc))
    r = gradscope("watch", run, "--exit-on-end", "--interval", "0.1")
    assert r.returncode == 0
    assert "FINDINGS clip-after-step (first at step 3, 5 steps)" in r.stdout.splitlines()[0]


def test_watch_in_a_terminal_draws_the_live_panel():
    """On a TTY watch uses rich's live display (a pseudo-terminal stands in for one)."""
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", LINES="40")
    p = subprocess.Popen([sys.executable, "-m", "gradscope", "watch", str(SAMPLES / "lstm_nan"), "--exit-on-end",
                          "--interval", "0.1"], stdout=slave, stderr=slave, stdin=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.time() + 60
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    p.wait(timeout=30)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    assert p.returncode == 1
    assert "gradscope watch" in text and "completed" in text and "╭" in text  # the panel, not plain lines
    assert "ALERT" in text and "✗" in text
    assert "FAIL non-finite" in text
