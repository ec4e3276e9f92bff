"""The run format (rundir.py): version 2 written and read, version 1 still read to the same table,
the layer store read lazily and safely, the step line, and the one bad-step rule."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from gsutil import gradscope, script

from gradscope import rundir
from gradscope.analysis import analyze
from gradscope.analysis.bad_steps import bad_steps
from gradscope.analysis.gate import find_non_finite
from gradscope.capture.writer import ProcessWriter
from gradscope.report import plot

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


def as_version_2(v1: Path, out: Path) -> Path:
    """A copy of a version-1 run directory in version 2: the per-layer CSVs become the layer store,
    written by capture's own writer; NaN losses of a series that records none become empty fields."""
    shutil.copytree(v1, out)
    for f in out.glob("layers-r*-o*.csv"):
        r, o = rundir._rank_of(f.name), int(f.stem.rsplit("-o", 1)[1])
        df = pd.read_csv(f)
        names = [c for c in df.columns if c != "step"]
        w = ProcessWriter(str(out), r)
        w._steps = open(out / ".unused.tmp", "w")  # the steps file exists already: write layers only
        for lo in range(0, len(df), 7):  # several flushes
            block = df.iloc[lo:lo + 7]
            w.write_layer_rows(o, names, block["step"].tolist(), torch.tensor(block[names].to_numpy(), dtype=torch.float32))
        w.close()
        (out / ".unused.tmp").unlink()
        f.unlink()
    for name in ["meta.json", *(p.name for p in out.glob("process-r*.json"))]:
        d = json.loads((out / name).read_text())
        d["format_version"] = 2
        (out / name).write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("sample", ["healthy_transformer", "lstm_nan", "amp_fp16_skipped"])
def test_a_version_1_and_a_version_2_directory_read_to_the_same_table(tmp_path, sample):
    v1 = rundir.load_run(SAMPLES / sample)
    v2 = rundir.load_run(as_version_2(SAMPLES / sample, tmp_path / sample))
    assert not list((tmp_path / sample).glob("*.csv"))[1:]  # only the steps file is a CSV
    steps2 = v2.steps.drop(columns=[rundir.LOSS_RECORDED], errors="ignore")
    pd.testing.assert_frame_equal(v1.steps, steps2)
    pd.testing.assert_frame_equal(v1.layers, v2.layers)
    assert len(v1.layers) > 0
    # the analyses that read layer rows give the same answers
    a1, a2 = analyze(v1), analyze(v2)
    # (version 1 held each float32 norm as 9 decimal digits, version 2 holds its bits: equal to 1e-7)
    spikes1 = [(s.step, s.layers) for o in a1.optimizers for s in o.spikes.listed]
    spikes2 = [(s.step, s.layers) for o in a2.optimizers for s in o.spikes.listed]
    assert [(st, [n for n, _ in ls]) for st, ls in spikes1] == [(st, [n for n, _ in ls]) for st, ls in spikes2]
    assert [f for _, ls in spikes1 for _, f in ls] == pytest.approx([f for _, ls in spikes2 for _, f in ls], rel=1e-7)
    assert sample != "lstm_nan" or any(ls for _, ls in spikes1)  # a run whose spikes name their layers
    nf1, nf2 = find_non_finite(v1), find_non_finite(v2)
    assert (nf1 is None) == (nf2 is None)
    if nf1 is not None:
        assert (nf1.layers, nf1.layers_step, nf1.layers_total) == (nf2.layers, nf2.layers_step, nf2.layers_total)
        assert [(n, st) for n, _, st, _ in nf1.growing] == [(n, st) for n, _, st, _ in nf2.growing]
        assert [x for _, v, _, g in nf1.growing for x in (v, g)] == \
            pytest.approx([x for _, v, _, g in nf2.growing for x in (v, g)], rel=1e-6)
        assert nf1.layers  # lstm_nan names its non-finite layers
    h1, h2 = plot.plot_data(v1).layers, plot.plot_data(v2).layers
    np.testing.assert_allclose(h1.mat, h2.mat, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(h1.edges, h2.edges)


def test_the_layer_store_reads_only_whole_rows_and_pairs_each_with_its_step(tmp_path):
    w = ProcessWriter(str(tmp_path), 0)
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.inf, math.nan], [7.0, 8.0, 9.0]])
    w.write_layer_rows(0, ["a", "b", "c"], [0, 5, 10], values)
    w.close()
    store = rundir.StoreLayerNorms.open(tmp_path)
    assert store.series() == [(0, 0)] and store.names(0, 0) == ["a", "b", "c"]
    np.testing.assert_array_equal(store.steps(0, 0), [0, 5, 10])
    np.testing.assert_array_equal(store.rows(0, 0, slice(None)), values.double().numpy())
    at, rows = store.at_steps(0, 0, [10, 5, 3])
    np.testing.assert_array_equal(at, [5, 10])
    np.testing.assert_array_equal(rows, values[1:].double().numpy())
    # a killed writer: a step written, its row cut in the middle -> neither is read
    with open(tmp_path / "layers-r0-o0.i64", "ab") as f:
        f.write(np.array([15], dtype=np.int64).tobytes())
    with open(tmp_path / "layers-r0-o0.f32", "ab") as f:
        f.write(np.array([1.0, 2.0], dtype=np.float32).tobytes())
    store = rundir.StoreLayerNorms.open(tmp_path)
    np.testing.assert_array_equal(store.steps(0, 0), [0, 5, 10])
    assert store.rows(0, 0, slice(None)).shape == (3, 3)


