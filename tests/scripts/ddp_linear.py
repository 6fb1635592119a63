"""Linear regression replicated with DistributedDataParallel when run under torchrun: each rank
takes its own half of every batch. Alone (no process group) it trains on the whole batches, which
is the same training: DDP averages the two halves' gradients, and the sweep the two halves' losses.
"""

import torch
import torch.distributed as dist
from data_helper import regression_data

X, Y = regression_data(64)


def build_model():
    model = torch.nn.Linear(3, 1)
    if dist.is_initialized():
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def batches():
    order = torch.randperm(len(X))  # the same on every rank: the RNG state is restored per run
    out = []
    for i in range(0, len(X), 16):
        idx = order[i : i + 16]
        if dist.is_initialized():
            idx = idx[dist.get_rank() :: dist.get_world_size()]
        out.append((X[idx], Y[idx]))
    return out


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
