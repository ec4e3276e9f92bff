"""A seeded linear regression for `gradscope tune`: SGD is fine until step 0.6*T, then the
learning rate jumps past the stable limit. Unclipped (or clipped loosely) it is the fastest early
and blows up to inf late; clipped, the late steps stay bounded at a size set by the threshold.
"""
import argparse

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=120)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--unseeded", action="store_true", help="do not seed (probes then differ)")
args = ap.parse_args()

if not args.unseeded:
    torch.manual_seed(args.seed)
torch.set_num_threads(1)
w_true = torch.randn(8, 1) * 3
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.2)
for step in range(args.steps):
    if step == int(0.6 * args.steps):
        for g in opt.param_groups:
            g["lr"] = 2.0  # past 2/L for this loss: unclipped steps grow 3x each
    x = torch.randn(64, 8)
    y = x @ w_true + 0.1 * torch.randn(64, 1)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
