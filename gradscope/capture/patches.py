"""The patches: what the recorder hooks in torch (see recorder.py's docstring for why there), and how."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn.utils import clip_grad as _clip_grad_mod

UNSCALED_ATTR = "_gradscope_unscaled"  # GradScaler.scale's output -> the unscaled loss, read by backward


def install(rec: Any) -> None:
    """Hook the step boundary and patch torch for ``rec``; ``rec._uninstall`` undoes it."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    rec._handles.append(register_optimizer_step_pre_hook(rec._on_step))
    rec._handles.append(register_optimizer_step_post_hook(rec._after_step))

    def make_init(orig):
        def __init__(opt, *args, **kwargs):
            orig(opt, *args, **kwargs)
            if rec._mine():
                rec._register(opt)

        return __init__

    _patch(rec, torch.optim.Optimizer, "__init__", make_init)
    for owner, name, make in rec._audit.patches():  # zero_grad, zero_, GradScaler.unscale_
        _patch(rec, owner, name, make)

    audit = rec._audit

    def make_backward(orig):
        def backward(tensors, *args, **kwargs):
            if rec._in_backward or not rec._on:
                return orig(tensors, *args, **kwargs)
            rec._note_backward(tensors)
            audit.backward_begin()
            rec._in_backward = True  # checkpointing re-enters backward: not a loss
            try:
                result = orig(tensors, *args, **kwargs)
                audit.backward_end()
                return result
            finally:
                rec._in_backward = False

        return backward

    _patch(rec, torch.autograd, "backward", make_backward)

    def make_total_norm(orig):
        def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
            if not rec._mine():
                return orig(tensors, norm_type, error_if_nonfinite, foreach)
            return rec._on_total_norm(orig, tensors, norm_type, error_if_nonfinite, foreach)

        return get_total_norm

    total_norm = make_total_norm(_clip_grad_mod._get_total_norm)
    _set(rec, _clip_grad_mod, "_get_total_norm", total_norm)
    _set(rec, torch.nn.utils, "get_total_norm", total_norm)

    def make_clip_with_norm(orig):
        def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
            if not rec._mine():
                return orig(parameters, max_norm, total_norm, foreach)
            params = _as_list(parameters)
            # torch reads max_norm with float() too; converting once here and handing torch
            # the float keeps a tensor argument to one read per call, as without gradscope.
            max_norm = float(max_norm)
            if rec.clip_norm is not None:
                if not rec._applying:
                    rec._note_script_threshold(max_norm)
                max_norm = rec.clip_norm
            rec._on_clip(params, "norm", max_norm, total_norm)
            return orig(params, max_norm, total_norm, foreach)

        return clip_grads_with_norm_

    clip_with_norm = make_clip_with_norm(_clip_grad_mod._clip_grads_with_norm_)
    _set(rec, _clip_grad_mod, "_clip_grads_with_norm_", clip_with_norm)
    _set(rec, torch.nn.utils, "clip_grads_with_norm_", clip_with_norm)

    def make_clip_value(orig):
        def clip_grad_value_(parameters, clip_value, foreach=None):
            if not rec._mine():
                return orig(parameters, clip_value, foreach)
            params = _as_list(parameters)
            clip_value = float(clip_value)  # as torch does; read once (see clip_grads_with_norm_)
            with torch.no_grad():
                rec._remember_norms([p.grad for p in params if p.grad is not None])
            rec._on_clip(params, "value", clip_value, None)
            return orig(params, clip_value, foreach)

        return clip_grad_value_

    clip_value = make_clip_value(_clip_grad_mod.clip_grad_value_)
    _set(rec, _clip_grad_mod, "clip_grad_value_", clip_value)
    _set(rec, torch.nn.utils, "clip_grad_value_", clip_value)

    scaler_cls = torch.amp.GradScaler

    def make_scale(orig):
        def scale(scaler, outputs):
            out = orig(scaler, outputs)
            if rec._mine() and out is not outputs:
                rec._scaled = True  # from now on, backward looks for the unscaled loss
                rec._audit.scaled()
            if rec._mine() and isinstance(outputs, torch.Tensor) and out is not outputs:
                try:
                    setattr(out, UNSCALED_ATTR, outputs.detach())
                except (AttributeError, RuntimeError):
                    pass
            return out

        return scale

    def make_scaler_step(orig):
        def step(scaler, optimizer, *args, **kwargs):
            if not rec._mine():
                return orig(scaler, optimizer, *args, **kwargs)
            if rec._limit is not None:
                rec._limit.before_step(rec)  # a step it skips never reaches the optimizer's pre-hook
            st = rec._register(optimizer)
            before = st.steps
            outer, rec._active_scaler = rec._active_scaler, scaler
            try:
                result = orig(scaler, optimizer, *args, **kwargs)
            finally:
                rec._active_scaler = outer
            if st.steps == before:
                # The scaler found inf/nan and never called optimizer.step(): still a row.
                rec._record(st, optimizer.param_groups, skipped=True, scaler=scaler)
                rec._audit.step_end(st, via_scaler=True)
                rec._maybe_flush()
            return result

        return step

    _patch(rec, scaler_cls, "scale", make_scale)
    _patch(rec, scaler_cls, "step", make_scaler_step)


def install_fsdp1(rec: Any) -> None:
    """Hook ``FullyShardedDataParallel.clip_grad_norm_`` (FSDP1), once the script has imported it:
    its return value is the global pre-clip norm, which the recorder reuses (recorder._on_fsdp1_clip)."""
    import sys

    mod = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    cls = getattr(mod, "FullyShardedDataParallel", None)
    if cls is None or getattr(cls.clip_grad_norm_, "_gradscope", False):
        return

    def make_clip(orig):
        def clip_grad_norm_(module, max_norm, norm_type=2.0):
            if not rec._mine():
                return orig(module, max_norm, norm_type)
            return rec._on_fsdp1_clip(module, orig, max_norm, norm_type)

        clip_grad_norm_._gradscope = True  # type: ignore[attr-defined]
        return clip_grad_norm_

    _patch(rec, cls, "clip_grad_norm_", make_clip)


def _patch(rec: Any, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name)
    replacement = make(original)
    setattr(owner, name, replacement)
    rec._patches.append((owner, name, original, replacement))


def _set(rec: Any, owner: Any, name: str, value: Any) -> None:
    rec._patches.append((owner, name, getattr(owner, name), value))
    setattr(owner, name, value)


def _as_list(parameters: Any) -> list:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)
