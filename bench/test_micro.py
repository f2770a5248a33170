"""Microbenchmarks (`make bench-micro`): pytest-benchmark, rollout_buffers against the original.

Runs on CUDA when there is a GPU (``torch.cuda.synchronize()`` before the first and after each
timed call, so a call's time is its device work, not its launch), else on CPU with smaller
sizes (the 1 GB flatten is skipped there). Compare implementations within a group:

    pytest -q bench/ --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import itertools

import pytest
import torch

import rollout_buffers as rb
from bench import common as c
from bench import original

DEVICE = c.pick_device()
CUDA = DEVICE.type == "cuda"
IMPLS = ("rollout_buffers", "original")
NUM_ENVS, WIDTH, NUM_STEPS = 64, 12, 32


def run(benchmark, group: str, fn) -> None:
    """Benchmark ``fn(k)`` (k counts the calls), synchronized around each call on CUDA."""
    benchmark.group = group
    benchmark.extra_info["device"] = c.device_label(DEVICE)
    counter = itertools.count()
    if CUDA:
        torch.cuda.synchronize(DEVICE)

        def call():
            fn(next(counter))
            torch.cuda.synchronize(DEVICE)

    else:

        def call():
            fn(next(counter))

    benchmark(call)


def step_buffers(impl: str, num_keys: int):
    cls = rb.ExperienceBuffer if impl == "rollout_buffers" else original.ExperienceBuffer
    buf = cls(NUM_ENVS, NUM_STEPS, device=DEVICE)
    keys = [f"k{i}" for i in range(num_keys)]
    for k in keys:
        buf.register_key(k, (WIDTH,))
    sets = [{k: torch.randn(NUM_ENVS, WIDTH, device=DEVICE) for k in keys} for _ in range(4)]
    return buf, sets


@pytest.mark.parametrize("impl", IMPLS)
def test_update_data_single_key(benchmark, impl):
    buf, sets = step_buffers(impl, 1)
    run(
        benchmark,
        "update_data 1 key (64 x 12 floats)",
        lambda k: buf.update_data("k0", k % NUM_STEPS, sets[k % 4]["k0"]),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_keys", [4, 16, 64])
def test_update_step(benchmark, impl, num_keys):
    buf, sets = step_buffers(impl, num_keys)
    if impl == "rollout_buffers":
        fn = lambda k: buf.update_step(k % NUM_STEPS, sets[k % 4])
    else:  # the original has no update_step: one update_data per key

        def fn(k):
            for key, v in sets[k % 4].items():
                buf.update_data(key, k % NUM_STEPS, v)

    run(benchmark, f"update_step {num_keys} keys (64 x 12 floats each)", fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", ["1MB", "64MB", "1GB"])
def test_swap_and_flatten01(benchmark, impl, size):
    nbytes = {"1MB": 1 << 20, "64MB": 64 << 20, "1GB": 1 << 30}[size]
    if not CUDA and nbytes > 64 << 20:
        pytest.skip(
            "1 GB flatten is GPU-only: on CPU it would take the run past its ~2 minute budget"
        )
    steps, row = 32, 64  # (32, N, 16) float32: 64-byte rows
    envs = nbytes // (steps * row)
    pool = [
        torch.randn(steps, envs, row // 4, device=DEVICE)
        for _ in range(c.pool_size(nbytes, lo=1, hi=64))
    ]
    fn = rb.swap_and_flatten01 if impl == "rollout_buffers" else original.swap_and_flatten01
    run(benchmark, f"swap_and_flatten01 {size}", lambda k: fn(pool[k % len(pool)]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("row_bytes", [4, 12, 16, 64, 256, 4096])
def test_gather(benchmark, impl, row_bytes):
    rows = 262144 if CUDA else min(65536, (64 << 20) // row_bytes)
    shape = (rows,) if row_bytes == 4 else (rows, row_bytes // 4)
    data = {"x": torch.randn(shape, device=DEVICE)}
    batch = rows // 8
    if impl == "rollout_buffers":
        ds = rb.DictDataset(batch, data, shuffle=True)
    else:
        ds = original.DictDataset(batch, data, shuffle=True)
    run(
        benchmark,
        f"minibatch gather, {row_bytes} B rows, batch {batch} of {rows}",
        lambda k: ds[k % 8],
    )
