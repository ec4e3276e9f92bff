"""Linear regression on 16 points of pure-noise labels with 64 features (seeded): the faster it
fits (the larger the clip threshold) the lower its training loss and the higher its held-out
loss (the held-out truth is 0). Every --every steps it reports the held-out loss: by
gradscope.log_metric (a tensor) or, with --print, as a line "step N val_loss=V" on stdout."""
import argparse

import torch

import gradscope

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--every", type=int, default=10)
p.add_argument("--print", action="store_true")
p.add_argument("--clip", type=float, default=None)
a = p.parse_args()

torch.manual_seed(0)
X, y = torch.randn(16, 64), torch.randn(16, 1)
Xv = torch.randn(256, 64)
model = torch.nn.Linear(64, 1, bias=False)
torch.nn.init.zeros_(model.weight)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(a.steps):
    loss = torch.nn.functional.mse_loss(model(X), y)
    opt.zero_grad()
    loss.backward()
    if a.clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
    opt.step()
    if (step + 1) % a.every == 0:
        with torch.no_grad():
            val = model(Xv).pow(2).mean()
        if a.print:
            print(f"step {step + 1} val_loss={val.item():.9g}")
        else:
            gradscope.log_metric("val_loss", val)
