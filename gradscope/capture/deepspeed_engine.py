"""DeepSpeed: one row per engine optimizer step, with DeepSpeed's own global pre-clip norm and threshold.

Under ZeRO (stages 1, 2, 3) the engine's optimizer wraps the script's torch optimizer: it
reduces the gradients into flat per-rank partitions, computes the global norm itself, clips
(``unscale_and_clip_grads``) and only then calls the torch optimizer's ``step()``, once per
parameter group or sub-group. The torch step pre-hook would therefore see one rank's
partition after the clip. So the step is taken at ``DeepSpeedEngine._take_model_step``,
which runs once per optimizer step (at the gradient-accumulation boundary): the inner
``step()`` calls are not rows, and the row is made after the step from what DeepSpeed
stored, ``optimizer._global_grad_norm`` (the norm it clipped by: a tensor, or a float it
already had; reading it costs no host sync) and ``clip_grad`` (its ``gradient_clipping``).
Without ZeRO in float32 (stage 0) the gradients are whole, all-reduced replicas and
DeepSpeed clips them before ``step()``: their norm is measured before the step runs.

The loss ZeRO scales for backward (fp16's loss scale, or ``override_loss_scale``) is recorded
unscaled, and the scale in ``loss_scale``.

``gradscope run --clip-norm`` becomes DeepSpeed's own ``gradient_clipping`` (the engine's
``gradient_clipping()`` answers it, and a ZeRO optimizer built before the patch gets its
``clip_grad``), so the step is the one DeepSpeed takes when configured with that threshold.

Imported by the recorder only once the script has imported deepspeed (``sys.modules``);
this module never imports deepspeed itself.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from gradscope.capture.norms import per_tensor_norms, stack_norms


def maybe_install(rec: Any) -> bool:
    """Patch DeepSpeed's engine for ``rec`` (through ``rec.patch``, undone at its stop) if the script
    has imported deepspeed; False when it has not (yet): a later optimizer or start() tries again."""
    engine_mod = sys.modules.get("deepspeed.runtime.engine")
    cls = getattr(engine_mod, "DeepSpeedEngine", None) if engine_mod is not None else None
    if cls is None:
        return False
    rec.patch(cls, "_take_model_step", lambda orig: _make_take_model_step(rec, orig))
    base = sys.modules.get("deepspeed.runtime.base_optimizer")
    zero_cls = getattr(base, "ZeROOptimizer", None) if base is not None else None
    if zero_cls is not None and hasattr(zero_cls, "scale_if_loss"):
        # engine.backward multiplies the loss by ZeRO's loss scale before torch's backward:
        # the recorded loss is the unscaled one, as under GradScaler (patches.UNSCALED_ATTR).
        rec.patch(zero_cls, "scale_if_loss", lambda orig: _make_scale_if_loss(rec, orig))
    if rec.clip_norm is not None:
        def make_gradient_clipping(orig):
            def gradient_clipping(engine):
                return rec.clip_norm if rec.recording() else orig(engine)

            return gradient_clipping

        rec.patch(cls, "gradient_clipping", make_gradient_clipping)
    return True


def _make_scale_if_loss(rec: Any, orig):
    def scale_if_loss(opt, value):
        out = orig(opt, value)
        if out is not value and isinstance(out, torch.Tensor) and isinstance(value, torch.Tensor) and rec.recording():
            rec.on_scaled_loss(value, out, by_scaler=False)
        return out

    return scale_if_loss


def _make_take_model_step(rec: Any, orig):
    def _take_model_step(engine, *args, **kwargs):
        if not rec.recording() or rec.in_engine_step():
            return orig(engine, *args, **kwargs)
        ds_opt = engine.optimizer
        inner = getattr(ds_opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and hasattr(ds_opt, "_global_grad_norm"):
            return _zero_step(rec, engine, ds_opt, inner, orig, args, kwargs)
        if (isinstance(ds_opt, torch.optim.Optimizer) and not engine.fp16_enabled()
                and not engine.bfloat16_enabled() and not getattr(engine, "torch_autocast_z0_gradscaler", None)):
            return _plain_step(rec, engine, ds_opt, orig, args, kwargs)
        return orig(engine, *args, **kwargs)  # another engine optimizer: the torch hooks record it

    return _take_model_step


def _zero_step(rec: Any, engine: Any, ds_opt: Any, inner: torch.optim.Optimizer, orig, args, kwargs):
    if getattr(ds_opt, "compute_grad_norm", True) is False:
        # DeepSpeed computes no norm (allowed only without clipping): the torch pre-hook
        # records the rank's own partition, which the process file says is rank-local.
        rec.mark_rank_local()
        return orig(engine, *args, **kwargs)
    # The torch optimizer holds flat partitions of this rank: the row counts the model's
    # parameters, and has no per-layer norms (those live split across ranks' partitions).
    rec.on_engine_optimizer(inner, lambda: sum(int(getattr(p, "ds_numel", p.numel()))
                                               for p in engine.module.parameters()))
    if rec.clip_norm is not None and hasattr(ds_opt, "clip_grad"):
        ds_opt.clip_grad = rec.clip_norm  # an optimizer built before the engine was patched
    with rec.engine_step():
        result = orig(engine, *args, **kwargs)
    if rec.recording():
        threshold = getattr(ds_opt, "clip_grad", None)
        if threshold is None:
            threshold = engine.gradient_clipping()
        scaled = engine.fp16_enabled() or getattr(ds_opt, "custom_loss_scaler", False)
        scale = getattr(ds_opt, "loss_scale", None) if scaled else None
        rec.on_engine_step(inner, ds_opt._global_grad_norm, float(threshold), skipped=getattr(ds_opt, "overflow", False),
                           loss_scale=scale)
    return result


def _plain_step(rec: Any, engine: Any, opt: torch.optim.Optimizer, orig, args, kwargs):
    """ZeRO stage 0 in float32: whole all-reduced gradients, clipped by DeepSpeed before step()."""
    rec.on_engine_optimizer(opt)
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    total = None
    if grads:
        with torch.no_grad():
            vector = stack_norms(per_tensor_norms(grads), grads[0].device)
            total = torch.linalg.vector_norm(vector.to(torch.float64))
    with rec.engine_step():
        result = orig(engine, *args, **kwargs)
    if rec.recording():
        rec.on_engine_step(opt, total, float(engine.gradient_clipping()))
    return result
