"""issue 23: the verdict line (keep / change / add / run gradscope tune), no confident threshold outside
the pilot's norms, Adam-family wording against a measured update, the run's status first, check's
script-failed rule, no `next:` that cannot work, paste lines outside the box."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradscope
from gradscope.analysis import analyze, load_config
from gradscope.analysis.advice import normalises_update
from gradscope.cli import main
from gradscope.importers import open_run
from gradscope.report.recommend import render, snippets, to_json

from test_recommend_cli import norms, write_run

FORBIDDEN_FOR_ADAM = ("mean update multiplier", "learning-rate cut", "divide the learning rate",
                      "learning-rate increase", "average update")


def report(path, width=100, **kw) -> tuple[str, dict]:
    from rich.console import Console

    result = analyze(open_run(str(path)), load_config(), **kw)
    buf = io.StringIO()
    render(result, console=Console(file=buf, width=width, force_terminal=False, color_system=None),
           config=load_config())
    return buf.getvalue(), to_json(result, load_config())


def falling(n: int) -> list[float]:
    return [2.0 - i / n for i in range(n)]


# ----------------------------------------------------------------------------- item 1


def test_a_threshold_above_every_pilot_norm_is_not_confident_and_leads_with_tune(tmp_path):
    # The failure, in miniature: a calm pilot (norms within +-5% of 1, a falling loss) for which
    # the headroom rule's floor (x1.2 above the running level) lands above every norm it saw.
    rng = np.random.default_rng(3)
    g = [float(v) for v in np.exp(rng.normal(0, 0.015, 400))]
    d = write_run(tmp_path / "calm", g, clip=None, loss=falling(400))
    meta = json.loads((d / "meta.json").read_text())
    meta.update(target="script", command=["python", "train.py", "--lr", "0.1"])
    (d / "meta.json").write_text(json.dumps(meta))
    text, doc = report(d)
    tau = doc["recommended_clip_norm_rounded"]
    assert tau > max(g)  # the rule alone, checked by hand: it would never clip on this pilot
    assert doc["confident"] is False and doc["action"] == "tune"
    assert any("above every norm the pilot saw" in r for r in doc["confidence_reasons"])
    lines = text.splitlines()
    assert lines[1].startswith("run gradscope tune: the rule's")
    assert lines[2].strip() == "gradscope tune train.py --lr 0.1" == doc["tune_command"]
    assert "paste (max_norm" not in text and "clip_grad_norm_(model" not in text


def test_a_confident_threshold_lies_within_the_pilots_steady_norms(tmp_path):
    for seed, sigma in ((0, 0.3), (1, 0.15), (2, 0.5)):
        g = norms(n=600, seed=seed)
        g = [float(v) ** (sigma / 0.3) for v in g]
        d = write_run(tmp_path / f"r{seed}", g, clip=None, loss=falling(600))
        _, doc = report(d)
        steady = np.array(g)[doc["warmup_steps"]:]
        if doc["confident"]:
            assert steady.min() < doc["recommended_clip_norm_rounded"] < steady.max()
            assert doc["action"] == "add"
        else:
            assert doc["action"] == "tune"
    # and the usual case is confident: sigma 0.3 in log space, 600 steps
    assert report(tmp_path / "r0")[1]["confident"] is True


# ----------------------------------------------------------------------------- item 3


def test_verdict_line_change_keep_add_and_json_action(tmp_path):
    g = norms(n=800, seed=4)
    # change: a threshold that clips about a third of the steps
    d = write_run(tmp_path / "low", g, clip=float(np.quantile(g, 0.67)), loss=falling(800))
    text, doc = report(d)
    first = text.splitlines()[1]
    new = doc["recommended_clip_norm_rounded"]
    assert doc["action"] == "change" and first == doc["advice"]
    assert first.startswith(f"change max_norm {doc['clip_norm']:g} \u2192 {new:g}: ")
    assert f"max_norm={new:g})" in text  # the paste lines carry the new value
    # keep: the run's threshold is the recommendation itself
    d = write_run(tmp_path / "same", g, clip=new, loss=falling(800))
    text, doc = report(d)
    lo, hi = doc["recommended_range"]
    assert doc["action"] == "keep" and lo <= new <= hi
    assert text.splitlines()[1].startswith(f"keep max_norm = {new:g}")
    assert "paste (max_norm" not in text and "recommend  max_norm" not in text  # nothing below says change it
    # add: unclipped
    d = write_run(tmp_path / "none", g, clip=None, loss=falling(800))
    text, doc = report(d)
    assert doc["action"] == "add" and text.splitlines()[1].startswith(f"add clipping at max_norm = {new:g}: ")
    # tune: a loss that does not fall (not confident)
    d = write_run(tmp_path / "flat", g, clip=None)
    text, doc = report(d)
    assert doc["confident"] is False and doc["action"] == "tune"
    assert text.splitlines()[1].startswith("run gradscope tune: the pilot's loss did not fall")


# ----------------------------------------------------------------------------- item 6


def test_paste_lines_sit_outside_the_box_unwrapped_at_80_columns(tmp_path):
    g = norms(n=800, seed=5)
    d = write_run(tmp_path / "r", g, clip=None, loss=falling(800))
    for width in (80, 60):  # 60: narrower than the PyTorch line itself
        text, doc = report(d, width=width)
        lines = text.splitlines()
        want = snippets(doc["recommended_clip_norm_rounded"])
        for code in want.values():
            hit = [ln for ln in lines if code in ln]
            assert len(hit) == 1, code
            assert "\u2502" not in hit[0] and hit[0].rstrip().endswith(code)  # no box border, nothing after it
        assert max(len(ln) for ln in lines if want["pytorch"] in ln) > 60 or width == 80


# ----------------------------------------------------------------------------- item 2


def _train(opt_name: str, clip: float | None, steps: int = 60, record_to: Path | None = None):
    """A small regression net from a fixed init; returns the per-step update norms ||theta_t+1 - theta_t||."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(256, 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2))
    sizes = []

    def loop():
        for i in range(steps):
            b = slice((i * 32) % 256, (i * 32) % 256 + 32)
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[b]), y[b]).backward()
            opt.step()
            after = torch.cat([p.detach().flatten() for p in model.parameters()])
            sizes.append(float(torch.linalg.vector_norm((after - before).double())))

    if record_to is not None:
        with gradscope.record(str(record_to), clip_norm=clip, layer_stride=0):
            loop()
    else:
        loop()
    return np.array(sizes)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_adam_family_wording_against_a_measured_update(tmp_path, opt_name):
    unclipped = _train(opt_name, None)
    run = tmp_path / opt_name
    first = _train(opt_name, None, record_to=tmp_path / "measure")
    g0 = gradscope.load_run(str(tmp_path / "measure")).steps["grad_norm"].to_numpy(dtype=float)
    assert np.allclose(first, unclipped)  # the recorder is invisible
    tau = float(np.min(g0)) / 5  # a fifth of the smallest norm: it clips every step
    clipped = _train(opt_name, tau, record_to=run)
    g = gradscope.load_run(str(run)).steps["grad_norm"].to_numpy(dtype=float)
    measured = float(clipped[10:].mean() / unclipped[10:].mean())  # the real change of the update size
    sgd_algebra = float(np.minimum(1.0, tau / g[10:]).mean())  # what "mean update multiplier" claims
    text, doc = report(run)
    assert doc["clip_fraction"] == 1.0 and doc["regime"] == "always-clips"
    if opt_name == "adamw":
        # Measured: clipping every gradient to a fifth of its size leaves AdamW's step far from a fifth.
        assert measured > 2 * sgd_algebra, (measured, sgd_algebra)
        assert doc["adam_family"] is True
        low = text.lower()
        for phrase in FORBIDDEN_FOR_ADAM:
            assert phrase not in low, phrase
        assert "moment estimates" in low
    else:
        # On plain SGD the algebra is the measurement (the same gradients up to clipping at step 0;
        # later the trajectories differ, so compare loosely), and the report may say it.
        assert doc["adam_family"] is False
        assert measured == pytest.approx(sgd_algebra, rel=0.35)
        assert "mean update multiplier" in text


