"""What `gradscope recommend` tells is true: the threshold that was in force on foreign logs, whole-run
figures beside steady-state ones, no contradictions, answers from few points, advice that does no
obvious harm. Each log is written the way its trainer writes it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import gradscope
from gradscope.analysis import analyze
from gradscope.cli import main
from gradscope.importers import open_run
from gradscope.rundir import host_name

from test_importers import TrainerState, append_to_jsonl, lf_write, save_state, swift_entry

HEADER = "optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time"


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["recommend", *map(str, args)])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def cli_json(args, capsys) -> dict:
    code, out, err = cli([*args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def report(args, capsys) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # rich wraps at the terminal width: one report line per line here
    try:
        code, out, err = cli(args, capsys)
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    assert code == 0, err
    return out


def hf_state(path: Path, g, lr=None, loss=None, every=10, max_steps=None) -> Path:
    """trainer_state.json as TrainerState.save_to_json writes it: one train row per logging step."""
    n = len(g)
    lr = [2e-5] * n if lr is None else lr
    loss = np.linspace(2.5, 1.5, n) if loss is None else loss
    hist = [{"epoch": round((i + 1) / n, 4), "grad_norm": float(v), "learning_rate": float(r), "loss": float(l),
             "step": (i + 1) * every} for i, (v, r, l) in enumerate(zip(g, lr, loss))]
    return save_state(path, TrainerState(global_step=n * every, max_steps=max_steps or n * every,
                                         logging_steps=every, log_history=hist))


def table_run(d: Path, g, loss=None, clip=None, lr=0.1, meta=None, momentum=None) -> Path:
    """A run directory in the recorded format (rundir.py), written by hand."""
    d.mkdir(parents=True)
    loss = [1.0] * len(g) if loss is None else loss
    c = "nan" if clip is None else repr(float(clip))
    rows = [HEADER] + [
        f"0,{i},{v!r},{l!r},{c},{int(clip is not None and math.isfinite(v) and v > clip)},nan,0,nan,"
        f"{float(lr if np.isscalar(lr) else lr[i])!r},{1.7e9 + i}"
        for i, (v, l) in enumerate(zip(map(float, g), map(float, loss)))
    ]
    (d / "steps-r0.csv").write_text("\n".join(rows) + "\n")
    (d / "meta.json").write_text(json.dumps({
        "format": "gradscope-run", "format_version": 1, "status": "completed", "exit_code": 0,
        "optimizers": [{"id": 0, "class": "SGD", "momentum": momentum}], **(meta or {}),
    }))
    return d


def lognormal(n, seed=0, scale=1.0, sigma=0.3):
    return scale * np.exp(np.random.default_rng(seed).normal(0.0, sigma, n))


# ----------------------------------------------------------------------------- 1. the threshold in force


def _swift_log(d: Path, g) -> Path:
    d.mkdir(parents=True)
    f = d / "logging.jsonl"
    for i, v in enumerate(g):
        append_to_jsonl(f, swift_entry(i + 1, len(g), loss=2.0 - i / len(g), grad_norm=float(v),
                                       learning_rate=1e-4, epoch=(i + 1) / len(g)))
    return f


def _lf_log(d: Path, g) -> Path:
    d.mkdir(parents=True)
    f = d / "trainer_log.jsonl"
    for i, v in enumerate(g):
        lf_write(f, {"current_steps": (i + 1) * 5, "total_steps": len(g) * 5, "loss": 2.0 - i / len(g),
                     "lr": 1e-4, "epoch": (i + 1) / len(g), "grad_norm": float(v), "percentage": 1.0,
                     "elapsed_time": "0:00:01", "remaining_time": "0:00:01"})
    return f


@pytest.mark.parametrize("write,args_file", [
    (lambda d, g: hf_state(d / "trainer_state.json", g), "training_args.json"),
    (_swift_log, "args.json"),
    (_lf_log, "training_args.yaml"),
])
def test_a_trainer_log_without_args_is_judged_at_the_trainers_default(tmp_path, capsys, write, args_file):
    """HF, ms-swift and LLaMA-Factory log grad_norm only when they clip, by default at 1.0."""
    g = lognormal(60, seed=1, scale=2.0)  # mostly above 1.0, as on the real logs
    f = write(tmp_path / "out", g)
    j = cli_json([f], capsys)
    s = g[j["warmup_steps"]:]
    assert j["clip_norm"] == 1.0 and j["clip_norm_source"] == "default"
    assert j["regime"] == "always-clips" and j["clip_fraction"] == pytest.approx((s > 1.0).mean())
    assumed = [n for n in j["notes"] if "assumed" in n]
    assert len(assumed) == 1 and "default max_grad_norm" in assumed[0] and "--clip-norm" in assumed[0]
    assert not any("recorded nothing" in n for n in j["notes"])  # 2. no rank notes on foreign logs
    out = report([f], capsys)
    assert "max_norm 1 (the trainer's default, assumed)" in out and "every spike reaches the weights" not in out
    # an args file names the threshold: it is the log's
    text = "max_grad_norm: 0.5\n" if args_file.endswith(".yaml") else json.dumps({"max_grad_norm": 0.5})
    (f.parent / args_file).write_text(text)
    j = cli_json([f], capsys)
    assert j["clip_norm"] == 0.5 and j["clip_norm_source"] == "log" and not any("assumed" in n for n in j["notes"])
    j = cli_json([f, "--clip-norm", "3"], capsys)
    assert j["clip_norm"] == 3.0 and j["clip_norm_source"] == "option"


def test_max_grad_norm_0_in_the_args_means_unclipped_not_the_default(tmp_path, capsys):
    f = hf_state(tmp_path / "trainer_state.json", lognormal(40, scale=2.0))
    (tmp_path / "training_args.json").write_text(json.dumps({"max_grad_norm": 0.0}))
    j = cli_json([f], capsys)
    assert j["clip_norm"] is None and j["clip_norm_source"] is None and j["regime"] == "unclipped"


def test_a_run_recorded_with_clip_norm_is_judged_as_the_override(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.record(tmp_path / "run", clip_norm=0.5):
        for _ in range(40):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # replaced by the override
            opt.step()
    j = cli_json([tmp_path / "run"], capsys)
    assert j["clip_norm"] == 0.5 and j["clip_norm_source"] == "override"
    assert "max_norm 0.5 (`gradscope run --clip-norm`)" in report([tmp_path / "run"], capsys)


# ----------------------------------------------------------------------------- 3. whole-run figures


def test_whole_run_figures_and_the_warmup_maximum_are_shown(tmp_path, capsys):
    n = 300
    g = lognormal(n, seed=2)
    g[12] = 52.2  # the run's largest norm, inside an LR warm-up
    lr = np.minimum(np.arange(n) / 50, 1.0) * 1e-3
    d = table_run(tmp_path / "run", g, lr=lr, clip=1.0)
    j = cli_json([d], capsys)
    assert j["warmup_steps"] == 50 and j["percentiles"]["max"] == pytest.approx(g[50:].max())
    assert j["whole_run"] == {"steps": n, "finite_steps": n, "min": pytest.approx(g.min()),
                              "p50": pytest.approx(np.median(g)), "max": 52.2, "max_step": 12}
    listed = {s["step"]: s for s in j["spikes"]["listed"]}
    assert 12 in listed and listed[12]["in_warmup"] is True  # found in the warm-up too
    assert "warm-up: the 50 steps before the learning rate peaks at step 50" in j["notes"]
    out = report([d], capsys)
    assert "whole run  max 52.2 at step 12, in the warm-up left out above" in out
    assert "1 of them in the warm-up" in out


def test_a_spike_on_the_very_first_steps_is_found(tmp_path, capsys):
    g = lognormal(200, seed=3)
    g[1] = 30.0  # before any trailing level exists
    j = cli_json([table_run(tmp_path / "run", g)], capsys)
    assert j["warmup_steps"] == 0 and j["percentiles"]["max"] == 30.0 and j["whole_run"]["max_step"] == 1
    assert [s["step"] for s in j["spikes"]["listed"]] == [1]


# ----------------------------------------------------------------------------- 4. no contradictions


def test_a_drifting_stable_run_does_not_claim_its_norms_stay_near_their_level(tmp_path, capsys):
    n = 600
    g = np.geomspace(3.7, 1.0, n) * lognormal(n, seed=4, sigma=0.05)
    j = cli_json([table_run(tmp_path / "run", g, loss=np.linspace(3, 1, n))], capsys)
    assert j["situation"] == "stable" and j["drift"]["drifting"]
    assert "stay near their level" not in j["situation_evidence"]
    ratio = j["drift"]["p50_ratio"]
    assert ratio == pytest.approx(np.median(g[-(n // 3):]) / np.median(g[:n // 3]))
    assert f"the level itself fell {1 / ratio:.3g}x" in j["situation_evidence"]


def test_the_reference_level_is_the_steady_states_not_the_warmups(tmp_path, capsys):
    """A warm-up with norms ~14 ahead of a steady state at ~3.6: the reference the recommendation is a
    multiple of sits at the steady level, not at the warm-up's."""
    n = 400
    g = np.concatenate([lognormal(100, seed=5, scale=14.0, sigma=0.1), lognormal(n - 100, seed=6, scale=3.6)])
    lr = np.minimum(np.arange(n) / 100, 1.0)
    j = cli_json([table_run(tmp_path / "run", g, lr=lr)], capsys)
    p50 = j["percentiles"]["p50"]
    assert j["warmup_steps"] == 100 and p50 == pytest.approx(np.median(g[100:]))
    assert p50 / 1.5 < j["recommendation"]["reference_level"] < 1.5 * p50
    assert "typical level" not in report([tmp_path / "run"], capsys)


