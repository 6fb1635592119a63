import torch


def build_model():
    return torch.nn.Linear(2, 1)


def batches():
    return [torch.ones(4, 2)]


def loss_fn(model, batch):
    return (model(batch) ** 2).squeeze(1)  # shape (4,): forgot the .mean()
