"""metrics-r<rank>.csv: the values a script reports, from each source (gradscope.log_metric, the
Hugging Face Trainer's eval_* keys, Lightning's self.log names, run --metric-regex), each stamped
with the optimizer step it was reported after, checked against the training's own record of
what it reported; no host read of a tensor value before flush; no framework imported by capture."""
from __future__ import annotations

import gc
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

import gradscope
from gradscope import rundir
from gsutil import gradscope as gs, python, script

HELDOUT = script("heldout_train.py")


def _rows(run, name):
    m = run.metrics[run.metrics["name"] == name]
    return list(zip(m["step"].tolist(), m["value"].tolist()))


# ---------------------------------------------------------------- gradscope.log_metric


def test_log_metric_tensor_is_read_at_flush_not_per_step(tmp_path, monkeypatch):
    """A tensor value stays on its device until flush: during the steps nothing reads a tensor on
    the host from capture code (the per-step sync the recorder must not make); after the stop the
    file holds every value exactly (float32 -> float64) at the step it was logged after."""
    import traceback

    import gradscope.capture.metrics as capture_metrics

    capture_dir = os.path.dirname(capture_metrics.__file__) + os.sep
    reads = []

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            stack = "".join(traceback.format_stack(limit=8))
            if capture_dir in stack:
                reads.append((name, stack))
            return orig(self, *a, **k)

        return wrapper

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = []
    with gradscope.record(tmp_path / "run", flush_steps=1000, flush_seconds=1e9) as rec:
        gradscope.log_metric("before", torch.tensor(7.5))  # before any step: step -1
        for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        for i in range(12):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            metric = loss.detach() * 3
            gradscope.log_metric("tripled", metric)
            logged.append((i, metric.clone()))
            metric.add_(100.0)  # changed in place after the call: the logged value is the one at the call
            if i % 5 == 4:
                gradscope.log_metric("count", i)  # a plain number
        assert reads == [], reads[0][1]
        assert all(isinstance(v, torch.Tensor) for _, n, v in rec._metrics.rows if n == "tripled")
        monkeypatch.undo()
    run = gradscope.load_run(tmp_path / "run")
    assert _rows(run, "before") == [(-1, 7.5)]
    got = _rows(run, "tripled")
    assert [s for s, _ in got] == list(range(12))
    assert [v for _, v in got] == [float(t) for _, t in logged]  # bit for bit
    assert _rows(run, "count") == [(4, 4.0), (9, 9.0)]
    assert list(run.metrics.columns) == ["rank", *rundir.METRIC_COLUMNS]


def test_log_metric_is_a_noop_without_gradscope_and_imports_nothing(tmp_path):
    """Without a recorder log_metric does nothing and `import gradscope` pulls in neither torch
    nor pandas; a bad value under gradscope is dropped with one warning, the training goes on."""
    res = python("-c", "import sys, gradscope; gradscope.log_metric('x', 1.0); gradscope.log_metric('x', 'junk'); "
                 "print(sorted(m for m in ('torch', 'pandas', 'transformers', 'lightning') if m in sys.modules))",
                 cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
    with gradscope.record(tmp_path / "run"):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(3, 2)).sum().backward()
        opt.step()
        gradscope.log_metric("bad", "junk")
        gradscope.log_metric("vec", torch.ones(3))
        gradscope.log_metric("good", np.float32(0.25))
    run = gradscope.load_run(tmp_path / "run")
    assert sorted(set(run.metrics["name"])) == ["good"] and _rows(run, "good") == [(0, 0.25)]


def test_a_run_without_metrics_loads_an_empty_table(tmp_path):
    with gradscope.record(tmp_path / "run"):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(3, 2)).sum().backward()
        opt.step()
    assert not (tmp_path / "run" / "metrics-r0.csv").exists()
    run = gradscope.load_run(tmp_path / "run")
    assert run.metrics.empty and list(run.metrics.columns) == ["rank", *rundir.METRIC_COLUMNS]


# ---------------------------------------------------------------- --metric-regex


