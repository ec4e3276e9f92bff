"""Training cases for tests/test_distributed.py, launched with torchrun (2 ranks, gloo, CPU).

Each case trains a small model and, after backward and before any clip or
step, computes an independent float64 reference of the global gradient norm
(and per-parameter norms) from the *full* gradients: for FSDP2 via
``full_tensor()``, for DDP from the all-reduced local copy, cross-checked
against the other rank with an all_gather. The reference only reads the
gradients (all-gathers copy them), so the training numerics are the same
whether gradscope records or not; the final full state dict is saved to prove it.

    cases.py OUT [--cases ddp,accum,fsdp,fsdp_clip] [--steps N] [--crash-rank R --crash-at S]
"""
import argparse
import atexit
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--cases", default="ddp,accum,fsdp,fsdp_clip")
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--crash-rank", type=int, default=-1)
ap.add_argument("--crash-at", type=int, default=-1)
args = ap.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
os.makedirs(args.out, exist_ok=True)


def make_model(seed):
    torch.manual_seed(seed)  # same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
    )


def batch(case_id, step, micro=0):
    g = torch.Generator().manual_seed(1000 * case_id + 10 * step + micro + 100_000 * rank)
    x = torch.randn(8, 16, generator=g) * (1 + step)  # growing inputs: the norm changes, clipping bites
    y = torch.randn(8, 4, generator=g)
    return x, y


def full_grads(params):
    out = []
    for p in params:
        g = p.grad
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append(g.detach().double().clone())
    return out


def reference(params, ref, check_replicated):
    grads = full_grads(params)
    if check_replicated:  # DDP: every rank must hold the same all-reduced gradient
        flat = torch.cat([g.flatten() for g in grads])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], t) for t in gathered), "DDP gradients differ between ranks"
    layers = [g.norm().item() for g in grads]
    ref["grad_norm"].append(torch.stack([g.norm() for g in grads]).norm().item())
    ref["layers"].append(layers)


def save(case, model, ref, fsdp):
    sd = model.state_dict() if fsdp else model.module.state_dict()
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in sd.items()}
    ref["names"] = list(sd)
    with open(os.path.join(args.out, f"ref-{case}-r{rank}.json"), "w") as f:
        json.dump(ref, f)
    if rank == 0:
        torch.save(sd, os.path.join(args.out, f"state-{case}.pt"))


def maybe_crash(step):
    if rank == args.crash_rank and step == args.crash_at:
        raise RuntimeError(f"rank {rank} fails at step {step} (on purpose)")


def run_ddp(case_id):
    model = DDP(make_model(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref = {"grad_norm": [], "layers": [], "loss": []}
    for step in range(args.steps):
        maybe_crash(step)
        x, y = batch(case_id, step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ref["loss"].append(loss.item())
        reference(list(model.parameters()), ref, check_replicated=True)
        opt.step()
        opt.zero_grad()
    save("ddp", model, ref, fsdp=False)


def run_accum(case_id):
    """DDP + gradient accumulation under no_sync() + bf16 autocast + GradScaler + clipping."""
    model = DDP(make_model(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref = {"grad_norm": [], "layers": [], "loss": [], "loss_scale": [], "clip_total": []}
    micro = 3
    for step in range(args.steps):
        total_loss = 0.0
        for k in range(micro):
            x, y = batch(case_id, step, k)
            ctx = model.no_sync() if k < micro - 1 else torch.enable_grad()
            with ctx:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.mse_loss(model(x), y) / micro
                scaler.scale(loss).backward()
            total_loss += loss.item()
        ref["loss"].append(total_loss)
        ref["loss_scale"].append(scaler.get_scale())
        scaler.unscale_(opt)
        reference(list(model.parameters()), ref, check_replicated=True)
        ref["clip_total"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.6).item())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    save("accum", model, ref, fsdp=False)


def run_fsdp(case_id, clip):
    from torch.distributed.fsdp import fully_shard

    model = make_model(3)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref = {"grad_norm": [], "layers": [], "loss": [], "clip_total": []}
    for step in range(args.steps):
        x, y = batch(case_id, step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ref["loss"].append(loss.item())
        reference(list(model.parameters()), ref, check_replicated=False)
        if clip:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            ref["clip_total"].append(total.full_tensor().item())
        opt.step()
        opt.zero_grad()
    save("fsdp_clip" if clip else "fsdp", model, ref, fsdp=True)


for i, case in enumerate(args.cases.split(",")):
    if case == "ddp":
        run_ddp(i)
    elif case == "accum":
        run_accum(i)
    elif case == "fsdp":
        run_fsdp(i, clip=False)
    elif case == "fsdp_clip":
        run_fsdp(i, clip=True)
    else:
        raise SystemExit(f"unknown case {case}")
# Every rank finishes its sends before any rank tears gloo down, and the process then skips
# interpreter finalisation: gloo's worker threads can still abort a rank there ("terminate
# called without an active exception", SIGABRT; pytorch/pytorch#179291), with or without
# gradscope. The atexit handlers (gradscope's final flush among them) run first, as on a
# normal exit.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
atexit._run_exitfuncs()
os._exit(0)
