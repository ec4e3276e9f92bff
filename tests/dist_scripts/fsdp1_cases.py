"""FSDP1 training cases for tests/test_sharded.py, launched with torchrun (2 ranks, gloo, CPU).

Each case wraps the same small model with torch's ``FullyShardedDataParallel``
(every ``nn.Linear`` its own FSDP unit, plus the root), trains a few steps, and,
after backward and before any clip or step, computes an independent float64
reference of the *global* pre-clip gradient norm: the squares of this rank's
local gradient shard summed in float64 and all-reduced over the ranks (FSDP
shards hold disjoint pieces; padding is zero). The per-parameter reference
all-gathers the flat gradient shards and splits the full flat gradient by
FSDP's own per-parameter sizes (flat params), or reads the full gradients
inside ``summon_full_params(with_grads=True)`` (use_orig_params). The
references only read the gradients, so the training numerics are the same
whether gradscope records or not; the final full state dict is saved to prove it.

Cases (one optimizer each, optimizer ids in launch order):

    flat_full_clip    use_orig_params=False, FULL_SHARD,     model.clip_grad_norm_(tau)
    orig_grad_op_clip use_orig_params=True,  SHARD_GRAD_OP,  model.clip_grad_norm_(tau)
    flat_grad_op      use_orig_params=False, SHARD_GRAD_OP,  no clip
    orig_full         use_orig_params=True,  FULL_SHARD,     no clip
    local_clip        use_orig_params=False, FULL_SHARD,     torch.nn.utils.clip_grad_norm_ on the
                      local flat shards (the bug: each rank clips by its own shard's norm)

    fsdp1_cases.py OUT [--cases a,b] [--steps N] [--tau T] [--no-clip]

``--no-clip`` leaves the script's own clip calls out (for ``gradscope run --clip-norm T``,
whose weights must equal this script's with ``--tau T``); a case's data and initial weights
depend on the case name only.
"""
import argparse
import atexit
import json
import os
import sys
import zlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--cases", default="flat_full_clip,orig_grad_op_clip,flat_grad_op,orig_full,local_clip")
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--tau", type=float, default=0.8)
ap.add_argument("--no-clip", action="store_true")
args = ap.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
os.makedirs(args.out, exist_ok=True)

CASES = {
    # name: (use_orig_params, strategy, clip)
    "flat_full_clip": (False, ShardingStrategy.FULL_SHARD, "fsdp"),
    "orig_grad_op_clip": (True, ShardingStrategy.SHARD_GRAD_OP, "fsdp"),
    "flat_grad_op": (False, ShardingStrategy.SHARD_GRAD_OP, None),
    "orig_full": (True, ShardingStrategy.FULL_SHARD, None),
    "local_clip": (False, ShardingStrategy.FULL_SHARD, "local"),
}


def make_model(seed):
    torch.manual_seed(seed)  # same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 30), torch.nn.Tanh(), torch.nn.Linear(30, 4)
    )


def batch(seed, step):
    g = torch.Generator().manual_seed(1000 * seed + 10 * step + 100_000 * rank)
    x = torch.randn(8, 16, generator=g) * (0.3 + 0.4 * step)  # growing inputs: clipping bites on later steps
    y = torch.randn(8, 4, generator=g)
    return x, y


def flat_params(model):
    return [p for p in model.parameters() if getattr(p, "_is_flat_param", False)]


def global_reference(model):
    """Sum of the squares of this rank's gradient shards (float64), all-reduced: the global norm."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            sq += p.grad.detach().double().square().sum()
    dist.all_reduce(sq)
    return sq.sqrt().item()


def clean(name):
    """The name the user wrote: FSDP's wrapper levels left out (written here, not gradscope's code)."""
    return ".".join(c for c in name.split(".") if c not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"))


def layer_reference(model, orig):
    """{user's parameter name: float64 norm of its full gradient}."""
    out = {}
    if orig:
        with FSDP.summon_full_params(model, with_grads=True):
            for name, p in model.named_parameters():
                if p.grad is not None:
                    out[clean(name)] = p.grad.detach().double().norm().item()
        return out
    for name, p in model.named_parameters():  # flat parameters, one per FSDP unit
        prefix = clean(name)[: -len("_flat_param")]
        shard = p.grad.detach().double()
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)
        full = torch.cat(parts)
        pieces = torch.split(full[: sum(p._numels_with_padding)], list(p._numels_with_padding))
        real = [t for t, pad in zip(pieces, p._is_padding_mask) if not pad]
        for fqn, t in zip(p._fqns, real):
            out[prefix + clean(fqn)] = t.norm().item()
    return out


def run_case(case):
    orig, strategy, clip = CASES[case]
    seed = zlib.crc32(case.encode()) % 1000
    model = FSDP(make_model(seed), auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                 sharding_strategy=strategy, use_orig_params=orig, device_id=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref = {"grad_norm": [], "layers": [], "loss": [], "clip_total": [], "local_norm": []}
    for step in range(args.steps):
        x, y = batch(seed, step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ref["loss"].append(loss.item())
        ref["grad_norm"].append(global_reference(model))
        ref["layers"].append(layer_reference(model, orig))
        if clip == "fsdp" and not args.no_clip:
            ref["clip_total"].append(model.clip_grad_norm_(args.tau).item())
        elif clip == "local" and not args.no_clip:
            ref["local_norm"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.tau).item())
        opt.step()
        opt.zero_grad()
    with FSDP.state_dict_type(model, torch.distributed.fsdp.StateDictType.FULL_STATE_DICT):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with open(os.path.join(args.out, f"ref-{case}-r{rank}.json"), "w") as f:
        json.dump(ref, f)
    if rank == 0:
        torch.save(sd, os.path.join(args.out, f"state-{case}.pt"))


for case in args.cases.split(","):
    run_case(case)
# As in cases.py: every rank finishes before gloo is torn down, and interpreter finalisation
# is skipped (pytorch/pytorch#179291); atexit handlers (gradscope's final flush) run first.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
atexit._run_exitfuncs()
os._exit(0)
