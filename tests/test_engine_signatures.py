"""The README's promise: the engine is a drop-in with "the same signatures and defaults as torch".

Compared with ``inspect.signature`` against the installed torch: parameter names, order, kinds
and defaults. The engine may add parameters of its own after torch's, keyword-only and with a
default, so that every call written for torch works unchanged. Annotations are left out on purpose: the engine documents wider types (a
``norm_type`` may also be the string ``'inf'``, a ``total_norm`` may be a float).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from gradcheck_cli import engine

DROP_INS = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]


def shape(func, keyword_only_extras: bool = True) -> list[tuple[str, inspect._ParameterKind, object]]:
    params = inspect.signature(func).parameters.values()
    return [(p.name, p.kind, p.default) for p in params if keyword_only_extras or p.kind != p.KEYWORD_ONLY]


@pytest.mark.parametrize("name", DROP_INS)
def test_same_parameters_kinds_and_defaults_as_torch(name):
    theirs = getattr(torch.nn.utils, name, None)
    if theirs is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.utils.{name} (added in 2.6)")
    ours, torchs = shape(getattr(engine, name)), shape(theirs)
    assert ours[: len(torchs)] == torchs
    # anything the engine adds comes after torch's parameters, keyword-only and optional, so
    # every call written for torch means the same here
    for pname, kind, default in ours[len(torchs) :]:
        assert kind == inspect.Parameter.KEYWORD_ONLY and default is not inspect.Parameter.empty, pname


def test_defaults_written_out():
    """The defaults by hand, so a change on both sides at once is noticed too."""
    assert shape(engine.clip_grad_norm_, keyword_only_extras=False) == [
        ("parameters", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("max_norm", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("norm_type", inspect.Parameter.POSITIONAL_OR_KEYWORD, 2.0),
        ("error_if_nonfinite", inspect.Parameter.POSITIONAL_OR_KEYWORD, False),
        ("foreach", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
    ]
    assert [(n, d) for n, _, d in shape(engine.clip_grad_value_, keyword_only_extras=False)] == [
        ("parameters", inspect.Parameter.empty),
        ("clip_value", inspect.Parameter.empty),
        ("foreach", None),
    ]
    assert [(n, d) for n, _, d in shape(engine.get_total_norm, keyword_only_extras=False)] == [
        ("tensors", inspect.Parameter.empty),
        ("norm_type", 2.0),
        ("error_if_nonfinite", False),
        ("foreach", None),
    ]
    assert [(n, d) for n, _, d in shape(engine.clip_grads_with_norm_, keyword_only_extras=False)] == [
        ("parameters", inspect.Parameter.empty),
        ("max_norm", inspect.Parameter.empty),
        ("total_norm", inspect.Parameter.empty),
        ("foreach", None),
    ]


def test_the_defaults_behave_like_torchs():
    """Calling both with only the required arguments gives the same result (the L2 norm)."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 3, generator=g) * 10, torch.randn(5, generator=g)]

    def params():
        ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(ps, grads):
            p.grad = t.clone()
        return ps

    ours, theirs = params(), params()
    n_ours = engine.clip_grad_norm_(ours, 1.0)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(n_ours, n_theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
