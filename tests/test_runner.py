import math
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from reference_loop import reference_training

from gradcheck_cli import runner
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    NON_FINITE,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
)
from gradcheck_cli.runner import run_cell, to_device
from gradcheck_cli.snapshot import seed_everything

SCRIPTS = Path(__file__).parent / "scripts"
CONTROL = Cell(None, 2.0)


def script_path(name: str) -> Path:
    return SCRIPTS / f"{name}.py"


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def run(script: Path | str, cell: Cell = CONTROL, seed: int = 0, lr: float | None = None, **config):
    """Load, seed, build the model, re-seed, run one cell (what a sweep does for its first run)."""
    path = script if isinstance(script, Path) else script_path(script)
    exp = load_experiment(path)
    cfg = SweepConfig(script=path, seeds=(seed,), lrs=(lr,) if lr is not None else None, **config)
    seed_everything(seed)
    model = exp.build_model()
    seed_everything(seed)
    return run_cell(exp, model, cell, cfg), model


def bare_loop(name: str, steps: int, lr: float | None = None, max_norm=None, norm_type=2.0, seed=0):
    """The reference loop's losses and pre-clip norms for a test script."""
    history = reference_training(
        load_experiment(script_path(name)), steps, lr=lr, max_norm=max_norm, norm_type=norm_type, seed=seed
    )
    return [h.loss for h in history], [h.norm for h in history]


# --- healthy runs ------------------------------------------------------------------------------


def test_stable_control_run_records_every_step_and_never_clips():
    result, _ = run("stable_linear", steps=12)
    assert result.status == STABLE
    assert result.cell == CONTROL and result.run == "unclipped"
    assert [s.step for s in result.steps] == list(range(1, 13))
    assert all(s.clip_coef == 1.0 for s in result.steps)
    assert all(math.isfinite(s.loss) and math.isfinite(s.grad_norm) for s in result.steps)
    assert result.nan_step is None and result.diverged_step is None and result.error is None
    assert result.seconds > 0


def test_control_run_matches_a_bare_loop_bit_for_bit():
    # Adam, dropout and batches shuffled with torch, random and numpy: the same numbers exactly
    result, _ = run("with_optimizer", steps=10)
    losses, norms = bare_loop("with_optimizer", 10)
    assert [s.loss for s in result.steps] == losses
    assert [s.grad_norm for s in result.steps] == pytest.approx(norms, rel=1e-6)


