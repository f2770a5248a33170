"""Compact storage: a key kept in bfloat16 / float16 and served in its float dtype.

The contract: what is served equals ``x.to(storage).to(dtype)`` bit for bit (NaN stays NaN),
on both backends, through every path that serves values; ``buffer.<key>`` is the storage
itself; the rollout's bytes are counted per key. Default: nothing changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bits, kernel_device

import rollout_buffers as rb
from rollout_buffers import DictDataset, ExperienceBuffer, SequenceDataset, TrajectoryDataset
from rollout_buffers.backend import use_backend
from rollout_buffers.errors import RolloutTypeError, RolloutValueError

STORAGES = [torch.bfloat16, torch.float16]
T, N = 4, 5


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        kernel_device()
    with use_backend(request.param):
        yield request.param


@pytest.fixture(params=[True, False], ids=["lazy", "eager"])
def lazy(request):
    previous = rb.lazy_make_dict()
    rb.set_lazy_make_dict(request.param)
    yield request.param
    rb.set_lazy_make_dict(previous)


def _values(shape, seed, dtype=torch.float32):
    """Random values plus the edge cases of a narrowing cast: ties, subnormals, values past
    float16's range, infinities, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    flat = x.view(-1)
    edges = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 65504.0, 65520.0, 7e4, -1e6, 2.0**-20, 2.0**-26,
         -0.0, float("inf"), float("-inf"), 1e-45],
        dtype=torch.float64,
    )  # fmt: skip
    k = min(flat.numel(), edges.numel())
    flat[:k] = edges[:k]
    return x.to(dtype)


def _served(x, storage, dtype=torch.float32):
    return x.to(storage).to(dtype)


def _buffer(storage, extra_full=True):
    b = ExperienceBuffer(N, T, "cpu")
    b.register_key("obs", shape=(3,), storage=storage)
    b.register_key("h", shape=(2, 2), storage=storage)
    if extra_full:
        b.register_key("r")
        b.register_key("dones", dtype=torch.bool)
    return b