def test_second_moment_optimizers_by_class_name():
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "FusedAdam", "DeepSpeedCPUAdam",
                 "AdamW8bit", "PagedAdamW", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "FusedLAMB"):
        assert normalises_update(name), name
    for name in ("SGD", "ASGD", "LBFGS", "Rprop", None, ""):
        assert not normalises_update(name), name


# ----------------------------------------------------------------------------- item 4

FAILING = """
import sys
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
fail_at = int(sys.argv[sys.argv.index("--fail-at") + 1]) if "--fail-at" in sys.argv else None
for step in range(80):
    if step == fail_at:
        raise RuntimeError("boom at step %d" % step)
    opt.zero_grad()
    x = torch.randn(8, 4)
    loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
"""


def _gs(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gradscope", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_a_failed_run_says_so_first_and_check_fails_it(tmp_path):
    (tmp_path / "train.py").write_text(FAILING)
    p = _gs("run", "--out", "r", "train.py", "--fail-at", "40", cwd=tmp_path)
    assert p.returncode == 1
    r = _gs("recommend", "r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("the run FAILED (exit code 1) after 40 optimizer steps recorded")
    assert lines[2].startswith("no advice: the run's script failed")
    assert "paste (max_norm" not in r.stdout and "clip_grad_norm_(model" not in r.stdout
    assert "gradscope tune" not in r.stdout and "--fail-at" not in r.stdout  # no command repeating the failure
    doc = json.loads(_gs("recommend", "r", "--json", cwd=tmp_path).stdout)
    assert doc["status"] == "failed" and doc["action"] is None and doc["tune_command"] is None
    assert doc["confident"] is False and doc["status_line"] == lines[1]
    c = _gs("check", "r", cwd=tmp_path)
    assert c.returncode == 1 and "script-failed" in c.stdout, c.stdout
    # the same script when it does not fail: check passes, recommend advises
    assert _gs("run", "--out", "ok", "train.py", cwd=tmp_path).returncode == 0
    assert _gs("check", "ok", cwd=tmp_path).returncode == 0
    assert json.loads(_gs("recommend", "ok", "--json", cwd=tmp_path).stdout)["action"] in ("keep", "change", "tune")


@pytest.mark.slow
def test_a_run_with_no_steps_suggests_no_recommend(tmp_path):
    (tmp_path / "train.py").write_text(FAILING)
    p = _gs("run", "--out", "r", "train.py", "--fail-at", "0", cwd=tmp_path)
    assert p.returncode == 1
    assert "run saved in r" in p.stderr and "next:" not in p.stderr, p.stderr
    assert _gs("recommend", "r", cwd=tmp_path).returncode == 2  # what the hint would have led to


# ----------------------------------------------------------------------------- item 5


def _lr_warmup_run(d: Path, n: int, warm: int, clip: float) -> tuple[Path, np.ndarray]:
    """A run written by hand: the learning rate rises for `warm` steps, then stays; norms large during
    the warm-up (all clipped there), ordinary after it."""
    rng = np.random.default_rng(7)
    g = np.exp(rng.normal(0, 0.3, n))
    g[:warm] *= 4.0
    d.mkdir(parents=True)
    rows = ["optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time"]
    for i, v in enumerate(g):
        lr = 1e-3 * min(1.0, (i + 1) / warm)
        rows.append(f"0,{i},{float(v)!r},{2.0 - i / n!r},{clip!r},{int(v > clip)},nan,0,nan,{lr!r},{1.7e9 + i}")
    (d / "steps-r0.csv").write_text("\n".join(rows) + "\n")
    (d / "meta.json").write_text(json.dumps({"format": "gradscope-run", "format_version": 1,
                                             "status": "completed", "exit_code": 0}))
    return d, g


def test_watch_counts_clipped_steps_as_recommend_does_and_waits_for_the_warm_up(tmp_path):
    from gradscope.cli.watch import _Watcher
    from gradscope.report.summary import summary_lines
    from gradscope.report.watch import alerts, series_text

    d, g = _lr_warmup_run(tmp_path / "r", 400, 60, 2.0)
    _, doc = report(d)
    assert doc["warmup_steps"] == 59  # the steps before the learning rate peaks
    by_hand = int(np.count_nonzero(g[59:] > 2.0))
    assert doc["clipped_steps"] == by_hand
    w = _Watcher(d, 0)
    w.poll()
    view = w.view()
    live, norm, loss = view.series[0]
    assert (live.clipped_steps, live.steady_steps) == (by_hand, 400 - 59)
    text = series_text(view, live, norm, loss)
    assert f"clips {by_hand / 341:.1%} of steady-state steps ({by_hand} of 341)" in text
    assert f"({doc['clipped_steps']} of {doc['steady_steps']})" in "\n".join(summary_lines(d))
    # Only the warm-up recorded so far (the learning rate still rising): every step clipped, yet no
    # "always-clips so far" alert until the warm-up is over.
    part, _ = _lr_warmup_run(tmp_path / "early", 400, 60, 2.0)
    lines = (part / "steps-r0.csv").read_text().splitlines()
    (part / "steps-r0.csv").write_text("\n".join(lines[:50]) + "\n")
    w = _Watcher(part, 0)
    w.poll()
    live = w.view().series[0][0]
    assert live.warmup_open and live.regime_so_far is None
    assert not any("so far" in a for a in alerts(live))


def test_a_sampled_hf_log_counts_optimizer_steps_and_says_logged_points(tmp_path):
    rng = np.random.default_rng(2)
    hist = [{"loss": round(2.0 - i / 60, 4), "grad_norm": float(np.exp(rng.normal(0, 0.3))),
             "learning_rate": 1e-4, "epoch": i / 50, "step": 10 * (i + 1)} for i in range(50)]
    f = tmp_path / "trainer_state.json"
    f.write_text(json.dumps({"global_step": 500, "max_steps": 500, "logging_steps": 10, "log_history": hist}))
    text, doc = report(f, width=200)
    assert doc["sampled"] is True and doc["steps"] == 50
    covered = doc["steady_optimizer_steps"]
    first = doc["steady_from_step"]
    assert covered == 500 - first + 10  # the span the steady-state points cover, one stride past the last
    assert not any("steady-state steps (at least" in r for r in doc["confidence_reasons"])  # 450 steps, not 45
    assert f"{doc['steady_steps']} finite logged points" in text and f"covering {covered} optimizer steps" in text


# ----------------------------------------------------------------------------- item 7

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


def test_plot_reads_at_a_glance_raw_units_lr_range_smoothed_loss_small_heatmap(tmp_path):
    from matplotlib.patches import Rectangle

    from gradscope.report import plot
    from gradscope.rundir import load_run

    run = load_run(SAMPLES / "lstm_never_clips")  # layer norms recorded, a learning rate with a warm-up
    a = analyze(run, load_config())
    data = plot.plot_data(run, a)
    fig = plot.build_figure(data)
    ax_norm, ax_loss, ax_hist, ax_surv = fig.axes[:4]
    s, o = data.series[0], a.main
    r = o.recommendation
    # the histogram: raw norms on a log axis, the judged tau drawn at its own value, whole-number counts
    assert ax_hist.get_xscale() == "log" and "log10" not in ax_hist.get_xlabel()
    xs = {round(float(ln.get_xdata()[0]), 9) for ln in ax_hist.get_lines()}
    assert round(o.verdict.clip_norm, 9) in xs and round(r.clip_norm_rounded, 9) in xs
    bars = [p for p in ax_hist.patches if isinstance(p, Rectangle) and not p.get_label().startswith("range")]
    heights = np.array([p.get_height() for p in bars])
    steady = s.steady()
    assert int(heights.sum()) == len(steady[steady > 0])  # every judged step is in one bar
    assert all(float(t).is_integer() for t in ax_hist.get_yticks())
    # the range the data support, drawn where recommend says it is
    for ax in (ax_norm, ax_hist):
        spans = [p for p in ax.patches if p.get_label().startswith("range the data support")]
        assert len(spans) == 1
        p = spans[0]
        if isinstance(p, Rectangle):
            vals = (p.get_y(), p.get_y() + p.get_height()) if ax is ax_norm else (p.get_x(), p.get_x() + p.get_width())
        else:
            ext = p.get_xy()
            vals = ext[:, 1] if ax is ax_norm else ext[:, 0]
        assert min(vals) == pytest.approx(r.low) and max(vals) == pytest.approx(r.high)
    # the learning rate, on the loss panel's own axis, as recorded
    lr_lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == "learning rate"]
    assert len(lr_lines) == 1
    recorded = run.steps["lr"].to_numpy(dtype=float)
    assert np.nanmax(lr_lines[0].get_ydata()) == pytest.approx(np.nanmax(recorded))
    # the loss smoothed (a trailing mean, recomputed here) over the raw curve
    smooth = [ln for ln in ax_loss.get_lines() if "mean of the last" in ln.get_label()]
    assert len(smooth) == 1
    w = int(smooth[0].get_label().split("mean of the last ")[1].split()[0])
    loss = run.steps["loss"].to_numpy(dtype=float)
    import pandas as pd

    by_hand = pd.Series(loss).rolling(w, min_periods=1).mean().to_numpy()
    x, y = smooth[0].get_xdata(), smooth[0].get_ydata()
    steps = run.steps["step"].to_numpy()
    for k in (0, len(x) // 2, len(x) - 1):
        assert y[k] == pytest.approx(by_hand[np.searchsorted(steps, x[k])])
    # the heatmap is the smallest panel: under a fifth of the figure's height
    heat = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("per-parameter"))
    assert heat.get_position().height < 0.2


def test_many_clipped_steps_are_a_rug_not_dots_over_the_curve():
    from gradscope.report import plot
    from gradscope.rundir import load_run

    run = load_run(SAMPLES / "lstm_always_clips")
    a = analyze(run, load_config())
    assert a.main.verdict.clipped_steps > plot.MAX_CLIP_DOTS
    fig = plot.build_figure(plot.plot_data(run, a))
    ax = fig.axes[0]
    clipped = [c for c in ax.collections if c.get_label().startswith("clipped")]
    assert clipped
    for c in clipped:  # drawn along the panel's foot (axis coordinates in y), not at the norms
        assert c.get_offset_transform() is not ax.transData
        assert np.allclose(c.get_offsets()[:, 1], 0.0)
    # few clipped steps stay dots on the curve
    run = load_run(SAMPLES / "healthy_transformer")
    a = analyze(run, load_config())
    assert a.main.verdict.clipped_steps <= plot.MAX_CLIP_DOTS
    ax = plot.build_figure(plot.plot_data(run, a)).axes[0]
    dots = [c for c in ax.collections if c.get_label().startswith("clipped")]
    assert dots and all(c.get_offset_transform() is ax.transData for c in dots)


def _copy_run(src: Path, dst: Path, scale: float = 1.0) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if scale != 1.0:
        f = dst / "steps-r0.csv"
        import pandas as pd

        df = pd.read_csv(f)
        df["loss"] = df["loss"] * np.linspace(1, scale, len(df))
        df.to_csv(f, index=False)
    return dst


def test_compare_figure_log_loss_distinct_colours_legend_beside_labelled_taus(tmp_path, capsys, monkeypatch):
    from matplotlib.colors import to_hex

    from gradscope.analysis.compare import compare_rows
    from gradscope.report import compare as report
    from gradscope.rundir import load_run

    runs = [_copy_run(SAMPLES / "healthy_transformer", tmp_path / f"r{i}", scale=1.0 if i else 1e4)
            for i in range(12)]  # r0's loss climbs 10^4 x: a diverged run
    rows = []
    for p in runs:
        run = load_run(p)
        rows.extend(compare_rows(str(p), run, analyze(run, load_config())))
    fig = report.build_figure(rows)
    ax_n, ax_l = fig.axes[:2]
    assert ax_l.get_yscale() == "log"
    colours = [to_hex(ln.get_color()) for ln in ax_n.get_lines() if not ln.get_label().startswith("_")]
    assert len(colours) == 12 and len(set(colours)) == 12
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    leg = fig.legends[0]
    box = leg.get_window_extent(renderer)
    for ax in (ax_n, ax_l):
        assert not box.overlaps(ax.get_window_extent(renderer))
    labels = [t.get_text() for t in ax_n.texts]
    assert "max_norm 1.5 (12 runs)" in labels
    # --json without -o: no figure written into the current directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--json", str(runs[1]), str(runs[2])])
    assert e.value.code == 0
    json.loads(capsys.readouterr().out)
    assert not (tmp_path / report.DEFAULT_OUTPUT).exists()


@pytest.mark.parametrize("status, signal, first", [
    ("interrupted", "SIGINT", "the run was INTERRUPTED (SIGINT) after 600 optimizer steps recorded"),
    ("killed", "SIGKILL", "the run was KILLED (SIGKILL) after 600 optimizer steps recorded"),
    ("running", None, "the run is STILL RUNNING: 600 optimizer steps recorded so far"),
])
def test_an_interrupted_killed_or_running_run_says_so_first_and_is_still_judged(tmp_path, status, signal, first):
    d = write_run(tmp_path / "r", norms(n=600, seed=6), clip=None, loss=falling(600))
    meta = json.loads((d / "meta.json").read_text())
    meta.update(status=status, signal=signal, exit_code=None if status == "running" else 130)
    (d / "meta.json").write_text(json.dumps(meta))
    text, doc = report(d)
    assert text.splitlines()[1].startswith(first) and doc["status_line"].startswith(first)
    assert doc["action"] == "add"  # judged on the steps it holds
