"""`gradscope plot`: the downsampler keeps spikes, the figure has its panels, every kind of run plots."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradscope.cli import main
from gradscope.report import plot
from gradscope.rundir import Run, load_run, normalize_steps

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_runs"
SAMPLE_NAMES = ["healthy_transformer", "lstm_nan", "lstm_never_clips", "lstm_always_clips", "amp_fp16_skipped"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_plot(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["plot", *map(str, args)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def memory_run(grad_norm, loss=None, clip=math.nan, layers=None, skipped=None) -> Run:
    n = len(grad_norm)
    df = pd.DataFrame({"step": np.arange(n), "grad_norm": grad_norm,
                       "loss": loss if loss is not None else np.full(n, np.nan),
                       "clip_max_norm": clip, "skipped": skipped if skipped is not None else False})
    df["clipped"] = df["grad_norm"] > clip
    empty = pd.DataFrame({"rank": [], "optimizer": [], "step": []}, dtype="int64")
    return Run(Path("mem"), normalize_steps(df), layers if layers is not None else empty, {"optimizers": []})


def write_steps(d: Path, grad_norm, loss) -> Path:
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"format": "gradscope-run", "format_version": 1, "status": "completed"}))
    lines = ["optimizer,step,grad_norm,loss,clip_max_norm,clipped,clip_value,skipped,loss_scale,lr,time\n"]
    lines += [f"0,{i},{g},{l},nan,0,nan,0,nan,0.01,{100 + i}\n" for i, (g, l) in enumerate(zip(grad_norm, loss))]
    (d / "steps-r0.csv").write_text("".join(lines))
    return d


# ---------------------------------------------------------------- pure helpers


def test_single_step_spike_survives_downsampling_a_million_steps():
    n = 1_000_000
    rng = np.random.default_rng(0)
    y = np.exp(rng.normal(0, 0.2, n))
    y[777_777] = 1e4
    x = np.arange(n)
    xs, ys = plot.downsample_minmax(x, y, max_bins=2000)
    assert len(xs) <= 4000
    assert ys.max() == 1e4 and 777_777 in xs
    assert ys.min() == y.min()
    assert np.all(np.diff(xs) > 0)  # still in step order: draws as a line


def test_downsampling_skips_non_finite_and_leaves_short_series_alone():
    y = np.ones(10_000)
    y[5000:5100] = np.nan
    xs, ys = plot.downsample_minmax(np.arange(10_000), y, max_bins=100)
    assert np.isfinite(ys).all() and len(xs) <= 200
    short = np.array([1.0, np.nan, 3.0])
    xs, ys = plot.downsample_minmax(np.arange(3), short, max_bins=100)
    assert np.array_equal(xs, np.arange(3)) and np.isnan(ys[1])


def test_thin_markers_is_bounded_and_keeps_a_lone_event():
    x = np.concatenate([np.arange(0, 500_000), [999_999]])
    kept = plot.thin_markers(x, max_points=1000)
    assert len(kept) <= 1000 and kept[-1] == 999_999 and kept[0] == 0


def test_survival_is_the_clip_fraction_at_each_threshold():
    g = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    assert plot.survival(g, np.array([0.5, 2.0, 2.5, 4.0])).tolist() == [1.0, 0.5, 0.5, 0.0]


def test_heatmap_binning_keeps_spikes_and_flags_non_finite_and_skipped():
    v = np.ones((10_000, 3))
    v[1234, 1] = 1e6
    v[9000, 2] = np.nan
    skipped = np.zeros(10_000, bool)
    skipped[:100] = True  # exactly the first column's bin
    v[:100] = np.inf  # overflow steps: inf by design
    mat, starts, only_skipped = plot.heatmap_matrix(v, max_cols=100, skipped=skipped)
    assert mat.shape == (3, 100)
    assert np.nanmax(mat) == 6.0
    assert np.isnan(mat[2]).sum() == 1 and not np.isnan(mat[:2]).any()
    assert only_skipped[0] and not only_skipped[1:].any()


# ---------------------------------------------------------------- the figure


def test_figure_has_four_panels_without_layers_and_a_heatmap_with_them():
    run = load_run(SAMPLES / "lstm_never_clips")
    with_layers = plot.build_figure(plot.plot_data(run))
    # norm, loss, the loss panel's learning-rate axis (issue 23), histogram, clip fraction, heatmap, colorbar
    assert len(with_layers.axes) == 7
    run.layers = run.layers.iloc[0:0]
    without = plot.build_figure(plot.plot_data(run))
    assert len(without.axes) == 5
    titles = [a.get_title(loc="left") for a in without.axes]
    assert titles[0].startswith("gradient norm") and titles[1] == "loss"


def test_threshold_lines_are_drawn_at_the_judged_and_recommended_norms():
    from gradscope.analysis import analyze

    run = load_run(SAMPLES / "healthy_transformer")
    data = plot.plot_data(run, analyze(run))
    s = data.series[0]
    assert s.clip_norm == 1.5 and s.recommended is not None
    fig = plot.build_figure(data)
    ax = fig.axes[0]
    ys = {round(line.get_ydata()[0], 6) for line in ax.get_lines() if len(line.get_ydata()) == 2}
    assert 1.5 in ys and round(s.recommended, 6) in ys
    assert ax.get_yscale() == "log"


def test_million_step_run_draws_a_bounded_number_of_points_with_its_spike():
    n = 1_000_000
    g = np.exp(np.random.default_rng(1).normal(0, 0.2, n))
    g[123_456] = 5e3
    g[900_000] = np.nan
    run = memory_run(g, loss=np.linspace(3, 1, n), clip=2.0)
    fig = plot.build_figure(plot.plot_data(run))
    line = fig.axes[0].get_lines()[0]
    assert len(line.get_ydata()) <= 2 * plot.MAX_BINS
    assert np.nanmax(line.get_ydata()) == 5e3


# ---------------------------------------------------------------- the command


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_sample_run_plots_to_a_real_png(capsys, tmp_path, name):
    out = tmp_path / f"{name}.png"
    code, stdout, err = run_plot(capsys, SAMPLES / name, "-o", out)
    assert code == 0, err
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 40_000
    assert f"wrote {out}" in stdout


def test_default_output_is_beside_the_run(capsys, tmp_path):
    run = shutil.copytree(SAMPLES / "lstm_nan", tmp_path / "run")
    assert run_plot(capsys, run)[0] == 0
    assert (run / "gradscope.png").read_bytes()[:8] == PNG_MAGIC
    log = tmp_path / "trainer_state.json"
    log.write_text(json.dumps({"log_history": [{"step": s, "loss": 1.0, "grad_norm": 1.0 + s % 4} for s in range(1, 40)]}))
    assert run_plot(capsys, log)[0] == 0
    assert (tmp_path / "trainer_state.json.gradscope.png").is_file()


@pytest.mark.parametrize("ext,magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_format_follows_the_extension(capsys, tmp_path, ext, magic):
    out = tmp_path / f"plot{ext}"
    assert run_plot(capsys, SAMPLES / "amp_fp16_skipped", "-o", out)[0] == 0
    assert out.read_bytes()[: len(magic)] == magic


def test_unknown_extension_and_missing_run_are_exit_2(capsys, tmp_path):
    code, _, err = run_plot(capsys, SAMPLES / "lstm_nan", "-o", tmp_path / "x.jpeg")
    assert code == 2 and ".png, .svg or .pdf" in err
    code, _, err = run_plot(capsys, tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["nan_only", "single_step", "no_loss"])
def test_degenerate_runs_plot_without_error(capsys, tmp_path, kind):
    if kind == "nan_only":
        d = write_steps(tmp_path / kind, [math.nan] * 5, [math.nan] * 5)
    elif kind == "single_step":
        d = write_steps(tmp_path / kind, [1.5], [2.0])
    else:
        d = write_steps(tmp_path / kind, list(np.linspace(1, 2, 50)), [math.nan] * 50)
    out = tmp_path / "p.png"
    code, _, err = run_plot(capsys, d, "-o", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- every figure tells the truth
# Each sample run and each trainer's real log format is drawn, and the figure's text and limits
# (not its pixels) are checked against the data and the analyzer.


def _logs(tmp: Path) -> dict[str, Path]:
    """Real-format logs, written as the trainers write them (the writers of test_importers)."""
    import test_importers as ti

    out = {}
    hist = [{"epoch": s / 40, "grad_norm": 1.0 + (s % 7) / 5 + (9.0 if s == 23 else 0.0),
             "learning_rate": 1e-4 * min(1, s / 5), "loss": 2.5 - s / 40, "step": s} for s in range(1, 41)]
    out["hf"] = ti.save_state(tmp / "hf" / "trainer_state.json",
                              ti.TrainerState(global_step=40, max_steps=100, logging_steps=1, log_history=hist))
    (tmp / "hf" / "training_args.json").write_text(json.dumps({"max_grad_norm": 1.5}))
    out["swift"] = ti.write_swift(tmp / "swift")
    f = tmp / "lf" / "trainer_log.jsonl"
    f.parent.mkdir()
    for s in range(10, 310, 10):
        ti.lf_write(f, {"current_steps": s, "total_steps": 300, "loss": 2 - s / 400, "grad_norm": 0.5 + (s % 70) / 50,
                        "lr": 1e-4, "epoch": s / 300, "percentage": s / 3, "elapsed_time": "0:00:10",
                        "remaining_time": "0:00:20"})
    (f.parent / "training_args.yaml").write_text("stage: sft\nmax_grad_norm: 1.0\nlogging_steps: 10\n")
    out["llamafactory"] = f
    ti.write_lightning_csv(tmp / "lightning" / "metrics.csv", ti.lightning_metrics())
    out["lightning"] = tmp / "lightning" / "metrics.csv"
    console = tmp / "console.log"
    console.write_text("".join(f"{{'loss': {2 - s / 50:.4f}, 'grad_norm': {1 + (s % 5) / 4}, 'learning_rate': 1e-05, "
                               f"'epoch': {s / 30:.2f}}}\n" for s in range(30)))
    out["console"] = console
    # An all-inf log whose loss stays finite and falls (a norm computed in fp16 before unscaling).
    inf_hist = [{"epoch": s / 30, "grad_norm": math.inf, "learning_rate": 1e-4, "loss": 2 - s / 40, "step": s}
                for s in range(1, 31)]
    out["all_inf"] = ti.save_state(tmp / "inf" / "trainer_state.json",
                                   ti.TrainerState(global_step=30, max_steps=30, log_history=inf_hist))
    return out


def _blowup(d: Path) -> Path:
    """Norms near 1 for 60 steps, growing to 1e17, then 197 non-finite steps."""
    rng = np.random.default_rng(3)
    g = list(np.exp(rng.normal(0, 0.15, 60))) + list(np.logspace(0.5, 17, 23)) + [math.nan] * 197
    loss = list(np.linspace(3, 2, 60)) + list(np.linspace(2, 50, 23)) + [math.nan] * 197
    return write_steps(d, g, loss)


def _unicode_run(tmp: Path) -> Path:
    return shutil.copytree(SAMPLES / "lstm_never_clips", tmp / "実験_τ_run")


def _charmap_of(family: str) -> set[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return set(FT2Font(font_manager.findfont(font_manager.FontProperties(family=[family]))).get_charmap())


def _draw(fig):
    """Lay the figure out as saving it does (Agg) and return the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _assert_figure_is_honest(fig, data, analysis, run):
    from matplotlib.lines import Line2D
    from matplotlib.text import Text

    renderer = _draw(fig)
    fb = fig.bbox
    ax_norm, ax_loss, ax_hist, ax_surv = fig.axes[:4]
    charmaps: dict[str, set[int]] = {}
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        assert t.get_fontsize() >= 8, (t.get_text(), t.get_fontsize())  # nothing below 8 pt
        # every character is in one of the fonts the text is drawn with (no tofu boxes)
        fams = t.get_fontfamily()
        have = set().union(*(charmaps.setdefault(f, _charmap_of(f)) for f in fams))
        lacking = [c for c in t.get_text() if not c.isspace() and ord(c) not in have]
        assert not lacking, (t.get_text(), lacking)
    # nothing cut at the figure's edges: every panel with what it draws (ticks, titles, legend), and the title
    inside = lambda e: e.x0 >= fb.x0 - 1 and e.x1 <= fb.x1 + 1 and e.y0 >= fb.y0 - 1 and e.y1 <= fb.y1 + 1  # noqa: E731
    for ax in fig.axes:
        assert inside(ax.get_tightbbox(renderer)), ax.get_title(loc="left")
    assert inside(fig._suptitle.get_window_extent(renderer)), fig._suptitle.get_text()
    # a panel's title stays over its own panel (the histogram's must not run into the next one)
    for ax in fig.axes[:4]:
        title = ax.title if ax.title.get_text() else ax._left_title
        assert title.get_window_extent(renderer).x1 <= ax.bbox.x1 + 2, title.get_text()
    # a legend swatch always has its line in the panel
    for ax in fig.axes[:4]:
        leg = ax.get_legend()
        if leg is None:
            continue
        drawn = {ln.get_label(): ln for ln in ax.get_lines() if np.isfinite(np.asarray(ln.get_ydata(), float)).any()}
        for handle, text in zip(leg.legend_handles, leg.get_texts()):
            if isinstance(handle, Line2D) and handle.get_linestyle() not in ("None", "none", " ", ""):
                assert text.get_text() in drawn, f"swatch without a line: {text.get_text()}"
    labels = [t.get_text() for t in (ax_norm.get_legend().get_texts() if ax_norm.get_legend() else [])]
    s = data.series[0]
    # a log axis only when there is something positive to draw on it
    finite_pos = np.isfinite(s.grad_norm) & (s.grad_norm > 0)
    assert (ax_norm.get_yscale() == "log") == bool(finite_pos.any())
    assert ("(log)" in ax_norm.get_ylabel()) == (ax_norm.get_yscale() == "log")
    if s.clip_norm is None:
        assert ("no clip threshold: the run does not clip" if run.source == "gradscope"
                else "no clip threshold known for this log") in labels
    # threshold lines inside the panels, clear of the frame
    lo, hi = ax_norm.get_ylim()
    for v in (s.clip_norm, s.recommended):
        if v is not None and finite_pos.any():
            span = math.log10(hi / lo)
            assert math.log10(v / lo) > 0.02 * span and math.log10(hi / v) > 0.02 * span, (v, lo, hi)
            if ax_hist.patches:  # issue 23: the histogram's x-axis is in raw norms, on a log scale
                a, b = ax_hist.get_xlim()
                assert ax_hist.get_xscale() == "log"
                span = math.log10(b / a)
                assert math.log10(v / a) > 0.02 * span and math.log10(b / v) > 0.02 * span, (v, a, b)
            a, b = ax_surv.get_xlim()
            assert a < v < b
    # non-finite markers: whole triangles inside the top frame, one per run of bad steps
    bad = ~np.isfinite(s.grad_norm) & ~s.skipped
    runs = plot.runs_of(bad)
    tri = [c for c in ax_norm.collections if c.get_label().startswith("non-finite grad norm")]
    assert len(tri) == (1 if runs else 0)
    if tri:
        pts = tri[0].get_offset_transform().transform(tri[0].get_offsets())
        radius = math.sqrt(tri[0].get_sizes()[0]) / 2 * fig.dpi / 72
        assert len(pts) == len(runs)
        assert (pts[:, 1] + radius <= ax_norm.bbox.y1 + 0.5).all() and (pts[:, 1] - radius >= ax_norm.bbox.y0).all()
        assert f"non-finite grad norm ({int(bad.sum()):,} step" in " ".join(labels)
    if analysis is None:
        return
    a = next(o for o in analysis.optimizers if o.optimizer == s.optimizer)
    # one clipped count: the legend says the analyzer's, recomputed here from the table
    if a.verdict.clip_norm is not None and s.clipped.any():
        judged = (np.isfinite(s.grad_norm) & ~s.skipped & (s.grad_norm > 0) & (s.step >= a.steady_from_step))
        n = int((judged & (s.grad_norm > a.verdict.clip_norm)).sum())
        assert n == a.verdict.clipped_steps and judged.sum() == a.steady_steps
        assert f"clipped: {n:,} of {a.steady_steps:,} judged steps ({n / a.steady_steps:.1%})" in labels
    # the distribution panels leave a blow-up out
    rec = a.recommendation  # None where the data support no threshold (the all-inf log)
    onset = rec.onset_step if rec is not None and rec.situation == "blew-up" else None
    if onset is not None and ax_hist.patches:
        before = s.grad_norm[(s.step < onset) & np.isfinite(s.grad_norm) & (s.grad_norm > 0)]
        assert ax_hist.get_xlim()[1] < before.max() * 10.0
        assert f"before the blow-up at step {onset:,}" in ax_hist.get_title(loc="left").replace("\n", " ")