def test_one_noisy_loss_on_a_clipped_run_with_falling_norms_is_not_instability(tmp_path, capsys):
    """Seen on a real log: the loss at step 1 twice the first, clipped on 100% of steps, the norms falling:
    "unstable ... clipping has to normalise most steps" above a threshold that clips none was false."""
    n = 200
    g = np.geomspace(20.0, 5.0, n) * lognormal(n, seed=7, sigma=0.05)
    loss = np.linspace(2.0, 1.0, n)
    loss[1] = 4.5
    j = cli_json([table_run(tmp_path / "run", g, loss=loss, clip=1.0)], capsys)
    assert j["clip_fraction"] == 1.0 and j["situation"] in ("stable", "spiky")
    assert "not read as instability" in j["situation_evidence"] and "unclipped updates" not in j["situation_evidence"]
    # the same loss climb on norms that grow past their start is instability; the run was clipped, so says so
    grow = np.geomspace(2.0, 20.0, n) * lognormal(n, seed=7, sigma=0.05)
    j = cli_json([table_run(tmp_path / "grow", grow, loss=loss, clip=50.0)], capsys)
    assert j["situation"] == "unstable-needs-normalisation"
    assert "clipped at max_norm 50" in j["situation_evidence"] and "unclipped" not in j["situation_evidence"]
    # a climb that lasts is instability even on falling norms (the advice benchmark's gru_copy pilots)
    lasting = loss.copy()
    lasting[1:6] = 4.5
    j = cli_json([table_run(tmp_path / "lasting", g, loss=lasting)], capsys)
    assert j["situation"] == "unstable-needs-normalisation" and "unclipped updates" in j["situation_evidence"]


