"""The Triton kernels under Triton's CPU interpreter, bit for bit against the PyTorch reference.

Every launcher of ``rollout_buffers.kernels`` is compared with ``rollout_buffers.ops.torch_*``
(``torch.equal``: these are copies) on fresh random data for every dtype of the contract,
scalar and multi-dim keys, odd sizes (7 envs, 3 steps; rows of 1, 12 and 4096 bytes) and
non-contiguous or misaligned inputs. Destinations and outputs are poisoned first so that a
row the kernel forgets shows up.
"""

import math

import pytest

pytest.importorskip("triton")

import rollout_buffers.kernels as K
import torch
from conftest import DTYPES, random_tensor

from rollout_buffers import backend, ops

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("interpreted_kernels")]


def step_write(*args):
    return K.step_write(*args)


def transpose_flatten(*args):
    return K.transpose_flatten(*args)


def permuted_gather(*args):
    return K.permuted_gather(*args)


T, N = 3, 7  # odd on purpose: nothing divides nicely
POISON = 0xA5


def rand(shape, dtype):
    return random_tensor(shape, dtype)


def poisoned(shape, dtype):
    t = torch.empty(shape, dtype=dtype)
    t.untyped_storage().fill_(POISON)
    return t


def key_shapes(dtype):
    """Scalar, 12-byte-ish, multi-dim and 4096-byte rows for ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return [(), (3,), (2, 3), (max(12 // size, 1),), (4096 // size,)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as 0xA5 bytes, not zeros or old data."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.numel():
            t.untyped_storage().fill_(POISON)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def source_variants(shape, dtype, rows):
    """The same logical ``(rows, *shape)`` source in several memory layouts."""
    n_el = math.prod(shape)
    out = {"contiguous": rand((rows, *shape), dtype)}
    out["every_other_row"] = rand((2 * rows, *shape), dtype)[::2]
    out["expanded_row"] = rand((1, *shape), dtype).expand(rows, *shape)
    # Base address one element past an allocation: the unit shrinks to the element size.
    flat = rand((rows * n_el + 1,), dtype)
    out["misaligned"] = flat[1:].view(rows, *shape)
    if len(shape) >= 1 and shape[-1] > 1:
        # Rows that are not dense (every other column): copied to a dense layout first.
        out["strided_columns"] = rand((rows, *shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
        # A column slice of a wider tensor: dense rows with a row stride larger than the row.
        wide = rand((rows, *shape[:-1], shape[-1] + 1), dtype)
        out["column_slice"] = wide[..., 1:] if len(shape) == 1 else wide[..., :-1]
    if len(shape) == 2:
        out["transposed_row"] = rand((rows, shape[1], shape[0]), dtype).transpose(1, 2)
    return out


# ---------------------------------------------------------------------------------------------
# step_write
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_write_matches_torch_for_every_layout(dtype):
    for shape in key_shapes(dtype):
        for name, src in source_variants(shape, dtype, N).items():
            dst = rand((T, N, *shape), dtype)  # random bytes: a wrong step or row shows
            ref = dst.clone()
            for index in (T - 1, 0):
                step_write([dst], index, [src])
                ops.torch_write_step([ref], index, [src])
                assert torch.equal(dst, ref), (shape, name, index)


def test_step_write_mixed_dtypes_in_one_launch():
    keys = [(shape, dtype) for dtype in DTYPES for shape in key_shapes(dtype)[:3]]
    keys.append(((0,), torch.float32))  # an empty row moves nothing
    dsts = [rand((T, N, *s), d) for s, d in keys]
    refs = [d.clone() for d in dsts]
    for index in range(T):
        srcs = []
        for i, (s, d) in enumerate(keys):
            variants = list(source_variants(s, d, N).values())
            srcs.append(variants[(i + index) % len(variants)])
        step_write(dsts, index, srcs)
        ops.torch_write_step(refs, index, srcs)
    for (s, d), a, b in zip(keys, dsts, refs, strict=True):
        assert torch.equal(a, b), (s, d)


def test_step_write_reuses_the_descriptor_table():
    dsts = [rand((T, N, 5), torch.float32), rand((T, N), torch.int64)]
    srcs = [rand((N, 5), torch.float32), rand((N,), torch.int64)]
    K._common.STEP_TABLES.clear()
    step_write(dsts, 0, srcs)
    (table,) = K._common.STEP_TABLES.values()  # built once, by the first call
    builds = []
    real_tensor = K._common.torch.tensor
    K._common.torch.tensor = lambda *a, **kw: builds.append(1) or real_tensor(*a, **kw)
    try:
        for index in range(T):
            step_write(dsts, index, srcs)
    finally:
        K._common.torch.tensor = real_tensor
    assert builds == [] and len(K._common.STEP_TABLES) == 1
    assert next(iter(K._common.STEP_TABLES.values())) is table


def test_write_step_through_ops_casts_and_broadcasts():
    """ops.write_step normalizes sources (dtype, broadcast, 0-dim CPU) before the kernel."""
    dsts = [
        rand((T, N, 4), torch.float32),
        rand((T, N), torch.bfloat16),
        rand((T, N, 2), torch.bool),
    ]
    refs = [d.clone() for d in dsts]
    srcs = [rand((4,), torch.float64), torch.tensor(2.5), rand((N, 1), torch.int32)]
    with backend.use_backend("triton"):
        ops.write_step(dsts, 1, srcs)
    ops.torch_write_step(refs, 1, srcs)
    for a, b in zip(dsts, refs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# transpose_flatten
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transpose_flatten_matches_torch(dtype):
    srcs = []
    for shape in key_shapes(dtype):
        srcs.append(rand((T, N, *shape), dtype))
        srcs.append(rand((N, T, *shape), dtype).transpose(0, 1))  # env-major storage
        srcs.append(rand((T, 2 * N, *shape), dtype)[:, ::2])  # strided dim 1
        if shape and shape[-1] > 1:
            srcs.append(rand((T, N, *shape[:-1], shape[-1] + 1), dtype)[..., 1:])  # row slice
    # One launch for everything, then one key at a time.
    outs = transpose_flatten(srcs)
    for src, out, ref in zip(srcs, outs, ops.torch_flatten(srcs), strict=True):
        assert out.is_contiguous() and out.shape == ref.shape
        assert torch.equal(out, ref), (src.shape, src.stride())
    for src in srcs[:4]:
        assert torch.equal(transpose_flatten([src])[0], ops.torch_flatten([src])[0])


@pytest.mark.parametrize("s0,s1", [(1, 5), (5, 1), (1, 1), (2, 3)])
def test_transpose_flatten_degenerate_dims(s0, s1):
    srcs = [rand((s0, s1, 3), torch.float32), rand((s0, s1), torch.bool)]
    for out, ref in zip(transpose_flatten(srcs), ops.torch_flatten(srcs), strict=True):
        assert torch.equal(out, ref)
        assert out.data_ptr() not in (s.data_ptr() for s in srcs)  # always a new tensor


# ---------------------------------------------------------------------------------------------
# permuted_gather
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permuted_gather_matches_torch(dtype):
    n, batch = 21, 7
    perm = torch.randperm(n)
    srcs = []
    for shape in key_shapes(dtype):
        srcs.append(rand((n, *shape), dtype))
        srcs.append(rand((5, *shape), dtype))  # shorter: indexed modulo its length
        srcs.append(rand((2 * n, *shape), dtype)[::2])  # row-strided
    srcs.append(rand((1, 3), dtype))  # length 1: every row is row 0
    for start in (0, batch, n - batch):
        outs = permuted_gather(srcs, perm, start, batch)
        refs = ops.torch_gather(srcs, perm, start, batch)
        for src, out, ref in zip(srcs, outs, refs, strict=True):
            assert out.is_contiguous() and out.shape == ref.shape
            assert torch.equal(out, ref), (src.shape, src.stride(), start)


def test_permuted_gather_mixed_keys_and_misaligned_sources():
    n = 24
    perm = torch.randperm(n)
    srcs = []
    for i, dtype in enumerate(DTYPES):
        shape = key_shapes(dtype)[i % 5]
        variants = source_variants(shape, dtype, n if i % 2 else 9)
        srcs.extend(variants[k] for k in ("misaligned", "contiguous"))
    for start in range(0, n, 8):
        outs = permuted_gather(srcs, perm, start, 8)
        for out, ref in zip(outs, ops.torch_gather(srcs, perm, start, 8), strict=True):
            assert torch.equal(out, ref)


def test_gather_and_flatten_through_ops():
    srcs = [rand((T, N, 3), torch.float16), rand((T, N), torch.int64)]
    with backend.use_backend("triton"):
        flat = ops.flatten(srcs)
        perm = torch.randperm(T * N)
        got = ops.gather(flat, perm, 7, 7)
    for a, b in zip(flat, ops.torch_flatten(srcs), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(got, ops.torch_gather(flat, perm, 7, 7), strict=True):
        assert torch.equal(a, b)


def test_word_bytes_picks_the_widest_shared_power_of_two():
    assert K._common.word_bytes(4096, 1 << 20) == 16
    assert K._common.word_bytes(940, 64) == 4
    assert K._common.word_bytes(24, 16) == 8
    assert K._common.word_bytes(15) == 1
    assert K._common.word_bytes(0) == 16


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64], ids=str)
def test_permuted_gather_wraps_entries_outside_the_range_never_reading_out_of_bounds(dtype):
    # An assigned permutation may hold anything: with wrap=True every key, full-length keys
    # included, takes each entry modulo its length with Python's sign rule (-1 -> L - 1).
    n = 6
    perm = torch.tensor([5, 6, 7, -1, 2**40 + 3, -(2**35) - 1], dtype=torch.int64)
    srcs = [rand((n, 3), dtype), rand((4,), dtype), rand((n, 5), dtype)[::1, 1:4]]
    want = [s[torch.remainder(perm, s.shape[0])] for s in srcs]
    for start, count in ((0, 6), (2, 3)):
        outs = permuted_gather(srcs, perm, start, count, True)
        refs = ops.torch_gather(srcs, perm, start, count, True)
        for out, ref, w in zip(outs, refs, want, strict=True):
            assert torch.equal(out, ref) and torch.equal(out, w[start : start + count])


def test_keys_with_rows_of_no_bytes_launch_nothing_for_them():
    # A (n, 0) key has no bytes to move: it must get no programs (not one unit per row).
    srcs = [rand((T, N, 0), torch.float32), rand((T, N, 3), torch.int32)]
    for out, ref in zip(transpose_flatten(srcs), ops.torch_flatten(srcs), strict=True):
        assert out.shape == ref.shape and torch.equal(out, ref)
    flat = ops.torch_flatten(srcs)
    perm = torch.randperm(T * N)
    outs = permuted_gather(flat, perm, 7, 7)
    for out, ref in zip(outs, ops.torch_gather(flat, perm, 7, 7), strict=True):
        assert out.shape == ref.shape and torch.equal(out, ref)


def test_permuted_gather_takes_the_modulo_by_the_given_lengths_and_refuses_one_past_the_end():
    # DictDataset passes the lengths it recorded when built: a key since replaced by a longer
    # tensor is reduced modulo its old length; a length past a tensor's end is refused.
    n = 8
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    srcs = [rand((n, 3), torch.float32), rand((12,), torch.int64), rand((n + 4, 2), torch.uint8)]
    lengths = [n, 5, n]  # the second: recorded 5, now 12 rows; the third: longer, not reduced
    for start, count in ((0, 4), (4, 4)):
        outs = permuted_gather(srcs, perm, start, count, False, lengths)
        refs = ops.torch_gather(srcs, perm, start, count, False, lengths)
        for out, ref, src, length in zip(outs, refs, srcs, lengths, strict=True):
            want = src[torch.remainder(perm[start : start + count], length)]
            assert torch.equal(out, ref) and torch.equal(out, want)
    with pytest.raises(IndexError, match="13"):
        permuted_gather(srcs, perm, 0, 4, False, [n, 13, n])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_of_chunks_matches_torch(dtype):
    # Sequences of seq steps from (T, N, *shape) storage: odd seq, strided and narrow rows,
    # chunks that cross the kernels' row tiles, first-step keys (hidden states).
    t, n, seq = 6, 5, 3
    nc = t // seq
    srcs = [rand((t, n, *shape), dtype) for shape in key_shapes(dtype)]
    srcs.append(rand((t, 2 * n, 4), dtype)[:, ::2])  # env-strided storage
    first = [i % 3 == 1 for i in range(len(srcs))]
    ids = torch.randperm(n * nc)
    for start, count in ((0, 4), (4, 6), (9, 1)):
        g = K.gatherer(srcs, [K.CHUNKS] * len(srcs), [0] * len(srcs), n * nc, count, seq=seq,
                       first_step=first)  # fmt: skip
        outs = g(ids, start)
        refs = ops.torch_gather_chunks(srcs, first, ids, start, count, seq)
        for out, ref, f in zip(outs, refs, first, strict=True):
            assert out.is_contiguous() and out.shape == ref.shape
            assert out.shape[:2] == ((1 if f else seq), count)
            assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_env_major_from_time_major_storage_matches_flatten_then_gather(dtype):
    # Row r of the env-major flattening is storage[r % T, r // T]: gathering it straight from
    # the storage gives what flattening first and gathering after gives, modulo lengths included.
    srcs = [rand((T, N, *shape), dtype) for shape in key_shapes(dtype)]
    srcs.append(rand((T, 2 * N, 3), dtype)[:, 1::2])  # env-strided, misaligned
    flat = ops.torch_flatten(srcs)
    n = T * N
    short = rand((5, 2), dtype)  # a plain key, shorter: modulo
    perm = torch.randperm(n)
    k = len(srcs)
    for start, count in ((0, 7), (7, 7), (14, 7)):
        g = K.gatherer(srcs + [short], [K.ENV_MAJOR] * k + [K.ROWS], [n] * k + [5], n, count)
        outs = g(perm, start)
        refs = ops.torch_gather(flat + [short], perm, start, count)
        for out, ref in zip(outs, refs, strict=True):
            assert out.is_contiguous() and torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["rows", "env_major", "chunks"])
def test_gather_never_reads_outside_a_source_whatever_the_indices_hold(mode):
    # The host decides whether a permutation needs the modulo from what it saw of it; a write it
    # could not see (through NumPy, DLPack, another stream) must still not make the kernel read
    # outside the tensor. Each source is the middle of a larger tensor whose other bytes hold a
    # sentinel: no output row may contain it, whatever the indices (wrap off).
    sentinel = -7777.0
    big = torch.full((3 * T, 2 * N, 3), sentinel)
    inner = rand((T, N, 3), torch.float32)
    big[T : 2 * T, :N] = inner
    src = big[T : 2 * T, :N]  # (T, N, 3), env-strided
    bad = torch.tensor([0, 10**6, -5, 2**40, -(2**40), 3, T * N, -1], dtype=torch.int64)
    if mode == "rows":
        rows = big.view(-1, 3)[T * 2 * N : T * 2 * N + T * N]
        g = K.gatherer([rows], [K.ROWS], [T * N], T * N, bad.shape[0])
    elif mode == "env_major":
        g = K.gatherer([src], [K.ENV_MAJOR], [T * N], T * N, bad.shape[0])
    else:
        g = K.gatherer([src], [K.CHUNKS], [0], N * T, bad.shape[0], seq=1)
    (out,) = g(bad, 0)
    assert not (out == sentinel).any()


@pytest.mark.parametrize("dtype", [torch.complex32, torch.complex64, torch.complex128], ids=str)
def test_every_launcher_moves_complex_values(dtype):
    # Triton's binder has no complex pointer type; the kernels move bytes, so complex keys work.
    srcs = [rand((T, N, 3), torch.float32).to(dtype), rand((T, N), torch.float32).to(dtype)]
    dsts = [poisoned(s.shape, dtype) for s in srcs]
    step_write(dsts, 1, [s[1] for s in srcs])
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(d[1].view(torch.uint8), s[1].view(torch.uint8))
    flat = transpose_flatten(srcs)
    ref = ops.torch_flatten(srcs)
    for out, r in zip(flat, ref, strict=True):
        assert torch.equal(out.view(torch.uint8), r.view(torch.uint8))
    perm = torch.randperm(T * N)
    for out, r in zip(permuted_gather(ref, perm, 7, 7), ops.torch_gather(ref, perm, 7, 7),
                      strict=True):  # fmt: skip
        assert torch.equal(out.view(torch.uint8), r.view(torch.uint8))
