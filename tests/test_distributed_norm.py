"""Tests for the global norm across a process group: two real gloo processes on this machine.

One group of two processes (tests/distributed_cases.py) runs every case once, with bounded
timeouts, and saves its results; the tests below compare them with the single-process norm of
all the gradients together (the engine in one process, and a float64 norm of the concatenation).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gradcheck_cli import engine

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_cases.py"
INF = math.inf
NORM_TYPES = [0.0, 0.5, 1.0, 2.0, 3.0, -1.0, -0.5, INF, -INF]
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The saved results of rank 0 and rank 1 of one 2-process gloo group."""
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(tmp / "init"), str(tmp / f"r{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    deadline = time.monotonic() + TIMEOUT_S  # one bound for the whole group
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(tmp / f"r{r}.pt", weights_only=False) for r in range(2)]


def rtol(dtype: str, p: float) -> float:
    """float32: the engine's own accumulation error (amplified by 1/p for p < 1); float64: tiny."""
    if dtype == "torch.float64":
        return 1e-13
    return 4e-6 * max(1.0, 1.0 / abs(p)) if math.isfinite(p) and p else 4e-6


def same(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b) or b == 0:
        return a == b
    return abs(a - b) <= tol * abs(b)


def check_case(ranks, case: str) -> None:
    """Both ranks got the same norm, equal to the single-process norms, for every norm type."""
    r0, r1 = ranks[0][case], ranks[1][case]
    assert set(r0) == set(NORM_TYPES)
    for p in NORM_TYPES:
        a, b = r0[p], r1[p]
        assert a["got"] == b["got"] or (math.isnan(a["got"]) and math.isnan(b["got"])), (case, p)
        assert a["dtype"] == b["dtype"]
        tol = rtol(a["dtype"], p)
        assert same(a["got"], a["single"], tol), (case, p, a)
        assert same(a["got"], a["flat64"], tol), (case, p, a)


@pytest.mark.parametrize("case", ["uneven", "float64", "split_tensor", "big", "zero_on_rank1"])
def test_every_norm_type_matches_the_single_process_norm(ranks, case):
    check_case(ranks, case)


def test_a_tensor_split_across_ranks_has_the_norm_of_the_whole(ranks):
    got = ranks[0]["split_tensor"]
    for p, whole in ranks[0]["split_tensor_whole"].items():
        assert same(got[p]["got"], whole, rtol(got[p]["dtype"], p)), p
    assert got[0.0]["got"] == 2.0  # p = 0: two nonzero pieces, as torch counts tensors


def test_no_overflow_across_ranks(ranks):
    big = ranks[0]["big"]
    assert big[2.0]["got"] == pytest.approx(math.sqrt(10 * 1e40 + 5 * 9e38 + 1), rel=1e-6)
    assert torch.nn.utils.get_total_norm([torch.full((10,), 1e20)]).item() == INF  # torch


@pytest.mark.parametrize("case", ["empty_rank", "all_empty"])
def test_ranks_without_gradients(ranks, case):
    check_case(ranks, case)
    if case == "all_empty":
        assert all(ranks[0][case][p]["got"] == 0.0 for p in NORM_TYPES)
    else:
        # -inf and negative p: a rank without gradients is no "zero norm"
        assert ranks[1][case][-INF]["got"] > 0 and ranks[1][case][-1.0]["got"] > 0


@pytest.mark.parametrize("case", ["nan_rank1", "inf_rank1", "ninf_rank1", "all_inf_rank1"])
def test_nonfinite_on_rank1_only_reaches_every_rank(ranks, case):
    check_case(ranks, case)
    for r in range(2):
        res = ranks[r][case]
        if case == "nan_rank1":
            assert all(math.isnan(res[p]["got"]) for p in NORM_TYPES if p != 0)
        else:
            assert all(res[p]["got"] == INF for p in [0.5, 1.0, 2.0, 3.0, INF])
        assert res[0.0]["got"] == 3.0 or case == "all_inf_rank1"


def test_error_if_nonfinite_raises_on_every_rank(ranks):
    for r in range(2):
        for key in ("error_if_nonfinite", "dtensor_error_if_nonfinite"):
            msg = ranks[r][key]
            assert msg is not None, f"rank {r} did not raise ({key})"
            assert "non-finite" in msg and "error_if_nonfinite=False" in msg


