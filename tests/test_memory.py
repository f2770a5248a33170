"""Memory stays flat: 200 epochs of rollout writes, make_dict and minibatches leak nothing.

CPU: the resident set (from /proc/self/statm) after warm-up stays within a small bound; a
control run that keeps every epoch's rollout alive shows the measurement does see a leak of
that size. GPU: ``torch.cuda.memory_allocated`` is identical at the end of every epoch after
warm-up (skipped without CUDA).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from rollout_buffers import DictDataset, ExperienceBuffer, use_backend

EPOCHS, WARMUP = 200, 20
NUM_ENVS, NUM_STEPS, MINIBATCHES = 64, 16, 4
KEYS = {
    "obs": ((48,), torch.float32),
    "actions": ((8,), torch.float32),
    "rewards": ((), torch.float32),
    "dones": ((), torch.bool),
    "steps": ((), torch.int64),
}
CPU_BOUND = 4 * 2**20  # bytes of resident-set growth allowed after warm-up
EPOCH_BYTES = NUM_ENVS * NUM_STEPS * (48 + 8 + 1) * 4  # the bulk of one flattened rollout

_STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_buffer(device) -> tuple[ExperienceBuffer, dict[str, torch.Tensor]]:
    buf = ExperienceBuffer(NUM_ENVS, NUM_STEPS, device=device)
    for key, (shape, dtype) in KEYS.items():
        buf.register_key(key, shape=shape, dtype=dtype)
    rows = {k: torch.ones((NUM_ENVS, *s), dtype=d, device=device) for k, (s, d) in KEYS.items()}
    return buf, rows


def epoch(buf, rows, generator, keep: list | None = None) -> None:
    for step in range(NUM_STEPS):
        buf.update_step(step, rows)
        buf.update_data("rewards", step, rows["rewards"])  # the one-key path too
    data = buf.make_dict()
    dataset = DictDataset(
        NUM_ENVS * NUM_STEPS // MINIBATCHES, data, shuffle=True, generator=generator
    )
    for batch in dataset:
        batch["obs"].sum()
    if keep is not None:
        keep.append(data)


def rss_growth(keep: list | None = None) -> tuple[int, list[int]]:
    buf, rows = make_buffer("cpu")
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(EPOCHS):
        epoch(buf, rows, gen, keep)
        if i + 1 >= WARMUP and (i + 1) % 10 == 0:
            gc.collect()
            samples.append(rss_bytes())
    return max(samples) - samples[0], samples


pytestmark = pytest.mark.skipif(not _STATM.exists(), reason="needs /proc/self/statm (Linux)")


def test_cpu_resident_memory_stays_flat_over_200_epochs():
    with use_backend("torch"):
        rss_growth()  # a first run settles allocator caches and thread pools
        growth, samples = rss_growth()
    assert growth <= CPU_BOUND, (
        f"resident set grew by {growth / 2**20:.1f} MiB after warm-up: {samples}"
    )


def test_cpu_measurement_detects_a_leak_of_one_rollout_per_epoch():
    """Control: keeping every epoch's make_dict output alive must exceed the bound above."""
    assert (EPOCHS - WARMUP) * EPOCH_BYTES > 4 * CPU_BOUND
    keep: list = []
    with use_backend("torch"):
        growth, samples = rss_growth(keep)
    assert growth > CPU_BOUND, f"a {EPOCH_BYTES}-byte-per-epoch leak went unseen: {samples}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_allocated_memory_is_identical_every_epoch_after_warmup():
    buf, rows = make_buffer("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    allocated = []
    for i in range(EPOCHS):
        epoch(buf, rows, gen)
        torch.cuda.synchronize()
        if i + 1 >= WARMUP:
            allocated.append(torch.cuda.memory_allocated())
    assert len(set(allocated)) == 1, (
        f"memory_allocated changed after warm-up: {sorted(set(allocated))}"
    )
    assert allocated[0] >= sum(
        getattr(buf, k).numel() * getattr(buf, k).element_size() for k in KEYS
    )
