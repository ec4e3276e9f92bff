"""Names for an optimizer's parameters, as the user knows them from model.named_parameters().

The script is not modified, so nobody hands us the model: we find the live
nn.Module objects once (a gc scan, off the hot path, at an optimizer's first
flush), take the outermost ones, and name each parameter from the root module
that holds most of the optimizer's parameters.
"""
from __future__ import annotations

import gc
import sys

import torch

# Wrappers that add a level to named_parameters() the user did not write.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Levels that only wrappers add, wherever they appear (FSDP1 and activation checkpointing wrap
# inner modules: `layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.weight`).
_WRAPPER_LEVELS = frozenset(("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"))


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    if "_" in name and any(level in name for level in _WRAPPER_LEVELS):
        name = ".".join(c for c in name.split(".") if c not in _WRAPPER_LEVELS)
    return name


clean_name = strip_wrappers  # the user's name of a parameter (capture/fsdp1.py)


def parameter_names(params: list[torch.Tensor]) -> list[str]:
    """One unique name per parameter, in the given order; `param.<i>` where none is found.

    The root module holding most of the parameters names them as the user's
    model.named_parameters() does; parameters of further roots (a separate
    `head = nn.Linear(...)`) are prefixed with the variable that holds the root
    in __main__, when there is one.
    """
    wanted = {id(p) for p in params}
    # type(), not isinstance(): some lazy objects warn when their __class__ is read.
    modules = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    covers = []
    for root in modules:
        if id(root) in children:
            continue
        try:
            named = {id(p): n for n, p in root.named_parameters(remove_duplicate=False) if id(p) in wanted}
        except Exception:  # a half-built or exotic module; naming is best-effort
            continue
        if named:
            covers.append((len(named), root, named))
    covers.sort(key=lambda c: -c[0])
    main_vars = {id(v): k for k, v in vars(sys.modules.get("__main__", sys)).items() if not k.startswith("_")}
    found: dict[int, str] = {}
    for rank, (_, root, named) in enumerate(covers):
        prefix = "" if rank == 0 else main_vars.get(id(root), f"module{rank}") + "."
        for pid, name in named.items():
            found.setdefault(pid, prefix + strip_wrappers(name))
    names: list[str] = []
    seen: set[str] = set()
    for i, p in enumerate(params):
        name = found.get(id(p), f"param.{i}")
        if name in seen:  # keep CSV columns unique even for odd models
            name = f"{name}#{i}"
        seen.add(name)
        names.append(name)
    return names


def clip_order(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters in the order the training's own clip would pass them to clip_grad_norm_,
    whose float32 total norm depends on it (it stacks the per-tensor norms in that order).

    The clip is usually `clip_grad_norm_(model.parameters(), ...)` (Hugging Face Trainer,
    accelerate, the hand-written loop), while optimizers often split the parameters into groups
    (weight decay and none): the order is that of the root module holding most of them, then any
    others in the optimizer's order. When that root is a LightningModule, Lightning clips the
    optimizer's parameters group by group (its precision plugin's main_params), and the
    optimizer's order is kept. Found with a gc scan: call it once per optimizer, off the hot path.
    """
    wanted = {id(p) for p in params}
    modules = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    best: list[torch.Tensor] = []
    holder = None
    for root in modules:
        if id(root) in children:
            continue
        try:
            held = [p for p in root.parameters() if id(p) in wanted]
        except Exception:  # a half-built or exotic module
            continue
        if len(held) > len(best):
            best, holder = held, root
    if holder is not None and _is_lightning(holder):
        return list(params)
    seen = {id(p) for p in best}
    return best + [p for p in params if id(p) not in seen]


def _is_lightning(module: torch.nn.Module) -> bool:
    """A LightningModule (lightning.pytorch or pytorch_lightning), by its classes' names: capture
    imports no framework."""
    return any(c.__name__ == "LightningModule" and c.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
               for c in type(module).__mro__)