def test_metric_regex_records_printed_values_at_their_step_and_output_passes_unchanged(tmp_path):
    """The script prints "step N val_loss=V" every 5 steps: each V is recorded under the name at
    step N-1 (the step it was printed after), exactly as printed, and the script's stdout is
    byte for byte what plain python prints."""
    args = [HELDOUT, "--steps", "20", "--every", "5", "--print"]
    plain = python(*args, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    res = gs("run", "-q", "--out", tmp_path / "run", "--metric-name", "val", "--metric-regex",
             r"val_loss=([-0-9.eE+naif]+)", *args, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == plain.stdout
    printed = [(int(l.split()[1]) - 1, float(l.split("=")[1])) for l in plain.stdout.splitlines()]
    assert len(printed) == 4
    run = gradscope.load_run(tmp_path / "run")
    assert _rows(run, "val") == printed
    meta = run.meta
    assert (meta["metric_name"], meta["metric_regex"]) == ("val", r"val_loss=([-0-9.eE+naif]+)")


def test_max_steps_with_metric_name_waits_for_the_value_after_the_last_step(tmp_path):
    """--max-steps 10 alone stops right after the 10th step, before the script reports; with
    --metric-name the stop comes when step 11 begins, so the value reported after step 10 is in."""
    args = [HELDOUT, "--steps", "30", "--every", "5"]
    res = gs("run", "-q", "--out", tmp_path / "bare", "--max-steps", "10", *args, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    res = gs("run", "-q", "--out", tmp_path / "metric", "--max-steps", "10", "--metric-name", "val_loss", *args,
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    bare, metric = gradscope.load_run(tmp_path / "bare"), gradscope.load_run(tmp_path / "metric")
    assert bare.meta["status"] == metric.meta["status"] == "stopped"
    assert len(bare.steps) == len(metric.steps) == 10
    assert [s for s, _ in _rows(bare, "val_loss")] == [4]
    assert [s for s, _ in _rows(metric, "val_loss")] == [4, 9]
    # the 10 recorded steps are the same steps
    np.testing.assert_array_equal(bare.steps["grad_norm"], metric.steps["grad_norm"])


@pytest.mark.parametrize("argv, message", [
    (["--metric-regex", "x=(1)"], "--metric-regex needs --metric-name"),
    (["--metric-name", "x", "--metric-regex", "no group"], "has no group"),
    (["--metric-name", "x", "--metric-regex", "(unclosed"], "not a Python regular expression"),
])
def test_bad_metric_options_are_one_line_and_exit_2(tmp_path, argv, message):
    res = gs("run", "--out", tmp_path / "run", *argv, HELDOUT, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def test_capture_imports_no_framework_the_script_did_not(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import sys, torch\nm = torch.nn.Linear(2, 1)\no = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                     "m(torch.randn(3, 2)).sum().backward()\no.step()\n"
                     "print(sorted(x for x in ('transformers', 'lightning', 'pytorch_lightning', 'pandas') "
                     "if x in sys.modules))\n")
    res = gs("run", "-q", "--out", tmp_path / "run", "--metric-name", "a", "--metric-regex", "a=(1)", probe,
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


# ---------------------------------------------------------------- Hugging Face Trainer


@pytest.mark.slow
def test_hf_trainer_eval_keys_are_recorded_at_their_step(tmp_path):
    """A real Trainer (tiny GPT-2 from a config, random weights, made-up data) evaluating every 3
    steps: every eval_* key it logs is recorded at global_step - 1 with the value it logged."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (40, 16), generator=g)
    data = [{"input_ids": r, "labels": r} for r in ids[:32]]
    held = [{"input_ids": r, "labels": r} for r in ids[32:]]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=7, per_device_train_batch_size=4, learning_rate=3e-3,
        eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=held)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.record(tmp_path / "run"):
            trainer.train()
            trainer.evaluate()  # after the last step: at step 6
    logged = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in logged][:2] == [3, 6] and logged[-1]["step"] == 7  # (and at the end, by version)
    run = gradscope.load_run(tmp_path / "run")
    assert _rows(run, "eval_loss") == [(h["step"] - 1, h["eval_loss"]) for h in logged]
    keys = {k for h in logged for k in h if k.startswith("eval_")}
    assert keys == set(run.metrics["name"]) and "eval_runtime" in keys
    assert "loss" not in set(run.metrics["name"])  # training logs are not eval_* keys


@pytest.mark.slow
def test_hf_trainer_under_gradscope_run_is_patched_at_its_import(tmp_path):
    """The script imports transformers after torch (the recorder is already running): the Trainer
    is patched when transformers.trainer is imported, without a change to the script."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    res = gs("run", "-q", "--out", tmp_path / "run", script("hf_eval_train.py"), tmp_path / "history.json",
             tmp_path / "out", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    history = json.loads((tmp_path / "history.json").read_text())
    logged = [h for h in history if "eval_loss" in h]
    assert len(logged) >= 2
    run = gradscope.load_run(tmp_path / "run")
    assert _rows(run, "eval_loss") == [(h["step"] - 1, h["eval_loss"]) for h in logged]


# ---------------------------------------------------------------- Lightning


@pytest.mark.slow
def test_lightning_self_log_names_are_recorded_at_their_step(tmp_path):
    """A real Lightning fit logging train_loss every step (on_step) and val_loss per validation
    (on_epoch, averaged over its batches), validating every 4 batches after a sanity check: each
    value is recorded at the step it was computed after, equal to what Lightning handed its
    callbacks; the sanity check's value is not recorded."""
    L = pytest.importorskip("lightning")
    seen = {"train_loss": [], "val_loss": []}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen["train_loss"].append((trainer.global_step - 1, float(trainer.callback_metrics["train_loss"])))

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:  # the sanity check's values are not recorded
                seen["val_loss"].append((trainer.global_step - 1, float(trainer.callback_metrics["val_loss"])))

    gc.collect()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = x[:, :1] * 2 + torch.randn(64, 1, generator=g) * 0.1
    def make(s):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[s], y[s]), batch_size=8)
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, val_check_interval=4, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=1, default_root_dir=str(tmp_path), callbacks=[Watch()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.record(tmp_path / "run"):
            trainer.fit(Tiny(), make(slice(0, 64)), make(slice(0, 16)))
    run = gradscope.load_run(tmp_path / "run")
    assert [s for s, _ in seen["val_loss"]] == [3, 7] and len(seen["train_loss"]) == 8
    for name in ("train_loss", "val_loss"):
        got = _rows(run, name)
        assert [s for s, _ in got] == [s for s, _ in seen[name]], name
        np.testing.assert_array_equal(np.array([v for _, v in got], dtype=np.float32),
                                      np.array([v for _, v in seen[name]], dtype=np.float32))
    assert not math.isnan(run.steps["grad_norm"].iloc[0])


@pytest.mark.slow
def test_lightning_under_gradscope_run_is_patched_at_its_import(tmp_path):
    """An unmodified Lightning script under `gradscope run` (Lightning imported by the script,
    after the recorder starts at its torch import): every self.log name at its step."""
    pytest.importorskip("lightning")
    res = gs("run", "-q", "--out", tmp_path / "run", script("lightning_log.py"), tmp_path / "seen.json",
             tmp_path / "root", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    run = gradscope.load_run(tmp_path / "run")
    assert [s for s, _ in seen["val_loss"]] == [3, 7]
    for name in ("train_loss", "val_loss"):
        got = _rows(run, name)
        assert [s for s, _ in got] == [s for s, _ in seen[name]], name
        np.testing.assert_array_equal(np.array([v for _, v in got], dtype=np.float32),
                                      np.array([v for _, v in seen[name]], dtype=np.float32))


# ---------------------------------------------------------------- compare and plot


def test_compare_and_plot_show_the_reported_metrics(tmp_path):
    """compare's JSON and table carry each name's last value and its step; plot and compare draw
    a metrics panel; a run without metrics has none (and no column)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.record(tmp_path / "with"):
        for i in range(6):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % 2 == 1:
                gradscope.log_metric("acc", 0.1 * i)
    with gradscope.record(tmp_path / "without"):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    res = gs("compare", tmp_path / "with", tmp_path / "without", "--json", "-o", tmp_path / "cmp.png", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)["runs"]
    assert runs[0]["metrics"] == {"acc": {"step": 5, "value": 0.5}} and runs[1]["metrics"] == {}
    table = gs("compare", tmp_path / "with", tmp_path / "without", "--no-plot", cwd=tmp_path)
    assert "last metrics" in table.stdout and "acc=0.5@5" in table.stdout

    from gradscope.analysis.compare import compare_rows
    from gradscope.report import compare as cmp_report, plot

    data = plot.plot_data(gradscope.load_run(tmp_path / "with"))
    assert data.metrics["step"].tolist() == [1, 3, 5]
    titles = [ax.get_title(loc="left") for ax in plot.build_figure(data).axes]
    assert any(t.startswith("metrics the script reported") for t in titles)
    assert plot.plot_data(gradscope.load_run(tmp_path / "without")).metrics is None
    rows = compare_rows("w", gradscope.load_run(tmp_path / "with"))
    assert len(cmp_report.build_figure(rows).axes) == 3


# ---------------------------------------------------------------- ranking by the metric (pure)


def _table(rows):
    import pandas as pd

    return pd.DataFrame({"rank": 0, "step": [s for s, _, _ in rows], "name": [n for _, n, _ in rows],
                         "value": [v for _, _, v in rows]})


def _summary(tau, n=20, last=1.0):
    import pandas as pd

    from gradscope.analysis import tune as decide
    from gradscope.rundir import normalize_steps

    steps = normalize_steps(pd.DataFrame({"rank": 0, "optimizer": 0, "step": np.arange(n),
                                          "loss": np.linspace(2, last, n), "grad_norm": np.ones(n)}))
    return decide.summarize(steps, tau, n)


def test_with_metric_ranks_by_the_value_after_the_horizon_and_never_by_loss():
    """The value ranked is NAME's last one reported after step horizon-1 (negated with maximize);
    a probe without one keeps its loss figures, gets no score, and is said to have none; when no
    probe has one, nothing is chosen and the reason names the metric."""
    from gradscope.analysis import tune as decide

    m = _table([(9, "val", 0.7), (19, "val", 0.5), (19, "val", 0.4), (19, "other", 9.0)])
    s = decide.with_metric(_summary(1.0), m, "val", 20)
    assert (s.metric, s.score, s.score_se, s.unranked) == (0.4, 0.4, 0.0, None)
    assert s.loss == _summary(1.0).loss  # the loss figures stay as they were
    assert decide.with_metric(_summary(1.0), m, "val", 20, maximize=True).score == -0.4
    none = decide.with_metric(_summary(2.0), m, "val", 15)
    assert math.isnan(none.score) and none.unranked == "no val value after step 15" and not none.diverged
    # the unranked probe has the lower training loss: it is still not chosen
    better_loss = decide.with_metric(_summary(2.0, last=0.1), _table([]), "val", 20)
    assert better_loss.loss < s.loss
    assert decide.choose([s, better_loss]).clip_norm == 1.0
    nothing = decide.choose([none, better_loss])
    assert nothing.clip_norm is None and "reported val" in nothing.reason


def test_report_horizons_and_align():
    from gradscope.analysis import tune as decide

    m = _table([(-1, "val", 1.0), (9, "val", 0.7), (19, "val", 0.5), (4, "x", 0.0)])
    assert decide.report_horizons(m, "val", 20, 60, complete=True) == [10, 20]
    assert decide.report_horizons(m, "val", 20, 60, complete=False) == [10, 20, 30, 40, 50, 60]
    assert decide.report_horizons(m, "nope", 20, 60, complete=True) == []
    assert [decide.align(n, [10, 20, 30]) for n in (5, 10, 19, 45)] == [10, 10, 10, 30]
    assert decide.align(17, []) == 17
