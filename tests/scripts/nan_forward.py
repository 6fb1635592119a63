"""The loss becomes NaN at step 5: the fifth batch's input holds a NaN."""

import torch

NAN_STEP = 5


def build_model():
    return torch.nn.Linear(2, 1)


def batches():
    out = []
    for i in range(1, 9):
        x = torch.full((4, 2), 0.1 * i)
        if i == NAN_STEP:
            x[0, 0] = float("nan")
        out.append((x, torch.ones(4, 1)))
    return out


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
