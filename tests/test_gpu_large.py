"""Large offsets: a key whose buffer passes 2**31 bytes, checked at its far end in every hot path.

uint8 rows of 4096 bytes x 8192 envs x 72 steps = 2,415,919,104 bytes (> 2**31 = 2,147,483,648):
any 32-bit offset arithmetic in a kernel (``program_id * stride`` before casting to int64)
wraps and writes or reads the wrong place. Checked: update_step at the last step (every step,
in fact), update_data at the last step, make_dict's last rows (and every row), a dataset
gather of the last rows and of the row that crosses 2**31. Needs CUDA and ~12 GB free. It runs
on the configured backend (``auto``: the Triton kernels for CUDA tensors); with
``ROLLOUT_BUFFERS_BACKEND=torch`` it checks the PyTorch path (and the test's own logic).
"""

from __future__ import annotations

import os

import pytest
import torch

from rollout_buffers import DictDataset, ExperienceBuffer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, T, ROW = 8192, 72, 4096  # num_envs, num_steps, bytes per row of the big key
ROWS = N * T
BIG_BYTES = ROWS * ROW
assert BIG_BYTES > 2**31
CROSSING_ROW = 2**31 // ROW  # the first flattened row at byte offset >= 2**31
POISON = 255  # pattern() values are < 251: a row left unwritten shows
BATCH = 4096  # divides ROWS
NEED_FREE = 12 * 2**30


@pytest.fixture(autouse=True, scope="module")
def compiled_kernels():
    """These tests need the kernels compiled for the GPU, not Triton's CPU interpreter (which
    cannot be switched off once triton is imported)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is on: run the GPU tests in a process without it")


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    free, _ = torch.cuda.mem_get_info()
    if free < NEED_FREE:
        return f"needs ~12 GB of free GPU memory, {free / 2**30:.1f} GB free"
    return None


def pattern(step: int, salt: int = 0) -> torch.Tensor:
    """(N, ROW) uint8, distinct per step, env and byte (mod 251), built on the GPU."""
    env = torch.arange(N, device="cuda", dtype=torch.int32)[:, None]
    col = torch.arange(ROW, device="cuda", dtype=torch.int32)[None, :]
    return ((env * 131 + col * 7 + step * 29 + salt * 53) % 251).to(torch.uint8)


def small_rows(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    env = torch.arange(N, device="cuda", dtype=torch.float32)
    rew = env * 1000 + step
    vec = (env[:, None] * 3 + torch.arange(3, device="cuda") + step * 0.5).to(torch.float16)
    return rew, vec


@pytest.fixture(scope="module")
def rollout():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    buf = ExperienceBuffer(N, T, device="cuda")
    buf.register_key("rew")  # narrow keys share the launch with the big one
    buf.register_key("big", shape=(ROW,), dtype=torch.uint8)
    buf.register_key("vec", shape=(3,), dtype=torch.float16)
    buf.big.fill_(POISON)
    for step in range(T):
        rew, vec = small_rows(step)
        buf.update_step(step, {"rew": rew, "big": pattern(step), "vec": vec})
    # poison the block the caching allocator will hand to make_dict's output
    poison = torch.full((ROWS, ROW), POISON, dtype=torch.uint8, device="cuda")
    del poison
    out = buf.make_dict()
    torch.cuda.synchronize()
    yield buf, out
    del buf, out
    torch.cuda.empty_cache()


def test_update_step_writes_every_step_up_to_the_far_end(rollout):
    buf, _ = rollout
    assert buf.big.numel() == BIG_BYTES
    assert not (buf.big == POISON).any(), "a row of the big key was never written"
    for step in range(T):
        assert torch.equal(buf.big[step], pattern(step)), f"step {step}"
    last = buf.big[T - 1, N - 1]  # byte offset BIG_BYTES - ROW
    assert torch.equal(last, pattern(T - 1)[N - 1])
    rew, vec = small_rows(T - 1)
    assert torch.equal(buf.rew[T - 1], rew) and torch.equal(buf.vec[T - 1], vec)


def test_update_data_at_the_last_step_reaches_the_far_end(rollout):
    buf, _ = rollout
    before = buf.big[T - 2].clone()
    buf.update_data("big", T - 1, pattern(T - 1, salt=1))
    assert torch.equal(buf.big[T - 1], pattern(T - 1, salt=1))
    assert torch.equal(buf.big[T - 2], before), "the write landed on another step"
    buf.update_step(T - 1, {"big": pattern(T - 1)})  # restore for the other tests
    assert torch.equal(buf.big[T - 1, -1], pattern(T - 1)[-1])


def test_make_dict_last_rows_and_every_row_are_exact(rollout):
    _, out = rollout
    big = out["big"]
    assert big.shape == (ROWS, ROW) and big.is_contiguous()
    for step in range(T):  # env-major: row env * T + step
        assert torch.equal(big.view(N, T, ROW)[:, step], pattern(step)), f"step {step}"
    for step in range(T):  # the very last rows, each spelled out
        assert torch.equal(big[(N - 1) * T + step], pattern(step)[N - 1])
    env, step = divmod(CROSSING_ROW, T)
    assert torch.equal(big[CROSSING_ROW], pattern(step)[env])
    rew = out["rew"].view(N, T)
    for step in (0, T - 1):
        assert torch.equal(rew[:, step], small_rows(step)[0])
        assert torch.equal(out["vec"].view(N, T, 3)[:, step], small_rows(step)[1])


def test_dataset_gathers_the_last_rows_and_the_row_crossing_2_31(rollout):
    _, out = rollout
    big = out["big"]
    expert = torch.arange(1000, device="cuda", dtype=torch.int64)  # shorter: indexed modulo
    ds = DictDataset(BATCH, {"big": big, "rew": out["rew"], "expert": expert})
    assert len(ds) == ROWS // BATCH
    ds.shuffled_to_original = torch.arange(ROWS - 1, -1, -1, device="cuda")  # last rows first
    first = ds[0]
    rows = torch.arange(ROWS - 1, ROWS - 1 - BATCH, -1, device="cuda")
    assert torch.equal(first["big"], big[rows])
    assert torch.equal(first["big"][0], big[-1])
    assert torch.equal(first["rew"], out["rew"][rows])
    assert torch.equal(first["expert"], rows % 1000)
    crossing = (ROWS - 1 - CROSSING_ROW) // BATCH
    pos = (ROWS - 1 - CROSSING_ROW) % BATCH
    assert torch.equal(ds[crossing]["big"][pos], big[CROSSING_ROW])
    # a shuffled epoch: the batch holding the largest row index, and the last batch
    gen = torch.Generator(device="cuda").manual_seed(0)
    ds = DictDataset(BATCH, {"big": big}, shuffle=True, generator=gen)
    perm = ds.shuffled_to_original
    holder = int(torch.nonzero(perm == ROWS - 1)) // BATCH
    for i in {holder, len(ds) - 1}:
        assert torch.equal(ds[i]["big"], big[perm[i * BATCH : (i + 1) * BATCH]]), f"batch {i}"
