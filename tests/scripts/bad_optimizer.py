import torch


def build_model():
    return torch.nn.Linear(2, 1)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=-1.0)  # torch rejects a negative lr


def batches():
    return [torch.ones(1, 2)]


def loss_fn(model, batch):
    return model(batch).sum()
