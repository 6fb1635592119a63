import torch


def build_model():
    torch.nn.Linear(2, 1)  # forgot to return it


def batches():
    return [torch.ones(1, 2)]


def loss_fn(model, batch):
    return model(batch).sum()
