"""A closure optimizer: LBFGS calls backward() inside step()."""
import json
import sys

import torch

torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
x, y = torch.randn(32, 3), torch.randn(32, 1)
ref = {"loss": [], "grad_norm": []}
for _ in range(5):
    first = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
        first.append((loss.item(), norm))
        return loss

    opt.step(closure)
    assert len(first) > 1  # several evaluations per step: the first one is recorded
    ref["loss"].append(first[0][0])
    ref["grad_norm"].append(first[0][1])
with open(sys.argv[1], "w") as f:
    json.dump(ref, f)