def _figure_cases(tmp: Path) -> dict[str, Path]:
    cases = {name: SAMPLES / name for name in ALL_SAMPLES}
    cases.update({f"log_{k}": v for k, v in _logs(tmp).items()})
    cases["blowup"] = _blowup(tmp / "blowup")
    cases["unicode"] = _unicode_run(tmp)
    return cases


# every shipped sample run, whatever has been added since SAMPLE_NAMES was written
ALL_SAMPLES = sorted(p.name for p in SAMPLES.iterdir() if (p / "meta.json").is_file())
FIGURE_CASES = [*ALL_SAMPLES, "log_hf", "log_swift", "log_llamafactory", "log_lightning", "log_console",
                "log_all_inf", "blowup", "unicode"]


@pytest.mark.parametrize("name", FIGURE_CASES)
def test_every_sample_run_and_trainer_log_draws_an_honest_figure(tmp_path, name):
    from gradscope.analysis import analyze
    from gradscope.errors import GradscopeError
    from gradscope.importers import open_run

    cases = _figure_cases(tmp_path)
    assert sorted(cases) == sorted(FIGURE_CASES)
    run = open_run(cases[name])
    try:
        analysis = analyze(run)
    except GradscopeError:
        analysis = None  # drawn anyway (e.g. the all-inf log): the figure must still be honest
    data = plot.plot_data(run, analysis, name=str(cases[name]))
    _assert_figure_is_honest(plot.build_figure(data), data, analysis, run)


