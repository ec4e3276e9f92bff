"""Bug: clipping inside the gradient-accumulation loop (each micro-batch's partial sum is clipped)."""
import sys

import torch
from torch.nn.utils import clip_grad_norm_

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
accum = 4
for step in range(15):
    for micro in range(accum):
        x = torch.randn(16, 8)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1] * 3) / accum
        loss.backward()
        clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    opt.zero_grad()
if len(sys.argv) > 1:
    torch.save(model.state_dict(), sys.argv[1])
