"""A plain `optimizer.step(closure)` loop: backward (and optionally clip_grad_norm_) inside the closure.

Writes its own float64 reference (pre-clip norm and loss of each step, taken inside the
closure after backward) with --ref, and the final weights with --save.
"""
import argparse
import json

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--kw", action="store_true", help="pass the closure as step(closure=...)")
parser.add_argument("--ref", default=None)
parser.add_argument("--save", default=None)
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
ref = {"grad_norm": [], "loss": []}
for step in range(args.steps):
    x = torch.randn(32, 8)
    y = x[:, :1] * 3 + torch.randn(32, 1) * 0.1

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = [p.grad.detach().double() for p in model.parameters()]
        ref["grad_norm"].append(torch.sqrt(sum((g * g).sum() for g in grads)).item())
        ref["loss"].append(loss.item())
        if args.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        return loss

    if args.kw:
        opt.step(closure=closure)
    else:
        opt.step(closure)

if args.ref:
    with open(args.ref, "w") as f:
        json.dump(ref, f)
if args.save:
    torch.save(model.state_dict(), args.save)
