"""Distributed training under `gradscope run`: real torchrun (2 ranks, gloo, CPU).

Every recorded `grad_norm` is compared with a float64 norm of the *full*
gradients that the training script computes itself (tests/dist_scripts/cases.py),
for DDP, DDP with no_sync() accumulation + autocast + GradScaler, FSDP2 without
clipping and FSDP2 with the script's own clip_grad_norm_. Launches dominate the
time, so one launch runs every case (one optimizer each, ids 0..3).
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradscope
from gradscope.analysis.ranks import missing_ranks, rank_disagreement
from gsutil import env_without_gradscope, gradscope as gs

CASES = ["ddp", "accum", "fsdp", "fsdp_clip"]  # optimizer ids 0..3 in launch order
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
CASES_PY = str(SCRIPTS / "cases.py")
RTOL = 2e-6  # float32 norms against float64 references

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *map(str, args)]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    res = gs("run", "--out", tmp / "run", "--", *_torchrun(CASES_PY, tmp / "out"), cwd=tmp, timeout=180)
    assert res.returncode == 0, _tail(res)
    (tmp / "gradscope-stderr.txt").write_text(res.stderr)  # for the announcement test
    return tmp / "run", tmp / "out"


def _tail(res) -> str:
    return (res.stdout + res.stderr)[-6000:]  # the ranks' own tracebacks, not only torchrun's summary


def _ref(out: Path, case: str, rank: int = 0) -> dict:
    return json.loads((out / f"ref-{case}-r{rank}.json").read_text())


def _steps(run, case: str, rank: int):
    s = run.steps
    return s[(s["rank"] == rank) & (s["optimizer"] == CASES.index(case))].reset_index(drop=True)


def _layers(run_dir: Path, case: str, rank: int) -> pd.DataFrame:
    """One optimizer's per-layer table of one rank (`step` then one column per parameter)."""
    store = gradscope.load_run(run_dir).layer_norms
    key = (rank, CASES.index(case))
    df = pd.DataFrame(store.rows(*key, slice(None)), columns=store.names(*key))
    df.insert(0, "step", store.steps(*key))
    return df


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_grad_norm_is_the_full_model_norm_on_every_rank(recorded, case):
    """DDP (all-reduced grads) and FSDP2 (sharded DTensor grads): grad_norm is what
    clip_grad_norm_ computes on the full model, on each rank, not a shard's norm."""
    run_dir, out = recorded
    run = gradscope.load_run(run_dir)
    ref = _ref(out, case)
    for rank in (0, 1):
        s = _steps(run, case, rank)
        assert list(s["step"]) == list(range(len(ref["grad_norm"])))
        np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=RTOL)
    assert rank_disagreement(run.steps).empty
    assert missing_ranks(run) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_per_layer_norms_are_full_parameter_norms(recorded, case):
    """Under FSDP2 each rank holds a shard; the per-layer table holds the full parameter's norm."""
    run_dir, out = recorded
    ref = np.array(_ref(out, case)["layers"])
    for rank in (0, 1):
        layers = _layers(run_dir, case, rank)
        assert list(layers["step"]) == list(range(len(ref)))
        np.testing.assert_allclose(layers.drop(columns="step").to_numpy(), ref, rtol=RTOL)


@pytest.mark.slow
def test_fsdp2_clip_total_is_reused_exactly(recorded):
    """When the script clips, the recorded norm is the total torch computed (already reduced)."""
    run_dir, out = recorded
    run = gradscope.load_run(run_dir)
    ref = _ref(out, "fsdp_clip")
    for rank in (0, 1):
        s = _steps(run, "fsdp_clip", rank)
        # written with 9 significant digits: exact as float32
        np.testing.assert_array_equal(s["grad_norm"].to_numpy(np.float32), np.float32(ref["clip_total"]))
        assert (s["clip_max_norm"] == 0.5).all()
        np.testing.assert_array_equal(s["clipped"], np.array(ref["grad_norm"]) > 0.5)


