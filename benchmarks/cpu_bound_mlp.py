"""A CPU-bound sample for benchmarks/parallel.py: a small MLP whose every step is a few
milliseconds of matrix products, the size where one run cannot keep two threads busy."""

import torch

g = torch.Generator().manual_seed(0)
X = torch.randn(512, 128, generator=g)
Y = torch.randn(512, 1, generator=g)


def build_model():
    return torch.nn.Sequential(
        torch.nn.Linear(128, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1)
    )


def batches():
    order = torch.randperm(len(X))
    return [(X[order[i : i + 128]], Y[order[i : i + 128]]) for i in range(0, len(X), 128)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
