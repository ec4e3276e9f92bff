"""`gradscope recommend`: end to end through open_run, the JSON contract, and one-line errors (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradscope.cli import main

STEP_HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time"


def write_run(d: Path, g, clip=1.0, skipped=None, rank=0, optimizer=0, meta=True, layers=None, loss=None) -> Path:
    """A gradscope run directory written by hand in the documented format (rundir.py); loss: one per
    step (default 1.5 on every step: a run whose loss does not fall)."""
    d.mkdir(parents=True, exist_ok=True)
    skipped = np.zeros(len(g), int) if skipped is None else np.asarray(skipped, int)
    lines = [STEP_HEADER] if not (d / f"steps-r{rank}.csv").exists() else []
    for i, v in enumerate(g):
        c = "nan" if clip is None else repr(clip)
        clipped = int(clip is not None and np.isfinite(v) and v > clip)
        lo = 1.5 if loss is None else loss[i]
        lines.append(f"{optimizer},{i},{v!r},{lo!r},{c},{clipped},nan,{skipped[i]},nan,0.001,{1.7e9 + i}")
    with open(d / f"steps-r{rank}.csv", "a") as f:
        f.write("\n".join(lines) + "\n")
    if meta:
        (d / "meta.json").write_text(json.dumps(
            {"format": "gradscope-run", "format_version": 1, "status": "completed", "exit_code": 0}
        ))
    if layers is not None:
        layers.to_csv(d / f"layers-r{rank}-o{optimizer}.csv", index=False)
    return d


def norms(n=1500, seed=0, scale=1.0):
    return [float(v) for v in scale * np.exp(np.random.default_rng(seed).normal(0, 0.3, n))]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["recommend", *map(str, args)])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def no_nan(s: str):
    def bad(c):
        raise AssertionError(f"{c} in JSON")
    return json.loads(s, parse_constant=bad)


# ----------------------------------------------------------------------------- JSON contract


def test_json_schema_and_figures(tmp_path, capsys):
    g = norms()
    g[700] = 40.0
    skipped = np.zeros(len(g), int)
    g[900] = float("inf")
    skipped[900] = 1
    d = write_run(tmp_path / "run", g, clip=1.0, skipped=skipped)
    code, out, err = run_cli([d, "--json", "--preset", "transformer"], capsys)
    assert code == 0, err
    j = no_nan(out)
    required = {
        "schema": str, "path": str, "format": str, "rank": int, "ranks": list, "sampled": bool,
        "optimizer": int, "steps": int, "finite_steps": int, "nonfinite_steps": int,
        "first_nonfinite_step": int, "nonfinite_kind": str, "warmup_steps": int, "steady_steps": int,
        "percentiles": dict, "clip_norm": float, "clip_norm_source": str, "regime": str,
        "clip_fraction": float, "mean_multiplier": float, "recommended_clip_norm": float,
        "recommended_clip_norm_rounded": float, "recommended_clip_fraction": float,
        "recommended_mean_multiplier": float, "drift": dict, "spikes": dict, "nonfinite": dict,
        "preset": dict, "snippets": dict, "notes": list, "optimizers": list, "skipped_fraction": float,
    }
    for k, t in required.items():
        assert isinstance(j[k], t), (k, j[k])
    assert j["schema"] == "gradscope.recommend/1" and j["format"] == "gradscope"
    assert j["regime"] in ("never-clips", "always-clips", "healthy", "unclipped")
    assert j["steps"] == 1500 and j["nonfinite_steps"] == 1 and j["first_nonfinite_step"] == 900
    assert j["nonfinite_kind"] == "overflow-skipped" and j["skipped_steps"] == 1
    # independent figures: steady state = finite steps after the warm-up
    fin = np.array([v for v in g if np.isfinite(v)])
    s = fin[j["warmup_steps"]:]
    assert j["steady_steps"] == len(s)
    assert j["percentiles"]["p99"] == pytest.approx(np.percentile(s, 99))
    assert j["percentiles"]["max"] == pytest.approx(40.0)
    assert j["clip_fraction"] == pytest.approx((s > 1.0).mean())
    tau = j["recommended_clip_norm"]
    assert j["recommended_clip_fraction"] == pytest.approx((s > tau).mean())
    assert j["spikes"]["count"] == 1 and j["spikes"]["listed"][0]["step"] == 700
    assert j["preset"]["name"] == "transformer" and j["preset"]["position"] in ("below", "within", "above")
    assert str(j["recommended_clip_norm_rounded"]) in j["snippets"]["huggingface"]
    assert len(j["optimizers"]) == 1 and j["optimizers"][0]["recommended_clip_norm"] == tau


def test_json_unclipped_has_nulls_not_nan(tmp_path, capsys):
    d = write_run(tmp_path / "run", norms(300), clip=None)
    code, out, _ = run_cli([d, "--json"], capsys)
    j = no_nan(out)
    assert code == 0 and j["regime"] == "unclipped"
    assert j["clip_norm"] is None and j["clip_fraction"] is None and j["mean_multiplier"] is None


def test_json_top_level_is_the_optimizer_with_most_steps(tmp_path, capsys):
    d = write_run(tmp_path / "run", norms(300, seed=1), clip=100.0, optimizer=0)
    write_run(d, norms(600, seed=2), clip=0.01, optimizer=1)
    code, out, _ = run_cli([d, "--json"], capsys)
    j = no_nan(out)
    assert [o["optimizer"] for o in j["optimizers"]] == [0, 1]
    assert [o["regime"] for o in j["optimizers"]] == ["never-clips", "always-clips"]
    assert j["optimizer"] == 1 and j["regime"] == "always-clips" and j["steps"] == 600
    code, out, _ = run_cli([d, "--json", "--optimizer", "0"], capsys)
    assert no_nan(out)["regime"] == "never-clips"


def test_clip_norm_option_and_ranks(tmp_path, capsys):
    g = norms(400)
    d = write_run(tmp_path / "run", g, clip=1.0, rank=0)
    write_run(d, [v * 1.01 for v in g], clip=1.0, rank=1)
    code, out, _ = run_cli([d, "--json", "--clip-norm", "1000"], capsys)
    j = no_nan(out)
    assert j["clip_norm"] == 1000 and j["clip_norm_source"] == "option" and j["regime"] == "never-clips"
    assert j["ranks"] == [0, 1] and j["rank"] == 0
    assert any("ranks disagree" in n for n in j["notes"])
    code, out, _ = run_cli([d, "--json", "--rank", "1"], capsys)
    assert no_nan(out)["rank"] == 1


def test_human_report_has_verdict_recommendation_and_snippets(tmp_path, capsys):
    # A falling loss: a run that learns, so one pilot can tell (a flat loss leads with `gradscope tune`
    # and has no paste lines: see test_verdict_line_*).
    g = norms()
    d = write_run(tmp_path / "run", g, clip=100.0, loss=[2.0 - i / len(g) for i in range(len(g))])
    code, out, _ = run_cli([d], capsys)
    assert code == 0
    assert out.splitlines()[1].startswith("change max_norm 100 \u2192 ")
    for needle in ("never-clips", "recommend", "p50", "p99", "clip_grad_norm_", "max_grad_norm",
                   "gradient_clip_val", '"gradient_clipping"', "global_clipnorm", "ClipGradByGlobalNorm",
                   "--max_grad_norm", "spikes", "non-finite", "dead code"):
        assert needle in out, needle


def test_foreign_log_through_open_run(tmp_path, capsys):
    f = tmp_path / "log.csv"
    g = norms(200, seed=4)
    f.write_text("step,train_loss,gnorm\n" + "".join(f"{i},2.0,{v}\n" for i, v in enumerate(g)))
    code, out, err = run_cli([f, "--column", "gnorm", "--json", "--clip-norm", "0.5"], capsys)
    assert code == 0, err
    j = no_nan(out)
    assert j["format"] == "csv" and j["steps"] == 200 and j["regime"] == "always-clips"


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def _bad_cases(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.txt").write_text("nothing to see here\n")
    (tmp_path / "noloss.csv").write_text("step,loss\n1,2.0\n2,1.9\n")
    one = write_run(tmp_path / "one", [1.5])
    allnan = write_run(tmp_path / "allnan", [float("nan"), float("inf"), float("nan")])
    good = write_run(tmp_path / "good", norms(100))
    (tmp_path / "bad.yaml").write_text("warmup:\n  nope: 1\n")
    return [
        ([tmp_path / "missing"], "does not exist"),
        ([tmp_path / "empty"], "empty directory"),
        ([tmp_path / "junk.txt"], "no log format"),
        ([tmp_path / "noloss.csv"], "no gradient-norm column"),
        ([one], "at least 3 are needed"),
        ([allnan], "non-finite"),
        ([good, "--preset", "gan"], "valid: transformer, cnn, rnn, recommender, alignment"),
        ([good, "--config", tmp_path / "bad.yaml"], "unknown setting 'nope'"),
        ([good, "--clip-norm", "-1"], "positive"),
        ([good, "--optimizer", "3"], "no optimizer 3"),
        ([good, "--rank", "2"], "no rank 2"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for args, needle in _bad_cases(tmp_path):
        code, out, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradscope: error:"), err
        assert needle in lines[0], (needle, lines[0])
        assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("pick", [0, 4])
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, pick):
    args, needle = _bad_cases(tmp_path)[pick]
    p = subprocess.run([sys.executable, "-m", "gradscope", "recommend", *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["recommend"], ["recommend", "--bogus", "x"], ["check"], ["plot", "a", "b"],
                                  ["nosuchcommand"]])
def test_usage_errors_exit_2_with_usage_not_an_internal_error(args):
    # typer >= 0.26 no longer runs on the click package: this failed with exit 3 once.
    p = subprocess.run([sys.executable, "-m", "gradscope", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "Usage:" in p.stderr and "internal error" not in p.stderr and "Traceback" not in p.stderr
