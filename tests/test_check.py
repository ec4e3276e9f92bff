"""`gradscope check`: exit codes, the first-bad-step message, policy rules, CI output formats."""
from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from gradscope.analysis import gate
from gradscope.cli import main
from gradscope.report import ci
from gradscope.rundir import load_run

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"
STEP_HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time\n"


def check(capsys, *args: str, env: dict | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """Run `gradscope check ARGS` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(["check", *map(str, args)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def write_run(path: Path, rows: list[tuple], layers: dict[int, list[float]] | None = None,
              names: list[str] | None = None, rank: int = 0) -> Path:
    """A run directory in the on-disk format: rows of (step, grad_norm, loss, skipped[, clip])."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.json").write_text(json.dumps({"format": "gradscope-run", "format_version": 1, "status": "completed",
                                                "optimizers": [{"id": 0, "class": "AdamW"}]}))
    lines = [STEP_HEADER]
    for i, r in enumerate(rows):
        step, g, loss, skipped = r[:4]
        clip = r[4] if len(r) > 4 else math.nan
        lines.append(f"0,{step},{g},{loss},{clip},{int(g > clip) if clip == clip else 0},nan,{int(skipped)},nan,0.001,{1000 + i}\n")
    (path / f"steps-r{rank}.csv").write_text("".join(lines))
    if layers:
        names = names or [f"layer{i}.weight" for i in range(len(next(iter(layers.values()))))]
        body = ["step," + ",".join(names) + "\n"]
        body += [f"{s}," + ",".join(str(v) for v in vals) + "\n" for s, vals in sorted(layers.items())]
        (path / f"layers-r{rank}-o0.csv").write_text("".join(body))
    return path


# ---------------------------------------------------------------- exit codes on the sample runs


def test_nan_sample_run_fails_with_exit_1(capsys):
    code, out, _ = check(capsys, SAMPLES / "lstm_nan")
    assert code == 1
    assert "FAIL non-finite" in out and "FAILED" in out


def test_nan_message_names_first_bad_step_quantity_and_layers_as_the_csv_says(capsys):
    """Read the CSV independently of gradscope's loader and compare with the message."""
    with open(SAMPLES / "lstm_nan" / "steps-r0.csv") as f:
        rows = list(csv.DictReader(f))
    bad = next(r for r in rows if not math.isfinite(float(r["loss"])) or not math.isfinite(float(r["grad_norm"])))
    quantity = []
    if not math.isfinite(float(bad["loss"])):
        quantity.append("loss")
    if not math.isfinite(float(bad["grad_norm"])):
        quantity.append("gradient")
    with open(SAMPLES / "lstm_nan" / "layers-r0-o0.csv") as f:
        lrows = list(csv.DictReader(f))
    lrow = next(r for r in lrows if r["step"] == bad["step"])
    bad_layers = [k for k, v in lrow.items() if k != "step" and not math.isfinite(float(v))]

    code, out, _ = check(capsys, SAMPLES / "lstm_nan")
    assert code == 1
    assert f"{' and '.join(quantity)} went non-finite at step {bad['step']} (optimizer 0 SGD)" in out
    assert f"({len(bad_layers)} of {len(lrow) - 1})" in out  # every layer went NaN at that step


@pytest.mark.parametrize("name", ["healthy_transformer", "lstm_never_clips", "lstm_always_clips"])
def test_finite_sample_runs_pass(capsys, name):
    code, out, _ = check(capsys, SAMPLES / name)
    assert code == 0, out
    assert "PASS non-finite" in out and ": ok (" in out


def test_gradscaler_overflow_steps_are_absorbed_not_failures(capsys):
    code, out, _ = check(capsys, SAMPLES / "amp_fp16_skipped")
    assert code == 0, out
    assert "overflow steps the loss scaler skipped" in out


