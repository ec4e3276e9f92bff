"""A small character-level transformer with gradient clipping that acts on a few outliers.

Healthy training: the loss falls, and clip_grad_norm_ at max_norm 1.5 clips only
the occasional large step (a few percent of steps). CPU, seeded, about 10 seconds.

    gradscope run sample_runs/scripts/healthy_transformer.py
    gradscope run sample_runs/scripts/healthy_transformer.py --steps 100 --clip-norm 0.5
"""
import argparse

import torch
import torch.nn as nn

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness, it was "
    "the spring of hope, it was the winter of despair, we had everything before us, "
    "we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way. "
) * 4


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, ctx: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, x):
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--clip-norm", type=float, default=1.5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and reproducible
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    model = TinyTransformer(len(chars), ctx=args.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()

    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,))
        x = torch.stack([data[s : s + args.ctx] for s in starts])
        y = torch.stack([data[s + 1 : s + args.ctx + 1] for s in starts])
        loss = loss_fn(model(x).reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  grad_norm {norm.item():.3f}", flush=True)


if __name__ == "__main__":
    main()
