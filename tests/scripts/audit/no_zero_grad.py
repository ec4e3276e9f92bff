"""Bug: zero_grad() was forgotten: every step applies the sum of all gradients so far."""
import sys

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.001)
for step in range(20):
    x = torch.randn(32, 8)
    loss = torch.nn.functional.mse_loss(model(x), x[:, :1] * 3)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
if len(sys.argv) > 1:
    torch.save(model.state_dict(), sys.argv[1])