def test_a_range_that_collapses_is_not_printed_as_a_range(tmp_path, capsys):
    d = table_run(tmp_path / "run", [1.25] * 100)
    j = cli_json([d], capsys)
    lo, hi = j["recommended_range"]
    assert f"{lo:.3g}" == f"{hi:.3g}"
    out = report([d], capsys)
    assert f"support {lo:.3g} to {hi:.3g}" not in out and f"no range around {lo:.3g}" in out


# ----------------------------------------------------------------------------- 5-7. few points, inf, counters


def test_a_five_entry_log_is_answered_and_says_how_few_points(tmp_path, capsys):
    g = [3.1, 2.7, 2.9, 3.4, 2.2]
    f = hf_state(tmp_path / "trainer_state.json", g)
    code, out, err = cli([f, "--json"], capsys)
    assert code == 0, err
    j = json.loads(out)
    s = np.array(g)[j["warmup_steps"]:]
    assert j["steps"] == 5 and j["percentiles"]["max"] == pytest.approx(s.max())
    assert any(f"only 5 finite gradient norms ({len(s)} after warm-up)" in c for c in j["caveats"])


def test_an_all_inf_log_with_a_falling_loss_exits_0_without_a_recommendation(tmp_path, capsys):
    n = 30
    f = hf_state(tmp_path / "trainer_state.json", [math.inf] * n, loss=np.linspace(2.4, 0.9, n))
    assert "Infinity" in f.read_text()  # json.dumps writes inf that way, as the Trainer does
    j = cli_json([f], capsys)
    assert j["recommended_clip_norm"] is None and j["regime"] is None and j["snippets"] is None
    assert j["finite_steps"] == 0 and j["whole_run"]["max"] is None and j["clip_norm_source"] == "default"
    assert "non-finite (inf) while the loss stays finite and falls" in j["meaning"]
    assert j["nonfinite_steps"] == n and j["nonfinite_kind"] is None and j["nonfinite"]["divergence_step"] is None
    out = report([f], capsys)
    assert "divergence" not in out
    assert "recommend  none" in out and "non-finite (inf) while the loss stays finite and falls" in out


def test_a_console_counter_rising_by_4_is_not_called_sampled(tmp_path, capsys):
    f = tmp_path / "train.log"
    g = lognormal(40, seed=8)
    f.write_text("".join(f"Step {4 * (i + 1)}: {{'loss': {2 - i / 40:.4f}, 'grad_norm': {v:.4f}}}\n"
                         for i, v in enumerate(g)))
    run = open_run(f)
    assert run.meta["sampled"] is False and list(run.steps["step"][:3]) == [4, 8, 12]
    j = cli_json([f], capsys)
    assert j["sampled"] is False
    counter = [n for n in j["notes"] if "rises by 4 per entry" in n]
    assert len(counter) == 1 and "gradient accumulation 4" in counter[0] and "cannot tell" in counter[0]
    assert not any("every 4th" in n or "every k-th" in n for n in j["notes"])


