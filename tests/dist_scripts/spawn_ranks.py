"""mp.spawn training (2 ranks, gloo) with a spawn-context DataLoader worker: tests/test_distributed.py.

The ranks are multiprocessing spawn children, like the DataLoader worker; only
the ranks (which join a process group) must be recorded.
"""
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

def worker(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = DDP(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4,
                                     num_workers=1, multiprocessing_context="spawn")
    for (x,) in dl:
        m(x).sum().backward()
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(2, int(sys.argv[1])), nprocs=2)
