"""A seeded regression that stops itself at its first non-finite loss (a common guard):
unclipped, the learning rate is past the stable limit and the loss blows up to inf within a few
dozen steps; clipped, the updates stay bounded and it trains."""
import argparse
import math

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--lr", type=float, default=30.0)
args = ap.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
w_true = torch.randn(8, 1) * 3
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
for step in range(args.steps):
    x = torch.randn(64, 8)
    y = x @ w_true + 0.1 * torch.randn(64, 1)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if not math.isfinite(loss.item()):
        print(f"non-finite loss at step {step}: stopping")
        break
    opt.zero_grad()
    loss.backward()
    opt.step()
