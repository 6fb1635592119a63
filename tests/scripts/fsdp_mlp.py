"""A small MLP sharded with FSDP2 (``fully_shard``) on CPU when run under torchrun: parameters and
gradients are DTensors sharded over the ranks; each rank takes its own half of every batch.
Alone it trains the same model unsharded on the whole batches."""

import torch
import torch.distributed as dist
from data_helper import regression_data

X, Y = regression_data(64)


def build_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def build_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=0.01)


def batches():
    order = torch.randperm(len(X))
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
