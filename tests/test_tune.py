"""`gradscope tune` on a real tiny script: the budget is respected, the diverging candidate is never
chosen, the JSON contract holds, a stopped tune resumes without re-running finished probes, and
an unseeded script is reported. Each tune starts several real `gradscope run`s: slow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gradscope
from gsutil import gradscope as gs, script

pytestmark = pytest.mark.slow
TASK = script("tune_task.py")
T = 60
ARGS = ["--steps", str(T), "--candidates", "0.5,2,8"]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and (p / "meta.json").is_file())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "t"
    # --jobs 2: the probes of a rung run in parallel processes
    res = gs("tune", *ARGS, "--jobs", "2", "--out", out, "--json", TASK, "--steps", str(T), cwd=out.parent,
             timeout=600)
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout), res


def test_json_contract(tuned):
    out, j, _ = tuned
    assert j["schema"] == "gradscope.tune/1"
    for key in ("recommended_clip_norm", "candidates", "budget_spent"):
        assert key in j
    assert isinstance(j["recommended_clip_norm"], float) and j["recommended_clip_norm"] in (0.5, 2.0, 8.0)
    assert [c["clip_norm"] for c in j["candidates"]] == [0.5, 2.0, 8.0, None]  # None: the script as is
    for c in j["candidates"]:
        assert {"clip_norm", "steps", "loss", "loss_spread", "clip_fraction", "mean_multiplier", "diverged",
                "probes"} <= c.keys()
    assert sum(c["chosen"] for c in j["candidates"]) == 1
    # the runner-up: the best other finalist that did not diverge (none here when the others all did)
    others = [c["label"] for c in j["candidates"] if not c["chosen"] and not c["diverged"] and c["steps"] == j["horizon"]]
    if others:
        assert j["runner_up_label"] in others
    else:
        assert j["runner_up_label"] is None and "did not diverge" in j["reason"]
    assert j["snippets"]["pytorch"].endswith(f"max_norm={j['recommended_clip_norm']:g})")
    assert j["total_steps"] == T and j["seeded"] is True
    # 4 candidates, T = 60: the finalists reach T from pilot 5 + 3*5 + 3*60 = 200 steps, 3.34 runs (ceiled)
    assert j["horizon"] < T and f"compared at {j['horizon']} of {T} steps" in " ".join(j["notes"])
    assert "(--budget 3.34 would reach it)" in " ".join(j["notes"])
    assert (out / "tune.png").stat().st_size > 10_000 and (out / "tune.json").is_file()


def test_budget_is_respected(tuned):
    """Counted from the run directories themselves: every optimizer step run <= B * T (B = 3,
    the pilot included), and budget_spent says the same."""
    out, j, _ = tuned
    steps = sum(len(gradscope.load_run(d).steps) for d in _run_dirs(out))
    assert steps <= 3 * T
    assert j["budget_spent"] == pytest.approx(steps / T)
    assert j["steps_spent"] == steps


def test_the_diverging_candidate_is_never_chosen(tuned):
    """Unclipped, the script is the fastest early (best loss at the first rung) and blows up after
    the learning-rate jump at 0.6 T: the tune must see that at the finalists' horizon (past the jump) and not
    take it."""
    out, j, _ = tuned
    as_is = j["candidates"][-1]
    assert as_is["diverged"] and as_is["steps"] == j["horizon"] > 0.6 * T  # a finalist, probed past the jump
    first = j["rungs"][0]
    assert None in first["kept"]  # it did look good early
    chosen = next(c for c in j["candidates"] if c["chosen"])
    assert not chosen["diverged"]
    # the chosen threshold really trains to the end without diverging
    longest = max(chosen["probes"], key=lambda p: p["steps_run"])
    s = gradscope.load_run(longest["run_dir"]).steps
    assert s["loss"].notna().all() and (s["loss"] < 1e6).all()


def test_a_candidates_clipped_share_is_the_one_compare_and_recommend_show_for_its_probe(tuned):
    """issue 23 item 5: the clip fraction tune shows for a candidate counts the steady state (the
    steps after the warm-up the analysis detects), as `compare` and `recommend` do for the probe's
    run directory; the whole run's share is another figure (the test script's learning rate
    rises at 0.6 T, so the warm-up the analysis leaves out is not empty)."""
    from gradscope.analysis import analyze

    out, j, _ = tuned
    clipped = [c for c in j["candidates"] if c["clip_norm"] is not None]
    dirs = [max(c["probes"], key=lambda p: p["steps_run"])["run_dir"] for c in clipped]
    res = gs("compare", "--json", "--no-plot", *dirs, cwd=out.parent, timeout=300)
    assert res.returncode == 0, res.stderr
    shown = [r["clip_fraction"] for r in json.loads(res.stdout)["runs"]]
    assert len(shown) == len(clipped) and None not in shown
    differs = False
    for c, d, fraction in zip(clipped, dirs, shown):
        a = analyze(gradscope.load_run(d)).optimizers[0]  # what `recommend` reports
        assert c["steps"] == len(gradscope.load_run(d).steps)  # its figures are taken over the whole probe
        assert c["clip_fraction"] == pytest.approx(fraction)  # `compare`'s
        assert c["clip_fraction"] == pytest.approx(a.verdict.clip_fraction)  # `recommend`'s
        # by hand: norms above the threshold among the steps after the analysis's warm-up
        g = gradscope.load_run(d).steps["grad_norm"].to_numpy(dtype=float)
        steady = g[a.warmup_steps:]
        assert c["clip_fraction"] == pytest.approx(np.mean(steady > c["clip_norm"]))
        differs |= a.warmup_steps > 0 and np.mean(g > c["clip_norm"]) != pytest.approx(c["clip_fraction"])
    assert differs  # the warm-up is left out of at least one probe's share, not just empty


@pytest.mark.xfail(reason="issue 22 carries recommend's threshold into the finals: on this script it is 2.4 "
                   "(rung 1 kept 19.4, as is, 2.4), which holds, so not every finalist diverges and the fallback "
                   "is not reached; the test needs a script whose recommend threshold diverges too; not run: a known "
                   "failure that costs CI 65 s", run=False, strict=False)
def test_when_every_finalist_diverges_the_best_below_them_is_taken_and_said_so(tmp_path):
    """T learned from the pilot (120 steps), budget 4: the three finalists are the largest thresholds,
    fastest at the first rung, and all blow up after the learning-rate jump; the choice falls back to
    the best first-rung candidate below the smallest of them, probed again as long as the budget
    left allows (480 - 430 = 50 steps), and the report says at which horizon it was judged (no
    note that the finalists fell short of T: they ran it)."""
    res = gs("tune", "--budget", "4", "--out", tmp_path / "t", "--json", TASK, "--steps", "120", cwd=tmp_path,
             timeout=600)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    first, last, back = j["rungs"]  # the fallback's probe is a rung of its own
    assert last["steps"] == j["total_steps"] == 120 and last["kept"] == []
    finalists = [c for c in j["candidates"] if c["steps"] == 120]
    assert len(finalists) == 3 and all(c["diverged"] for c in finalists)
    smallest = min(c["clip_norm"] for c in finalists if c["clip_norm"] is not None)
    below = [c for c in j["candidates"] if c["clip_norm"] is not None and c["clip_norm"] < smallest]
    # the best of them at the first rung, recomputed from their first probes' losses (the last fifth, >= 5 steps)
    n1 = first["steps"]
    w = max(min(5, n1), n1 // 5)
    first_loss = {c["clip_norm"]: gradscope.load_run(c["probes"][0]["run_dir"]).steps["loss"].to_numpy()[n1 - w:n1].mean()
                  for c in below}
    chosen = next(c for c in j["candidates"] if c["chosen"])
    assert chosen["clip_norm"] == min(first_loss, key=first_loss.get) == j["recommended_clip_norm"]
    assert back == {"steps": chosen["steps"], "candidates": [chosen["clip_norm"]], "kept": [chosen["clip_norm"]]}
    assert not chosen["diverged"]
    # probed again for what the budget left: 4 x 120 minus every step run before that probe
    again = chosen["probes"][-1]
    assert again["steps_run"] == chosen["steps"] == j["horizon"] == 4 * 120 - (j["steps_spent"] - again["steps_run"])
    assert n1 < chosen["steps"] < 120
    assert j["reason"] == (f"every finalist diverged by 120 steps; {chosen['label']}, the best below them, did not "
                           f"in the {chosen['steps']} steps the budget left")
    assert not any("finalists were compared" in n for n in j["notes"])
    assert j["budget_spent"] <= 4


def test_every_probe_is_an_ordinary_run(tuned):
    out, j, _ = tuned
    probe = j["candidates"][0]["probes"][0]["run_dir"]
    for cmd in (["recommend", probe, "--json"], ["check", probe]):
        res = gs(*cmd, cwd=out)
        assert res.returncode in (0, 1), res.stderr
    meta = json.loads((Path(probe) / "meta.json").read_text())
    assert meta["status"] == "stopped" and meta["clip_norm_override"] == 0.5


def test_a_stopped_tune_resumes_reusing_finished_probes(tmp_path):
    """Kill a tune (SIGTERM to its process group) once two probes have finished; run it again:
    those are not run again (their files are untouched), the rest is."""
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "gradscope", "tune", *ARGS, "--out", str(out), "--json", TASK, "--steps", str(T)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    done = []
    while time.time() < deadline and proc.poll() is None:
        done = [d for d in out.glob("probe-*") if (d / "meta.json").is_file()
                and json.loads((d / "meta.json").read_text())["status"] == "stopped"]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    assert len(done) >= 2 and proc.poll() is None, "the tune ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGTERM)  # the tune and the probe it is running
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    before = {d: (d / "steps-r0.csv").stat().st_mtime_ns for d in done}

    res = gs("tune", *ARGS, "--out", out, "--json", TASK, "--steps", str(T), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    for d, mtime in before.items():
        assert (d / "steps-r0.csv").stat().st_mtime_ns == mtime, f"{d.name} was run again"
        assert f"reusing {d.name}" in res.stderr
    reused = [p for c in j["candidates"] for p in c["probes"] if p["reused"]]
    assert {Path(p["run_dir"]) for p in reused} >= set(done)
    assert j["steps_reused"] >= sum(len(gradscope.load_run(d).steps) for d in done)
    assert j["budget_spent"] <= 3

    again = gs("tune", *ARGS, "--out", out, "--json", TASK, "--steps", str(T), cwd=tmp_path, timeout=600)
    j2 = json.loads(again.stdout)
    assert j2["steps_reused"] == j2["steps_spent"]  # a finished tune runs nothing the second time
    assert j2["recommended_clip_norm"] == j["recommended_clip_norm"]


def test_an_unseeded_script_is_reported(tmp_path):
    """The note, and `seeded` false. (The working directory also holds a folder named gradscope,
    which `python -m gradscope` would import instead of the package: the probes must not.)"""
    (tmp_path / "gradscope").mkdir()
    # 0.5, not 4: unseeded, a threshold of 4 ends with its loss above twice its start (diverged) on
    # about 1 draw in 150 of this script (2 of 300 seeds), and then nothing is chosen; 0.5 on none of 300
    res = gs("tune", "--steps", "20", "--candidates", "0.5", "--out", tmp_path / "t", "--json", TASK,
             "--steps", "20", "--unseeded", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert j["seeded"] is False
    assert any("not seeded" in n for n in j["notes"])


def test_tune_a_module_within_steps_t(tmp_path):
    """`-m module`, as `gradscope run` takes it; with --steps 20 and a script that would run 50
    steps, no run goes past 20 (the budget is 3 x 20)."""
    (tmp_path / "tinymod.py").write_text(Path(TASK).read_text())
    res = gs("tune", "--steps", "20", "--candidates", "4", "--out", tmp_path / "t", "--json", "-m", "tinymod",
             "--steps", "50", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    runs = _run_dirs(tmp_path / "t")
    assert len(runs) == 2 and all(len(gradscope.load_run(d).steps) == 20 for d in runs)
    assert j["budget_spent"] == pytest.approx(2.0)
    assert json.loads((runs[0] / "meta.json").read_text())["command"][1:3] == ["-m", "tinymod"]


def test_t_is_learned_from_a_pilot_that_runs_to_its_end(tmp_path):
    res = gs("tune", "--candidates", "4", "--out", tmp_path / "t", "--json", TASK, "--steps", "20",
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert (j["total_steps"], j["total_steps_source"]) == (20, "pilot")
    pilot = json.loads((tmp_path / "t" / "pilot" / "meta.json").read_text())
    assert (pilot["status"], pilot["max_steps"]) == ("completed", None)
    assert j["budget_spent"] == pytest.approx(2.0)  # the pilot (the as-is candidate) and one probe


def test_a_pilot_that_fails_says_why_t_is_unknown(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nraise RuntimeError('no data here')\n")
    res = gs("tune", "--out", tmp_path / "t", bad, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "cannot learn the training's length" in res.stderr and "--steps" in res.stderr
    assert "no data here" in res.stderr  # the pilot's own last line


def test_bad_tune_input_is_one_line_and_exit_2(tmp_path):
    for args in (["--candidates", "0,1", TASK], ["--candidates", "a", TASK], ["--budget", "-1", TASK],
                 ["nothere.py"]):
        res = gs("tune", "--out", tmp_path / "t", *args, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
