"""`gradscope tune --metric`: probes ranked by a metric the script reports instead of the training
loss, on a task where the two order the thresholds oppositely (heldout_train.py: the faster it
fits pure-noise labels, the lower its training loss and the higher its held-out loss). Every
figure is checked against an in-process replay of the training. Real `gradscope run`s: slow."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradscope
from gradscope.analysis import tune as decide
from gsutil import gradscope as gs, script

pytestmark = pytest.mark.slow
HELDOUT = script("heldout_train.py")
T, EVERY = 40, 10
TAUS = (0.05, 2.0)


def _replay(clip: float | None, steps: int = T) -> tuple[float, float]:
    """heldout_train.py in process: (last training loss, held-out loss after `steps` steps), float32."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 64), torch.randn(16, 1)
    Xv = torch.randn(256, 64)
    model = torch.nn.Linear(64, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(X), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    with torch.no_grad():
        return float(loss), float(model(Xv).pow(2).mean())


@pytest.mark.parametrize("source", ["log_metric", "regex"])
def test_metric_picks_the_held_out_best_where_training_loss_would_not(tmp_path, source):
    """Ranked by val_loss, tune takes the smallest threshold (the held-out best of the replays);
    the same probes ranked by their training loss would take another one. The JSON carries the
    metric of each candidate (equal to the replay's value at T) and names what was ranked."""
    out = tmp_path / "t"
    extra = ["--metric-regex", r"val_loss=(\S+)"] if source == "regex" else []
    script_args = ["--steps", str(T), "--every", str(EVERY)] + (["--print"] if source == "regex" else [])
    res = gs("tune", "--steps", str(T), "--candidates", ",".join(map(str, TAUS)), "--metric", "val_loss", *extra,
             "--out", out, "--json", HELDOUT, *script_args, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert (j["metric"], j["maximize"]) == ("val_loss", False)
    replays = {t: _replay(None if t is None else t) for t in (*TAUS, None)}
    for c in j["candidates"]:
        assert c["steps"] == T and c["unranked"] is None
        assert np.float32(c["metric"]) == np.float32(replays[c["clip_norm"]][1]), c
    best_held_out = min(replays, key=lambda t: replays[t][1])
    assert best_held_out == min(TAUS)
    assert j["recommended_clip_norm"] == best_held_out and j["choice"] == "clip"
    assert "val_loss" in j["reason"]

    # The same probes, ranked by their training loss (the pure choice without --metric)
    summaries = []
    for c in j["candidates"]:
        run = gradscope.load_run(c["probes"][-1]["run_dir"])
        tau = decide.AS_IS if c["clip_norm"] is None else c["clip_norm"]
        summaries.append(decide.summarize(run.steps, tau, T))
    by_loss = decide.choose(summaries, full_horizon=True).clip_norm
    assert by_loss != best_held_out
    best_training = min(replays, key=lambda t: replays[t][0])
    assert best_training is None or best_training == max(TAUS)  # the fastest fit: no clip, or the largest
    assert (None if by_loss == decide.AS_IS else by_loss) == best_training
    assert (out / "tune.png").stat().st_size > 0


def test_a_metric_never_reported_is_one_line_and_exit_2(tmp_path):
    res = gs("tune", "--steps", "20", "--candidates", "0.1", "--metric", "nope", "--out", tmp_path / "t",
             HELDOUT, "--steps", "20", "--every", "5", cwd=tmp_path, timeout=600)
    assert res.returncode == 2 and "reported no value of 'nope'" in res.stderr and "val_loss" in res.stderr
    assert "Traceback" not in res.stderr


def test_maximize_without_metric_is_a_usage_error(tmp_path):
    res = gs("tune", "--maximize", "--out", tmp_path / "t", HELDOUT, cwd=tmp_path)
    assert res.returncode == 2 and "--maximize needs --metric" in res.stderr
