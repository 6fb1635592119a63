"""loss_fn raises on the batch of step 4."""

import torch

FAIL_STEP = 4


def build_model():
    return torch.nn.Linear(1, 1)


def batches():
    return [(i, torch.ones(2, 1)) for i in range(1, 10)]


def loss_fn(model, batch):
    index, x = batch
    if index == FAIL_STEP:
        raise RuntimeError(f"bad batch {index}")
    return model(x).pow(2).mean()