@pytest.mark.slow
def test_loss_is_kept_per_rank_and_load_run_reads_one_rank(recorded):
    """Each rank's own loss (its own batch) lands in its rows; load_run(rank=1) reads rank 1 only."""
    run_dir, out = recorded
    merged = gradscope.load_run(run_dir)
    assert sorted(merged.steps["rank"].unique()) == [0, 1]
    one = gradscope.load_run(run_dir, rank=1)
    assert set(one.steps["rank"]) == {1} and set(one.layers["rank"]) == {1}
    for case in CASES:
        for rank in (0, 1):
            s = _steps(merged, case, rank)
            np.testing.assert_allclose(s["loss"], _ref(out, case, rank)["loss"], rtol=1e-6)
    # the ranks trained on different batches: their losses differ
    assert not np.allclose(_steps(merged, "ddp", 0)["loss"], _steps(merged, "ddp", 1)["loss"])


@pytest.mark.slow
def test_ddp_accumulation_with_no_sync_and_amp_behaves_as_one_process(recorded):
    """no_sync() micro-batches + bf16 autocast + GradScaler: one row per optimizer step,
    the unscaled pre-clip norm, the summed unscaled loss, the scale, the clip flag."""
    run_dir, out = recorded
    run = gradscope.load_run(run_dir)
    ref = _ref(out, "accum")
    for rank in (0, 1):
        s = _steps(run, "accum", rank)
        assert len(s) == len(ref["grad_norm"])  # 3 backward calls per row
        np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=RTOL)
        np.testing.assert_allclose(s["grad_norm"], ref["clip_total"], rtol=RTOL)
        np.testing.assert_array_equal(s["loss_scale"], ref["loss_scale"])
        assert not s["skipped"].any()
        np.testing.assert_array_equal(s["clipped"], np.array(ref["clip_total"]) > 0.6)
    assert _steps(run, "accum", 0)["clipped"].any() and not _steps(run, "accum", 0)["clipped"].all()


@pytest.mark.slow
def test_only_rank_0_says_the_first_step_was_recorded(recorded):
    """Two ranks record, one line says so: `gradscope run` announces once, not once per rank."""
    err = (recorded[0].parent / "gradscope-stderr.txt").read_text().splitlines()
    assert sum(line.startswith("gradscope: recording into ") for line in err) == 1
    first = [line for line in err if "first optimizer step recorded" in line]
    assert len(first) == 1 and "(optimizer 0 " in first[0]


@pytest.mark.slow
def test_clip_audit_finds_nothing_in_ddp_no_sync_accumulation_and_fsdp2(recorded):
    """Controls of the clip audit: DDP; DDP with no_sync() accumulation, GradScaler with unscale_
    before the clip; FSDP2 with and without the script's clip_grad_norm_. No finding on any rank."""
    from gradscope.analysis.audit import findings

    run_dir, _ = recorded
    run = gradscope.load_run(run_dir)
    procs = run.meta["processes"]
    assert sorted(p["rank"] for p in procs) == [0, 1]
    for p in procs:
        assert p["clip_audit"] == {"findings": [], "error": None}
        assert p["clip_calls"]["clip_grad_norm_"] == 2 * 4  # accum and fsdp_clip clipped every step
    assert findings(run) == []


@pytest.mark.slow
def test_training_is_bit_identical_with_and_without_gradscope(recorded, tmp_path):
    """The recorder's collectives and hooks change nothing: same final weights, bit for bit."""
    import subprocess

    _, out = recorded
    plain = tmp_path / "plain"
    res = subprocess.run(_torchrun(CASES_PY, plain), cwd=tmp_path, capture_output=True, text=True,
                         timeout=180, env=env_without_gradscope())
    assert res.returncode == 0, _tail(res)
    for case in CASES:
        a = torch.load(out / f"state-{case}.pt")
        b = torch.load(plain / f"state-{case}.pt")
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{case}: {k} differs"


