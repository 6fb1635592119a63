"""Under torchrun, rank 1 fails in its first run as ``RANK_FAILS`` says: ``exit`` (the rank's
process dies of SIGKILL, as from the OOM killer) or ``hang`` (it stops answering for longer than any test waits).
Rank 0 and single-process runs train normally."""

import os
import signal
import time

import torch
from data_helper import regression_data

X, Y = regression_data()


def build_model():
    return torch.nn.Linear(3, 1)


def batches():
    return [(X[i : i + 8], Y[i : i + 8]) for i in range(0, len(X), 8)]


def loss_fn(model, batch):
    if os.environ.get("RANK") == "1":
        if os.environ.get("RANK_FAILS") == "exit":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("RANK_FAILS") == "hang":
            time.sleep(600)
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
