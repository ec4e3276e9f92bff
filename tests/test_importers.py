"""gradscope.importers: other trainers' logs, written the way those trainers write them,
read back into the Run table with the values that were written."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from gradscope.errors import GradscopeError
from gradscope.importers import FORMATS, open_run

NAN, INF = float("nan"), float("inf")


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def col(run, name):
    return [float(x) for x in run.steps[name]]


def has_note(run, *words) -> bool:
    return any(all(w.lower() in n.lower() for w in words) for n in run.meta["notes"])


def assert_contract(run, fmt):
    assert run.source == fmt
    for k in ("status", "exit_code", "format", "clip_norm", "sampled", "logging_steps", "notes", "source_path"):
        assert k in run.meta, k
    assert run.meta["format"] == fmt and run.meta["exit_code"] is None
    assert list(run.steps.columns[:3]) == ["rank", "optimizer", "step"]
    assert (run.steps["rank"] == 0).all() and (run.steps["optimizer"] == 0).all()
    assert {"rank", "optimizer", "step"} <= set(run.layers.columns)


# ---------------------------------------------------------------- Hugging Face


@dataclasses.dataclass
class TrainerState:
    """The fields of transformers' TrainerState that save_to_json writes."""

    epoch: float | None = None
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list = dataclasses.field(default_factory=list)
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict | None = None
    stateful_callbacks: dict | None = None


def save_state(path: Path, state: TrainerState, crlf: bool = False) -> Path:
    # TrainerState.save_to_json: json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
    text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", "\r\n").encode() if crlf else text.encode())
    return path


TRAIN = [  # (step, loss, grad_norm, learning_rate)
    (5, 2.3456, 1.0528565645217896, 4.8e-06),
    (10, 2.1002, NAN, 9.8e-06),
    (15, 1.9876, INF, 9.466666666666667e-06),
    (20, 1.8001, 0.7446250915527344, 8.91111111111111e-06),
]


def hf_history(train=TRAIN, evals=True):
    hist = []
    for i, (s, loss, g, lr) in enumerate(train):
        hist.append({"epoch": 0.05 * (i + 1), "grad_norm": g, "learning_rate": lr, "loss": loss, "step": s})
        if evals and s % 10 == 0:
            hist.append({"epoch": 0.05 * (i + 1), "eval_loss": 2.5, "eval_runtime": 1.2, "step": s})
            hist.append({"epoch": 0.05 * (i + 1), "eval_g0_loss": 2.6, "eval_g0_runtime": 1.1, "step": s})
    if evals:
        hist.append({"predict_loss": 2.7, "predict_runtime": 3.0})  # predict rows can lack a step
    return hist


def test_hf_trainer_state_keeps_train_rows_with_their_values(tmp_path):
    hist = hf_history() + [
        {"epoch": 0.2, "step": 20, "total_flos": 1e15, "train_loss": 2.05, "train_runtime": 60.1,
         "train_samples_per_second": 5.0, "train_steps_per_second": 0.3}
    ]
    f = save_state(tmp_path / "trainer_state.json", TrainerState(global_step=20, max_steps=20, logging_steps=5, log_history=hist))
    assert "NaN" in f.read_text() and "Infinity" in f.read_text()  # bare tokens, as json.dumps writes them

    run = open_run(f)
    assert_contract(run, "hf")
    assert list(run.steps["step"]) == [s for s, *_ in TRAIN]  # eval, predict and summary rows excluded
    for got, (_, loss, g, lr) in zip(run.steps.itertuples(), TRAIN):
        assert same(got.grad_norm, g) and got.loss == loss and got.lr == lr
    assert math.isnan(run.steps["grad_norm"][1]) and math.isinf(run.steps["grad_norm"][2])
    assert run.meta["status"] == "completed"
    assert run.meta["sampled"] is True and run.meta["logging_steps"] == 5
    assert run.meta["clip_norm"] is None
    assert has_note(run, "logging_nan_inf_filter") and has_note(run, "last optimizer step", "averaged")
    assert len(run.layers) == 0


