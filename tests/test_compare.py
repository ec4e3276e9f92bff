"""`gradscope compare`, and many runs per call for `check` and `recommend` (finding runs in trees)."""
from __future__ import annotations

import csv
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from gradscope.cli import main
from gradscope.importers.discover import find_inputs

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([*map(str, args)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def csv_rows(run: Path) -> list[dict]:
    with open(run / "steps-r0.csv") as f:
        return list(csv.DictReader(f))


def hf_log(path: Path, n: int = 40, step0: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    log = {"global_step": n, "max_steps": n, "logging_steps": 1,
           "log_history": [{"step": s, "loss": 2.0 - s / 100, "grad_norm": 1.0 + (s % 5) / 10,
                            "learning_rate": 1e-4, "epoch": s / n} for s in range(step0, n + 1)]}
    (path / "trainer_state.json").write_text(json.dumps(log))
    return path


# ---------------------------------------------------------------- compare


def test_compare_json_figures_match_the_csv_and_the_analyzer(capsys, tmp_path):
    runs = [SAMPLES / "healthy_transformer", SAMPLES / "lstm_nan", SAMPLES / "amp_fp16_skipped"]
    code, out, err = cli(capsys, "compare", *runs, "-o", tmp_path / "c.png")
    assert code == 0, err
    assert (tmp_path / "c.png").stat().st_size > 10_000
    code, out, _ = cli(capsys, "compare", *runs, "--json", "--no-plot")
    doc = json.loads(out)
    by = {Path(r["run"]).name: r for r in doc["runs"]}
    for run in runs:
        rows = csv_rows(run)
        got = by[run.name]
        assert got["steps"] == len(rows)
        loss = [float(r["loss"]) for r in rows]
        k = math.ceil(0.1 * len(loss))
        tail = loss[-k:]
        if all(math.isfinite(x) for x in tail):
            assert got["final_loss"] == pytest.approx(sum(tail) / k, rel=1e-12)
        else:
            assert got["final_loss"] in ("inf", "nan")
        bad = sum(1 for r in rows if not math.isfinite(float(r["loss"]))
                  or (not math.isfinite(float(r["grad_norm"])) and r["skipped"] == "0"))
        assert got["non_finite_steps"] == bad
        assert got["skipped_steps"] == sum(r["skipped"] == "1" for r in rows)
        # the analyzer's own figures, as `recommend --json` reports them
        _, rec, _ = cli(capsys, "recommend", run, "--json")
        rec = json.loads(rec)
        assert got["grad_norm"] == rec["percentiles"]
        assert got["clip_fraction"] == rec["clip_fraction"] and got["situation"] == rec["situation"]
        assert got["mean_multiplier"] == rec["mean_multiplier"]
    # the healthy run clips at the script's 1.5: the fraction counted by hand over the steady state
    h = by["healthy_transformer"]
    rec = json.loads(cli(capsys, "recommend", SAMPLES / "healthy_transformer", "--json")[1])
    g = np.array([float(r["grad_norm"]) for r in csv_rows(SAMPLES / "healthy_transformer")])[rec["warmup_steps"]:]
    assert h["clip_norm"] == 1.5 and h["clip_fraction"] == pytest.approx(float(np.mean(g > 1.5)))
    assert h["grad_norm"]["p50"] == pytest.approx(float(np.median(g)), rel=1e-6)
    assert by["lstm_nan"]["situation"] == "blew-up"


def test_compare_table_lists_each_run_and_a_foreign_log(capsys, tmp_path):
    log = hf_log(tmp_path / "hf")
    code, out, _ = cli(capsys, "compare", SAMPLES / "healthy_transformer", log, "--no-plot")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["run", "steps", "p50", "p90"]
    row = next(line for line in lines if line.startswith(str(log)))
    assert row.split()[1] == "40"
    assert any(line.startswith(str(SAMPLES / "healthy_transformer")) and " 300 " in line for line in lines)


def test_compare_reads_every_run_of_a_directory_of_probes(capsys, tmp_path):
    """`gradscope tune` leaves ordinary run directories under one folder: compare DIR reads each."""
    probes = tmp_path / "tune"
    for name in ("pilot", "probe-clip0.5", "probe-clip2"):
        shutil.copytree(SAMPLES / "lstm_never_clips", probes / name)
    (probes / "tune.json").write_text("{}")
    code, out, _ = cli(capsys, "compare", probes, "--json", "--no-plot")
    assert code == 0
    assert [Path(r["run"]).name for r in json.loads(out)["runs"]] == ["pilot", "probe-clip0.5", "probe-clip2"]


def test_compare_bad_input_is_exit_2(capsys, tmp_path):
    code, out, err = cli(capsys, "compare", SAMPLES / "healthy_transformer", tmp_path / "missing")
    assert code == 2 and err.startswith("gradscope: error: ") and "missing" in err
    code, _, err = cli(capsys, "compare", SAMPLES / "healthy_transformer", "-o", tmp_path / "x.gif")
    assert code == 2 and ".png" in err


# ---------------------------------------------------------------- finding runs


def test_find_inputs_walks_trees_and_collapses_checkpoints(tmp_path):
    shutil.copytree(SAMPLES / "healthy_transformer", tmp_path / "runs" / "a")
    shutil.copytree(SAMPLES / "lstm_nan", tmp_path / "runs" / "deep" / "b")
    out = tmp_path / "runs" / "hf_out"
    hf_log(out / "checkpoint-20", 20)
    hf_log(out / "checkpoint-40", 40)
    (tmp_path / "runs" / "notes.txt").write_text("not a log\n")
    (tmp_path / "runs" / ".git").mkdir()
    hf_log(tmp_path / "runs" / ".git" / "x")
    found = find_inputs([tmp_path / "runs", tmp_path / "runs" / "a"])  # a twice: listed once
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["runs/a", "runs/deep/b", "runs/hf_out"]
    assert find_inputs([SAMPLES / "lstm_nan"]) == [SAMPLES / "lstm_nan"]


# ---------------------------------------------------------------- check and recommend on many


def test_check_many_exit_status_is_the_worst_and_junit_has_a_suite_per_run(capsys, tmp_path):
    junit = tmp_path / "j.xml"
    code, out, _ = cli(capsys, "check", SAMPLES / "healthy_transformer", SAMPLES / "lstm_nan",
                       SAMPLES / "amp_fp16_skipped", "--junit", junit)
    assert code == 1
    lines = out.splitlines()
    assert f"gradscope check: {SAMPLES / 'lstm_nan'}: FAILED (non-finite)" in lines
    assert f"gradscope check: {SAMPLES / 'healthy_transformer'}: ok (2 checks)" in lines  # + incomplete (issue 26)
    assert lines[-1] == "gradscope check: 3 runs: 1 failed, 2 ok (exit 1)"
    nan_row = next(line for line in lines if line.startswith(str(SAMPLES / "lstm_nan")) and "FAILED" in line)
    assert nan_row.split()[1] == str(len(csv_rows(SAMPLES / "lstm_nan"))) and "step 31" in nan_row
    root = ET.parse(junit).getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [str(SAMPLES / n) for n in
                                               ("healthy_transformer", "lstm_nan", "amp_fp16_skipped")]
    assert [s.get("failures") for s in suites] == ["0", "1", "0"]
    assert root.get("failures") == "1" and root.get("tests") == "6"  # incomplete + non-finite per run (issue 26)
    # all pass -> 0
    assert cli(capsys, "check", SAMPLES / "healthy_transformer", SAMPLES / "lstm_never_clips")[0] == 0


def test_check_many_bad_input_in_a_tree_is_exit_2_and_the_rest_still_judged(capsys, tmp_path):
    shutil.copytree(SAMPLES / "healthy_transformer", tmp_path / "t" / "a")
    broken = tmp_path / "t" / "broken"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{not json")
    code, out, _ = cli(capsys, "check", tmp_path / "t", "--json")
    doc = json.loads(out)
    assert code == 2 and doc["exit_code"] == 2 and doc["ok"] is False
    assert doc["runs"][0]["ok"] is True and doc["runs"][0]["steps"] == 300
    assert doc["runs"][1]["run"] == str(broken) and doc["runs"][1]["exit_code"] == 2 and doc["runs"][1]["error"]


def test_one_run_given_keeps_the_single_run_output(capsys):
    code, out, _ = cli(capsys, "check", SAMPLES / "lstm_nan", "--json")
    assert code == 1 and json.loads(out)["non_finite"]["step"] == 31  # not wrapped in {"runs": ...}


def test_recommend_many_reports_each_and_a_summary(capsys, tmp_path):
    code, out, _ = cli(capsys, "recommend", SAMPLES / "lstm_always_clips", SAMPLES / "lstm_never_clips", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [r["regime"] for r in doc["runs"]] == ["always-clips", "never-clips"]
    single = json.loads(cli(capsys, "recommend", SAMPLES / "lstm_never_clips", "--json")[1])
    assert doc["runs"][1] == single
    code, out, _ = cli(capsys, "recommend", SAMPLES / "lstm_always_clips", SAMPLES / "lstm_never_clips")
    assert code == 0 and "gradscope recommend: summary" in out
    assert out.count("always-clips") >= 2 and "never-clips" in out
    code, out, _ = cli(capsys, "recommend", SAMPLES / "lstm_never_clips", tmp_path / "empty" if
                       (tmp_path / "empty").mkdir() is None else None, "--json")
    doc = json.loads(out)
    assert code == 2 and doc["runs"][1]["exit_code"] == 2 and "empty" in doc["runs"][1]["error"]
