"""Batches from a ``DataLoader`` with two worker processes, as real training scripts have them.

The ``Dataset`` is defined here, so a loader started with ``spawn`` must import this script in
its workers to unpickle it. Its items are noisy with the worker's own torch RNG (seeded by the
loader from the global RNG), so a run's numbers depend on the workers being seeded as in
``python script.py``. The data are generated in memory.

``LOADER_CONTEXT``: the workers' start method (``fork`` by default, or ``spawn``).
``LOADER_PIDS``: a folder; each loader worker and each process that computes a loss writes an
empty file named after its pid there. ``LOADER_CRASH``: a file; the first run that reaches its
second step while the file exists deletes it and kills its own process with SIGKILL
(``LOADER_CRASH_HOW=sleep``: sleeps for ten minutes there instead). Its loader workers are alive
then, and stay so: while the file exists, each sleeps for ten minutes before its second batch,
where it would not notice that its parent died.
"""

import os
import signal
import time

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

_g = torch.Generator().manual_seed(7)
X = torch.randn(24, 3, generator=_g)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1
_calls = 0
_items = 0  # served by this loader worker


def _note_pid() -> None:
    folder = os.environ.get("LOADER_PIDS")
    if folder:
        open(os.path.join(folder, str(os.getpid())), "w").close()


class NoisyPoints(Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        global _items
        if get_worker_info() is not None:
            _note_pid()
            _items += 1
            marker = os.environ.get("LOADER_CRASH")
            if marker and _items == 5 and os.path.exists(marker):
                time.sleep(600)
        return X[i] + 0.01 * torch.randn(3), Y[i]


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def build_optimizer(model):
    global _calls
    _calls = 0  # once per run
    return torch.optim.SGD(model.parameters(), lr=0.1)


def batches():
    context = os.environ.get("LOADER_CONTEXT", "fork")
    return DataLoader(NoisyPoints(), batch_size=4, shuffle=True, num_workers=2, multiprocessing_context=context)


def loss_fn(model, batch):
    global _calls
    _calls += 1
    _note_pid()
    marker = os.environ.get("LOADER_CRASH")
    if marker and _calls == 2 and os.path.exists(marker):
        os.unlink(marker)
        if os.environ.get("LOADER_CRASH_HOW") == "sleep":
            time.sleep(600)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
