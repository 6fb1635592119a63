import copy
import random

import numpy as np
import torch

from gradcheck_cli.snapshot import (
    Snapshot,
    capture_model,
    capture_optimizer,
    capture_rng,
    restore_model,
    restore_optimizer,
    restore_rng,
    seed_everything,
)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def train_steps(model, optimizer, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
        loss.backward()
        optimizer.step()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_restore_brings_back_weights_and_buffers():
    model = make_model()
    saved = capture_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    assert not same_state(before, model.state_dict())  # weights and BatchNorm running stats moved
    restore_model(model, saved)
    assert same_state(before, model.state_dict())


def test_model_snapshot_is_a_copy_not_a_view():
    model = make_model()
    saved = capture_model(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(saved["0.weight"], model[0].weight)


def test_restore_keeps_parameter_identity_and_drops_grads():
    model = make_model()
    params = list(model.parameters())
    saved = capture_model(model)
    model(torch.randn(4, 3)).sum().backward()
    restore_model(model, saved)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_restore_is_not_aliased_to_the_snapshot():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, opt, 2)
    saved_model, saved_opt = capture_model(model), capture_optimizer(opt)
    exp_avg = saved_opt["state"][0]["exp_avg"].clone()

    restore_optimizer(opt, saved_opt)
    train_steps(model, opt, 2)  # would update the snapshot in place if it were shared
    assert torch.equal(saved_opt["state"][0]["exp_avg"], exp_avg)

    # restoring twice and training the same way gives the same numbers
    restore_model(model, saved_model)
    restore_optimizer(opt, saved_opt)
    train_steps(model, opt, 2, seed=5)
    first = capture_model(model)
    restore_model(model, saved_model)
    restore_optimizer(opt, saved_opt)
    train_steps(model, opt, 2, seed=5)
    assert same_state(first, model.state_dict())


def test_optimizer_state_loads_into_a_fresh_optimizer():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, opt, 1)
    saved = capture_optimizer(opt)
    fresh = torch.optim.Adam(model.parameters(), lr=0.5)
    restore_optimizer(fresh, saved)
    assert fresh.param_groups[0]["lr"] == 0.01
    assert torch.equal(fresh.state[model[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def draw():
    return (torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist())


def test_rng_restore_repeats_every_generator():
    seed_everything(3)
    state = capture_rng()
    a = draw()
    restore_rng(state)
    b = draw()
    assert a == b
    assert draw() != a


def test_seed_everything_is_reproducible():
    seed_everything(11)
    a = draw()
    seed_everything(11)
    assert draw() == a
    seed_everything(12)
    assert draw() != a


def test_snapshot_restores_everything_together():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seed_everything(0)
    snap = Snapshot.capture(model, opt)

    def burst():
        train_steps(model, opt, 1)
        return capture_model(model), draw()

    first_state, first_draw = burst()
    snap.restore(model, opt)
    second_state, second_draw = burst()
    assert same_state(first_state, second_state)
    assert first_draw == second_draw
    assert snap.rng.torch_cuda is None  # CPU run: no CUDA state captured


def test_snapshot_without_optimizer():
    """A snapshot taken without an optimizer leaves an optimizer's state exactly as it is on
    restore: neither cleared, nor replaced by an earlier state."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, 2)
    snap = Snapshot.capture(model)  # model and RNG only
    assert snap.optimizer_state is None
    train_steps(model, opt, 3, seed=2)  # the momentum buffers move on
    before = capture_optimizer(opt)
    assert before["state"], "the optimizer must hold state for this test to mean anything"
    snap.restore(model, opt)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    for key in before["state"]:
        assert torch.equal(after["state"][key]["momentum_buffer"], before["state"][key]["momentum_buffer"])
    assert after["param_groups"] == before["param_groups"]
    # while the model itself did go back
    assert same_state(capture_model(model), snap.model_state)

    # the same snapshot taken *with* the optimizer does bring the old state back (the contrast)
    model2 = make_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    train_steps(model2, opt2, 2)
    with_opt = Snapshot.capture(model2, opt2)
    saved = copy.deepcopy(opt2.state_dict())
    train_steps(model2, opt2, 3, seed=2)
    with_opt.restore(model2, opt2)
    for key in saved["state"]:
        assert torch.equal(opt2.state_dict()["state"][key]["momentum_buffer"], saved["state"][key]["momentum_buffer"])
