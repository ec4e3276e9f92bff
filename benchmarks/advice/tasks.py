"""Small, seeded, CPU-only training tasks whose outcome depends on the clip threshold.

Each task builds its data and model from the seed alone, trains for a fixed number of
optimizer steps and returns the held-out loss at the end. A `clipper` is called with the
parameters between backward() and step(); None means no clipping. The same code runs as a
script (below) so that `gradscope run` can record an unmodified, unclipped pilot of it.

Why these tasks: each is a classic place where clipping decides the outcome.
- adding:    tanh RNN on the adding problem (Pascanu, Mikolov & Bengio 2013), SGD.
- lstm_lm:   word-level LSTM LM, SGD at lr 20 as in PyTorch's word_language_model example.
- tfm_lm:    small transformer LM, AdamW at a high learning rate with no warm-up.
- deep_mlp:  12-layer tanh MLP with a too-large initialisation, SGD with momentum.
- gru_copy:  GRU on a delayed-copy task, SGD at a high learning rate.
- cnn:       small CNN on noisy shifted 8x8 patterns, SGD with momentum at a high learning rate.
- logreg:    softmax regression at a well-chosen learning rate: not clipping is best.
- sum_mlp:   MLP regression with a summed squared error on heavy-tailed inputs: norms ~100.
- tiny_norm: MLP autoencoder on small-valued data at a large learning rate: norms ~0.01.
- char_rnn:  vanilla tanh RNN character-level LM, plain SGD at lr 10.
- conv1d:    1-D CNN forecasting noisy sums of sines, MSE, SGD with momentum at a high learning rate.
- mf_rec:    matrix-factorisation recommender (embeddings), summed squared error, SGD: norms ~1000.
- vae:       MLP variational autoencoder (negative ELBO, summed over dims), SGD with momentum: norms ~100.
- gcn:       2-layer graph convolutional network, node classification on a random block-model graph, SGD.
- gru_warmup: GRU sequence classifier, AdamW with a 60-step linear warm-up and cosine decay, the script's
             own clip_grad_norm_(..., 1.0) (the issue-22 case).
- noisy_mlp: MLP classifier on a small training set with noisy labels, SGD with momentum: it memorises, so
             the threshold that trains best is not the one that generalises best.

Tasks with `eval_every` report their held-out loss while they train (`heldout_loss` lines on stdout
and, when gradscope has it, `gradscope.log_metric("heldout_loss", value)`), so that a tool can rank
probes by it rather than by the training loss.
"""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Clipper = Callable[[list], None]


@dataclass(frozen=True)
class Task:
    name: str
    steps: int
    build: Callable  # seed -> (model, optimizer, next_batch(step) -> (x, y), heldout() -> loss, loss_fn)
    scale: float = 1.0  # where the family's norms sit: the grid of thresholds is placed around it
    benchmark: bool = True  # in the default benchmark
    # the learning-rate multiplier at (step, steps); None: linear decay to 0 from step 0
    schedule: Callable[[int, int], float] | None = None
    script_clip: float | None = None  # the script's own clip_grad_norm_ max_norm when run as a script
    eval_every: int = 0  # report the held-out loss every this many steps (0: only the final one)


# Whole task families held out from the design of `recommend` and `tune`: the benchmark reports
# them apart. vae and gcn, the third held-out set, were declared here before any recommend or tune
# result on them existed (their grids were run while the tasks were built, to check that clipping
# decides their outcome; that says nothing about the rules). char_rnn, conv1d and mf_rec, the
# second held-out set, became design families once their recommend and tune figures had been seen
# (tune's rules are changed after that, on them as design families); cnn and sum_mlp, the first
# held-out pair, likewise before them, once their tune figures had been seen while tune was changed.
# gru_warmup and noisy_mlp, the fourth held-out pair, were declared here (issue 22) before any
# recommend or tune result on them existed; vae and gcn became design families then (their
# recommend and tune figures had been seen).
HELDOUT_FAMILIES = ("gru_warmup", "noisy_mlp")


