"""loss = w**2 with w = 1 at the start: plain SGD with lr 1.5 maps w to -2w (loss x4 a step),
so the unclipped run passes 10x its first loss at step 3; clipping at max_norm <= 1 keeps the
step at most 1.5 long, and w stays bounded."""

import torch


def build_model():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def batches():
    return [torch.ones(1, 1)]


def loss_fn(model, batch):
    return (model(batch) ** 2).sum()
