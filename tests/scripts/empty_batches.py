import torch


def build_model():
    return torch.nn.Linear(2, 1)


def batches():
    return []


def loss_fn(model, batch):
    return model(batch).sum()