@pytest.mark.parametrize("name", ["stable_linear", "with_optimizer"])
@pytest.mark.parametrize("max_norm, norm_type", [(1.0, 2.0), (0.1, math.inf), (0.5, 1.0)])
def test_clipped_run_matches_torch_clip_grad_norm(name, max_norm, norm_type):
    result, _ = run(name, Cell(max_norm, norm_type), steps=10)
    losses, norms = bare_loop(name, 10, max_norm=max_norm, norm_type=norm_type)
    assert result.status == STABLE
    assert [s.loss for s in result.steps] == pytest.approx(losses, rel=1e-5, abs=1e-7)
    assert [s.grad_norm for s in result.steps] == pytest.approx(norms, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("max_norm, norm_type", [(0.1, 2.0), (1.0, 2.0), (10.0, 2.0), (1.0, math.inf)])
def test_clip_coef_is_min_of_ratio_and_one(max_norm, norm_type):
    result, _ = run("stable_linear", Cell(max_norm, norm_type), steps=12)
    for s in result.steps:
        assert s.clip_coef == min(max_norm / (s.grad_norm + 1e-6), 1.0)
        assert (s.clip_coef < 1.0) == (s.grad_norm + 1e-6 > max_norm)
        if s.clip_coef < 1.0:
            assert s.grad_norm > max_norm - 1e-6
    if max_norm == 0.1:
        assert all(s.clip_coef < 1.0 for s in result.steps)


def test_default_optimizer_is_sgd_with_config_lr():
    # loss = w**2 at w = 1, one step of SGD with lr 0.25: w = 1 - 0.25 * 2 = 0.5
    result, model = run("diverge", lr=0.25, steps=1)
    assert result.status == STABLE
    assert model.weight.item() == 0.5


def test_batches_is_called_again_when_exhausted(tmp_path):
    script = write(
        tmp_path,
        "counted.py",
        """
        import torch
        CALLS = []
        def build_model():
            return torch.nn.Linear(1, 1)
        def batches():
            CALLS.append(1)
            return (torch.full((1, 1), float(i)) for i in range(3))
        def loss_fn(model, batch):
            return model(batch).pow(2).sum()
        """,
    )
    exp = load_experiment(script)
    cfg = SweepConfig(script=script, steps=7)
    result = run_cell(exp, exp.build_model(), CONTROL, cfg)
    assert result.status == STABLE and len(result.steps) == 7
    assert len(exp.module.CALLS) == 3  # 3 + 3 + 1 batches


def test_one_element_loss_of_any_shape_is_accepted(tmp_path):
    script = write(
        tmp_path,
        "one_element.py",
        """
        import torch
        def build_model():
            return torch.nn.Linear(2, 1)
        def batches():
            return [torch.ones(1, 2)]
        def loss_fn(model, batch):
            return model(batch).pow(2)  # shape (1, 1)
        """,
    )
    result, _ = run(script, steps=3)
    assert result.status == STABLE and len(result.steps) == 3


# --- non-finite and divergent runs ---------------------------------------------------------------


@pytest.mark.parametrize("cell", [CONTROL, Cell(1.0, 2.0), Cell(0.1, math.inf)])
def test_nan_loss_is_caught_at_its_step_in_the_forward_pass(cell):
    result, _ = run("nan_forward", cell, steps=8)
    assert result.status == NON_FINITE
    assert result.nan_step == 5 and result.nan_source == SOURCE_FORWARD and result.nan_param is None
    assert len(result.steps) == 5
    last = result.steps[-1]
    assert last.step == 5 and math.isnan(last.loss) and math.isnan(last.grad_norm) and math.isnan(last.clip_coef)
    assert all(math.isfinite(s.loss) for s in result.steps[:-1])


@pytest.mark.parametrize("cell", [CONTROL, Cell(1.0, 2.0), Cell(0.1, math.inf)])
def test_nan_gradient_is_located_at_its_step_and_parameter(cell):
    result, model = run("nan_backward", cell, steps=6)
    assert result.status == NON_FINITE
    assert result.nan_step == 3 and result.nan_source == SOURCE_BACKWARD
    assert result.nan_param == "head.weight"  # body.* come first in named_parameters and are finite
    last = result.steps[-1]
    assert len(result.steps) == 3 and last.step == 3
    assert math.isfinite(last.loss) and math.isnan(last.grad_norm) and math.isnan(last.clip_coef)
    # stopped before clipping or stepping: no NaN reached the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


INF_GRAD_SCRIPT = """
import torch

class AddInf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, on):
        ctx.on = on
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return (grad + float("inf")) if ctx.on else grad, None

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(3))
        self.b = torch.nn.Parameter(torch.ones(3))
        self.c = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, on):
        return (x * self.a).sum() + (x * AddInf.apply(self.b, on)).sum() + (x * AddInf.apply(self.c, on)).sum()

def build_model():
    return Net()

def batches():
    return [(torch.full((3,), 0.1), i == 4) for i in range(1, 7)]

def loss_fn(model, batch):
    x, on = batch
    return model(x, on) ** 2
"""


@pytest.mark.parametrize("cell", [CONTROL, Cell(1.0, 2.0), Cell(1.0, math.inf)])
def test_inf_gradient_reports_the_first_bad_parameter_and_the_inf_norm(tmp_path, cell):
    script = write(tmp_path, "inf_grad.py", INF_GRAD_SCRIPT)
    result, model = run(script, cell, steps=6)
    assert result.status == NON_FINITE
    assert result.nan_step == 4 and result.nan_source == SOURCE_BACKWARD
    assert result.nan_param == "b"  # b and c are both inf: the first in named_parameters order
    assert result.steps[-1].grad_norm == math.inf  # the measured norm, not NaN from a clip at inf
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_scan_runs_only_at_the_onset_step(monkeypatch):
    calls = []
    original = runner.first_non_finite_param

    def counting(model):
        calls.append(1)
        return original(model)

    monkeypatch.setattr(runner, "first_non_finite_param", counting)
    run("stable_linear", steps=8)
    assert calls == []
    run("nan_backward", steps=6)
    assert calls == [1]


def test_divergence_stops_before_the_optimizer_step():
    # w: 1 -> -2 -> 4 -> -8; step 4's loss 64 is above 4 + 10 x 4 (the starting level, the median
    # of 1, 4 and 16, plus 10 times it), judged before stepping, so w stays -8
    result, model = run("diverge", lr=1.5, steps=10)
    assert result.status == DIVERGED and result.diverged_step == 4
    assert [s.loss for s in result.steps] == [1.0, 4.0, 16.0, 64.0]
    assert [s.grad_norm for s in result.steps[:3]] == [2.0, 4.0, 8.0]
    assert math.isnan(result.steps[-1].grad_norm) and math.isnan(result.steps[-1].clip_coef)
    assert result.nan_step is None and result.divergence_checked is True
    assert model.weight.item() == -8.0


@pytest.mark.parametrize("max_norm", [0.1, 1.0])
def test_clipping_keeps_the_divergent_script_stable(max_norm):
    result, _ = run("diverge", Cell(max_norm, 2.0), lr=1.5, steps=10)
    assert result.status == STABLE and len(result.steps) == 10
    assert result.steps[0].clip_coef == max_norm / (2.0 + 1e-6)


def test_divergence_factor_comes_from_the_config():
    result, _ = run("diverge", lr=1.5, steps=10, divergence_factor=100.0)
    assert result.status == DIVERGED and result.diverged_step == 6  # 1024 > 4 + 100 x 4


def test_divergence_is_judged_whatever_the_sign_of_the_first_loss(tmp_path):
    script = write(
        tmp_path,
        "negative_first.py",
        """
        import torch
        def build_model():
            m = torch.nn.Linear(1, 1, bias=False)
            with torch.no_grad():
                m.weight.fill_(1.0)
            return m
        def batches():
            return [torch.ones(1, 1)]
        def loss_fn(model, batch):
            return (model(batch) ** 2).sum() - 2.0  # -1 at the start, then grows without bound
        """,
    )
    result, _ = run(script, lr=1.5, steps=6)
    # -1, 2, 14, 62, 254: both signs early, so the spread is the scale; 254 > 14 + 10 x (14 - -1)
    assert [s.loss for s in result.steps] == [-1.0, 2.0, 14.0, 62.0, 254.0]
    assert (result.status, result.diverged_step, result.divergence_checked) == (DIVERGED, 5, True)


# --- errors in the user's code ---------------------------------------------------------------------


def test_exception_in_loss_fn_is_an_error_run_with_a_trimmed_traceback():
    result, _ = run("raises_in_loss", steps=8)
    assert result.status == ERROR
    assert result.error == "RuntimeError: bad batch 4"
    assert [s.step for s in result.steps] == [1, 2, 3]
    tb = result.error_traceback
    assert f'File "{script_path("raises_in_loss").resolve()}", line 19, in loss_fn' in tb
    assert "gradcheck_cli" not in tb and "test_runner.py" not in tb


def test_non_scalar_loss_is_an_error_run():
    result, _ = run("non_scalar_loss", steps=3)
    assert result.status == ERROR
    assert result.error == "loss_fn must return a scalar tensor, got shape (4,)"
    assert "non_scalar_loss.py" in result.error_traceback and "in loss_fn" in result.error_traceback
    assert result.steps == []


@pytest.mark.parametrize(
    "body, expected",
    [
        ("return 1.5", "loss_fn must return a scalar tensor, got float"),
        ("return None", "loss_fn must return a scalar tensor, got NoneType"),
        ("return model(batch).sum().detach()", "loss_fn returned a tensor that does not require grad"),
    ],
)
def test_bad_loss_values_are_error_runs(tmp_path, body, expected):
    script = write(
        tmp_path,
        "bad_loss.py",
        f"""
        import torch
        def build_model():
            return torch.nn.Linear(2, 1)
        def batches():
            return [torch.ones(1, 2)]
        def loss_fn(model, batch):
            {body}
        """,
    )
    result, _ = run(script, steps=2)
    assert result.status == ERROR and result.error.startswith(expected)


def test_empty_batches_is_an_error_run():
    result, _ = run("empty_batches", steps=2)
    assert result.status == ERROR
    assert result.error.startswith("batches() yielded no batches")
    assert "empty_batches.py" in result.error_traceback


def test_batches_that_yield_nothing_on_a_second_call(tmp_path):
    script = write(
        tmp_path,
        "one_shot.py",
        """
        import torch
        STREAM = iter([torch.ones(1, 2), torch.ones(1, 2)])
        def build_model():
            return torch.nn.Linear(2, 1)
        def batches():
            return STREAM  # the same exhausted iterator on the second call
        def loss_fn(model, batch):
            return model(batch).sum()
        """,
    )
    result, _ = run(script, steps=5)
    assert result.status == ERROR and len(result.steps) == 2
    assert "called again" in result.error and "fresh iterable" in result.error


@pytest.mark.parametrize(
    "body, expected",
    [
        ("return 3", "batches() must return an iterable of batches, got int"),
        ("raise OSError('data dir missing')", "OSError: data dir missing"),
        ("yield torch.ones(1, 2)\n    raise ValueError('corrupt record')", "ValueError: corrupt record"),
    ],
)
def test_failing_batches_are_error_runs(tmp_path, body, expected):
    script = write(
        tmp_path,
        "bad_batches.py",
        "import torch\n"
        "def build_model():\n    return torch.nn.Linear(2, 1)\n"
        f"def batches():\n    {body}\n"
        "def loss_fn(model, batch):\n    return model(batch).sum()\n",
    )
    result, _ = run(script, steps=3)
    assert result.status == ERROR and result.error == expected
    assert "bad_batches.py" in result.error_traceback


@pytest.mark.parametrize(
    "body, expected",
    [
        ("return 'adam'", "build_optimizer(model) must return a torch.optim.Optimizer, got str"),
        ("raise RuntimeError('no optimizer today')", "RuntimeError: no optimizer today"),
        # LBFGS needs a closure: its step() raises, and that is the user's error too
        ("return torch.optim.LBFGS(model.parameters())", "TypeError:"),
    ],
)
def test_failing_optimizers_are_error_runs(tmp_path, body, expected):
    script = write(
        tmp_path,
        "bad_opt.py",
        "import torch\n"
        "def build_model():\n    return torch.nn.Linear(2, 1)\n"
        f"def build_optimizer(model):\n    {body}\n"
        "def batches():\n    return [torch.ones(1, 2)]\n"
        "def loss_fn(model, batch):\n    return model(batch).sum()\n",
    )
    result, _ = run(script, steps=2)
    assert result.status == ERROR and result.error.startswith(expected)
    assert result.steps == []


def test_exception_in_backward_is_an_error_run(tmp_path):
    script = write(
        tmp_path,
        "bad_backward.py",
        """
        import torch
        class Broken(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()
            @staticmethod
            def backward(ctx, grad):
                raise ArithmeticError("backward exploded")
        def build_model():
            return torch.nn.Linear(2, 1)
        def batches():
            return [torch.ones(1, 2)]
        def loss_fn(model, batch):
            return Broken.apply(model(batch)).sum()
        """,
    )
    result, _ = run(script, steps=2)
    assert result.status == ERROR
    assert result.error == "ArithmeticError: backward exploded"
    assert "bad_backward.py" in result.error_traceback and "in backward" in result.error_traceback


def test_system_exit_in_user_code_is_an_error_run_not_an_exit(tmp_path):
    script = write(
        tmp_path,
        "exits.py",
        """
        import sys, torch
        def build_model():
            return torch.nn.Linear(2, 1)
        def batches():
            return [torch.ones(1, 2)]
        def loss_fn(model, batch):
            sys.exit(2)
        """,
    )
    result, _ = run(script, steps=2)
    assert result.status == ERROR and result.error == "SystemExit: 2"


def test_keyboard_interrupt_propagates():
    with pytest.raises(KeyboardInterrupt):
        run("interrupt", steps=4)


# --- batches on a device -----------------------------------------------------------------------------


def test_to_device_moves_tensors_inside_containers():
    Pair = namedtuple("Pair", "x y")
    batch = {
        "x": torch.ones(2),
        "pair": Pair(torch.zeros(1), 3),
        "list": [torch.ones(1), ("text", torch.ones(1))],
        "n": 5,
    }
    moved = to_device(batch, "meta")
    assert moved["x"].device.type == "meta"
    assert isinstance(moved["pair"], Pair) and moved["pair"].x.device.type == "meta" and moved["pair"].y == 3
    assert moved["list"][0].device.type == "meta"
    assert moved["list"][1][0] == "text" and moved["list"][1][1].device.type == "meta"
    assert moved["n"] == 5
    assert batch["x"].device.type == "cpu"  # the original is untouched


def test_gradients_of_parameters_outside_the_optimizer_do_not_pile_up(tmp_path):
    script = write(
        tmp_path,
        "partial_optimizer.py",
        """
        import torch

        def build_model():
            return torch.nn.Linear(2, 1)

        def batches():
            return [torch.ones(4, 2)]

        def loss_fn(model, batch):
            return model(batch).pow(2).mean()

        def build_optimizer(model):
            return torch.optim.SGD([model.weight], lr=0.0)  # bias is not held; nothing moves
    """,
    )
    result, _ = run(script, steps=4)
    assert result.status == STABLE
    # lr 0: every step sees the same fresh gradient, so the same norm, unless the bias's
    # gradient accumulated across steps
    assert len({s.grad_norm for s in result.steps}) == 1
