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
from conftest import DTYPES, bits, random_tensor
from rollout_buffers.kernels import _convert as C

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


# ---------------------------------------------------------------------------------------------
# Dtype conversion and strided sources (kernels/_convert.py)
# ---------------------------------------------------------------------------------------------

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PAIRS = [(s, d) for s in DTYPES for d in DTYPES if s != d and K.converts(s, d)]


def test_converts_names_exactly_the_pairs_the_kernels_match():
    for s in DTYPES:
        for d in DTYPES:
            want = s == d or not (s.is_floating_point and not d.is_floating_point)
            want = want or d == torch.bool  # x != 0, NaN included, as torch does
            assert K.converts(s, d) == want, (s, d)
    assert K.converts(torch.complex64, torch.complex64)
    assert not K.converts(torch.complex64, torch.float32)
    assert not K.converts(torch.float32, torch.complex64)
    assert not K.converts(torch.uint16, torch.int32)
    assert K.converts(torch.uint16, torch.uint16)


def special_values(dtype, n=256):
    """Random bit patterns (subnormals, huge values, infinities, NaNs) plus rounding ties and
    overflow edges for a float ``dtype``; random values of the whole range for an int one."""
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.tensor([0, 1, 2, 255], dtype=torch.uint8).view(torch.bool).repeat(n // 4)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, (n,), dtype=dtype, generator=g)
    ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    info = torch.iinfo(ib)
    x = torch.randint(info.min, info.max, (n,), dtype=ib, generator=g).view(dtype)
    edge = [0.0, -0.0, 1.0, 65504, 65519.99, 65520, 65536, 1e-40, 6e-8, 2**-25, 2**-24,
            2**-14, 3e38, 3.4028235e38, float("inf"), -float("inf"), float("nan"),
            1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-30, 1 + 2**-8, 1 + 3 * 2**-8]  # fmt: skip
    return torch.cat([x, torch.tensor(edge, dtype=torch.float64).to(dtype)])


def assert_converted(out, ref, src):
    """Bit for bit, except that a NaN only has to stay a NaN (its payload is the device's)."""
    if src.dtype.is_floating_point and out.dtype.is_floating_point:
        nan = torch.isnan(src.to(torch.float32)).reshape(out.shape)
        assert torch.isnan(out.to(torch.float32)[nan]).all()
        out, ref = out[~nan], ref[~nan]
    assert torch.equal(bits(out), bits(ref))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy casts of NaN and inf
@pytest.mark.parametrize("src_dtype", DTYPES, ids=str)
def test_step_write_converts_like_copy_bit_for_bit(src_dtype):
    # Every destination dtype the kernels convert this source to, in one launch: random bit
    # patterns, ties and edges, into keys of (N,) and (N, 2) (even: vector units) rows.
    dsts, srcs = [], []
    for d in DTYPES:
        if d != src_dtype and K.converts(src_dtype, d):
            for shape in ((), (2,)):
                n = special_values(src_dtype).shape[0] // max(math.prod(shape), 1)
                srcs.append(
                    special_values(src_dtype)[: n * max(math.prod(shape), 1)].view(n, *shape)
                )
                dsts.append(poisoned((T, n, *shape), d))
    before = [bits(d).clone() for d in dsts]  # raw bytes: a bool clone would read 0xA5 as 1
    step_write(dsts, 1, srcs)
    for a, b, s in zip(dsts, before, srcs, strict=True):
        assert torch.equal(bits(a)[0], b[0]) and torch.equal(bits(a)[2], b[2])  # untouched
        assert_converted(a[1], s.to(a.dtype), s)  # what dst[1] = s (copy_) gives


def test_step_write_narrows_float32_to_16_bits_with_nan_as_0x7fff():
    # The integer round to nearest even, on patterns of every exponent; a NaN of any sign and
    # payload becomes 0x7FFF (the canonical NaN of NVIDIA's cvt: what CUDA torch gives).
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**31), 2**31 - 1, (4096,), dtype=torch.int64, generator=g)
    x = x.to(torch.int32).view(torch.float32)
    nan_bits = torch.tensor([0x7F800001, 0x7FC00000, -1, -(2**22)], dtype=torch.int32)
    x = torch.cat([x, nan_bits.view(torch.float32)])
    for d in (torch.bfloat16, torch.float16):
        dst = poisoned((1, x.shape[0]), d)
        step_write([dst], 0, [x])
        nan = torch.isnan(x)
        assert torch.equal(bits(dst[0][~nan]), bits(x[~nan].to(d)))
        assert (bits(dst[0][nan]) == 0x7FFF).all()