@pytest.mark.parametrize("bad", ["missing", "empty_dir", "a_file.txt"])
def test_bad_input_is_exit_2_with_one_line(capsys, tmp_path, bad):
    target = tmp_path / bad
    if bad == "empty_dir":
        target.mkdir()
    elif bad.endswith(".txt"):
        target.write_text("hello\n")
    code, out, err = check(capsys, target)
    assert code == 2
    assert out == ""
    assert err.startswith("gradscope: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_unreadable_config_and_unknown_regime_are_exit_2(capsys, tmp_path):
    code, _, err = check(capsys, SAMPLES / "healthy_transformer", "--fail-on", "sometimes-clips")
    assert code == 2 and "unknown regime" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_clip_fraction: 2\n")
    code, _, err = check(capsys, SAMPLES / "healthy_transformer", "--config", cfg)
    assert code == 2 and "between 0 and 1" in err
    cfg.write_text("max_clips: 1\n")
    code, _, err = check(capsys, SAMPLES / "healthy_transformer", "--config", cfg)
    assert code == 2 and "unknown setting 'max_clips'" in err


# ---------------------------------------------------------------- the gate's logic on small runs


def test_partial_layer_failure_names_inf_layers_first(tmp_path):
    rows = [(s, 1.0, 2.0, False) for s in range(5)] + [(5, math.inf, 2.0, False), (6, math.nan, math.nan, False)]
    layers = {s: [0.5, 0.5, 0.5] for s in range(5)}
    layers[5] = [0.5, math.nan, math.inf]
    run = load_run(write_run(tmp_path / "r", rows, layers, names=["a.weight", "b.weight", "c.weight"]))
    nf = gate.find_non_finite(run)
    assert (nf.step, nf.quantity) == (5, "gradient")
    assert nf.layers == ["c.weight", "b.weight"]
    text = gate.describe_non_finite(nf)
    assert "non-finite layers: 2 of 3: c.weight, b.weight" in text and "1 more bad step" in text


def test_layers_from_a_later_step_when_the_bad_step_had_none_recorded(tmp_path):
    rows = [(s, 1.0, 2.0, False) for s in range(4)] + [(4, math.nan, 2.0, False), (5, math.nan, 2.0, False)]
    layers = {0: [1.0, 1.0], 2: [1.0, 1.0], 5: [math.nan, 1.0]}  # --layer-stride skipped step 4
    nf = gate.find_non_finite(load_run(write_run(tmp_path / "r", rows, layers)))
    assert nf.step == 4 and nf.layers_step == 5 and nf.layers == ["layer0.weight"]
    assert "at step 5 (the first with layer norms recorded)" in gate.describe_non_finite(nf)


def test_nan_loss_alone_fails_but_a_run_without_losses_does_not(tmp_path):
    rows = [(0, 1.0, 2.0, False), (1, 1.0, math.nan, False), (2, 1.0, 2.0, False)]
    nf = gate.find_non_finite(load_run(write_run(tmp_path / "a", rows)))
    assert (nf.step, nf.quantity) == (1, "loss")
    no_loss = [(s, 1.0, math.nan, False) for s in range(3)]  # nothing called backward() we saw
    assert gate.find_non_finite(load_run(write_run(tmp_path / "b", no_loss))) is None


def test_skipped_step_with_nan_loss_still_fails(tmp_path):
    rows = [(0, math.inf, 2.0, True), (1, math.nan, math.nan, True), (2, 1.0, 2.0, False)]
    nf = gate.find_non_finite(load_run(write_run(tmp_path / "r", rows)))
    assert nf.step == 1 and nf.quantity == "loss" and nf.absorbed_steps == 2


def test_rank_is_named_only_when_there_are_several(tmp_path):
    d = write_run(tmp_path / "r", [(0, 1.0, 2.0, False), (1, 1.0, 2.0, False)], rank=0)
    write_run(d, [(0, 1.0, 2.0, False), (1, math.nan, 2.0, False)], rank=1)
    nf = gate.find_non_finite(load_run(d))
    assert nf.rank == 1 and "rank 1" in gate.describe_non_finite(nf)


def test_hf_nan_filter_note_says_what_cannot_be_seen(capsys, tmp_path):
    log = {"global_step": 30, "max_steps": 30, "logging_steps": 1,
           "log_history": [{"step": s, "loss": 2.0 - s / 100, "grad_norm": 1.0 + (s % 3) / 10, "learning_rate": 1e-4,
                            "epoch": s / 30} for s in range(1, 31)]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(log))
    code, out, _ = check(capsys, tmp_path / "trainer_state.json")
    assert code == 0, out
    assert "cannot show NaN/inf losses" in out and "logging_nan_inf_filter" in out


def test_the_gate_says_blind_spots_as_flags_and_only_the_report_words_them(tmp_path):
    """Only report/ turns the importers' flags into words: the gate's verdict holds each thing the log
    cannot show as a flag (and the sampling stride), and ci.notes says it, before the other notes."""
    from gradscope import rundir

    every = 5
    log = {"global_step": 100, "max_steps": 100, "logging_steps": every,
           "log_history": [{"step": s, "loss": 2.0 - s / 1000, "grad_norm": 1.0 + (s % 3) / 10,
                            "learning_rate": 1e-4} for s in range(every, 101, every)]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(log))
    (tmp_path / "training_args.json").write_text(json.dumps({"max_grad_norm": 1.0, "deepspeed": "ds.json"}))
    from gradscope.cli.check import open_any

    verdict = gate.evaluate(open_any(tmp_path / "trainer_state.json", None, None))
    assert verdict.blind_spots == [gate.BlindSpot(rundir.NAN_LOSSES_DROPPED), gate.BlindSpot(rundir.SHARDED_TRAINING),
                                   gate.BlindSpot(gate.SAMPLED, every)]
    assert not any("cannot" in n or "DeepSpeed" in n for n in verdict.notes)  # no sentence in the gate's notes
    said = ci.notes(verdict)
    assert said[0].startswith("this log cannot show NaN/inf losses")
    assert said[1].startswith("trained with DeepSpeed/FSDP")
    assert said[2] == f"the log holds every {every}th step only: a non-finite step between entries cannot be seen"
    assert said[3:] == verdict.notes
    # A flag every importer can set has its words (a new flag without them fails here, not in a user's CI).
    for flag in (*rundir.IMPORT_FLAGS, gate.SAMPLED):
        assert ci.blind_spot_text(gate.BlindSpot(flag))


# ---------------------------------------------------------------- policy


def test_policy_flags_fail_with_a_reason(capsys):
    code, out, _ = check(capsys, SAMPLES / "lstm_always_clips", "--fail-on", "always-clips,never-clips")
    assert code == 1
    assert "FAIL fail-on: regime always-clips" in out
    code, out, _ = check(capsys, SAMPLES / "lstm_never_clips", "--fail-on", "always-clips,never-clips")
    assert code == 1 and "regime never-clips" in out
    code, out, _ = check(capsys, SAMPLES / "healthy_transformer", "--fail-on", "always-clips,never-clips",
                         "--max-clip-fraction", "0.5")
    assert code == 0, out
    code, out, _ = check(capsys, SAMPLES / "healthy_transformer", "--max-clip-fraction", "0.01")
    assert code == 1 and "FAIL max-clip-fraction" in out and "more than the allowed 1.0%" in out


def test_max_skipped_fraction_and_config_file(capsys, tmp_path):
    cfg = tmp_path / "check.yaml"
    cfg.write_text("max-skipped-fraction: 0.05\nfail_on: [never-clips]\n")
    code, out, _ = check(capsys, SAMPLES / "amp_fp16_skipped", "--config", cfg)
    assert code == 1 and "FAIL max-skipped-fraction: the loss scaler skipped 22 of 200 steps" in out
    # a flag wins over the file
    code, out, _ = check(capsys, SAMPLES / "amp_fp16_skipped", "--config", cfg, "--max-skipped-fraction", "0.5")
    assert code == 0, out


def test_max_spikes_rule_is_judged(capsys):
    code, out, _ = check(capsys, SAMPLES / "healthy_transformer", "--max-spikes", "100")
    assert code == 0 and "PASS max-spikes" in out


def test_shipped_default_policy_turns_every_rule_off_but_incomplete_and_script_failed():
    # issue 26: an incomplete recording is never a PASS by default; issue 23: nor a run whose script failed
    assert gate.load_policy() == gate.Policy(fail_on=(gate.INCOMPLETE, gate.SCRIPT_FAILED))


# ---------------------------------------------------------------- CI formats


def test_github_actions_annotations(capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    code, out, _ = check(capsys, SAMPLES / "lstm_nan")
    assert code == 1
    err = [line for line in out.splitlines() if line.startswith("::error ")]
    assert len(err) == 1
    assert err[0].startswith("::error title=gradscope check non-finite::")
    assert "step 31" in err[0]


def test_annotation_escapes_workflow_command_characters():
    line = ci.annotation("error", "a:b,c", "50% done\nnext")
    assert line == "::error title=a%3Ab%2Cc::50%25 done%0Anext"


def test_junit_file_parses_and_counts_match(capsys, tmp_path):
    junit = tmp_path / "reports" / "gradscope.xml"
    code, _, _ = check(capsys, SAMPLES / "lstm_nan", "--junit", junit, "--max-skipped-fraction", "0.1",
                       "--fail-on", "never-clips")
    assert code == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "gradscope"
    cases = suite.findall("testcase")
    # `incomplete` first and `script-failed`: on by default, both kept by --fail-on (issues 26, 23)
    assert [c.get("name") for c in cases] == ["incomplete", "non-finite", "fail-on", "script-failed",
                                              "max-skipped-fraction"]
    failures = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("tests")) == len(cases) == 5
    assert int(suite.get("failures")) == len(failures)
    assert "step 31" in cases[1].find("failure").get("message")


def test_junit_all_pass(capsys, tmp_path):
    junit = tmp_path / "j.xml"
    assert check(capsys, SAMPLES / "healthy_transformer", "--junit", junit)[0] == 0
    suite = ET.parse(junit).getroot().find("testsuite")
    # incomplete (issue 26), non-finite, script-failed (issue 23): all on by default
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_json_output(capsys):
    code, out, _ = check(capsys, SAMPLES / "lstm_nan", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["exit_code"] == 1
    assert doc["non_finite"]["step"] == 31 and doc["non_finite"]["quantity"] == "gradient"  # the loss followed at 32
    assert doc["non_finite"]["grad_norm"] == "nan"


def test_check_reports_ranks_that_disagree_without_failing(tmp_path, capsys):
    """Desynchronised replicas: a note naming the worst step, not a failure (the norms are finite)."""
    from test_recommend_cli import norms, write_run

    g = norms(200)
    write_run(tmp_path / "run", g, rank=0)
    off = [float(v) * (1.01 if i >= 100 else 1.0) for i, v in enumerate(g)]
    write_run(tmp_path / "run", off, rank=1)
    with pytest.raises(SystemExit) as e:
        main(["check", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert e.value.code == 0
    worst = 100 + int(np.argmax(np.abs(np.array(off[100:]) - np.array(g[100:])) / np.array(off[100:])))
    assert "ranks disagree" in out and "on 100 steps" in out and f"step {worst}" in out