def test_the_clipped_count_is_one_number_in_plot_recommend_and_the_run_summary(capsys):
    from gradscope.analysis import analyze
    from gradscope.report.summary import summary_lines

    run_dir = SAMPLES / "healthy_transformer"
    main_a = analyze(load_run(run_dir)).main
    with pytest.raises(SystemExit):
        main(["recommend", "--json", str(run_dir)])
    doc = json.loads(capsys.readouterr().out)
    assert doc["clipped_steps"] == main_a.verdict.clipped_steps
    summary = "\n".join(summary_lines(run_dir))
    assert (f"clipped    {doc['clip_fraction']:.1%} of steady-state steps ({doc['clipped_steps']} of "
            f"{doc['steady_steps']})") in summary


def test_a_long_note_wraps_inside_the_figure_and_a_unicode_path_has_no_tofu(tmp_path):
    run = load_run(_unicode_run(tmp_path))
    data = plot.plot_data(run, name=str(run.path))
    data.notes += ["a note that goes on and on " * 12]
    fig = plot.build_figure(data)
    renderer = _draw(fig)
    title = fig._suptitle
    assert title.get_window_extent(renderer).x1 <= fig.bbox.x1 + 1
    text = title.get_text()
    for ch in "実験":  # drawn in a font that has it, or written as an escape: never a box
        assert ch in text or f"\\u{ord(ch):04x}" in text
    assert "τ" in text  # the default font has Greek