def test_hf_crlf_rounded_midrun_checkpoint_with_args_json_one_level_up(tmp_path):
    train = [(s, round(3.0 - s / 1000, 4), 0.2 + s / 1000, 1e-5) for s in range(50, 501, 50)]
    ckpt = tmp_path / "out" / "checkpoint-500"
    f = save_state(
        ckpt / "trainer_state.json",
        TrainerState(global_step=500, max_steps=2000, logging_steps=10, log_history=hf_history(train, evals=False)),
        crlf=True,
    )
    assert b"\r\n" in f.read_bytes()
    (tmp_path / "out" / "training_args.json").write_text(json.dumps({"max_grad_norm": 0.5, "logging_steps": 10}))

    run = open_run(f)
    assert list(run.steps["step"]) == list(range(50, 501, 50))
    assert col(run, "grad_norm") == [g for _, _, g, _ in train]
    assert col(run, "loss") == [l for _, l, _, _ in train]
    assert run.meta["clip_norm"] == 0.5
    assert col(run, "clip_max_norm") == [0.5] * 10
    assert list(run.steps["clipped"]) == [g > 0.5 for _, _, g, _ in train]
    assert run.meta["logging_steps"] == 50 and run.meta["sampled"]
    assert has_note(run, "mid-run checkpoint", "global_step 500", "max_steps 2000")
    assert has_note(run, "logging_steps=10", "50 steps apart")
    assert has_note(run, "rounded to 4 decimals")
    assert run.meta["status"] == "unknown"