def _markov_text(seed: int, vocab: int, length: int, branching: int = 3) -> torch.Tensor:
    """Token stream from a sparse random first-order Markov chain: learnable, not trivial."""
    rng = random.Random(seed)
    nxt = [[rng.randrange(vocab) for _ in range(branching)] for _ in range(vocab)]
    weights = [[math.exp(2.0 * rng.gauss(0, 1)) for _ in range(branching)] for _ in range(vocab)]
    out, tok = [], 0
    for _ in range(length):
        tok = rng.choices(nxt[tok], weights[tok])[0]
        out.append(tok)
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------- adding problem


class _RNNReg(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


def _adding_batch(gen: torch.Generator, n: int, T: int):
    vals = torch.rand(n, T, generator=gen)
    mark = torch.zeros(n, T)
    a = torch.randint(0, T // 2, (n,), generator=gen)
    b = torch.randint(T // 2, T, (n,), generator=gen)
    mark[torch.arange(n), a] = 1.0
    mark[torch.arange(n), b] = 1.0
    x = torch.stack([vals, mark], dim=-1)
    y = (vals * mark).sum(1)
    return x, y


def build_adding(seed: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    T = 10
    model = _RNNReg(48)
    with torch.no_grad():  # a recurrent matrix with spectral radius > 1: gradients explode
        model.rnn.weight_hh_l0.copy_(torch.nn.init.orthogonal_(torch.empty(48, 48)) * 1.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    test = _adding_batch(torch.Generator().manual_seed(999), 512, T)
    loss_fn = nn.MSELoss()
    return model, opt, lambda step: _adding_batch(gen, 128, T), test, loss_fn


# ----------------------------------------------------------------------------- language models


class _LSTMLM(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        for p in self.parameters():  # as word_language_model: uniform init
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.out(h)


class _TfmLM(nn.Module):
    def __init__(self, vocab: int, d: int, ctx: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=False)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        h = self.body(self.emb(x) + self.pos[:n], mask=self.mask[:n, :n], is_causal=True)
        return self.out(h)


class _LMLoss:
    def __init__(self):
        self.ce = nn.CrossEntropyLoss()

    def __call__(self, logits, y):
        return self.ce(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _lm_data(seed: int, vocab: int, ctx: int, batch: int):
    text = _markov_text(20_000 + seed % 3, vocab, 30_000)  # three corpora, shared across seeds
    train, test = text[:26_000], text[26_000:]
    gen = torch.Generator().manual_seed(30_000 + seed)

    def batch_at(step):
        i = torch.randint(0, len(train) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([train[j:j + ctx] for j in i.tolist()])
        y = torch.stack([train[j + 1:j + ctx + 1] for j in i.tolist()])
        return x, y

    starts = range(0, len(test) - ctx - 1, ctx)
    tx = torch.stack([test[j:j + ctx] for j in starts])
    ty = torch.stack([test[j + 1:j + ctx + 1] for j in starts])
    return batch_at, (tx, ty)


def build_lstm_lm(seed: int):
    torch.manual_seed(seed)
    batch_at, test = _lm_data(seed, 64, 24, 16)
    model = _LSTMLM(64, 32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    return model, opt, batch_at, test, _LMLoss()


def build_tfm_lm(seed: int):
    torch.manual_seed(seed)
    ctx = 16
    batch_at, test = _lm_data(seed, 64, ctx, 16)
    model = _TfmLM(64, 32, ctx)
    # PyTorch's default betas, a high learning rate and no warm-up: the first updates are lr-sized
    # on every weight, and a burst of large gradients moves Adam's moments for a long while.
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, betas=(0.9, 0.999), weight_decay=0.0)
    return model, opt, batch_at, test, _LMLoss()


# ----------------------------------------------------------------------------- deep MLP


def build_deep_mlp(seed: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(40_000 + seed)
    d = 32
    teacher = torch.Generator().manual_seed(41_000)
    w_true = torch.randn(d, 1, generator=teacher) / math.sqrt(d)
    layers: list[nn.Module] = []
    for i in range(12):
        lin = nn.Linear(d, d)
        nn.init.normal_(lin.weight, std=2.0 / math.sqrt(d))  # twice the stable gain: norms blow up
        layers += [lin, nn.Tanh()]
    layers.append(nn.Linear(d, 1))
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    def data(g, n):
        x = torch.randn(n, d, generator=g)
        return x, (x @ w_true).squeeze(-1) / w_true.norm()  # a linear teacher, variance 1

    test = data(torch.Generator().manual_seed(998), 1024)
    loss_fn = nn.MSELoss()
    return model, opt, lambda step: data(gen, 64), test, _Squeeze(loss_fn)


class _Squeeze:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, pred, y):
        return self.fn(pred.squeeze(-1), y)


# ----------------------------------------------------------------------------- GRU delayed copy


class _GRUSeq(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.out(h)


def _copy_batch(gen: torch.Generator, n: int, k: int, delay: int, vocab: int):
    seq = torch.randint(1, vocab, (n, k), generator=gen)
    blank = torch.zeros(n, delay, dtype=torch.long)
    x = torch.cat([seq, blank, torch.zeros(n, k, dtype=torch.long)], 1)
    y = torch.cat([torch.zeros(n, k + delay, dtype=torch.long), seq], 1)
    return x, y


def build_gru_copy(seed: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(50_000 + seed)
    vocab, k, delay = 8, 5, 20
    model = _GRUSeq(vocab, 64)
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    test = _copy_batch(torch.Generator().manual_seed(997), 256, k, delay, vocab)
    return model, opt, lambda step: _copy_batch(gen, 32, k, delay, vocab), test, _LMLoss()


# ----------------------------------------------------------------------------- small CNN


class _SmallCNN(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4, classes),
        )

    def forward(self, x):
        return self.body(x)


def _shapes_batch(gen: torch.Generator, templates: torch.Tensor, n: int):
    """8x8 images: a class template, shifted by up to a pixel each way, plus noise."""
    y = torch.randint(0, len(templates), (n,), generator=gen)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    x = torch.roll(templates[y], shifts=(dx, dy), dims=(-2, -1))
    return (x + 1.0 * torch.randn(x.shape, generator=gen)).unsqueeze(1), y


def build_cnn(seed: int):
    torch.manual_seed(seed)
    templates = torch.randn(10, 8, 8, generator=torch.Generator().manual_seed(60_000))
    gen = torch.Generator().manual_seed(61_000 + seed)
    model = _SmallCNN(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    test = _shapes_batch(torch.Generator().manual_seed(996), templates, 512)
    return model, opt, lambda step: _shapes_batch(gen, templates, 32), test, nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- softmax regression (no clipping best)


def build_logreg(seed: int):
    torch.manual_seed(seed)
    d, classes = 32, 8
    w_true = torch.randn(d, classes, generator=torch.Generator().manual_seed(70_000))
    gen = torch.Generator().manual_seed(71_000 + seed)

    def data(g, n):
        x = torch.randn(n, d, generator=g)
        return x, (x @ w_true).argmax(-1)  # a linear teacher: separable, convex

    model = nn.Linear(d, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    test = data(torch.Generator().manual_seed(995), 1024)
    return model, opt, lambda step: data(gen, 32), test, nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- norms far from 1


def build_sum_mlp(seed: int):
    """Regression with a summed squared error (as hand-written losses often are): norms in the hundreds."""
    torch.manual_seed(seed)
    d = 16
    w_true = torch.randn(d, 1, generator=torch.Generator().manual_seed(80_000)) / math.sqrt(d)
    gen = torch.Generator().manual_seed(81_000 + seed)
    heavy = torch.distributions.StudentT(3.0)

    def data(g, n):  # StudentT.sample takes no generator: seed the global one from ours
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        x = heavy.sample((n, d))
        return x, (x @ w_true).squeeze(-1)

    model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    test = data(torch.Generator().manual_seed(994), 1024)
    return model, opt, lambda step: data(gen, 64), test, _Squeeze(_SumMSE())


class _SumMSE:
    def __call__(self, pred, y):
        return ((pred - y) ** 2).sum()


def build_tiny_norm(seed: int):
    """An MLP autoencoder on small-valued data, mean-reduced: norms around 0.01."""
    torch.manual_seed(seed)
    d, k = 32, 12
    basis = torch.randn(k, d, generator=torch.Generator().manual_seed(90_000)) * 0.05
    gen = torch.Generator().manual_seed(91_000 + seed)

    def data(g, n):
        z = torch.randn(n, k, generator=g)
        x = torch.tanh(z) @ basis
        return x, x

    model = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 64), nn.Tanh(),
                          nn.Linear(64, d))
    opt = torch.optim.SGD(model.parameters(), lr=50.0, momentum=0.9)
    test = data(torch.Generator().manual_seed(993), 1024)
    return model, opt, lambda step: data(gen, 64), test, nn.MSELoss()


# ----------------------------------------------------------------------------- vanilla RNN char LM


class _CharRNN(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = nn.RNN(emb, hidden, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(h)


def build_char_rnn(seed: int):
    """A vanilla tanh RNN (nn.RNN, 128 units) character-level LM on synthetic Markov text
    (32 symbols, context 32), plain SGD at lr 10."""
    torch.manual_seed(seed)
    vocab, ctx = 32, 32
    text = _markov_text(100_000 + seed % 3, vocab, 20_000)  # three corpora, shared across seeds
    train_, test = text[:17_000], text[17_000:]
    gen = torch.Generator().manual_seed(101_000 + seed)

    def batch_at(step):
        i = torch.randint(0, len(train_) - ctx - 1, (16,), generator=gen).tolist()
        return (torch.stack([train_[j:j + ctx] for j in i]), torch.stack([train_[j + 1:j + ctx + 1] for j in i]))

    starts = range(0, len(test) - ctx - 1, ctx)
    tx = torch.stack([test[j:j + ctx] for j in starts])
    ty = torch.stack([test[j + 1:j + ctx + 1] for j in starts])
    model = _CharRNN(vocab, 16, 128)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    return model, opt, batch_at, (tx, ty), _LMLoss()


# ----------------------------------------------------------------------------- matrix factorisation (norms ~1000)


class _MF(nn.Module):
    def __init__(self, users: int, items: int, rank: int):
        super().__init__()
        self.u = nn.Embedding(users, rank)
        self.v = nn.Embedding(items, rank)
        self.ub = nn.Embedding(users, 1)
        self.vb = nn.Embedding(items, 1)
        for e in (self.u, self.v):
            nn.init.normal_(e.weight, std=1.0)
        for e in (self.ub, self.vb):
            nn.init.zeros_(e.weight)

    def forward(self, x):
        u, i = x[:, 0], x[:, 1]
        return (self.u(u) * self.v(i)).sum(-1) + self.ub(u).squeeze(-1) + self.vb(i).squeeze(-1)


def build_mf_rec(seed: int):
    """Matrix-factorisation recommender (user and item embeddings plus biases: a step touches only
    the rows in its batch) on ratings around 12 (spread ~4, noise 1.2) from a rank-6 truth,
    trained on the squared error summed over a batch of 1024, plain SGD: norms around 1000."""
    torch.manual_seed(seed)
    users, items, rank, k = 3000, 2000, 6, 4.0
    g0 = torch.Generator().manual_seed(120_000)
    pu, pv = torch.randn(users, rank, generator=g0), torch.randn(items, rank, generator=g0)
    truth = k * (3.0 + (pu @ pv.T) / math.sqrt(rank))
    gen = torch.Generator().manual_seed(121_000 + seed)

    def data(g, n):
        u = torch.randint(0, users, (n,), generator=g)
        i = torch.randint(0, items, (n,), generator=g)
        return torch.stack([u, i], 1), truth[u, i] + 0.3 * k * torch.randn(n, generator=g)

    model = _MF(users, items, rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    test = data(torch.Generator().manual_seed(991), 4096)
    return model, opt, lambda step: data(gen, 1024), test, _SumTrainMeanEval()


class _SumTrainMeanEval:
    """The summed squared error while training (autograd on); the mean one when evaluated under
    no_grad, as `train` scores the held-out set."""

    def __call__(self, pred, y):
        total = ((pred - y) ** 2).sum()
        return total if torch.is_grad_enabled() else total / len(y)


# ----------------------------------------------------------------------------- 1-D CNN forecaster


def build_conv1d(seed: int):
    """A 1-D CNN (3 convolutions, 32 channels) forecasting the next 8 values of a noisy sum of
    three sines from the last 64, MSE, SGD with momentum at a high learning rate."""
    torch.manual_seed(seed)
    ctx, horizon = 64, 8
    gen = torch.Generator().manual_seed(131_000 + seed)

    def data(g, n):
        t = torch.arange(ctx + horizon, dtype=torch.float32)
        f = 0.05 + 0.3 * torch.rand(n, 3, 1, generator=g)
        ph = 6.283 * torch.rand(n, 3, 1, generator=g)
        a = torch.rand(n, 3, 1, generator=g) * 2
        s = (a * torch.sin(f * t + ph)).sum(1) + 0.1 * torch.randn(n, ctx + horizon, generator=g)
        return s[:, None, :ctx], s[:, ctx:]

    model = nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2),
                          nn.ReLU(), nn.Conv1d(32, 32, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * ctx // 2, horizon))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    test = data(torch.Generator().manual_seed(990), 1024)
    return model, opt, lambda step: data(gen, 64), test, nn.MSELoss()


# ----------------------------------------------------------------------------- variational autoencoder


class _VAE(nn.Module):
    def __init__(self, d: int, hidden: int, latent: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        # one reparameterised sample; scoring (no_grad) draws it from a fixed generator, so every
        # threshold's held-out loss is estimated with the same noise
        gen = None if torch.is_grad_enabled() else torch.Generator().manual_seed(989)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
        return self.dec(z), mu, logvar


class _NegELBO:
    """Squared reconstruction error summed over the dimensions plus the KL to N(0, I), both
    averaged over the batch (a Gaussian decoder of fixed variance, up to constants)."""

    def __call__(self, out, x):
        recon, mu, logvar = out
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(-1)
        return (((recon - x) ** 2).sum(-1) + kl).mean()


def build_vae(seed: int):
    """An MLP variational autoencoder (48 -> 128 -> 2x8 -> 128 -> 48, ReLU) on a mixture of 8
    Gaussians in 2-D mapped nonlinearly to 48 dimensions plus noise; loss: the negative ELBO
    (squared error summed over the dimensions + KL, batch mean), SGD with momentum at a high
    learning rate: norms around 100, and exp(logvar) makes the unclipped run blow up."""
    torch.manual_seed(seed)
    d, hidden, latent = 48, 128, 8
    g0 = torch.Generator().manual_seed(140_000)
    centres = 3.0 * torch.randn(8, 2, generator=g0)
    w1, w2 = torch.randn(2, 64, generator=g0), torch.randn(64, d, generator=g0) / 8.0
    gen = torch.Generator().manual_seed(141_000 + seed)

    def data(g, n):
        z = centres[torch.randint(0, 8, (n,), generator=g)] + 0.5 * torch.randn(n, 2, generator=g)
        x = 3.0 * torch.tanh(z @ w1) @ w2 + 0.1 * torch.randn(n, d, generator=g)
        return x, x

    model = _VAE(d, hidden, latent)
    opt = torch.optim.SGD(model.parameters(), lr=7e-3, momentum=0.9)
    test = data(torch.Generator().manual_seed(988), 1024)
    return model, opt, lambda step: data(gen, 64), test, _NegELBO()


# ----------------------------------------------------------------------------- graph convolutional network


class _GCN(nn.Module):
    """Two graph convolutions (Kipf & Welling 2017) over a fixed dense normalised adjacency."""

    def __init__(self, adj: torch.Tensor, d: int, hidden: int, classes: int):
        super().__init__()
        self.register_buffer("adj", adj, persistent=False)
        self.l1 = nn.Linear(d, hidden)
        self.l2 = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.adj @ self.l1(x))
        return self.adj @ self.l2(h)


def build_gcn(seed: int):
    """A 2-layer GCN (64 hidden units) on a random stochastic-block-model graph (600 nodes, 6
    blocks, edge probability 0.05 within a block and 0.02 across) whose node features are the
    block's mean plus twice as much noise; node classification (cross-entropy) on 64 of the 300
    labelled nodes per step, scored on the 300 others; SGD with momentum at a high learning rate."""
    torch.manual_seed(seed)
    n, blocks, d = 600, 6, 32
    g0 = torch.Generator().manual_seed(150_000)
    label = torch.randint(0, blocks, (n,), generator=g0)
    same = label[:, None] == label[None, :]
    edge = torch.rand(n, n, generator=g0) < torch.where(same, torch.tensor(0.05), torch.tensor(0.02))
    a = (torch.triu(edge, 1) | torch.triu(edge, 1).T).float() + torch.eye(n)
    dinv = a.sum(1).rsqrt()
    adj = dinv[:, None] * a * dinv[None, :]
    feats = torch.randn(blocks, d, generator=g0)[label] + 2.0 * torch.randn(n, d, generator=g0)
    order = torch.randperm(n, generator=g0)
    train_nodes, test_nodes = order[:300], order[300:]
    gen = torch.Generator().manual_seed(151_000 + seed)

    def labelled(nodes):  # labels of `nodes`, the rest ignored by the loss
        y = torch.full((n,), -100, dtype=torch.long)
        y[nodes] = label[nodes]
        return y

    def batch_at(step):
        return feats, labelled(train_nodes[torch.randperm(len(train_nodes), generator=gen)[:64]])

    model = _GCN(adj, d, 64, blocks)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    return model, opt, batch_at, (feats, labelled(test_nodes)), nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- GRU classifier, AdamW with warm-up


class _GRUClassifier(nn.Module):
    def __init__(self, vocab: int, hidden: int, classes: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.head(h[:, -1])


def warmup_cosine(warmup: int) -> Callable[[int, int], float]:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at the last step
    (transformers' get_cosine_schedule_with_warmup)."""
    def at(step: int, steps: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return at


def build_gru_warmup(seed: int):
    """A GRU (64 units) classifying token sequences (length 24, 12 symbols) into 4 classes: the
    class is which of 4 marker symbols occurs most often after the first 8 positions (ties to
    the smaller), with 10% of the labels flipped; AdamW lr 3e-3, weight decay 0.01, batch 32,
    a 60-step linear warm-up then cosine decay (the schedule), and the script's own
    clip_grad_norm_(..., 1.0)."""
    torch.manual_seed(seed)
    vocab, length, classes = 12, 24, 4
    gen = torch.Generator().manual_seed(160_000 + seed)

    def data(g, n, noise=0.1):
        x = torch.randint(0, vocab, (n, length), generator=g)
        counts = torch.stack([(x[:, 8:] == c).sum(1) for c in range(classes)], 1).float()
        y = (counts + 0.01 * torch.arange(classes, 0, -1)).argmax(1)
        flip = torch.rand(n, generator=g) < noise
        y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
        return x, y

    model = _GRUClassifier(vocab, 64, classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    test = data(torch.Generator().manual_seed(987), 1024, noise=0.0)
    return model, opt, lambda step: data(gen, 32), test, nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------- memorising MLP (train and held-out disagree)


def build_noisy_mlp(seed: int):
    """A 3-layer ReLU MLP (20 -> 256 -> 256 -> 10) on 10 overlapping Gaussian classes in 20-D, 256
    training points of which 30% carry a wrong label, minibatches of 32 (about 37 epochs in 300
    steps), SGD lr 0.2 momentum 0.9, scored on 2048 clean points: it can memorise the noise, so
    the threshold that trains best (clipping little) is not the one that generalises best."""
    torch.manual_seed(seed)
    d, classes, n_train = 20, 10, 256
    g0 = torch.Generator().manual_seed(170_000)
    centres = 1.2 * torch.randn(classes, d, generator=g0)

    def data(g, n, noise):
        y = torch.randint(0, classes, (n,), generator=g)
        x = centres[y] + torch.randn(n, d, generator=g)
        flip = torch.rand(n, generator=g) < noise
        return x, torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)

    tx, ty = data(torch.Generator().manual_seed(171_000 + seed), n_train, 0.3)
    gen = torch.Generator().manual_seed(172_000 + seed)

    def batch_at(step):
        i = torch.randint(0, n_train, (32,), generator=gen)
        return tx[i], ty[i]

    model = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    test = data(torch.Generator().manual_seed(986), 2048, 0.0)
    return model, opt, batch_at, test, nn.CrossEntropyLoss()


TASKS = {
    t.name: t
    for t in [
        Task("adding", 600, build_adding),
        Task("lstm_lm", 300, build_lstm_lm),
        Task("tfm_lm", 200, build_tfm_lm),
        Task("deep_mlp", 400, build_deep_mlp),
        Task("gru_copy", 400, build_gru_copy),
        Task("cnn", 300, build_cnn),
        Task("logreg", 300, build_logreg),
        Task("sum_mlp", 300, build_sum_mlp, scale=100.0),
        Task("tiny_norm", 300, build_tiny_norm, scale=0.01),
        Task("char_rnn", 300, build_char_rnn),
        Task("mf_rec", 400, build_mf_rec, scale=1000.0),
        Task("conv1d", 300, build_conv1d),
        Task("vae", 300, build_vae, scale=100.0),
        # gcn reports its held-out loss while it trains (added at issue 22, before any tune result
        # with --metric on it existed): issue 22 names it as the family whose training and held-out
        # losses order the thresholds oppositely; evaluating changes nothing in its training
        Task("gcn", 300, build_gcn, scale=0.3, eval_every=25),
        Task("gru_warmup", 250, build_gru_warmup, schedule=warmup_cosine(60), script_clip=1.0, eval_every=25),
        Task("noisy_mlp", 300, build_noisy_mlp, scale=0.3, eval_every=25),
    ]
}


def train(name: str, seed: int, clipper: Clipper | None = None, stop_at: int | None = None,
          on_eval: Callable[[int, float], None] | None = None) -> float:
    """Train task `name` from `seed` and return the final held-out loss (inf when the weights or
    the loss went non-finite). The learning rate follows the task's schedule (by default it decays
    linearly to zero over the task's steps, so the final loss measures where training settled,
    not the noise of its last step); `stop_at` ends early on the same schedule (a pilot).
    `on_eval(step, heldout_loss)` is called every `eval_every` steps of a task that has it (step:
    the optimizer steps made so far); evaluating changes nothing in the training (no_grad, no
    random numbers drawn)."""
    task = TASKS[name]
    torch.set_num_threads(1)
    model, opt, batch_at, (tx, ty), loss_fn = task.build(seed)
    schedule = task.schedule or (lambda s, n: 1.0 - s / n)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, task.steps))
    params = [p for p in model.parameters()]
    for step in range(task.steps if stop_at is None else stop_at):
        x, y = batch_at(step)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if clipper is not None:
            clipper(params)
        opt.step()
        sched.step()
        if on_eval is not None and task.eval_every and (step + 1) % task.eval_every == 0:
            with torch.no_grad():
                on_eval(step + 1, float(loss_fn(model(tx), ty)))
    with torch.no_grad():
        final = float(loss_fn(model(tx), ty))
    return final if math.isfinite(final) else math.inf


def _report_heldout(step: int, value: float) -> None:
    """A held-out loss as a script reports it: a line on stdout, and gradscope's metric when the
    installed gradscope has `log_metric` (a no-op outside gradscope)."""
    print(f"step {step} heldout_loss {value:.6g}", flush=True)
    try:
        import gradscope
        log = getattr(gradscope, "log_metric", None)
    except ImportError:
        log = None
    if log is not None:
        log("heldout_loss", value)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train one advice-benchmark task (unclipped unless --clip-norm, or "
                                             "the task's own threshold for a task whose script clips).")
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (a pilot)")
    ap.add_argument("--clip-norm", type=float, default=None,
                    help="clip at this max_norm (0: no clipping); default: the task script's own (none for most)")
    a = ap.parse_args(argv)
    tau = a.clip_norm if a.clip_norm is not None else TASKS[a.task].script_clip
    clipper = None
    if tau:
        clipper = lambda ps: torch.nn.utils.clip_grad_norm_(ps, tau)  # noqa: E731
    on_eval = _report_heldout if TASKS[a.task].eval_every else None
    print(f"held-out loss {train(a.task, a.seed, clipper, a.stop_at, on_eval):.6g}")


if __name__ == "__main__":
    main()
