"""The issue-22 case, small: a seeded GRU sequence classifier, AdamW with a 60-step linear warm-up
then cosine decay over 250 steps, and the script's own clip_grad_norm_(..., 1.0)."""
import math

import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)
T, WARMUP, VOCAB, LENGTH, CLASSES = 250, 60, 12, 16, 4
gen = torch.Generator().manual_seed(1)


def batch(g, n):
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    counts = torch.stack([(x[:, 4:] == c).sum(1) for c in range(CLASSES)], 1).float()
    return x, (counts + 0.01 * torch.arange(CLASSES, 0, -1)).argmax(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.gru = nn.GRU(8, 32, batch_first=True)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.head(h[:, -1])


model = Net()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def lr_at(step):
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (T - WARMUP)))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
for step in range(T):
    x, y = batch(gen, 32)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
