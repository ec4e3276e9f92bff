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
    assert len(with_layers.axes) == 6  # norm, loss, histogram, clip fraction, heatmap, colorbar
    run.layers = run.layers.iloc[0:0]
    without = plot.build_figure(plot.plot_data(run))
    assert len(without.axes) == 4
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