class _Evil:
    """Stands for training_args.bin: unpickling it would run a shell command."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",),
                {"output_dir": "out", "max_grad_norm": 0.3, "logging_nan_inf_filter": False, "logging_steps": 1})


def test_hf_training_args_bin_is_read_without_unpickling(tmp_path):
    torch = pytest.importorskip("torch")
    sentinel = tmp_path / "UNPICKLED"
    torch.save(_Evil(str(sentinel)), tmp_path / "training_args.bin")
    save_state(tmp_path / "trainer_state.json", TrainerState(global_step=20, max_steps=20, log_history=hf_history(evals=False)))

    run = open_run(tmp_path)  # a directory holding one trainer_state.json
    assert not sentinel.exists()
    assert run.meta["clip_norm"] == 0.3
    assert not has_note(run, "logging_nan_inf_filter")  # the args say the filter was off
    assert has_note(run, "training_args.bin", "nothing unpickled")


def test_hf_without_grad_norm_is_a_clear_error(tmp_path):
    hist = [{"epoch": 0.1, "learning_rate": 1e-5, "loss": 2.0, "step": 10}]
    f = save_state(tmp_path / "trainer_state.json", TrainerState(global_step=10, max_steps=10, log_history=hist))
    with pytest.raises(GradscopeError) as e:
        open_run(f)
    assert e.value.exit_code == 2 and str(f) in e.value.message and "grad_norm" in e.value.message


def test_hf_differing_norms_for_one_step_are_flagged_per_rank(tmp_path):
    hist = [
        {"epoch": 0.1, "grad_norm": 1.5, "learning_rate": 1e-5, "loss": 2.0, "step": 1},
        {"epoch": 0.1, "grad_norm": 0.7, "learning_rate": 1e-5, "loss": 2.0, "step": 1},
        {"epoch": 0.2, "grad_norm": 1.2, "learning_rate": 1e-5, "loss": 1.9, "step": 2},
    ]
    f = save_state(tmp_path / "trainer_state.json", TrainerState(global_step=2, max_steps=2, log_history=hist))
    run = open_run(f)
    assert list(run.steps["step"]) == [1, 2]
    assert has_note(run, "per-rank")
    assert run.meta["sampled"] is False and run.meta["logging_steps"] == 1


def test_all_zero_norms_are_not_trusted(tmp_path):
    hist = [{"epoch": 0.1, "grad_norm": 0.0, "learning_rate": 1e-5, "loss": 2.0, "step": s} for s in (1, 2, 3, 4)]
    run = open_run(save_state(tmp_path / "trainer_state.json", TrainerState(global_step=4, max_steps=4, log_history=hist)))
    assert has_note(run, "exactly 0.0", "ZeRO")


# ---------------------------------------------------------------- ms-swift


def append_to_jsonl(path: Path, obj: dict) -> None:
    # swift.utils.append_to_jsonl
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def swift_entry(step, max_steps, **logs):
    # swift/trainers/callback.py add_train_message
    logs["global_step/max_steps"] = f"{step}/{max_steps}"
    logs["percentage"] = f"{step / max_steps * 100:.2f}%"
    logs["elapsed_time"] = f"{step}s"
    logs["remaining_time"] = f"{max_steps - step}s"
    return {k: round(v, 8) if isinstance(v, float) else v for k, v in logs.items()}


SWIFT = [(1, 2.58519292123, 17.12728882456), (5, 2.03561759987, 1.61355615111), (10, 1.63347206, 13.6875)]


def write_swift(d: Path, doubled=False, final=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    f = d / "logging.jsonl"
    history = []
    for s, loss, g in SWIFT:
        logs = {"loss": loss, "grad_norm": g, "learning_rate": 1e-5, "memory(GiB)": 11.29,
                "train_speed(iter/s)": 0.028, "epoch": s / 10}
        history.append({**logs, "step": s})
        for _ in range(2 if doubled else 1):
            append_to_jsonl(f, swift_entry(s, 10, **dict(logs)))
        if s == 10:
            ev = {"eval_loss": 1.9, "eval_runtime": 2.0, "epoch": 1.0}
            history.append({**ev, "step": s})
            append_to_jsonl(f, swift_entry(s, 10, **ev))
    summary = {"train_runtime": 100.0, "train_samples_per_second": 1.0, "train_loss": 2.0, "epoch": 1.0}
    append_to_jsonl(f, swift_entry(10, 10, **summary))
    if final:  # swift/llm/train/sft.py: run_info with the whole log_history
        append_to_jsonl(f, {"last_model_checkpoint": str(d / "checkpoint-10"), "best_model_checkpoint": None,
                            "best_metric": None, "global_step": 10,
                            "log_history": history + [{**summary, "step": 10}], "memory": {"cuda:0": "11.3GiB"}})
    return f


def test_swift_logging_jsonl_counts_the_repeated_history_once(tmp_path):
    d = tmp_path / "output" / "v0-20240101-000000"
    f = write_swift(d)
    (d / "args.json").write_text(json.dumps({"max_grad_norm": 1.0, "logging_steps": 5, "model": "Qwen"}, indent=2))
    run = open_run(f)
    assert_contract(run, "swift")
    assert list(run.steps["step"]) == [1, 5, 10]  # not doubled by the history line, eval row excluded
    assert col(run, "grad_norm") == [round(g, 8) for _, _, g in SWIFT]
    assert col(run, "loss") == [round(l, 8) for _, l, _ in SWIFT]
    assert run.meta["clip_norm"] == 1.0
    assert run.meta["status"] == "completed"
    assert has_note(run, "repeats the whole log history", "counted once")
    assert has_note(run, "rounds")


def test_swift_old_versions_doubled_lines_count_once(tmp_path):
    write_swift(tmp_path, doubled=True, final=False)
    run = open_run(tmp_path)  # directory auto-detection
    assert run.source == "swift"
    assert list(run.steps["step"]) == [1, 5, 10]
    assert has_note(run, "repeated log entries")


def test_swift_console_dict_lines_forced_format(tmp_path):
    # what `swift sft` prints to the console, pasted into a text file
    lines = ["[INFO:swift] Start training...",
             "{'loss': 1.47077751, 'grad_norm': 10.5625, 'learning_rate': 2e-06, 'token_acc': 0.655, 'epoch': 0.01, "
             "'global_step/max_steps': '1/94', 'percentage': '1.06%', 'elapsed_time': '2s', 'remaining_time': '4m 28s'}",
             "Train:   5%|5         | 5/94 [00:10<03:12]",
             "{'loss': 1.58882141, 'grad_norm': nan, 'learning_rate': 1e-05, 'token_acc': 0.61, 'epoch': 0.05, "
             "'global_step/max_steps': '5/94', 'percentage': '5.32%', 'elapsed_time': '10s', 'remaining_time': '3m 12s'}"]
    f = tmp_path / "console.txt"
    f.write_text("\n".join(lines) + "\n")
    run = open_run(f, format="swift")
    assert run.source == "swift" and list(run.steps["step"]) == [1, 5]
    assert run.steps["grad_norm"][0] == 10.5625 and math.isnan(run.steps["grad_norm"][1])
    assert has_note(run, "global_step 5 of max_steps 94")
    assert open_run(f).source == "swift"  # and found without help


def test_swift_without_grad_norm_is_an_error(tmp_path):
    f = tmp_path / "logging.jsonl"
    append_to_jsonl(f, swift_entry(1, 10, loss=2.0, learning_rate=1e-5))
    with pytest.raises(GradscopeError) as e:
        open_run(f)
    assert e.value.exit_code == 2 and str(f) in e.value.message


# ---------------------------------------------------------------- LLaMA-Factory


def lf_write(path: Path, logs: dict) -> None:
    # LogCallback._write_log: json.dumps(logs) + "\n", None values dropped first
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: v for k, v in logs.items() if v is not None}) + "\n")


LF = [(10, 1.2345, 3.25, 9e-5), (20, 1.1, 2.5, 8e-5), (30, 1.05, 12.0, 7e-5)]


def test_llamafactory_trainer_log_with_training_args_yaml(tmp_path):
    f = tmp_path / "trainer_log.jsonl"
    for s, loss, g, lr in LF:
        lf_write(f, {"current_steps": s, "total_steps": 30, "loss": loss, "grad_norm": g, "eval_loss": None,
                     "lr": lr, "epoch": s / 30, "percentage": round(s / 30 * 100, 2),
                     "elapsed_time": "0:00:10", "remaining_time": "0:00:20"})
        if s == 20:
            lf_write(f, {"current_steps": s, "total_steps": 30, "eval_loss": 1.3, "epoch": 0.67,
                         "percentage": 66.67, "elapsed_time": "0:00:11", "remaining_time": "0:00:05"})
    (tmp_path / "training_args.yaml").write_text("stage: sft\nmax_grad_norm: 1.0\nlogging_steps: 10\n")
    run = open_run(f)
    assert_contract(run, "llamafactory")
    assert list(run.steps["step"]) == [10, 20, 30]
    assert col(run, "grad_norm") == [g for *_, g, _ in LF]
    assert col(run, "loss") == [l for _, l, _, _ in LF] and col(run, "lr") == [lr for *_, lr in LF]
    assert run.meta["clip_norm"] == 1.0 and run.meta["status"] == "completed"
    assert run.meta["logging_steps"] == 10
    assert list(run.steps["clipped"]) == [True, True, True]


def test_llamafactory_without_grad_norm_reads_trainer_state_beside_it(tmp_path):
    f = tmp_path / "trainer_log.jsonl"
    lf_write(f, {"current_steps": 5, "total_steps": 20, "loss": 2.0, "lr": 1e-5, "epoch": 0.1,
                 "percentage": 25.0, "elapsed_time": "0:00:01", "remaining_time": "0:00:03"})
    with pytest.raises(GradscopeError) as e:
        open_run(f)
    assert e.value.exit_code == 2 and str(f) in e.value.message and "trainer_state.json" in e.value.message

    save_state(tmp_path / "trainer_state.json", TrainerState(global_step=20, max_steps=20, log_history=hf_history(evals=False)))
    run = open_run(f)
    assert run.source == "hf" and list(run.steps["step"]) == [5, 10, 15, 20]
    assert has_note(run, "trainer_log.jsonl", "no grad_norm")


# ---------------------------------------------------------------- Lightning


def write_lightning_csv(path: Path, metrics: list[dict]) -> None:
    # lightning.fabric.loggers.csv_logs._ExperimentWriter.save: sorted union of keys, a row per log call
    keys = sorted(set().union(*metrics))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(metrics)


LAYERS = {"layer.weight": [0.3, 0.4, 2.0], "layer.bias": [0.4, 0.3, 1.5]}
L_STEPS = [49, 99, 149]


def lightning_metrics(total=True):
    rows = []
    for i, s in enumerate(L_STEPS):
        g = {f"grad_2.0_norm/{n}": v[i] for n, v in LAYERS.items()}
        if total:
            g["grad_2.0_norm_total"] = math.sqrt(sum(v[i] ** 2 for v in LAYERS.values()))
        g["grad_inf_norm_total"] = 99.0  # another norm type logged too: not the L2 norm
        rows.append({**g, "step": s})
        rows.append({"train_loss": 1.0 / (i + 1), "epoch": 0, "step": s})
    rows.append({"val_loss": 0.9, "epoch": 0, "step": 149})
    return rows


def test_lightning_metrics_csv_total_and_per_layer_norms(tmp_path):
    d = tmp_path / "lightning_logs" / "version_0"
    write_lightning_csv(d / "metrics.csv", lightning_metrics())
    (d / "hparams.yaml").write_text("lr: 0.001\ngradient_clip_val: 0.5\n")
    run = open_run(tmp_path / "lightning_logs")  # version_0 found one level down
    assert_contract(run, "lightning")
    assert list(run.steps["step"]) == L_STEPS
    expected = [math.sqrt(LAYERS["layer.weight"][i] ** 2 + LAYERS["layer.bias"][i] ** 2) for i in range(3)]
    assert col(run, "grad_norm") == pytest.approx(expected, rel=1e-12)
    assert col(run, "loss") == [1.0, 0.5, 1.0 / 3]
    assert list(run.layers.columns) == ["rank", "optimizer", "step", "layer.bias", "layer.weight"]
    assert list(run.layers["step"]) == L_STEPS
    assert list(run.layers["layer.weight"]) == LAYERS["layer.weight"]
    assert list(run.layers["layer.bias"]) == LAYERS["layer.bias"]
    assert run.meta["clip_norm"] == 0.5 and run.meta["logging_steps"] == 50


def test_lightning_total_computed_from_layers_and_value_clipping_is_not_a_norm(tmp_path):
    write_lightning_csv(tmp_path / "metrics.csv", lightning_metrics(total=False))
    (tmp_path / "config.yaml").write_text("trainer:\n  gradient_clip_val: 2.0\n  gradient_clip_algorithm: value\n")
    run = open_run(tmp_path / "metrics.csv")
    assert col(run, "grad_norm") == pytest.approx([0.5, 0.5, 2.5])
    assert has_note(run, "computed from 2 per-parameter norms")
    assert run.meta["clip_norm"] is None and has_note(run, "by value")


def test_lightning_with_only_inf_norms_is_an_error(tmp_path):
    f = tmp_path / "metrics.csv"
    write_lightning_csv(f, [{"grad_inf_norm_total": 1.0, "step": 0}, {"grad_inf_norm_total": 2.0, "step": 1}])
    with pytest.raises(GradscopeError) as e:
        open_run(f)
    assert e.value.exit_code == 2 and str(f) in e.value.message and "2-norm" in e.value.message


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_with_hf_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "out" / "runs" / "Jan01_00-00-00_host"
    w = SummaryWriter(log_dir=str(logdir))
    w.add_text("args", json.dumps({"max_grad_norm": 2.0, "logging_steps": 2}))  # HF TensorBoardCallback
    vals = {2: 0.75, 4: 3.5, 6: 1.25}
    for s, g in vals.items():
        w.add_scalar("train/grad_norm", g, s)
        w.add_scalar("train/loss", 10.0 / s, s)
        w.add_scalar("train/learning_rate", 1e-4, s)
    w.add_scalar("eval/loss", 1.0, 4)
    w.close()

    run = open_run(tmp_path / "out" / "runs")  # the event dir is found one level down
    assert_contract(run, "tensorboard")
    assert list(run.steps["step"]) == [2, 4, 6]
    assert col(run, "grad_norm") == list(vals.values())  # exact in float32
    assert col(run, "loss") == pytest.approx([10.0 / s for s in vals], rel=1e-6)
    assert run.meta["clip_norm"] == 2.0 and run.meta["logging_steps"] == 2


def test_tensorboard_custom_tag_with_column(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path))
    for s in range(3):
        w.add_scalar("opt/gn", 0.5 * (s + 1), s)
    w.close()
    with pytest.raises(GradscopeError) as e:
        open_run(tmp_path)
    assert "--column" in e.value.message and str(tmp_path) in e.value.message
    run = open_run(tmp_path, format="tensorboard", column="opt/gn")
    assert col(run, "grad_norm") == [0.5, 1.0, 1.5]


def test_tensorboard_missing_package_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"\x00" * 16)
    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("tensorboard"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(GradscopeError) as e:
        open_run(tmp_path)
    assert e.value.exit_code == 2 and "pip install 'gradscope[tensorboard]'" in e.value.message


# ---------------------------------------------------------------- generic CSV / JSON Lines / console


def test_csv_finds_common_names_and_takes_column(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("step,loss,total_norm,lr\n0,2.5,1.5,0.001\n1,2.4,nan,0.001\n2,2.3,inf,0.001\n")
    run = open_run(f)
    assert_contract(run, "csv")
    assert list(run.steps["step"]) == [0, 1, 2]
    assert run.steps["grad_norm"][0] == 1.5 and math.isnan(run.steps["grad_norm"][1]) and math.isinf(run.steps["grad_norm"][2])
    assert col(run, "loss") == [2.5, 2.4, 2.3]

    g = tmp_path / "odd.csv"
    g.write_text("iteration,objective,gn_custom\n10,1.0,0.25\n20,0.9,0.5\n")
    with pytest.raises(GradscopeError) as e:
        open_run(g)
    assert e.value.exit_code == 2
    assert e.value.message == (
        f"no gradient-norm column in '{g}' (columns: iteration, objective, gn_custom); name one with --column"
    )
    run = open_run(g, column="gn_custom")
    assert list(run.steps["step"]) == [10, 20] and col(run, "grad_norm") == [0.25, 0.5]
    assert run.meta["sampled"] and run.meta["logging_steps"] == 10
    with pytest.raises(GradscopeError) as e:
        open_run(g, column="nope")
    assert "nope" in e.value.message and str(g) in e.value.message


def test_jsonl_generic_with_clip_from_args_beside(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s, "train/grad_norm": g}) + "\n"
                         for s, g in ((1, 0.5), (2, NAN), (3, 4.0))))
    (tmp_path / "config.yaml").write_text("optim:\n  grad_clip: 1.0\n")
    run = open_run(f)
    assert_contract(run, "jsonl")
    assert list(run.steps["step"]) == [1, 2, 3] and same(run.steps["grad_norm"][1], NAN)
    assert run.meta["clip_norm"] == 1.0


def test_hf_console_dicts_parse_inf_nan_without_evaluating_code(tmp_path):
    sentinel = tmp_path / "EVALUATED"
    f = tmp_path / "train.log"
    f.write_text(
        "  5%|▌         | 10/200 [00:05<01:30]\n"
        "{'loss': 2.4, 'grad_norm': inf, 'learning_rate': 1e-05, 'epoch': 0.1}\n"
        "{'eval_loss': 2.2, 'eval_runtime': 1.0, 'epoch': 0.1}\n"
        "{'loss': nan, 'grad_norm': nan, 'learning_rate': 2e-05, 'epoch': 0.2}\n"
        f"{{'loss': __import__('os').system('touch {sentinel}'), 'grad_norm': 1.0}}\n"
        "{'loss': 2.1, 'grad_norm': tensor(3.25, device='cuda:0'), 'learning_rate': 3e-05, 'epoch': 0.3}\n"
    )
    run = open_run(f)
    assert not sentinel.exists()
    assert run.source == "jsonl"
    assert list(run.steps["step"]) == [1, 2, 3]  # entries numbered: the console gives no step
    g = col(run, "grad_norm")
    assert math.isinf(g[0]) and math.isnan(g[1]) and g[2] == 3.25
    assert col(run, "loss")[0] == 2.4 and col(run, "lr")[2] == 3e-05
    assert has_note(run, "no step numbers") and has_note(run, "Hugging Face console")


def test_console_step_prefix_may_count_micro_batches(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("Step 8: {'loss': 1.0, 'grad_norm': 0.5}\nStep 16: {'loss': 0.9, 'grad_norm': 0.25}\n")
    run = open_run(f, format="jsonl")
    assert list(run.steps["step"]) == [8, 16]
    assert has_note(run, "micro-batches")


def test_forced_csv_format_on_an_unusual_name(tmp_path):
    f = tmp_path / "norms.dat"
    f.write_text("step,grad_norm\n1,0.5\n2,0.75\n")
    run = open_run(f, format="csv")
    assert col(run, "grad_norm") == [0.5, 0.75]


# ---------------------------------------------------------------- directories


def test_hf_output_dir_reads_the_latest_checkpoint(tmp_path):
    out = tmp_path / "output"
    save_state(out / "checkpoint-10" / "trainer_state.json",
               TrainerState(global_step=10, max_steps=20, log_history=hf_history(TRAIN[:2], evals=False)))
    save_state(out / "checkpoint-20" / "trainer_state.json",
               TrainerState(global_step=20, max_steps=20, log_history=hf_history(evals=False)))
    run = open_run(out)
    assert list(run.steps["step"]) == [5, 10, 15, 20]
    assert run.meta["source_path"].endswith(os.path.join("checkpoint-20", "trainer_state.json"))
    assert has_note(run, "latest of 2 checkpoints")
    assert open_run(out, format="hf").meta["checkpoint"] == "checkpoint-20"


def test_directory_with_two_different_logs_is_ambiguous(tmp_path):
    write_lightning_csv(tmp_path / "version_0" / "metrics.csv", lightning_metrics())
    write_lightning_csv(tmp_path / "version_1" / "metrics.csv", lightning_metrics())
    with pytest.raises(GradscopeError) as e:
        open_run(tmp_path)
    assert e.value.exit_code == 2 and str(tmp_path) in e.value.message
    assert "version_0" in e.value.message and "version_1" in e.value.message


def test_gradscope_run_directory_goes_to_load_run(tmp_path):
    from gradscope import rundir

    (tmp_path / rundir.META_FILE).write_text(json.dumps({"format_version": 1, "status": "completed", "exit_code": 0}))
    (tmp_path / rundir.steps_file(0)).write_text(
        ",".join(rundir.STEP_COLUMNS) + "\n" + "0,0,1.5,2.0,1.0,1,nan,0,nan,0.001,1700000000.0\n"
    )
    run = open_run(tmp_path)
    assert run.source == "gradscope" and list(run.steps["grad_norm"]) == [1.5]
    assert open_run(tmp_path, format="gradscope").meta["status"] == "completed"


# ---------------------------------------------------------------- bad input


def _bad_cases(tmp: Path):
    empty = tmp / "empty_dir"
    empty.mkdir()
    junk = tmp / "junk_dir"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\x00\x01binary")
    (tmp / "notes.md").write_text("# my notes\nnothing to see\n")
    (tmp / "weights.bin").write_bytes(b"\x80\x04\x00\x00binary")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "trainer_state.json").write_text('{"log_history": [{"loss": 2.0, "grad_norm": 1.0, "st')  # cut off
    (tmp / "nogn.csv").write_text("step,loss\n1,2.0\n")
    (tmp / "broken.csv").write_bytes(b'step,grad_norm\n1,"unterminated\n')
    lf = tmp / "lf"
    lf.mkdir()
    (lf / "trainer_log.jsonl").write_text('{"current_steps": 1, "total_steps": 2, "percentage": 50.0}\n')
    return [
        (tmp / "missing", None),
        (empty, None),
        (junk, None),
        (tmp / "notes.md", None),
        (tmp / "weights.bin", None),
        (tmp / "empty.jsonl", None),
        (tmp / "trainer_state.json", None),
        (tmp / "nogn.csv", None),
        (tmp / "broken.csv", None),
        (lf / "trainer_log.jsonl", None),
        (tmp / "nogn.csv", "parquet"),
        (tmp / "notes.md", "hf"),
        (tmp / "notes.md", "lightning"),
        (junk, "tensorboard"),
    ]


def test_bad_input_is_one_error_with_exit_code_2_naming_the_path(tmp_path):
    for path, fmt in _bad_cases(tmp_path):
        with pytest.raises(GradscopeError) as e:
            open_run(path, format=fmt)
        assert e.value.exit_code == 2, (path, fmt, e.value.message)
        assert str(path) in e.value.message, (path, fmt, e.value.message)
        assert "\n" not in e.value.message, e.value.message


def test_formats_describe_every_reader():
    assert set(FORMATS) == {"gradscope", "hf", "swift", "llamafactory", "lightning", "tensorboard", "csv", "jsonl"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in FORMATS.values())


def test_lightning_prefixed_keys_from_log_dict(tmp_path):
    # a common callback: pl_module.log_dict({"grad/" + k: v for k, v in grad_norm(pl_module, 2).items()})
    rows = [{f"grad/{k}": v for k, v in r.items() if k != "step"} | {"step": r["step"]}
            for r in lightning_metrics() if "grad_2.0_norm_total" in r]
    write_lightning_csv(tmp_path / "metrics.csv", rows)
    run = open_run(tmp_path)
    assert list(run.steps["step"]) == L_STEPS
    assert col(run, "grad_norm")[0] == pytest.approx(0.5)
    assert list(run.layers["layer.weight"]) == LAYERS["layer.weight"]
