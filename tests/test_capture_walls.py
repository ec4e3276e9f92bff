"""Capture's inside walls: the patches are handles that put back the very objects they replaced,
the recorder's state is reached only through its event API, the row layout is named once, and the
flusher writes rows and a snapshot without a recorder."""
from __future__ import annotations

import ast
import csv
import inspect
import json
import math
from pathlib import Path

import torch

import gradscope
from gradscope import rundir
from gradscope.capture import flushing, patches, rows
from gradscope.capture.recorder import Recorder, _OptState, _Row

CAPTURE = Path(gradscope.__file__).parent / "capture"


def _patched(rec: Recorder) -> list[patches.Patch]:
    return [h for h in rec._handles if isinstance(h, patches.Patch)]


def test_stop_puts_back_every_patched_attribute_as_the_identical_object(tmp_path):
    from torch.optim import optimizer as optim_mod

    pre_hooks, post_hooks = len(optim_mod._global_optimizer_pre_hooks), len(optim_mod._global_optimizer_post_hooks)
    rec = Recorder(tmp_path / "r", handle_sigterm=False)
    rec.start()
    try:
        handles = _patched(rec)
        # every torch attribute the recorder hooks, the clip audit's among them
        names = {(getattr(h.owner, "__name__", type(h.owner).__name__), h.name) for h in handles}
        for want in [("Optimizer", "__init__"), ("torch.autograd", "backward"), ("GradScaler", "step"),
                     ("GradScaler", "scale"), ("GradScaler", "unscale_"), ("Tensor", "zero_"),
                     ("torch.nn.utils.clip_grad", "_get_total_norm"), ("torch.nn.utils", "get_total_norm"),
                     ("torch.nn.utils.clip_grad", "_clip_grads_with_norm_"), ("Module", "zero_grad")]:
            assert want in names, want
        before = [(h.owner, h.name, h.original) for h in handles]
        assert all(getattr(h.owner, h.name) is h.replacement for h in handles)
        assert all(h.original is not h.replacement for h in handles)
        assert len(optim_mod._global_optimizer_pre_hooks) == pre_hooks + 1
    finally:
        rec.stop()
    for owner, name, original in before:
        assert getattr(owner, name) is original, (owner, name)
    assert not rec._handles
    assert len(optim_mod._global_optimizer_pre_hooks) == pre_hooks
    assert len(optim_mod._global_optimizer_post_hooks) == post_hooks


def test_handles_are_removed_in_reverse_order(tmp_path):
    """Two patches of one attribute (a framework patched twice): removing them last-first restores
    the original; first-last would leave the first wrapper in place."""

    class Owner:
        @staticmethod
        def f():
            return "original"

    original = Owner.f
    rec = Recorder(tmp_path / "r", handle_sigterm=False)
    rec.start()
    try:
        rec.patch(Owner, "f", lambda orig: (lambda: "one:" + orig()))
        rec.patch(Owner, "f", lambda orig: (lambda: "two:" + orig()))
        assert Owner.f() == "two:one:original"
    finally:
        rec.stop()
    assert Owner.f is original


def test_a_patch_handle_leaves_a_later_wrapper_in_place():
    """A wrapper installed over ours after us stays (ours passes through once the recorder is closed)."""

    class Owner:
        value = "original"

    h = patches.replace(Owner, "value", "ours")
    Owner.value = "theirs"
    h.remove()
    assert Owner.value == "theirs"
    h2 = patches.replace(Owner, "value", "ours again")
    h2.remove()
    h2.remove()  # idempotent, as RemovableHandle.remove
    assert Owner.value == "theirs"


def _private_uses(path: Path, names: tuple[str, ...]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{n.lineno} {n.value.id}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
            and isinstance(n.value, ast.Name) and n.value.id in names]


def test_no_module_reads_or_writes_the_recorders_private_state():
    """Patches, flushing, the step limit, metrics and the engines reach the recorder through its
    public event API only (on_step, on_backward, on_clip, recording(), patch(), ...)."""
    bad = []
    for p in CAPTURE.glob("*.py"):
        if p.name != "recorder.py":
            bad += _private_uses(p, ("rec", "recorder"))
    assert not bad, bad


def test_the_row_layout_is_named_once_and_matches_the_steps_columns():
    assert rows.ROW == ("grad_norm", "loss", "clipped", "skipped", "loss_scale")
    assert [rows.ROW[i] for i in (rows.GRAD_NORM, rows.LOSS, rows.CLIPPED, rows.SKIPPED, rows.LOSS_SCALE)] == \
        list(rows.ROW)
    assert set(rows.ROW) <= set(rundir.STEP_COLUMNS)
    # stack_row's keywords are the layout's names in its order: a row is stacked by name
    params = list(inspect.signature(rows.stack_row).parameters)[2:]
    assert params == list(rows.ROW)
    t = [torch.tensor(float(i)) for i in range(5)]
    row = rows.stack_row(torch.device("cpu"), torch.float64, **dict(zip(rows.ROW, t)))
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rows.FIELDS(row.tolist()) == (0.0, 1.0, 2.0, 3.0, 4.0)


def test_the_flusher_writes_rows_and_a_snapshot_without_a_recorder(tmp_path):
    """flushing.Flusher takes an optimizer's rows and a snapshot callable: the steps file holds the
    rows' values (checked against the numbers given), the process file the snapshot, completed with
    what only the writer knows."""
    run = tmp_path / "r"
    run.mkdir()
    p = torch.nn.Parameter(torch.zeros(3))
    st = _OptState(id=0, cls="SGD", kind="optimizer", params=[p], n_elements=3, names=["w"])
    given = [(0.5, 2.25, 0.0, 0.0), (1.75, float("nan"), 1.0, 0.0), (3.0, 1.5, 0.0, 1.0)]
    made = []
    for step, (gn, loss, clipped, skipped) in enumerate(given):
        values = torch.tensor([gn, loss, clipped, skipped, 1024.0], dtype=torch.float64)
        made.append(_Row(step, 1.0, float("nan"), 0.125, 1000.0 + step, values, None,
                         loss_recorded=step != 1))
    asked = []

    def snapshot(rank):
        asked.append(rank)
        return {"rank": rank, "run_id": None, "closed": True, "recording_error": None, "status": "completed",
                "optimizers": [{"id": 0, "steps": len(given)}]}

    f = flushing.Flusher(str(run), rank=lambda: 0, flush_seconds=60.0, snapshot=snapshot, changes=lambda: ())
    f.flush([(st, made)])
    f.drain(block=True)
    f.write_process()
    f.close()
    with open(run / rundir.steps_file(0), newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in lines] == [0, 1, 2]
    for r, (gn, loss, clipped, skipped) in zip(lines, given):
        assert float(r["grad_norm"]) == gn
        assert (r["loss"] == "") if math.isnan(loss) else float(r["loss"]) == loss  # no loss recorded: empty
        assert float(r["clipped"]) == clipped and float(r["skipped"]) == skipped
        assert float(r["loss_scale"]) == 1024.0 and float(r["lr"]) == 0.125
    info = json.loads((run / rundir.process_file(0)).read_text())
    assert asked and set(asked) == {0}
    assert info["format_version"] == rundir.FORMAT_VERSION and info["status"] == "completed"
    assert info["closed"] is True and info["recording_error"] is None and info["run_id"] == ""
    assert f.first_bad is None  # the NaN loss was not recorded: not a bad step