def conversion_layouts(shape, dtype):
    """A source ``(N, *shape)`` of ``dtype`` as real training code passes one."""
    out = source_variants(shape, dtype, N)
    if len(shape) == 1:
        d = shape[0]
        out["column_of_wider"] = rand((N, 3 * d), dtype)[:, ::3]  # element stride 3
        out["expanded_column"] = rand((N, 1), dtype).expand(N, d)  # element stride 0
        out["slice_of_concat"] = rand((N, d + 5), dtype)[:, 2 : 2 + d]
        out["transposed"] = rand((d, N), dtype).t()
    elif not shape:
        out["column"] = rand((N, 3), dtype)[:, 1]  # x[:, 1] of an (N, 3) tensor
        out["squeezed"] = rand((N, 1), dtype).squeeze(-1)
        out["flattened"] = rand((1, N), dtype).flatten()
        out["scalar_expanded"] = rand((), dtype).expand(N)
    return out


@pytest.mark.parametrize(
    "pair",
    [(torch.float32, torch.float32), (torch.bool, torch.int64), (torch.float64, torch.float32),
     (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.int32, torch.float32),
     (torch.bfloat16, torch.float32), (torch.uint8, torch.int64)],
    ids=str,
)  # fmt: skip
def test_step_write_reads_strided_and_converted_sources_in_one_launch(pair, monkeypatch):
    src_dtype, dst_dtype = pair
    keys, srcs = [], []
    for shape in ((), (4,), (3,), (2, 3)):
        for name, src in conversion_layouts(shape, src_dtype).items():
            keys.append((shape, name))
            srcs.append(src)
    dsts = [rand((T, N, *s), dst_dtype) for s, _ in keys]
    refs = [d.clone() for d in dsts]
    launches = []
    real = K._common.LaunchPlan.generic
    monkeypatch.setattr(K._common.LaunchPlan, "generic",
                        lambda self, *a: launches.append(1) or real(self, *a))  # fmt: skip
    w = K.step_writer(dsts)
    for index in (T - 1, 0):
        w(index, srcs)
        ops.torch_write_step(refs, index, srcs)
    assert len(launches) == 2  # one launch per call, whatever the layouts and dtypes
    modes = {x[3] for x in next(iter(w.plans)) if len(x) == 8}  # element keys' layouts
    assert modes == ({0, 1, 2} if src_dtype != dst_dtype else {2})
    for key, a, b in zip(keys, dsts, refs, strict=True):
        assert torch.equal(bits(a), bits(b)), key


def test_step_write_replays_a_plan_per_layout_and_casts_unsupported_pairs_first():
    dsts = [rand((T, N, 4), torch.float32), rand((T, N), torch.int64)]
    cols = [rand((N, 12), torch.float64)[:, ::3] for _ in range(2)]
    dones = [rand((N,), torch.bool) for _ in range(2)]
    w = K.step_writer(dsts)
    w(0, [cols[0], dones[0]])
    ((layout, _),) = w.plans.items()
    assert [x[:4] for x in layout] == [(C.F64, C.F32, 2, 2), (C.B1, C.I64, 1, 0)]
    w(1, [cols[1], dones[1]])  # another call, the same layout: the same plan, found by looks
    assert len(w.plans) == 1 and len(w.seen) == 1
    for i in (0, 1):
        assert torch.equal(dsts[0][i], cols[i].float()) and torch.equal(dsts[1][i], dones[i].long())
    # float -> int is not converted in-kernel: the writer casts it with torch (as copy_ does).
    floats = rand((N,), torch.float64) * 100
    w(2, [cols[0], floats])
    assert torch.equal(dsts[1][2], floats.to(torch.int64))


@pytest.mark.parametrize("pair", PAIRS[::3], ids=str)
def test_step_write_converts_strided_multi_dim_rows_made_contiguous(pair):
    src_dtype, dst_dtype = pair
    src = rand((N, 3, 2), src_dtype).transpose(1, 2)  # rows of 2 dims, not dense
    dst = rand((T, N, 2, 3), dst_dtype)
    ref = dst.clone()
    step_write([dst], 1, [src])
    ops.torch_write_step([ref], 1, [src])
    assert torch.equal(bits(dst), bits(ref))


def widening_sources(dtype):
    """``(T, N, ...)`` storages of ``dtype``: time-major, env-major, strided, misaligned."""
    srcs = [rand((T, N, 4), dtype), rand((T, N), dtype), rand((N, T, 3), dtype).transpose(0, 1)]
    srcs.append(rand((T, 2 * N, 8), dtype)[:, ::2])  # env-strided: 128-bit units of 8
    srcs.append(rand((T * N * 3 + 1,), dtype)[1:].view(T, N, 3))  # misaligned
    srcs.append(rand((T, N, 3, 2), dtype))
    return srcs


