"""A tiny real training loop, driven by flags, used by the recorder tests.

It writes its own float64 reference (pre-clip norm, loss, lr per optimizer step)
with --ref, computed on copies so the training itself is untouched.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.nn.utils import clip_grad_norm_  # imported at the top, as many scripts do

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--accum", type=int, default=1)
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--clip-value", type=float, default=None)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--opt", default="sgd")
parser.add_argument("--ref", default=None)
parser.add_argument("--save", default=None)
parser.add_argument("--exit", type=int, default=None)
parser.add_argument("--raise-at", type=int, default=None)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--progress", default=None, help="touch this file after each step")
parser.add_argument("--freeze-bias", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
)
if args.freeze_bias:
    model[2].bias.requires_grad_(False)
params = [p for p in model.parameters()]
opt = (torch.optim.SGD(params, lr=args.lr, momentum=0.9) if args.opt == "sgd"
       else torch.optim.AdamW(params, lr=args.lr))
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
ref = {"grad_norm": [], "loss": [], "lr": [], "layers": []}

for step in range(args.steps):
    if args.raise_at is not None and step == args.raise_at:
        raise RuntimeError(f"boom at step {step}")
    loss_sum = 0.0
    for micro in range(args.accum):
        x = torch.randn(32, 8)
        y = x[:, :1] * 3 + torch.randn(32, 1) * 0.1
        loss = torch.nn.functional.mse_loss(model(x), y) / args.accum
        loss.backward()
        loss_sum += loss.item()
    grads = [p.grad.detach().double() for p in model.parameters() if p.grad is not None]
    ref["grad_norm"].append(torch.sqrt(sum((g * g).sum() for g in grads)).item())
    ref["layers"].append({n: p.grad.detach().double().norm().item() for n, p in model.named_parameters() if p.grad is not None})
    ref["loss"].append(loss_sum)
    ref["lr"].append(opt.param_groups[0]["lr"])
    if args.clip is not None:
        clip_grad_norm_(model.parameters(), args.clip)
    if args.clip_value is not None:
        torch.nn.utils.clip_grad_value_(model.parameters(), args.clip_value)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if args.progress:
        # replaced atomically: a signal between truncating and writing would leave it empty
        with open(args.progress + ".tmp", "w") as f:
            f.write(str(step))
        os.replace(args.progress + ".tmp", args.progress)
    if args.sleep:
        time.sleep(args.sleep)

if args.ref:
    with open(args.ref, "w") as f:
        json.dump(ref, f)
if args.save:
    torch.save(model.state_dict(), args.save)
if args.exit is not None:
    sys.exit(args.exit)
