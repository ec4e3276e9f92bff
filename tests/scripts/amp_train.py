"""fp16 autocast on CPU with a GradScaler whose huge initial scale makes the first steps overflow."""
import json
import sys

import torch

ref_path, save_path = sys.argv[1], sys.argv[2]
clip = float(sys.argv[3]) if len(sys.argv) > 3 else None
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
ref = {"grad_norm": [], "loss": [], "scale": [], "skipped": []}
for step in range(40):
    x = torch.randn(16, 8)
    y = x.sum(1, keepdim=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad.detach().double() for p in model.parameters()]
    ref["grad_norm"].append(torch.sqrt(sum((g * g).sum() for g in grads)).item())
    ref["loss"].append(loss.item())
    ref["scale"].append(scaler.get_scale())
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    ref["skipped"].append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
    scaler.update()
with open(ref_path, "w") as f:
    json.dump(ref, f)
torch.save(model.state_dict(), save_path)
