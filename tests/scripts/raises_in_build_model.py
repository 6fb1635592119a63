import torch


def build_model():
    return torch.nn.Linear(2, 1, bais=True)  # typo


def batches():
    return [torch.ones(1, 2)]


def loss_fn(model, batch):
    return model(batch).sum()
