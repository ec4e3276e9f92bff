"""DataLoader workers started with spawn and a multiprocessing pool over a __main__ function."""
import multiprocessing as mp
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset


def square(v):
    return v * v


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        assert pool.map(square, [1, 2, 3]) == [1, 4, 9]
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=16, num_workers=2, multiprocessing_context="spawn")
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("workers ok", file=sys.stderr)
