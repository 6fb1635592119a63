"""Layer grouping: names by module level, group norms exactly the norm of their members'
gradients, and the groups combining back into the engine's total."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli import engine
from gradcheck_cli.config import parse_depth
from gradcheck_cli.layers import (
    AUTO,
    LayerGrouping,
    choose_depth,
    combine_grouped,
    group_name,
)

GPT_NAME = "transformer.h.3.attn.c_attn.weight"


@pytest.mark.parametrize(
    "depth, expected",
    [
        (1, "transformer"),
        (2, "transformer.h.3"),
        (3, "transformer.h.3.attn"),
        (4, "transformer.h.3.attn.c_attn"),
        (5, GPT_NAME),
        (9, GPT_NAME),
        (None, GPT_NAME),
    ],
)
def test_group_name_counts_module_levels_with_indices_attached(depth, expected):
    assert group_name(GPT_NAME, depth) == expected


def test_group_name_of_a_top_level_sequential():
    # "0.weight": a leading index is a level of its own (nothing before it to attach to)
    assert group_name("0.weight", 1) == "0"
    assert group_name("layers.0.1.bias", 1) == "layers.0.1"


def test_choose_depth_keeps_parameters_when_few_and_bounds_groups_when_many():
    few = [f"layer{i}.weight" for i in range(10)]
    assert choose_depth(few, max_groups=10) is None
    # 4 blocks x 30 tensors: per parameter is 120 > 64, depth 2 gives 4 groups (blocks), depth 3 120
    many = [f"model.blocks.{b}.sub{j}.weight" for b in range(4) for j in range(30)]
    assert choose_depth(many, max_groups=64) == 2
    assert choose_depth(many, max_groups=200) is None
    # nothing fits: the floor is depth 1
    wide = [f"{i}.weight" for i in range(100)]
    assert choose_depth(wide, max_groups=64) == 1


@pytest.mark.parametrize(
    "value, expected", [("auto", AUTO), (None, AUTO), ("param", None), ("all", None), ("2", 2), (3, 3)]
)
def test_parse_depth(value, expected):
    assert parse_depth(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", True, ""])
def test_parse_depth_rejects(value):
    with pytest.raises(ValueError, match="layer depth"):
        parse_depth(value)


def _reference_group_norm(grads: list[torch.Tensor], p: float) -> float:
    """Norm of the group's gradients concatenated, in float64 (p = 0: count of nonzero tensors)."""
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    if p == 0:
        return float(sum(bool((g != 0).any()) for g in grads))
    return float(torch.linalg.vector_norm(flat, p))


_NORM_TYPES = st.sampled_from([1.0, 2.0, 3.0, 0.5, math.inf, -math.inf, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    groups=st.lists(st.integers(0, 3), min_size=8, max_size=8),
    p=_NORM_TYPES,
    scale_exp=st.integers(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_group_norms_equal_the_norm_of_their_members(sizes, groups, p, scale_exp, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=gen) * 10.0**scale_exp for n in sizes]
    names = tuple(f"g{groups[i]}.t{i}" for i in range(len(grads)))
    measured = engine.measure_grad_norms([(n, _with_grad(g)) for n, g in zip(names, grads)], p)
    grouping = LayerGrouping(depth=1)
    group_names, norms = grouping.combine(measured.names, measured.norms, p)
    members: dict[str, list[torch.Tensor]] = {}
    for name, g in zip(names, grads):
        members.setdefault(name.split(".")[0], []).append(g)
    assert list(group_names) == list(members)  # first-appearance order
    for gname, value in zip(group_names, norms.tolist()):
        expected = _reference_group_norm(members[gname], p)
        assert value == pytest.approx(expected, rel=1e-5, abs=0.0), gname
    # The groups combine back into the step's total (the identity layers.csv promises); for
    # p = 0 (a count of nonzero tensors, not a norm) the groups' counts add up to the total.
    total = float(measured.total_norm)
    if p == 0:
        again = float(norms.sum())
    else:
        again = float(combine_grouped(norms, torch.zeros(len(group_names), dtype=torch.long), 1, p)[0])
    assert again == pytest.approx(total, rel=1e-5)


def _with_grad(g: torch.Tensor) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros_like(g))
    param.grad = g.clone()
    return param


def test_non_finite_member_makes_only_its_group_non_finite():
    norms = torch.tensor([1.0, math.nan, 2.0, math.inf, 3.0], dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 2, 3])
    for p in (2.0, math.inf, 1.0):
        out = combine_grouped(norms, index, 4, p).tolist()
        assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == math.inf and out[3] == 3.0, (p, out)


def test_huge_norms_do_not_overflow_in_a_group():
    norms = torch.tensor([1e300, 1e300, 1e-300], dtype=torch.float64)
    out = combine_grouped(norms, torch.tensor([0, 0, 1]), 2, 2.0).tolist()
    assert out[0] == pytest.approx(math.sqrt(2) * 1e300)
    assert out[1] == pytest.approx(1e-300)


@settings(max_examples=200, deadline=None)
@given(
    members=st.lists(
        st.one_of(
            st.floats(0, 1e6),
            st.sampled_from([0.0, 1e-300, 1e300, math.inf, math.nan]),
            st.floats(1e-30, 1e30),
        ),
        min_size=1,
        max_size=9,
    ),
    data=st.data(),
    p=st.sampled_from([2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5, -1.0]),
)
def test_host_combination_equals_the_tensor_one(members, data, p):
    """``combine_grouped_floats`` (the monitor's host path) against ``combine_grouped``: equal
    to float64 rounding, NaN and inf where the tensor path has them."""
    from gradcheck_cli.layers import combine_grouped, combine_grouped_floats

    n_groups = data.draw(st.integers(1, len(members)))
    index = list(range(n_groups)) + data.draw(
        st.lists(st.integers(0, n_groups - 1), min_size=len(members) - n_groups, max_size=len(members) - n_groups)
    )
    index = data.draw(st.permutations(index))
    want = combine_grouped(torch.tensor(members, dtype=torch.float64), torch.tensor(index), n_groups, p).tolist()
    got = combine_grouped_floats(members, index, n_groups, p)
    assert len(got) == n_groups
    for a, b in zip(got, want):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-13, abs=0.0), (a, b)


def test_host_grouping_of_one_parameter_per_group_returns_the_norms_themselves():
    grouping = LayerGrouping(None)
    names = ("a.weight", "a.bias")
    norms = [1.5, 2.5]
    groups, values = grouping.combine_host(names, norms, 2.0)
    assert groups == names and values is norms
    grouping = LayerGrouping(1)
    groups, values = grouping.combine_host(names, norms, 2.0)
    assert groups == ("a",) and values == pytest.approx([math.hypot(1.5, 2.5)], rel=1e-15)
