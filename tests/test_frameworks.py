"""Closure steps and real trainers: a plain `optimizer.step(closure)` loop, PyTorch Lightning's
automatic optimization and Hugging Face `Trainer`, each recorded against the training's own
float64 reference (taken after the backward, before any clip), with bit-identical weights with
and without gradscope, and `--clip-norm` matching Lightning's own clipping bit for bit."""
from __future__ import annotations

import gc
import json
import warnings

import numpy as np
import pytest
import torch

import gradscope
from gradscope.capture.recorder import active_recorder
from gsutil import gradscope as gs, python, script


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _norm64(params) -> float:
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    return torch.sqrt(sum((g * g).sum() for g in grads)).item()


# ---------------------------------------------------------------- plain step(closure)


@pytest.mark.parametrize("clip, kw", [(None, False), (1.0, True)])
def test_plain_closure_loop_is_recorded_after_the_closure_backward(tmp_path, clip, kw):
    """Backward (and clip_grad_norm_) inside the closure: each row is that step's own pre-clip
    norm and loss, its threshold, and the training is bit-identical to plain python."""
    args = [script("closure_train.py"), "--steps", "10"] + (["--clip", str(clip)] if clip else [])
    args += ["--kw"] if kw else []
    plain = python(*args, "--save", tmp_path / "plain.pt", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    res = gs("run", "--out", tmp_path / "run", *args, "--ref", tmp_path / "ref.json",
             "--save", tmp_path / "rec.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ref = json.loads((tmp_path / "ref.json").read_text())
    s = gradscope.load_run(tmp_path / "run").steps
    assert list(s["step"]) == list(range(10))
    np.testing.assert_allclose(s["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)
    if clip is None:
        assert s["clip_max_norm"].isna().all() and not s["clipped"].any()
    else:
        assert (s["clip_max_norm"] == clip).all()
        np.testing.assert_array_equal(s["clipped"], np.array(ref["grad_norm"]) > clip)
        assert s["clipped"].any()
    _same_weights(torch.load(tmp_path / "plain.pt", weights_only=True),
                  torch.load(tmp_path / "rec.pt", weights_only=True))


def test_clip_norm_option_clips_inside_the_closure(tmp_path):
    """`gradscope run --clip-norm 1.0` on an unclipped closure loop trains exactly as the loop
    clipping at 1.0 inside its closure, after the closure's backward."""
    base = [script("closure_train.py"), "--steps", "10"]
    own = python(*base, "--clip", "1.0", "--save", tmp_path / "own.pt", cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    res = gs("run", "--out", tmp_path / "run", "--clip-norm", "1.0", *base, "--ref", tmp_path / "ref.json",
             "--save", tmp_path / "rec.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _same_weights(torch.load(tmp_path / "own.pt", weights_only=True),
                  torch.load(tmp_path / "rec.pt", weights_only=True))
    s = gradscope.load_run(tmp_path / "run").steps
    ref = np.array(json.loads((tmp_path / "ref.json").read_text())["grad_norm"])
    np.testing.assert_allclose(s["grad_norm"], ref, rtol=1e-5)
    np.testing.assert_array_equal(s["clipped"], ref > 1.0)
    assert s["clipped"].any() and (s["clip_max_norm"] == 1.0).all()


# ---------------------------------------------------------------- Lightning

def _lightning():
    L = pytest.importorskip("lightning")
    return L


def _lightning_fit(root, *, accum=1, clip_val=None, algo="norm", batches=16, width=16, record=None,
                   clip_norm=None, probe=None):
    """Fit a tiny LightningModule on fixed random data; returns (weights, reference, recorder result)."""
    L = _lightning()

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
            self.ref = {"grad_norm": [], "loss": []}
            self.window = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.window.append(loss.detach().double().item())
            return loss

        def on_before_optimizer_step(self, optimizer):
            # Lightning calls this after the step's last backward and before its own clipping.
            self.ref["grad_norm"].append(_norm64(self.parameters()))
            # What reached backward(): each micro-batch loss divided by the accumulation factor.
            self.ref["loss"].append(sum(self.window) / self.trainer.accumulate_grad_batches)
            self.window = []
            if probe is not None:
                probe(self)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    gc.collect()  # the previous fit's trainer and optimizer (cycles): record() would adopt a live optimizer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * 8, 8, generator=g)
    y = x[:, :1] * 3 + torch.randn(batches * 8, 1, generator=g) * 0.1
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    torch.manual_seed(0)
    model = Tiny()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=accum,
        gradient_clip_val=clip_val, gradient_clip_algorithm=algo if clip_val is not None else None,
        enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=str(root), num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not have many workers" and the like
        if record is None:
            trainer.fit(model, data)
        else:
            with gradscope.record(record, clip_norm=clip_norm, flush_steps=7):
                trainer.fit(model, data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.ref


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("algo", ["norm", "value"])
def test_lightning_automatic_optimization_is_recorded_exactly(tmp_path, accum, algo):
    """Lightning runs backward and its own clipping inside optimizer.step(closure): every row
    is that step's pre-clip norm over the whole accumulation window, its loss, and its threshold
    (clip_grad_value_ as clip_value); weights are bit-identical with and without gradscope."""
    threshold = 0.5 if algo == "norm" else 0.05
    plain, _ = _lightning_fit(tmp_path / "a", accum=accum, clip_val=threshold, algo=algo)
    rec, ref = _lightning_fit(tmp_path / "b", accum=accum, clip_val=threshold, algo=algo, record=tmp_path / "run")
    _same_weights(plain, rec)
    run = gradscope.load_run(tmp_path / "run")
    s = run.steps
    n = 16 // accum
    assert list(s["step"]) == list(range(n)) and len(ref["grad_norm"]) == n
    g = np.array(ref["grad_norm"])
    np.testing.assert_allclose(s["grad_norm"], g, rtol=1e-5)
    np.testing.assert_allclose(s["loss"], ref["loss"], rtol=1e-6)
    if algo == "norm":
        assert (s["clip_max_norm"] == threshold).all() and s["clip_value"].isna().all()
        np.testing.assert_array_equal(s["clipped"], g > threshold)
        assert s["clipped"].any()
    else:
        assert (s["clip_value"] == threshold).all() and s["clip_max_norm"].isna().all()
    calls = run.meta["processes"][0]["clip_calls"]
    assert calls.get("clip_grad_norm_" if algo == "norm" else "clip_grad_value_") == n


@pytest.mark.parametrize("accum", [1, 2])
def test_clip_norm_option_matches_lightning_gradient_clip_val_bit_for_bit(tmp_path, accum):
    """record(clip_norm=0.5) (= `gradscope run --clip-norm 0.5`) on a Trainer with
    gradient_clip_val=None trains bit-identically to Lightning's own gradient_clip_val=0.5."""
    own, _ = _lightning_fit(tmp_path / "a", accum=accum, clip_val=0.5)
    unclipped, _ = _lightning_fit(tmp_path / "c", accum=accum)
    rec, ref = _lightning_fit(tmp_path / "b", accum=accum, record=tmp_path / "run", clip_norm=0.5)
    _same_weights(own, rec)
    assert any(not torch.equal(own[k], unclipped[k]) for k in own)  # the clip really acted
    s = gradscope.load_run(tmp_path / "run").steps
    g = np.array(ref["grad_norm"])
    np.testing.assert_allclose(s["grad_norm"], g, rtol=1e-5)
    assert (s["clip_max_norm"] == 0.5).all()
    np.testing.assert_array_equal(s["clipped"], g > 0.5)


@pytest.mark.slow
def test_lightning_script_under_gradscope_run_clip_norm(tmp_path):
    """The CLI end to end on a Lightning script: `gradscope run --clip-norm 0.5` equals the
    script's own gradient_clip_val=0.5 (with accumulation 2)."""
    _lightning()
    train = script("lightning_tiny.py")
    own = python(train, "0.5", "-1", tmp_path / "own.pt", cwd=tmp_path, timeout=300)
    assert own.returncode == 0, own.stderr
    res = gs("run", "--out", tmp_path / "run", "--clip-norm", "0.5", train, "none", "-1", tmp_path / "rec.pt",
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    _same_weights(torch.load(tmp_path / "own.pt", weights_only=True),
                  torch.load(tmp_path / "rec.pt", weights_only=True))
    s = gradscope.load_run(tmp_path / "run").steps
    assert len(s) == 6 and (s["clip_max_norm"] == 0.5).all() and s["clipped"].any()
    assert "no clip_grad_norm_ call seen" not in res.stderr




@pytest.mark.slow
def test_lightning_with_accumulation_memory_stays_flat(tmp_path):
    """The issue's leak: under Lightning with accumulation and clipping, about one gradient copy
    per step stayed alive. Count live gradient-sized tensors and the recorder's per-step
    structures at every step: nothing grows with the step count."""
    width = 512  # the first layer's gradient has 4096 elements: a leaked gradient is a tensor that large
    counts, sizes = [], []

    def probe(module):
        if module.trainer.global_step in (5, 20, 39):  # counting every object is slow
            gc.collect()
            counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() >= 4096))
        rec = active_recorder()
        if rec is not None:
            sizes.append((len(rec._pre_norms), len(rec._clips), len(rec._losses),
                          sum(len(st.rows) for st in rec._states)))

    _lightning_fit(tmp_path / "a", accum=2, clip_val=0.5, batches=80, width=width, probe=probe)
    without = list(counts)
    counts.clear()
    _lightning_fit(tmp_path / "b", accum=2, clip_val=0.5, batches=80, width=width, probe=probe,
                   record=tmp_path / "run")
    assert len(counts) == 3 and len(sizes) == 40
    assert counts[0] == counts[1] == counts[2], counts  # flat from step 5 to step 39
    assert counts == without, (counts, without)  # gradscope keeps no gradient alive
    assert max(p for p, _, _, _ in sizes) <= 6 and max(c for _, c, _, _ in sizes) <= 1
    assert max(l for _, _, l, _ in sizes) <= 2  # the current window's losses only
    assert max(r for _, _, _, r in sizes) <= 7  # rows: at most one flush interval (flush_steps=7)


# ---------------------------------------------------------------- Hugging Face Trainer


def _hf_fit(root, *, record=None, optim="adamw_torch", accum=2, max_grad_norm=0.5):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it (the frameworks extra installs it)
    refs = []

    class RefTrainer(transformers.Trainer):
        def _clip_grad_norm(self, model):
            refs.append(_norm64(model.parameters()))  # float64, after accumulation, before the clip
            return super()._clip_grad_norm(model)

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (48, 16), generator=g)
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(root), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=accum,
        max_grad_norm=max_grad_norm, learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, optim=optim,
    )
    trainer = RefTrainer(model=model, args=args, train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if record is None:
            trainer.train()
        else:
            with gradscope.record(record):
                trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, refs, logged


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_hf_trainer_norms_equal_its_own_logged_grad_norm(tmp_path, optim):
    """HF Trainer with max_grad_norm and accumulation: every recorded norm is the grad_norm the
    Trainer logs itself (the same float32), equal to a float64 reference; weights unchanged."""
    plain, _, _ = _hf_fit(tmp_path / "a", optim=optim)
    rec, refs, logged = _hf_fit(tmp_path / "b", record=tmp_path / "run", optim=optim)
    _same_weights(plain, rec)
    s = gradscope.load_run(tmp_path / "run").steps
    assert len(s) == 6 == len(logged) == len(refs)
    np.testing.assert_array_equal(s["grad_norm"].to_numpy(np.float32), np.array(logged, dtype=np.float32))
    np.testing.assert_allclose(s["grad_norm"], refs, rtol=1e-5)
    assert (s["clip_max_norm"] == 0.5).all()
    np.testing.assert_array_equal(s["clipped"], np.array(refs) > 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_is_recorded_exactly_and_trains_bit_identically(tmp_path, backend):
    """A torch.compile'd model (its forward calls fill_ and zero_, which the clip audit wraps):
    the weights equal a plain run's bit for bit, every step is recorded with the script's
    threshold, the norms equal the float64 norm of a plain replay's gradients, and no finding."""
    plain = python(script("compile_train.py"), backend, tmp_path / "plain.pt", cwd=tmp_path, timeout=300)
    assert plain.returncode == 0, plain.stderr
    res = gs("run", "--out", tmp_path / "run", script("compile_train.py"), backend, tmp_path / "rec.pt",
             cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    _same_weights(torch.load(tmp_path / "plain.pt", weights_only=True), torch.load(tmp_path / "rec.pt", weights_only=True))
    run = gradscope.load_run(tmp_path / "run")
    s = run.steps
    assert len(s) == 20 and (s["clip_max_norm"] == 1.0).all()
    # the reference: the same training replayed eagerly, pre-clip norms in float64
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    ref = []
    for _ in range(20):
        x = torch.randn(4, 8)
        loss = (lin(x) + 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        ref.append(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in lin.parameters()])).item())
        torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
        opt.step()
    np.testing.assert_allclose(s["grad_norm"], ref, rtol=1e-5)
    assert json.loads((tmp_path / "run" / "process-r0.json").read_text())["clip_audit"]["findings"] == []
