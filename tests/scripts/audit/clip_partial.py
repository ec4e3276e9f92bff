"""Bug: the optimizer updates the encoder and a separate head, but only the encoder is clipped."""
import sys

import torch

torch.manual_seed(0)
encoder = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32))
head = torch.nn.Linear(32, 4)
opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=1e-2)
for step in range(20):
    x = torch.randn(16, 8)
    y = torch.randint(0, 4, (16,))
    loss = torch.nn.functional.cross_entropy(head(encoder(x)), y)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)  # head left out
    opt.step()
if len(sys.argv) > 1:
    torch.save({"encoder": encoder.state_dict(), "head": head.state_dict()}, sys.argv[1])
