"""The patches: what the recorder hooks in torch (see recorder.py's docstring for why there), and how.

Each patch is a handle whose ``remove()`` puts the original back, as
``torch.utils.hooks.RemovableHandle`` removes a hook; the recorder removes its handles in reverse
order. A patch only forwards: it asks the recorder whether it records (``recording()``) and hands
it the event (``on_backward``, ``on_total_norm``, ``on_clip``, ``on_scaled_loss``,
``on_scaler_step``, ``on_fsdp1_clip``, ...); it reads and writes none of the recorder's state.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn.utils import clip_grad as _clip_grad_mod

UNSCALED_ATTR = "_gradscope_unscaled"  # GradScaler.scale's output -> the unscaled loss, read by backward


class Patch:
    """One attribute replaced by gradscope; ``remove()`` restores the original object."""

    __slots__ = ("owner", "name", "original", "replacement")

    def __init__(self, owner: Any, name: str, original: Any, replacement: Any) -> None:
        self.owner, self.name, self.original, self.replacement = owner, name, original, replacement

    def remove(self) -> None:
        # If someone wrapped us meanwhile, leave their wrapper; ours passes through once closed.
        if getattr(self.owner, self.name, None) is self.replacement:
            setattr(self.owner, self.name, self.original)


def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> Patch:
    """Replace ``owner.name`` by ``make(original)``."""
    original = getattr(owner, name)
    replacement = make(original)
    setattr(owner, name, replacement)
    return Patch(owner, name, original, replacement)


def replace(owner: Any, name: str, value: Any) -> Patch:
    """Replace ``owner.name`` by ``value`` (one replacement installed under several names)."""
    handle = Patch(owner, name, getattr(owner, name), value)
    setattr(owner, name, value)
    return handle


def install(rec: Any) -> list:
    """Hook the step boundary and patch torch for ``rec``: the handles, in the order installed."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles = [register_optimizer_step_pre_hook(rec.on_step), register_optimizer_step_post_hook(rec.after_step),
               patch(torch.optim.Optimizer, "__init__", lambda orig: _optimizer_init(rec, orig))]
    handles += [patch(owner, name, make) for owner, name, make in rec.audit_patches()]  # zero_grad, zero_, unscale_
    handles.append(patch(torch.autograd, "backward", lambda orig: _backward(rec, orig)))
    handles += _install_clip(rec)
    scaler_cls = torch.amp.GradScaler
    handles.append(patch(scaler_cls, "scale", lambda orig: _scale(rec, orig)))
    handles.append(patch(scaler_cls, "step", lambda orig: _scaler_step(rec, orig)))
    return handles


def _install_clip(rec: Any) -> list:
    """torch.nn.utils.clip_grad's module globals, which ``clip_grad_norm_`` looks up at call time (every
    way of importing it is covered), and their public names in ``torch.nn.utils``."""
    out = []
    for private, public, make in (("_get_total_norm", "get_total_norm", _total_norm),
                                  ("_clip_grads_with_norm_", "clip_grads_with_norm_", _clip_with_norm),
                                  ("clip_grad_value_", "clip_grad_value_", _clip_value)):
        new = make(rec, getattr(_clip_grad_mod, private))
        out += [replace(_clip_grad_mod, private, new), replace(torch.nn.utils, public, new)]
    return out


def _optimizer_init(rec: Any, orig: Callable) -> Callable:
    def __init__(opt, *args, **kwargs):
        orig(opt, *args, **kwargs)
        if rec.recording():
            rec.on_optimizer_init(opt)

    return __init__


def _backward(rec: Any, orig: Callable) -> Callable:
    def backward(tensors, *args, **kwargs):
        if not rec.on_backward(tensors):  # not recording, or re-entered (checkpointing): not a loss
            return orig(tensors, *args, **kwargs)
        ok = False
        try:
            result = orig(tensors, *args, **kwargs)
            ok = True
            return result
        finally:
            rec.after_backward(ok)

    return backward


def _total_norm(rec: Any, orig: Callable) -> Callable:
    def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        if not rec.recording():
            return orig(tensors, norm_type, error_if_nonfinite, foreach)
        return rec.on_total_norm(orig, tensors, norm_type, error_if_nonfinite, foreach)

    return get_total_norm


def _clip_with_norm(rec: Any, orig: Callable) -> Callable:
    def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
        if not rec.recording():
            return orig(parameters, max_norm, total_norm, foreach)
        params = _as_list(parameters)
        # torch reads max_norm with float() too; converting once here and handing torch
        # the float keeps a tensor argument to one read per call, as without gradscope.
        max_norm = float(max_norm)
        if rec.clip_norm is not None:
            max_norm = rec.clip_threshold(max_norm)  # --clip-norm replaces the script's max_norm
        rec.on_clip(params, "norm", max_norm, total_norm)
        return orig(params, max_norm, total_norm, foreach)

    return clip_grads_with_norm_


def _clip_value(rec: Any, orig: Callable) -> Callable:
    def clip_grad_value_(parameters, clip_value, foreach=None):
        if not rec.recording():
            return orig(parameters, clip_value, foreach)
        params = _as_list(parameters)
        clip_value = float(clip_value)  # as torch does; read once (see clip_grads_with_norm_)
        rec.on_clip(params, "value", clip_value, None)
        return orig(params, clip_value, foreach)

    return clip_grad_value_


def _scale(rec: Any, orig: Callable) -> Callable:
    def scale(scaler, outputs):
        out = orig(scaler, outputs)
        if out is not outputs and rec.recording():
            rec.on_scaled_loss(outputs, out, by_scaler=True)
        return out

    return scale


def _scaler_step(rec: Any, orig: Callable) -> Callable:
    def step(scaler, optimizer, *args, **kwargs):
        if not rec.recording():
            return orig(scaler, optimizer, *args, **kwargs)
        return rec.on_scaler_step(orig, scaler, optimizer, args, kwargs)

    return step


def install_fsdp1(rec: Any) -> list:
    """Hook ``FullyShardedDataParallel.clip_grad_norm_`` (FSDP1), once the script has imported it:
    its return value is the global pre-clip norm, which the recorder reuses (``rec.on_fsdp1_clip``)."""
    import sys

    mod = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    cls = getattr(mod, "FullyShardedDataParallel", None)
    if cls is None or getattr(cls.clip_grad_norm_, "_gradscope", False):
        return []

    def make_clip(orig):
        def clip_grad_norm_(module, max_norm, norm_type=2.0):
            if not rec.recording():
                return orig(module, max_norm, norm_type)
            return rec.on_fsdp1_clip(module, orig, max_norm, norm_type)

        clip_grad_norm_._gradscope = True  # type: ignore[attr-defined]
        return clip_grad_norm_

    return [patch(cls, "clip_grad_norm_", make_clip)]


def _as_list(parameters: Any) -> list:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)