def _same(a, b):
    """Bit for bit, except that any NaN equals any NaN (payloads differ across devices)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(bits(a)[~nan], bits(b)[~nan])


# -- the API -----------------------------------------------------------------------------------


def test_a_compact_key_is_its_storage_and_counts_its_bytes():
    b = ExperienceBuffer(N, T, "cpu")
    b.register_key("obs", shape=(358,), storage=torch.bfloat16)
    b.register_key("value", shape=(1,))
    assert b.obs.dtype == torch.bfloat16 and b.obs.shape == (T, N, 358)
    assert b.value.dtype == torch.float32
    assert b.key_nbytes == {"obs": T * N * 358 * 2, "value": T * N * 4}
    assert b.nbytes == T * N * (358 * 2 + 4)
    text = repr(b)
    assert "obs: (358,) torch.float32 stored as torch.bfloat16" in text and "nbytes=" in text


def test_without_storage_nothing_changes():
    b = ExperienceBuffer(N, T, "cpu")
    b.register_key("obs", shape=(3,))
    assert b.obs.dtype == torch.float32 and b._served == {}
    assert "stored as" not in repr(b)


@pytest.mark.parametrize(
    "dtype, storage, error",
    [
        (torch.float32, torch.int8, RolloutValueError),
        (torch.int64, torch.bfloat16, RolloutValueError),
        (torch.float16, torch.bfloat16, RolloutValueError),
        (torch.float32, "bfloat16", RolloutTypeError),
    ],
)
def test_a_storage_that_is_not_a_narrower_float_is_refused(dtype, storage, error):
    b = ExperienceBuffer(N, T, "cpu")
    with pytest.raises(error, match="obs"):
        b.register_key("obs", shape=(3,), dtype=dtype, storage=storage)
    assert "obs" not in b.keys() and not hasattr(b, "obs")


# -- numerics, through every write and every read ------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_what_is_served_is_the_round_trip_through_the_storage(backend, lazy, storage):
    b = _buffer(storage)
    wide = _values((N, 8), 1)
    obs = [_values((N, 3), 10 + t) for t in range(T)]
    h = [_values((N, 2, 2), 20 + t) for t in range(T)]
    for t in range(T):
        if t == 0:  # one key at a time; the observation a view of a wider tensor
            wide[:, 2:5] = obs[0]
            b.update_data("obs", t, wide[:, 2:5])
            b.update_data("h", t, h[0])
            b.update_data("r", t, torch.ones(N))
            b.update_data("dones", t, torch.zeros(N, dtype=torch.bool))
        elif t == 1:  # float64 sources: torch's cast of those, as assignment gives
            obs[1], h[1] = obs[1].double(), h[1].double()
            b.update_step(t, {"obs": obs[1], "h": h[1], "r": torch.ones(N),
                              "dones": torch.zeros(N, dtype=torch.bool)})  # fmt: skip
        else:  # compact and full keys in one update_step
            b.update_step(t, {"obs": obs[t], "h": h[t], "r": torch.ones(N),
                              "dones": torch.zeros(N, dtype=torch.bool)})  # fmt: skip
    stored_obs = torch.stack([x.to(storage) for x in obs])
    stored_h = torch.stack([x.to(storage) for x in h])
    _same(b.obs, stored_obs)  # buffer.<key> is the storage
    _same(b.h, stored_h)
    want_obs = stored_obs.float().transpose(0, 1).reshape(T * N, 3)
    want_h = stored_h.float().transpose(0, 1).reshape(T * N, 2, 2)
    d = b.make_dict()
    ds = DictDataset(10, d)
    perm = torch.randperm(T * N, generator=torch.Generator().manual_seed(3))
    ds.shuffled_to_original = perm
    for i in range(2):  # minibatches straight from the storage (nothing made yet when lazy)
        rows = perm[i * 10 : (i + 1) * 10]
        _same(ds[i]["obs"], want_obs[rows])
        _same(ds[i]["h"], want_h[rows])
    _same(d["obs"], want_obs)  # the values, made on read (one of them first)
    _same(d["h"], want_h)
    assert d["r"].dtype == torch.float32
    _same(DictDataset(10, b.get_dict())[1]["obs"], want_obs[10:])  # every value made
    b.batch_update_data("obs", _values((T, N, 3), 5))
    _same(
        b.get_dict()["obs"], _served(_values((T, N, 3), 5), storage).transpose(0, 1).reshape(-1, 3)
    )


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_sequence_and_trajectory_minibatches_serve_the_round_trip(backend, storage):
    b = _buffer(storage)
    for t in range(T):
        b.update_step(t, {"obs": _values((N, 3), t), "h": _values((N, 2, 2), 9 + t),
                          "r": torch.ones(N), "dones": torch.tensor([t == 1] * N)})  # fmt: skip
    obs, h = b.obs.float(), b.h.float()
    seq = SequenceDataset(b, 2, 5, keys=["obs"], hidden="h", shuffle=False)
    first = seq[0]  # chunks 0-4: env c // 2, steps (c % 2) * 2 ...
    want = torch.stack([obs[(c % 2) * 2 : (c % 2) * 2 + 2, c // 2] for c in range(5)], dim=1)
    _same(first["obs"], want)
    _same(first["h"], torch.stack([h[(c % 2) * 2, c // 2] for c in range(5)]))
    traj = TrajectoryDataset(b, 5, padded="obs", keys=["r"], hidden="h")
    batch = traj[0]
    assert batch["obs"].dtype == torch.float32 and batch["h"].dtype == torch.float32
    ref = TrajectoryDataset({"obs": obs, "h": h, "r": b.r, "dones": b.dones}, 5,
                            padded="obs", keys=["r"], hidden="h")[0]  # fmt: skip
    for k in ("obs", "h", "masks", "r"):
        _same(batch[k], ref[k])


def test_float16_overflow_is_inf_and_nan_stays_nan(backend):
    b = ExperienceBuffer(2, 1, "cpu")
    b.register_key("x", shape=(4,), storage=torch.float16)
    b.update_data("x", 0, torch.tensor([[7e4, -1e6, float("nan"), 65504.0]] * 2))
    got = b.get_dict()["x"][0]
    assert got[0] == float("inf") and got[1] == float("-inf")
    assert torch.isnan(got[2]) and got[3] == 65504.0


def test_gae_reads_compact_keys_in_float32(backend):
    def run(storage):
        b = ExperienceBuffer(N, T, "cpu")
        for k in ("rewards", "value", "next_value", "advantages", "returns"):
            b.register_key(k, storage=storage if k in ("value", "next_value") else None)
        b.register_key("dones", dtype=torch.bool)
        for t in range(T):
            b.update_step(t, {"rewards": _values((N,), t), "value": _values((N,), 7 + t),
                              "next_value": _values((N,), 8 + t),
                              "dones": torch.tensor([t == 2] * N)})  # fmt: skip
        b.compute_gae(0.99, 0.95)
        return b

    compact, full = run(torch.bfloat16), run(None)
    # what compute_gae sees of a compact key is its served value: the same as a full key
    # holding that value
    for t in range(T):
        full.update_data("value", t, compact.value[t].float())
        full.update_data("next_value", t, compact.next_value[t].float())
    full.compute_gae(0.99, 0.95)
    assert torch.equal(compact.advantages, full.advantages)
    assert torch.equal(compact.returns, full.returns)


def test_a_step_of_compact_and_full_keys_is_one_launch(kernel_calls):
    kernel_device()
    with use_backend("triton"):
        b = _buffer(torch.bfloat16)
        step = {"obs": torch.randn(N, 3), "h": torch.randn(N, 2, 2), "r": torch.ones(N),
                "dones": torch.zeros(N, dtype=torch.bool)}  # fmt: skip
        b.update_step(0, step)
        kernel_calls.clear()
        b.update_step(1, step)
        assert kernel_calls == ["step_write"]
        for t in (2, 3):
            b.update_step(t, step)
        kernel_calls.clear()
        ds = DictDataset(10, b.make_dict())
        ds[0]
        assert kernel_calls == ["permuted_gather"]  # widened inside the gather


# -- learning is unaffected where it should be -----------------------------------------------------


def test_recurrent_cartpole_learns_with_compact_observations():
    from test_examples import load_example

    example = load_example("recurrent_cartpole")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = example.train(iterations=12, seed=0, log=lambda line: None, compact=True)
    finally:
        torch.set_num_threads(threads)
    returns = out["returns"]
    # full precision, same seed: past 60 over the last 3 iterations (tests/test_examples.py)
    assert returns[0] < 25 and np.mean(returns[-3:]) > 60, returns
