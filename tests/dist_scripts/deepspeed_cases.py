"""DeepSpeed ZeRO 1/2/3 cases, each against a float64 reference of the global pre-clip norm.

Run under torchrun with 2 ranks (gloo, CPU). One engine per case, in one process group,
one after the other: gradscope gives each engine's inner optimizer its id in creation order
(CASES' order). Every rank can make every rank's micro-batches (seeded by case, step,
micro-batch and rank), so before each optimizer step the script rebuilds the model in
float64 from the engine's full weights and computes the gradient DeepSpeed will apply,
(1/world) * sum over ranks and micro-batches of grad(loss / accumulation steps), by hand.

    deepspeed_cases.py OUT [--config-clip TAU]

writes OUT/ref-<case>-r<rank>.json (norms, losses, DeepSpeed's own norms, threshold) and
OUT/weights-<case>.pt (rank 0: the final full weights).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# (name, ZeRO stage, gradient_accumulation_steps, how it is configured)
CASES = [
    ("z0", 0, 1, "dict"),        # no ZeRO, float32: DeepSpeed clips the whole gradients itself
    ("z1", 1, 1, "dict"),
    ("z1_accum", 1, 2, "dict"),
    ("z2", 2, 1, "json"),        # gradient_clipping read from a JSON file
    ("z2_accum", 2, 3, "dict"),
    ("z3", 3, 1, "dict"),
    ("z3_accum", 3, 2, "config_optimizer"),  # DeepSpeed's config optimizer (torch AdamW)
    ("z2_scaled", 2, 2, "loss_scale"),  # a static loss scale (as fp16 has): backward sees loss x 64
]
LOSS_SCALE = 64.0
TAU = 1.5     # within the cases' norms (about 0.9 to 3.4): some steps clip, some do not
STEPS = 8
BATCH = 4
D_IN, D_H, D_OUT = 12, 24, 3


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, D_H), nn.Tanh(), nn.Linear(D_H, D_H), nn.Tanh(), nn.Linear(D_H, D_OUT))


def batch(case: int, step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * case + 1009 * step + 31 * micro + rank)
    x = torch.randn(BATCH, D_IN, generator=g)
    y = torch.randn(BATCH, D_OUT, generator=g) * 2.0
    return x, y


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    if stage == 3:  # partitioned: gather (a collective every rank joins)
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: v.detach().clone() for k, v in params.items()}
    return {k: v.detach().clone() for k, v in params.items()}


def reference(weights: dict, ci: int, step: int, gas: int, world: int, rank: int) -> tuple[float, float]:
    """The float64 global gradient norm of this step and this rank's loss (sum of loss/gas)."""
    ref = make_model().double()
    ref.load_state_dict({k: v.double() for k, v in weights.items()})
    params = list(ref.parameters())
    total = [torch.zeros_like(p) for p in params]
    mine = 0.0
    for r in range(world):
        for m in range(gas):
            x, y = batch(ci, step, m, r)
            loss = nn.functional.mse_loss(ref(x.double()), y.double()) / gas
            # autograd.grad, not backward(): the reference is no training step of the script's
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t += g / world
            if r == rank:
                mine += float(loss)
    norm = math.sqrt(sum(float((t * t).sum()) for t in total))
    return norm, mine


def run_case(ci: int, name: str, stage: int, gas: int, how: str, clip: float, out: Path) -> None:
    import deepspeed

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(100 + ci)
    model = make_model()
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    kwargs = {}
    if how == "config_optimizer":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.01, "torch_adam": True}}
    else:
        kwargs["optimizer"] = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    if how == "json":
        path = out / f"ds_config_{name}.json"
        if rank == 0:
            path.write_text(json.dumps(config))
        dist.barrier()
        kwargs["config"] = str(path)
    else:
        kwargs["config"] = config
    engine, _, _, _ = deepspeed.initialize(model=model, **kwargs)
    if how == "loss_scale":
        engine.optimizer.override_loss_scale(LOSS_SCALE)
    norms, losses, ds_norms = [], [], []
    for step in range(STEPS):
        norm, loss = reference(full_weights(engine, stage), ci, step, gas, world, rank)
        norms.append(norm)
        losses.append(loss)
        for m in range(gas):
            x, y = batch(ci, step, m, rank)
            engine.backward(nn.functional.mse_loss(engine(x), y))
            engine.step()
        got = engine.get_global_grad_norm()
        ds_norms.append(float(got) if got is not None else None)
    weights = full_weights(engine, stage)
    (out / f"ref-{name}-r{rank}.json").write_text(json.dumps(
        {"norms": norms, "losses": losses, "ds_norms": ds_norms, "clip": clip, "stage": stage, "gas": gas}))
    if rank == 0:
        torch.save(weights, out / f"weights-{name}.pt")
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config-clip", type=float, default=TAU, help="gradient_clipping in the DeepSpeed config")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import deepspeed  # here, not at the top: the test reads CASES without importing deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    wanted = a.cases.split(",")
    for ci, (name, stage, gas, how) in enumerate(CASES):
        if name in wanted:
            run_case(ci, name, stage, gas, how, a.config_clip, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
