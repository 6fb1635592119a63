"""Kills its own process during chosen runs only, the way an extension's segfault or the OOM
killer would: no exception, no cleanup.

``CRASH_COUNTER`` names a file counting ``build_optimizer`` calls across processes (the sweep
calls it once for the snapshot, then once per run). ``CRASH_PLAN`` says which calls' runs die at
their second step, and how: ``3:exit,4:kill,5:segv`` (``os._exit(7)`` from another thread: in
the main thread gradclip turns it into an error; SIGKILL; a null-pointer read through ctypes). Without ``CRASH_COUNTER`` it never dies.
"""

import ctypes
import fcntl
import os
import signal
import threading
import time

import torch
from data_helper import regression_data

X, Y = regression_data()
_doomed = None
_calls = 0


def build_model():
    return torch.nn.Linear(3, 1)


def build_optimizer(model):
    global _doomed, _calls
    _calls = 0
    counter = os.environ.get("CRASH_COUNTER")
    if counter:
        with open(counter, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # two workers may count at once (--jobs 2)
            f.seek(0)
            n = len(f.read()) + 1
            f.write("x")
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        plan = dict(item.split(":") for item in os.environ["CRASH_PLAN"].split(","))
        _doomed = plan.get(str(n))
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def batches():
    order = torch.randperm(len(X))
    return [(X[order[i : i + 8]], Y[order[i : i + 8]]) for i in range(0, len(X), 8)]


def loss_fn(model, batch):
    global _calls
    _calls += 1
    if _doomed and _calls == 2:
        how = _doomed
        if how == "exit":
            threading.Thread(target=os._exit, args=(7,)).start()
            time.sleep(60)
        elif how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            ctypes.string_at(0)  # SIGSEGV
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