def test_clip_grad_norm_with_plain_shards_equals_the_single_process_clip(ranks):
    full = ranks[0]["clip_plain"]["full"]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in full]
    for prm, g in zip(params, full):
        prm.grad = g.clone()
    single_total = engine.clip_grad_norm_(params, 1.0)
    got = ranks[0]["clip_plain"]["grads"] + ranks[1]["clip_plain"]["grads"]
    for r in range(2):
        assert ranks[r]["clip_plain"]["total"] == pytest.approx(single_total.item(), rel=4e-6)
    assert single_total.item() > 1.0  # the case clips
    for a, prm in zip(got, params):
        torch.testing.assert_close(a, prm.grad, rtol=4e-6, atol=0)


@pytest.mark.parametrize("case", ["dtensor", "dtensor_replicated", "dtensor_mixed", "dtensor_2d"])
def test_dtensor_norms_every_type(ranks, case):
    check_case(ranks, case)


def test_dtensor_shards_are_uneven_and_one_is_empty(ranks):
    assert ranks[0]["dtensor_local_sizes"] == [20, 4, 5, 6]
    assert ranks[1]["dtensor_local_sizes"] == [15, 0, 4, 6]


def test_replicated_parameters_count_once(ranks):
    res = ranks[0]["dtensor_replicated"]
    # counted once per rank it would be 2**(1/p) times larger
    for p in [0.5, 1.0, 2.0, 3.0]:
        assert same(res[p]["got"], res[p]["flat64"], 4e-6 * max(1, 1 / p))
        assert not same(res[p]["got"], res[p]["flat64"] * 2 ** (1 / p), 1e-3)
    assert res[0.0]["got"] == 3.0


def test_dtensor_nan_on_rank1_only(ranks):
    assert ranks[0]["dtensor_nan_local"] is False and ranks[1]["dtensor_nan_local"] is True
    check_case(ranks, "dtensor_nan_rank1")
    for r in range(2):
        assert math.isnan(ranks[r]["dtensor_nan_rank1"][2.0]["got"])
        assert math.isnan(ranks[r]["dtensor_nan_rank1"][INF]["got"])


def test_clip_grad_norm_on_dtensors_equals_the_single_process_clip(ranks):
    for r in range(2):
        res = ranks[r]["clip_dtensor"]
        assert res["total_is_plain"]
        assert res["total"] == pytest.approx(res["single_total"], rel=4e-6)
        assert res["single_total"] > 1.0
        for a, b in zip(res["grads"], res["single"]):
            torch.testing.assert_close(a, b, rtol=4e-6, atol=0)
    # the +1e-6 is added once, to the global norm: the clipped norm is 1 / (1 + 1e-6 / T)
    res = ranks[0]["clip_dtensor"]
    clipped = engine.get_total_norm(res["grads"]).item()
    assert clipped == pytest.approx(res["total"] / (res["total"] + 1e-6), rel=1e-6)


def test_single_process_path_is_untouched_without_group(monkeypatch):
    """Plain tensors and no group never reach the distributed module."""
    from gradcheck_cli.engine import distributed

    def boom(*args, **kwargs):
        raise AssertionError("distributed path taken")

    monkeypatch.setattr(distributed, "total_norm", boom)
    g = [torch.tensor([3.0, 4.0])]
    assert engine.get_total_norm(g).item() == 5.0
    prm = torch.nn.Parameter(torch.zeros(2))
    prm.grad = torch.tensor([3.0, 4.0])
    assert engine.clip_grad_norm_([prm], 1.0).item() == 5.0
    assert engine.get_total_norm([prm]).item() == 0.0  # a Parameter (a subclass) is not a DTensor


@pytest.mark.parametrize("rule", ["autoclip", "zclip", "agc"])
def test_adaptive_rules_on_dtensors_equal_the_single_process_rules(ranks, rule):
    for r in range(2):
        res = ranks[r]["rules"][rule]
        dt, single = res["steps"]["dtensor"], res["steps"]["single"]
        assert len(dt) == len(single) == 5
        for a, b in zip(dt, single):
            for x, y in zip(a, b):
                assert (x is None) == (y is None)
                if x is not None:
                    assert x == pytest.approx(y, rel=4e-6)
        for a, b in zip(res["grads"], res["single_grads"]):
            torch.testing.assert_close(a, b, rtol=4e-6, atol=1e-12)
    # the spike at step 4 is clipped by every rule
    single = ranks[0]["rules"][rule]["steps"]["single"]
    assert single[3][2] is None or single[3][2] < 0.5
