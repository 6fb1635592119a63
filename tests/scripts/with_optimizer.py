"""Adam (with state), dropout (torch RNG) and batches shuffled with torch, random and numpy."""

import random

import numpy as np
import torch

g = torch.Generator().manual_seed(7)
X = torch.randn(24, 4, generator=g)
Y = torch.sin(X.sum(dim=1, keepdim=True))


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def build_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=0.05)


def batches():
    order = torch.randperm(len(X)).tolist()
    random.shuffle(order)
    order = [order[i] for i in np.random.permutation(len(order))]
    return [(X[order[i : i + 6]], Y[order[i : i + 6]]) for i in range(0, len(order), 6)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
