"""Noise-free linear regression that every run learns almost perfectly: ``evaluate`` (the MSE on
held-out points, lower is better) ends near 1e-7 whether the run clipped or not.

Two such numbers differ by a factor, yet both are perfect scores: one ``evaluate`` number per run
has no spread to call the difference meaningful by, and a sweep with one seed must not.
"""

import torch

DATA_SEED = 2
W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ W.T


X, Y = _data(256, DATA_SEED)
HX, HY = _data(128, DATA_SEED + 1)


def build_model():
    return torch.nn.Linear(4, 1)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def batches():
    return [(X[i : i + 32], Y[i : i + 32]) for i in range(0, 256, 32)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def evaluate(model):
    return torch.nn.functional.mse_loss(model(HX), HY)
