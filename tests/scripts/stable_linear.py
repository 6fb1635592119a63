"""Stable linear regression; batches are reshuffled with the global torch RNG on every call."""

import torch
from data_helper import regression_data

X, Y = regression_data()


def build_model():
    return torch.nn.Linear(3, 1)


def batches():
    order = torch.randperm(len(X))
    return [(X[order[i : i + 8]], Y[order[i : i + 8]]) for i in range(0, len(X), 8)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


if __name__ == "__main__":
    raise SystemExit("the __main__ block must not run on import")