# ----------------------------------------------------------------------------- 8, 10. no obvious harm


def test_a_run_that_went_non_finite_under_tau_never_gets_a_looser_threshold(tmp_path, capsys):
    """Seen: max_norm 1.0 blew up and recommend advised 3.5 (the first norm); with it the run diverged sooner."""
    g = [3.5, 3.2, 3.0, 3.3, 3.1] + [3.0 * 1.6 ** k for k in range(1, 20)] + [math.inf, math.nan]
    loss = [2.0] * 24 + [math.inf, math.nan]
    d = table_run(tmp_path / "run", g, loss=loss, clip=1.0)
    j = cli_json([d], capsys)
    assert j["situation"] == "blew-up" and j["clip_norm"] == 1.0
    assert j["recommended_clip_norm"] == pytest.approx(0.5) and j["recommended_range"][1] <= 0.5
    assert any("went non-finite at step 24 while clipped at max_norm 1" in c for c in j["caveats"])
    # unclipped, the same run gets the first norm (the rule): the cap is what the failed threshold adds
    assert cli_json([table_run(tmp_path / "free", g, loss=loss)], capsys)["recommended_clip_norm"] == pytest.approx(3.5)
    # a Hugging Face log that ends in NaN norms, judged at the assumed default: the cap says it was assumed
    f = hf_state(tmp_path / "hf" / "trainer_state.json", g[:-2] + [math.nan, math.nan])
    j = cli_json([f], capsys)
    assert j["clip_norm_source"] == "default" and j["recommended_clip_norm"] == pytest.approx(0.5)
    assert any("clipped at max_norm 1 (assumed: the trainer's default)" in c for c in j["caveats"])


def test_raising_the_threshold_of_a_run_that_clips_most_steps_names_the_larger_update(tmp_path, capsys):
    g = lognormal(500, seed=9)
    j = cli_json([table_run(tmp_path / "run", g, clip=0.6)], capsys)
    s = g[j["warmup_steps"]:]
    m_now = np.minimum(1.0, 0.6 / s).mean()
    m_rec = np.minimum(1.0, j["recommended_clip_norm_rounded"] / s).mean()
    assert j["regime"] == "always-clips" and j["mean_multiplier"] == pytest.approx(m_now)
    growth = [c for c in j["caveats"] if "makes the average update" in c]
    assert len(growth) == 1
    assert f"{m_rec / m_now:.3g}x larger" in growth[0] and "learning-rate increase" in growth[0]
    assert "Check that the loss still falls" in growth[0]


# ----------------------------------------------------------------------------- 15. a run still going


def test_a_run_still_being_recorded_says_so_and_how_many_steps_it_holds(tmp_path, capsys):
    d = table_run(tmp_path / "run", lognormal(120, seed=10),
                  meta={"status": "running", "host": host_name(), "launcher_pid": os.getpid()})
    j = cli_json([d], capsys)
    assert j["status"] == "running"
    assert any("still being recorded" in n and "holds 120 optimizer steps so far" in n for n in j["notes"])
    assert "still being recorded" in report([d], capsys)
    done = table_run(tmp_path / "done", lognormal(120, seed=10))
    assert not any("still being recorded" in n for n in cli_json([done], capsys)["notes"])


def test_analysis_results_for_a_run_that_went_inf_at_step_20_say_step_20(tmp_path):
    """The grad norm went inf at step 20 (the update was applied: no scaler), the loss only at 29."""
    g = [2.0] * 20 + [math.inf] + [2.0 * 10 ** k for k in range(1, 9)] + [math.inf] * 3
    loss = [1.0] * 29 + [math.inf] * 3
    a = analyze(gradscope.load_run(table_run(tmp_path / "run", g, loss=loss))).main
    assert a.nonfinite.first_unskipped_step == 20 and a.nonfinite.divergence_step == 29
    assert "went non-finite at step 20 and stayed non-finite from step 29" in a.recommendation.evidence


def test_the_plot_names_an_assumed_default_as_such(tmp_path):
    from gradscope.report import plot

    f = hf_state(tmp_path / "trainer_state.json", lognormal(40, seed=11, scale=2.0))
    run = open_run(f)
    data = plot.plot_data(run, analyze(run), name=str(f))
    assert data.series[0].clip_norm == 1.0 and "default" in data.series[0].clip_source
