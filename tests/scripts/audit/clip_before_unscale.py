"""Bug: fp16 AMP with clipping, but no scaler.unscale_(opt) before the clip (the Lightning 1.4 bug)."""
import sys

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
for step in range(30):
    x = torch.randn(16, 8)
    y = x.sum(1, keepdim=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the gradients are still scaled here
    scaler.step(opt)
    scaler.update()
if len(sys.argv) > 1:
    torch.save(model.state_dict(), sys.argv[1])
