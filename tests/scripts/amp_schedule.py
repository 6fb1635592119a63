"""A small MLP trained the way users train: SGD with momentum, a step schedule, batches shuffled
with torch's global RNG, dropout. Under ``--amp fp16`` with a large initial scale the first steps
overflow in half precision and the gradient scaler skips them."""

import torch

g = torch.Generator().manual_seed(3)
X = torch.randn(64, 6, generator=g)
Y = torch.tanh(X @ torch.randn(6, 1, generator=g))


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def build_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def batches():
    order = torch.randperm(len(X))
    return [(X[order[i : i + 8]], Y[order[i : i + 8]]) for i in range(0, len(X), 8)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y)
