"""Bad input is refused, not judged: runs without steps, damaged steps files, impossible values,
errors as JSON under --json, and `gradscope run`'s own usage mistakes (exit 2, one line)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gradscope.cli import main
from gsutil import gradscope as gs

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"
HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time"
META = {"format": "gradscope-run", "format_version": 1, "status": "completed"}


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([*map(str, args)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def good_line(step: int) -> str:
    return f"0,{step},{1.0 + step % 5 / 10},{2.0 - step / 100},nan,0,nan,0,nan,0.01,{1000 + step}"


def write_run(d: Path, lines: list[str], status: str = "completed") -> Path:
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({**META, "status": status}))
    (d / "steps-r0.csv").write_text("".join(line + "\n" for line in lines))
    return d


# ---------------------------------------------------------------- no steps: nothing to check


@pytest.mark.parametrize("kind", ["no_steps_file", "header_only", "deleted_steps_file"])
def test_a_run_without_steps_is_exit_2_for_check_and_plot(capsys, tmp_path, kind):
    d = tmp_path / kind
    if kind == "no_steps_file":  # Ctrl-C before the first optimizer step: only meta.json exists
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({**META, "status": "interrupted"}))
    elif kind == "header_only":
        write_run(d, [HEADER])
    else:
        shutil.copytree(SAMPLES / "healthy_transformer", d)
        (d / "steps-r0.csv").unlink()
    code, out, err = cli(capsys, "check", d)
    assert code == 2 and out == ""
    assert err.startswith("gradscope: error: nothing to check: ") and err.count("\n") == 1
    if kind == "deleted_steps_file":
        steps = json.loads((SAMPLES / "healthy_transformer" / "process-r0.json").read_text())["optimizers"][0]["steps"]
        assert f"count {steps} steps: the steps file was deleted" in err
    if kind == "header_only":
        assert "steps-r0.csv holds only its header" in err
    code, _, err = cli(capsys, "plot", d, "-o", tmp_path / "p.png")
    assert code == 2 and "nothing to plot" in err
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------- damaged files, impossible values


def _damage(kind: str) -> tuple[list[str], int, str]:
    """A steps file with one kind of damage: (lines, 1-based line number of the damage, words expected)."""
    lines = [HEADER] + [good_line(s) for s in range(40)]
    at = 23  # index into lines: the file's line 24
    if kind == "negative_norm":
        lines[at] = lines[at].replace(",1.", ",-1.", 1)
        words = "a norm cannot be negative"
    elif kind == "text_norm":
        f = lines[at].split(",")
        f[2] = "oops"
        lines[at] = ",".join(f)
        words = "grad_norm is 'oops', not a number"
    elif kind == "text_flag":
        f = lines[at].split(",")
        f[7] = "yes"
        lines[at] = ",".join(f)
        words = "skipped is 'yes', not 0 or 1"
    elif kind == "cut_line":  # a line cut short, the file going on after it
        lines[at] = lines[at][:12]
        words = "fields where the header has 11"
    elif kind == "two_lines_ran_together":
        lines[at] = lines[at][:15] + lines[at + 1]
        del lines[at + 1]
        words = "fields where the header has 11"
    elif kind == "missing_block":  # a block of whole lines cut out of the middle
        del lines[at : at + 6]
        words = f"jumps from step {at - 2} to {at + 5}: 6 steps are missing"
    elif kind == "repeated_block":
        lines[at:at] = lines[at - 5 : at]
        words = f"step {at - 6} comes again after step {at - 2}"
    else:  # the start of the file lost (header kept)
        del lines[1:at]
        at = 1
        words = "first step is 22, not 0"
    return lines, at + 1, words


DAMAGE = ["negative_norm", "text_norm", "text_flag", "cut_line", "two_lines_ran_together",
          "missing_block", "repeated_block", "lost_start"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_steps_file_is_exit_2_naming_the_file_and_line(capsys, tmp_path, kind):
    lines, line_no, words = _damage(kind)
    d = write_run(tmp_path / "run", lines)
    for command in ("check", "recommend", "plot"):
        code, out, err = cli(capsys, command, d)
        assert code == 2, (command, out, err)
        assert f"'{d / 'steps-r0.csv'}' line {line_no}: " in err and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_a_partial_last_line_of_a_killed_run_is_still_dropped_not_refused(capsys, tmp_path):
    lines = [HEADER] + [good_line(s) for s in range(30)]
    d = write_run(tmp_path / "run", lines, status="killed")
    with open(d / "steps-r0.csv", "a") as f:
        f.write(good_line(30)[:9])  # the writer died mid-line
    code, out, _ = cli(capsys, "check", d)
    assert code == 0 and "30 steps: every loss and gradient norm finite" in out


def test_a_steps_file_cut_at_a_line_boundary_is_caught_by_the_process_count(capsys, tmp_path):
    d = shutil.copytree(SAMPLES / "healthy_transformer", tmp_path / "run")
    lines = (d / "steps-r0.csv").read_text().splitlines(keepends=True)
    (d / "steps-r0.csv").write_text("".join(lines[:101]))  # header + the first 100 steps
    recorded = json.loads((d / "process-r0.json").read_text())["optimizers"][0]["steps"]
    assert recorded == len(lines) - 1 > 100
    code, _, err = cli(capsys, "check", d)
    assert code == 2
    assert "holds 100 steps of optimizer 0, but its process file says" in err and f"recorded {recorded}" in err


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "hf"])
@pytest.mark.parametrize("value", ["-0.75", "'n/a'"])
def test_foreign_log_with_an_impossible_norm_is_exit_2_naming_the_line(capsys, tmp_path, fmt, value):
    n, bad = 30, 17
    text_value = value.strip("'")
    if fmt == "csv":
        path = tmp_path / "log.csv"
        rows = ["step,loss,grad_norm"] + [f"{s},{2 - s / 100},{1 + s % 3 / 10}" for s in range(1, n + 1)]
        rows[bad] = f"{bad},1.5,{text_value}"
        path.write_text("\n".join(rows) + "\n")
        line = bad + 1
    elif fmt == "jsonl":
        path = tmp_path / "log.jsonl"
        recs = [{"step": s, "loss": 2 - s / 100, "grad_norm": 1 + s % 3 / 10} for s in range(1, n + 1)]
        recs[bad - 1]["grad_norm"] = float(text_value) if value[0] == "-" else text_value
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        line = bad
    else:
        path = tmp_path / "trainer_state.json"
        hist = [{"step": s, "loss": 2 - s / 100, "grad_norm": 1 + s % 3 / 10} for s in range(1, n + 1)]
        hist[bad - 1]["grad_norm"] = float(text_value) if value[0] == "-" else text_value
        path.write_text(json.dumps({"global_step": n, "log_history": hist}, indent=2))
        line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"grad_norm": ' in t
                    and text_value in t)
    code, out, err = cli(capsys, "check", path)
    assert code == 2 and out == "", err
    assert f"'{path}' line {line}: grad_norm is " in err and f"(step {bad})" in err


# ---------------------------------------------------------------- --json: every outcome is one JSON object


@pytest.mark.parametrize("command", ["check", "recommend"])
@pytest.mark.parametrize("case", ["missing", "no_steps", "negative", "bad_option_value", "unknown_option"])
def test_json_errors_are_one_object_on_stdout_with_the_exit_code(capsys, tmp_path, command, case):
    args: list = ["--json"]
    if case == "missing":
        args.append(tmp_path / "nope")
    elif case == "no_steps":
        args.append(write_run(tmp_path / "r", [HEADER]))
    elif case == "negative":
        args.append(write_run(tmp_path / "r", _damage("negative_norm")[0]))
    elif case == "bad_option_value":
        args += [SAMPLES / "healthy_transformer",
                 *(("--fail-on", "sometimes") if command == "check" else ("--preset", "nonsense"))]
    else:
        args += [SAMPLES / "healthy_transformer", "--no-such-option"]
    code, out, err = cli(capsys, command, *args)
    assert code == 2
    doc = json.loads(out)  # the whole of stdout is one JSON object
    assert set(doc) == {"error", "exit_code"} and doc["exit_code"] == code
    assert doc["error"] and doc["error"] in err  # the same words as the one stderr line


def test_json_outcomes_that_are_not_errors_keep_their_exit_code(capsys):
    code, out, _ = cli(capsys, "check", SAMPLES / "lstm_nan", "--json")
    assert code == 1 and json.loads(out)["exit_code"] == 1
    code, out, _ = cli(capsys, "recommend", "--json", SAMPLES / "healthy_transformer")
    assert code == 0 and "error" not in json.loads(out)


def test_json_after_a_script_is_the_scripts_argument_not_gradscopes(tmp_path):
    res = gs("run", "--out", "r", "missing.py", "--json", cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "" and "script 'missing.py' not found" in res.stderr


# ---------------------------------------------------------------- gradscope run's own mistakes


def test_unknown_run_option_is_named_as_an_option(tmp_path):
    (tmp_path / "train.py").write_text("print('trained')\n")
    res = gs("run", "--bogus", "train.py", cwd=tmp_path)
    assert res.returncode == 2 and "trained" not in res.stdout
    assert "no such option for gradscope run: '--bogus'" in res.stderr and "PATH" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_binary_script_names_the_line_of_the_null_byte(tmp_path):
    data = b"\x89PNG\r\n\x1a\nline two\nthree \x00\x01\x02\n"
    (tmp_path / "garbage.bin").write_bytes(data)
    line = data[: data.index(b"\0")].count(b"\n") + 1
    assert line == 4  # the PNG signature holds two line ends
    res = gs("run", "--out", "r", "garbage.bin", cwd=tmp_path)
    assert res.returncode == 2 and "None" not in res.stderr
    assert f"'garbage.bin' is not Python source: line {line} holds a null byte" in res.stderr
    assert not (tmp_path / "r").exists()


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    # root ignores permission bits: an empty directory of sysfs (read-only to everyone) instead
    for d in (Path("/sys/kernel/software_nodes"), Path("/sys/kernel/iommu_groups")):
        if d.is_dir() and not any(d.iterdir()):
            return d
    pytest.skip("no read-only directory available to root here")


def test_run_into_a_read_only_out_is_exit_2_with_the_path(tmp_path):
    ro = _read_only_dir(tmp_path)
    (tmp_path / "train.py").write_text("open('started', 'w').close()\n")
    try:
        res = gs("run", "--out", ro, "train.py", cwd=tmp_path)
    finally:
        if ro.is_relative_to(tmp_path):
            ro.chmod(0o755)
    assert res.returncode == 2, res.stderr
    assert f"cannot write in run directory '{ro}'" in res.stderr and "internal error" not in res.stderr
    assert not (tmp_path / "started").exists()  # refused before the script ran


# ---------------------------------------------------------------- outputs into a missing directory


def test_plot_and_junit_into_a_missing_directory_create_it_and_say_so(capsys, tmp_path):
    png = tmp_path / "new" / "dir" / "p.png"
    code, out, err = cli(capsys, "plot", SAMPLES / "lstm_never_clips", "-o", png)
    assert code == 0 and png.is_file()
    assert f"created directory '{png.parent}' for the plot" in err
    junit = tmp_path / "reports" / "j.xml"
    code, out, err = cli(capsys, "check", SAMPLES / "lstm_never_clips", "--junit", junit)
    assert code == 0 and junit.is_file()
    assert f"created directory '{junit.parent}' for the JUnit file" in err
    code, _, err = cli(capsys, "check", SAMPLES / "lstm_never_clips", "--junit", junit)
    assert "created directory" not in err  # only when it did


@pytest.mark.parametrize("bad, words", [("abc", "layer1.weight is 'abc', not a number"),
                                        ("-0.5", "layer1.weight is -0.5: a norm cannot be negative")])
def test_a_damaged_layers_file_is_exit_2_naming_the_line(capsys, tmp_path, bad, words):
    d = write_run(tmp_path / "run", [HEADER] + [good_line(s) for s in range(12)])
    rows = ["step,layer0.weight,layer1.weight"] + [f"{s},0.5,0.25" for s in range(12)]
    rows[8] = f"7,0.5,{bad}"
    (d / "layers-r0-o0.csv").write_text("\n".join(rows) + "\n")
    code, _, err = cli(capsys, "check", d)
    assert code == 2 and f"'{d / 'layers-r0-o0.csv'}' line 9: {words}" in err


def test_an_internal_error_under_json_is_an_error_object_with_exit_3(capsys, monkeypatch):
    import gradscope.importers

    def broken(*a, **k):  # stands in for a bug anywhere below the command
        raise RuntimeError("boom")

    monkeypatch.setattr(gradscope.importers, "open_run", broken)
    code, out, err = cli(capsys, "check", "--json", SAMPLES / "healthy_transformer")
    assert code == 3 and "internal error: RuntimeError: boom" in err
    assert json.loads(out) == {"error": "RuntimeError: boom (set GRADSCOPE_DEBUG=1 for the traceback)", "exit_code": 3}