def test_the_step_line_follows_the_columns_and_reads_back():
    line = rundir.step_line({"optimizer": "3"})
    values = (7, 1.5, 2.25, 1.0, 1, math.nan, 0, 65536.0, 0.01, 1700000000.25)
    text = rundir.steps_header() + line % values
    row = pd.read_csv(pd.io.common.StringIO(text)).iloc[0]
    assert list(row.index) == rundir.STEP_COLUMNS
    assert row["optimizer"] == 3 and row["step"] == 7 and row["loss"] == 2.25 and row["loss_scale"] == 65536.0
    no_loss = rundir.step_line({"optimizer": "0", "loss": rundir.NO_LOSS, **rundir.NO_CLIP_NO_SCALER})
    assert (no_loss % (4, 0.5, 0.1, 1.0)).split(",")[3] == ""


def test_the_bad_step_rule_is_one_rule_in_capture_and_in_analysis():
    nan, inf = math.nan, math.inf
    rows = [  # grad_norm, loss, skipped, loss recorded
        (1.0, 2.0, 0, True), (inf, 2.0, 0, True), (inf, 2.0, 1, True), (nan, 2.0, 1, True),
        (1.0, nan, 0, True), (1.0, inf, 1, True), (1.0, nan, 0, False), (nan, nan, 0, False),
        (1.0, -inf, 0, True), (inf, nan, 1, False),
    ]
    table = pd.DataFrame({"rank": 0, "optimizer": 0, "step": range(len(rows)),
                          "grad_norm": [r[0] for r in rows], "loss": [r[1] for r in rows],
                          "skipped": [bool(r[2]) for r in rows], rundir.LOSS_RECORDED: [r[3] for r in rows]})
    scalar = [rundir.is_bad_step(*r) for r in rows]
    assert bad_steps(table).any.tolist() == scalar
    assert scalar == [False, True, False, False, True, True, False, True, True, False]
    # without the column (version 1, importers): NaN counts as a NaN loss only where the series records losses
    v1 = table.drop(columns=[rundir.LOSS_RECORDED])
    none = v1.assign(loss=nan)
    assert bad_steps(none).any.tolist() == [rundir.is_bad_step(g, nan, s, False) for g, _, s, _ in rows]
    assert bad_steps(v1).any.tolist() == [rundir.is_bad_step(g, loss, s, True) for g, loss, s, _ in rows]
    # the live view (watch) applies it to one series' arrays
    from gradscope.analysis.bad_steps import one_series

    arrays = (table["grad_norm"], table["loss"], table["skipped"])
    assert one_series(*arrays, table[rundir.LOSS_RECORDED]).any.tolist() == scalar
    assert one_series(*arrays).any.tolist() == bad_steps(v1).any.tolist()


def test_layer_heatmap_streamed_equals_the_whole_table_binning(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.lognormal(size=(10_007, 4)).astype(np.float32)
    v[1234, 1] = 1e6
    v[9000, 2] = np.nan
    v[5000, 3] = np.inf
    v[7000, 0] = 0.0
    v[:100] = np.inf
    skipped_steps = np.arange(100) * 2
    w = ProcessWriter(str(tmp_path), 0)
    for lo in range(0, len(v), 999):
        w.write_layer_rows(0, list("abcd"), list(range(2 * lo, 2 * min(len(v), lo + 999), 2)), torch.from_numpy(v[lo:lo + 999]))
    w.close()
    store = rundir.StoreLayerNorms.open(tmp_path)
    heat = plot.layer_heatmap(store, (0, 0), skipped_steps, max_cols=600)
    mat, starts, only = plot.heatmap_matrix(v.astype(float), 600, np.isin(np.arange(len(v)) * 2, skipped_steps))
    np.testing.assert_array_equal(heat.mat, mat)
    np.testing.assert_array_equal(heat.only_skipped, only)
    np.testing.assert_array_equal(heat.edges[:-1], starts * 2 - 0.5)


@pytest.mark.slow
def test_a_loop_of_autograd_grad_is_neither_stopped_nor_misjudged(tmp_path):
    """Issue 25: gradients from torch.autograd.grad (no backward(), no loss recorded). --stop-on-nan
    stopped it at step 0 ("non-finite loss") while check passed it; the one rule does neither."""
    out = tmp_path / "run"
    r = gradscope("run", "--stop-on-nan", "--out", out, script("autograd_grad_loop.py"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "trained 12 steps" in r.stdout and "stopping the training" not in r.stderr
    lines = (out / "steps-r0.csv").read_text().splitlines()
    assert len(lines) == 13 and all(line.split(",")[3] == "" for line in lines[1:])  # no loss: an empty field
    run = rundir.load_run(out)
    assert not run.steps[rundir.LOSS_RECORDED].any() and np.isfinite(run.steps["grad_norm"]).all()
    c = gradscope("check", out, timeout=300)
    assert c.returncode == 0 and "PASS non-finite: 12 steps: every gradient norm finite (no loss recorded" in c.stdout, \
        c.stdout + c.stderr


def test_a_300_tensor_version_1_run_loads_without_a_performance_warning(tmp_path):
    """Issue 26 item 7: inserting columns one by one into a 300-column frame printed pandas
    PerformanceWarning lines on stderr."""
    import warnings

    shutil.copytree(SAMPLES / "healthy_transformer", tmp_path / "run")
    names = [f"blocks.{i}.weight" for i in range(300)]
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.lognormal(size=(40, 300)), columns=names)
    table.insert(0, "step", range(40))
    (tmp_path / "run" / "layers-r0-o0.csv").write_text(table.to_csv(index=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = rundir.load_run(tmp_path / "run")
        analyze(run)
    assert list(run.layers.columns) == ["rank", "optimizer", "step", *names]
    np.testing.assert_allclose(run.layers[names].to_numpy(), table[names].to_numpy())
