"""Breaks the contract three ways: no build_model, batches is a list, loss_fn takes one argument."""

batches = [1, 2, 3]


def loss_fn(batch):
    return batch


build_optimizer = "sgd"