OUT_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
             (torch.bfloat16, torch.float64), (torch.float32, torch.float32),
             (torch.float32, torch.bfloat16), (torch.bool, torch.float32),
             (torch.int32, torch.int64), (torch.float32, torch.int32)]  # fmt: skip


@pytest.mark.parametrize("pair", OUT_PAIRS, ids=str)
def test_transpose_flatten_serves_each_key_in_its_out_dtype(pair):
    src_dtype, out_dtype = pair
    srcs = widening_sources(src_dtype) + [rand((T, N, 2), torch.int64)]
    ods = [out_dtype] * (len(srcs) - 1) + [None]  # a byte key in the same launch
    outs = K.transpose_flatten(srcs, ods)
    refs = ops.torch_flatten(srcs, ods)
    for src, out, ref in zip(srcs, outs, refs, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
        assert torch.equal(bits(out), bits(ref)), (src.shape, src.stride())


@pytest.mark.parametrize("pair", OUT_PAIRS, ids=str)
def test_gather_serves_each_key_in_its_out_dtype_in_every_mode(pair):
    src_dtype, out_dtype = pair
    storages = widening_sources(src_dtype)
    k = len(storages)
    n = T * N
    flat = ops.torch_flatten(storages)
    perm = torch.randperm(n)
    ods = [out_dtype] * k
    for start, count in ((0, 7), (14, 7)):
        # ROWS (plus a shorter key, modulo), ENV_MAJOR straight from the storages.
        rows = K.gatherer(flat + [flat[0][:5]], [K.ROWS] * (k + 1), [n] * k + [5], n, count,
                          out_dtypes=ods + [None])  # fmt: skip
        want = ops.torch_gather(flat + [flat[0][:5]], perm, start, count, out_dtypes=ods + [None])
        env = K.gatherer(storages, [K.ENV_MAJOR] * k, [n] * k, n, count, out_dtypes=ods)
        for out, ref in zip(rows(perm, start) + env(perm, start), want + want[:k], strict=True):
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert torch.equal(bits(out), bits(ref))
    seq, first = 3, [i % 2 == 1 for i in range(k)]
    srcs = [rand((6, N, 3), src_dtype), rand((6, N), src_dtype)] * 2
    ids = torch.randperm(N * 2)
    g = K.gatherer(srcs, [K.CHUNKS] * 4, [0] * 4, N * 2, 5, seq=seq, first_step=first[:4],
                   out_dtypes=[out_dtype] * 4)  # fmt: skip
    refs = ops.torch_gather_chunks(srcs, first[:4], ids, 3, 5, seq, [out_dtype] * 4)
    for out, ref in zip(g(ids, 3), refs, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.equal(bits(out), bits(ref))


def test_ops_pass_out_dtypes_through_on_both_backends():
    storages = [rand((T, N, 4), torch.bfloat16), rand((T, N), torch.float16),
                rand((T, N, 2), torch.int64)]  # fmt: skip
    ods = [torch.float32, torch.float32, None]
    n = T * N
    perm = torch.randperm(n)
    got = {}
    for name in ("triton", "torch"):
        with backend.use_backend(name):
            flat = ops.flatten(storages, ods)
            lazy = ops.gatherer(storages, [ops.ENV_MAJOR] * 3, [n] * 3, n, 7, out_dtypes=ods)
            got[name] = (
                flat,
                ops.flattener(storages, ods)(),
                ops.gather(ops.flatten(storages), perm, 7, 7, out_dtypes=ods),
                lazy(perm, 7),
                ops.gather_chunks(
                    storages, [False, True, False], torch.randperm(N), 2, 3, 1, out_dtypes=ods
                ),  # fmt: skip
            )
    for a, b in zip(got["triton"], got["torch"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
    assert [o.dtype for o in got["torch"][0]] == [torch.float32, torch.float32, torch.int64]
    for i in (0, 1, 2, 3):
        for x, y in zip(got["triton"][i], got["torch"][i], strict=True):
            assert torch.equal(bits(x), bits(y))


def test_cpu_widening_gather_goes_through_its_temporary_in_chunks(monkeypatch):
    monkeypatch.setattr(ops, "_WIDEN_CHUNK", 64)  # a few rows per chunk
    src = rand((50, 5), torch.bfloat16)
    idx = torch.randperm(50)[:23]
    out = ops._select(src, idx, torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, src[idx].float())
