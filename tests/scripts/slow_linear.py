"""A stable regression whose every step sleeps a little: long enough to interrupt a sweep mid-run."""

import time

import torch

g = torch.Generator().manual_seed(3)
X = torch.randn(64, 4, generator=g)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def build_model():
    return torch.nn.Linear(4, 1)


def batches():
    return [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 64, 16)]


def loss_fn(model, batch):
    time.sleep(0.02)
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