@pytest.mark.slow
def test_a_crashed_rank_leaves_the_others_data_and_its_exit_status(tmp_path):
    """Rank 1 raises at step 3: torchrun fails, gradscope exits with torchrun's status,
    rank 0's flushed steps still load."""
    res = gs("run", "-q", "--flush-steps", "1", "--out", tmp_path / "run", "--",
             *_torchrun(CASES_PY, tmp_path / "out", "--cases", "ddp", "--steps", "6",
                        "--crash-rank", "1", "--crash-at", "3"), cwd=tmp_path, timeout=180)
    assert res.returncode == 1, _tail(res)
    run = gradscope.load_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and run.meta["exit_code"] == 1
    r0 = run.rank(0).steps
    assert len(r0) >= 3 and list(r0["step"][:3]) == [0, 1, 2]
    assert len(run.rank(1).steps) == 3  # steps 0..2, then the exception


@pytest.mark.slow
def test_mp_spawn_ranks_are_recorded_but_not_dataloader_workers(tmp_path):
    """mp.spawn ranks are spawn children like DataLoader workers: recorded once they join
    a process group; the spawn-context DataLoader worker leaves no file. No flush before the
    script destroys its group (--flush-seconds 600): each rank still writes under its own rank
    (it is taken while the group exists; mp.spawn sets no RANK to fall back on)."""
    res = gs("run", "-q", "--flush-seconds", "600", "--out", tmp_path / "run", str(SCRIPTS / "spawn_ranks.py"), str(_free_port()),
             cwd=tmp_path, timeout=180)
    assert res.returncode == 0, _tail(res)
    run = gradscope.load_run(tmp_path / "run")
    assert sorted(p["rank"] for p in run.meta["processes"]) == [0, 1]
    assert sorted(f.name for f in (tmp_path / "run").glob("steps-r*.csv")) == ["steps-r0.csv", "steps-r1.csv"]
    assert len(run.rank(0).steps) == 4 and rank_disagreement(run.steps).empty


# ---------------------------------------------------------------------- fast


def test_rank_disagreement_flags_desynchronised_steps():
    """Steps where ranks disagree beyond 1e-4 (or finite vs NaN) are reported; a rank missing
    a step (crashed) or all ranks NaN is not a disagreement."""
    steps = pd.DataFrame({
        "rank": [0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1],
        "optimizer": [0] * 9 + [1, 1],
        "step": [0, 0, 1, 1, 2, 2, 3, 3, 4, 0, 0],
        "grad_norm": [1.0, 1.0 + 1e-6, 1.0, 1.001, np.nan, np.nan, 2.0, np.inf, 3.0, 5.0, 4.0],
    })
    bad = rank_disagreement(steps)
    assert list(zip(bad["optimizer"], bad["step"])) == [(0, 1), (0, 3), (1, 0)]
    assert bad["rel_diff"].iloc[0] == pytest.approx(0.001 / 1.001)
    assert np.isinf(bad["rel_diff"].iloc[1])
    assert (bad["rank_min"].iloc[2], bad["rank_max"].iloc[2]) == (1, 0)
    assert rank_disagreement(steps, rtol=0.5).shape[0] == 1  # only finite-vs-inf remains
    assert rank_disagreement(steps[steps["rank"] == 0]).empty  # one rank: nothing to compare


@pytest.mark.slow
def test_max_steps_stops_every_rank_at_the_same_step(tmp_path):
    """`gradscope run --max-steps 3 -- torchrun ...`: both ranks end after their 3rd DDP step,
    cleanly (torchrun and gradscope exit 0), status stopped, 3 rows per rank."""
    res = gs("run", "-q", "--max-steps", "3", "--out", tmp_path / "run", "--",
             *_torchrun(CASES_PY, tmp_path / "out", "--cases", "ddp", "--steps", "8"), cwd=tmp_path, timeout=180)
    assert res.returncode == 0, _tail(res)
    run = gradscope.load_run(tmp_path / "run")
    assert (run.meta["status"], run.meta["exit_code"], run.meta["max_steps"]) == ("stopped", 0, 3)
    for r in (0, 1):
        assert list(run.rank(r).steps["step"]) == [0, 1, 2]
    assert [p["status"] for p in run.meta["processes"]] == ["stopped", "stopped"]