def test_every_threshold_source_has_one_label_for_every_report():
    """One label map for where a judged clip norm came from (report/sources.py), used by recommend's
    text and the plot's legend: every source the analyzer can set has both forms."""
    from gradscope.analysis.model import THRESHOLD_SOURCES
    from gradscope.report.sources import THRESHOLD_SOURCE_LABELS

    assert tuple(THRESHOLD_SOURCE_LABELS) == THRESHOLD_SOURCES
    assert all(label.text and label.legend for label in THRESHOLD_SOURCE_LABELS.values())


def test_the_plot_labels_the_threshold_where_the_analyzer_found_it(tmp_path):
    """The legend names the analyzer's threshold source as it is (no source judged again in the plot)."""
    from gradscope.analysis import analyze
    from gradscope.importers import open_run

    run = load_run(SAMPLES / "lstm_always_clips")
    a = analyze(run)
    assert a.main.threshold.source == "script"
    assert plot.plot_data(run, a).series[0].clip_source == "max_norm"
    b = analyze(run, clip_norm=0.5)
    assert b.main.threshold.source == "option"
    assert plot.plot_data(run, b).series[0].clip_source == "--clip-norm"
    log = {"global_step": 40, "max_steps": 40, "logging_steps": 1,
           "log_history": [{"step": s, "loss": 2.0 - s / 100, "grad_norm": 1.0 + (s % 4) / 5, "learning_rate": 1e-4}
                           for s in range(1, 41)]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(log))
    for args, source, legend in (({"max_grad_norm": 0.8}, "log", "the log's max_grad_norm"),
                                 (None, "default", "the trainer's default max_grad_norm (assumed)")):
        if args is not None:
            (tmp_path / "training_args.json").write_text(json.dumps(args))
        hf = open_run(tmp_path / "trainer_state.json")
        c = analyze(hf)
        assert c.main.threshold.source == source
        assert plot.plot_data(hf, c).series[0].clip_source == legend
        (tmp_path / "training_args.json").unlink(missing_ok=True)
