"""`gradscope run --max-steps N`: the training ends after optimizer 0's Nth step, exit 0, status
`stopped`, data flushed, and those N steps are bit-identical to the unstopped training."""
from __future__ import annotations

import json

import pytest
import torch

import gradscope
from gsutil import gradscope as gs, python, script

STOP = script("stop_train.py")


def _same_weights(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rows(run_dir, n=None):
    """The recorded rows without the wall-clock column, as the CSV holds them (exact strings)."""
    lines = (run_dir / "steps-r0.csv").read_text().splitlines()
    header, body = lines[0].split(","), [l.split(",") for l in lines[1:]]
    keep = [i for i, c in enumerate(header) if c != "time"]
    body = [[r[i] for i in keep] for r in body]
    return body[:n] if n is not None else body


@pytest.mark.parametrize("mode", ["plain", "amp", "closure"])
def test_max_steps_stops_after_n_steps_bit_identical(tmp_path, mode):
    """Weights after the stop equal a plain 7-step run; the 7 rows equal the first 7 of the
    unstopped recorded run; meta.json says stopped with max_steps 7; exit status 0."""
    plain = python(STOP, "--mode", mode, "--steps", "7", "--save", tmp_path / "plain.pt", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    full = gs("run", "-q", "--out", tmp_path / "full", STOP, "--mode", mode, "--steps", "20", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    res = gs("run", "--out", tmp_path / "stopped", "--max-steps", "7", STOP, "--mode", mode, "--steps", "20",
             "--save", tmp_path / "stopped.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "stopping the training after 7 optimizer steps" in res.stderr
    assert "gradscope: stopped (exit code 0)" in res.stderr
    _same_weights(tmp_path / "plain.pt", tmp_path / "stopped.pt")
    # The script's finally ran; its counter stops at 6: the 7th step() completed, then raised.
    assert json.loads((tmp_path / "stopped.pt.json").read_text()) == {"done": 6}

    meta = json.loads((tmp_path / "stopped" / "meta.json").read_text())
    assert (meta["status"], meta["exit_code"], meta["max_steps"]) == ("stopped", 0, 7)
    assert json.loads((tmp_path / "full" / "meta.json").read_text())["status"] == "completed"
    rows = _rows(tmp_path / "stopped")
    assert len(rows) == 7
    assert rows == _rows(tmp_path / "full", 7)
    run = gradscope.load_run(tmp_path / "stopped")
    assert run.meta["processes"][0]["status"] == "stopped"
    assert run.steps["step"].tolist() == list(range(7))
    if mode == "amp":  # the scaler's skipped steps count as steps (they are rows)
        assert run.steps["skipped"].sum() >= 2
        assert not run.steps["skipped"].all()


def test_max_steps_longer_than_the_training_is_completed(tmp_path):
    res = gs("run", "-q", "--out", tmp_path / "run", "--max-steps", "50", STOP, "--steps", "5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert (meta["status"], meta["max_steps"]) == ("completed", 50)
    assert len(gradscope.load_run(tmp_path / "run").steps) == 5


def test_max_steps_counts_the_first_optimizer_only(tmp_path):
    """Optimizer 1 (stepped first in each iteration) has made 4 steps when optimizer 0 makes its 4th."""
    res = gs("run", "-q", "--out", tmp_path / "run", "--max-steps", "4", STOP, "--mode", "two", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    s = gradscope.load_run(tmp_path / "run").steps
    counts = s.groupby("optimizer").size().to_dict()
    assert counts == {0: 4, 1: 4}


def test_max_steps_with_dataloader_workers_ends_cleanly(tmp_path):
    res = gs("run", "-q", "--out", tmp_path / "run", "--max-steps", "3", STOP, "--mode", "workers",
             "--steps", "40", "--save", tmp_path / "w.pt", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads((tmp_path / "w.pt.json").read_text()) == {"done": 2}
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["status"] == "stopped"
    assert len(gradscope.load_run(tmp_path / "run").steps) == 3


@pytest.mark.parametrize("bad", ["0", "-2", "x"])
def test_bad_max_steps_is_a_usage_error(tmp_path, bad):
    res = gs("run", "--out", tmp_path / "run", "--max-steps", bad, STOP, cwd=tmp_path)
    assert res.returncode == 2
    assert not (tmp_path / "run").exists()




@pytest.mark.slow
def test_max_steps_under_lightning_stops_after_the_whole_closure_step(tmp_path):
    """Lightning steps with optimizer.step(closure) (backward, accumulation and its own clipping
    inside): --max-steps 3 ends after the 3rd whole step, with the weights of Lightning's own
    Trainer(max_steps=3), status stopped, exit 0."""
    pytest.importorskip("lightning")
    train = script("lightning_tiny.py")
    own = python(train, "0.5", "3", tmp_path / "own.pt", cwd=tmp_path, timeout=300)
    assert own.returncode == 0, own.stderr
    res = gs("run", "--out", tmp_path / "run", "--max-steps", "3", train, "0.5", "-1", tmp_path / "rec.pt",
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    _same_weights(tmp_path / "own.pt", tmp_path / "rec.pt")
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert (meta["status"], meta["exit_code"], meta["max_steps"]) == ("stopped", 0, 3)
    s = gradscope.load_run(tmp_path / "run").steps
    assert s["step"].tolist() == [0, 1, 2] and (s["clip_max_norm"] == 0.5).all()
