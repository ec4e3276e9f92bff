"""Two optimizers over two models; the second steps every other iteration (loss accumulates)."""
import json
import sys

import torch

torch.manual_seed(0)
a = torch.nn.Linear(4, 4)
b = torch.nn.Linear(4, 1)
opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
opt_b = torch.optim.Adam(b.parameters(), lr=0.001)
ref = {"a": [], "b": [], "loss_a": [], "loss_b": []}
pending_b = 0.0
for it in range(10):
    x = torch.randn(8, 4)
    loss = b(torch.relu(a(x))).pow(2).mean()
    loss.backward()
    pending_b += loss.item()
    ref["a"].append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in a.parameters())).item())
    ref["loss_a"].append(loss.item())
    opt_a.step()
    opt_a.zero_grad()
    if it % 2 == 1:
        ref["b"].append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in b.parameters())).item())
        ref["loss_b"].append(pending_b)
        pending_b = 0.0
        opt_b.step()
        opt_b.zero_grad()
with open(sys.argv[1], "w") as f:
    json.dump(ref, f)
