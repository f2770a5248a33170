"""Dtype conversion inside the byte-moving kernels, bit for bit as PyTorch's ``dst.copy_(src)``.

A key whose source and destination dtypes differ (or whose source is read element by element:
a strided column) moves as *elements*, ``V`` at a time, instead of raw byte units: each element
is loaded in its source dtype, converted with :func:`cvt`, and stored in the destination dtype.
The launchers describe such a key by two small integer dtype codes (:data:`CODES`; integers,
not names: Triton 3.6 cannot compile a constexpr tuple holding strings) and pass them as
constexprs, so every pair compiles to straight-line code.

What matches PyTorch, and how (checked bit for bit under Triton's interpreter and built for
sm_80/sm_90 by ``kernels/aot.py``):

- identical dtypes: raw bits (the ``X*`` codes: no float ever touched);
- bool -> any int or float: ``x != 0`` as 0 / 1 (torch reads any nonzero byte as True);
- int -> int: sign or zero extension, truncation when narrower (C casts, as torch does);
- int -> float32 / float64: one round to nearest even (``cvt.rn``);
- anything -> bool: ``x != 0`` (NaN is True, -0.0 is False, as in torch);
- float -> float: widening is exact (bfloat16 by a 16-bit shift); float64 -> float32 by
  ``cvt.rn.f32.f64``; -> bfloat16 / float16 by an integer round to nearest even of the
  float32 bits. torch narrows float64 and integers to bfloat16 / float16 *through float32*
  (``c10::BFloat16(float)``, ``c10::Half(float)``): so do these kernels, double rounding
  included (``1 + 2**-11 + 2**-40`` becomes 1.0 in float16 in both, not ``1 + 2**-10``).

Why integers for the narrowing to 16 bits: Triton's interpreter rounds float32 -> bfloat16 and
-> float16 half-up, clamps overflow instead of giving inf and mishandles subnormals, so the
kernels' own conversion would be tested against nothing it does on the GPU. The integer round
is exact everywhere (every float32 bit pattern checked against torch in tests/test_kernels.py)
and costs a few integer instructions per element of a memory-bound copy.

NaN: a NaN stays a NaN, but its payload is not promised. Narrowed to 16 bits it becomes
``0x7FFF``, the canonical NaN of NVIDIA's ``cvt`` instructions, which is what CUDA torch's
``.to()`` gives; CPU torch gives ``0xFFFF`` (bfloat16, vectorized), ``0x7FC0`` (bfloat16,
scalar) or a sign-keeping quiet NaN (float16). float64 -> float32 and float16 -> float32 use
the hardware conversion (CUDA torch's own instruction: canonical NaN on the GPU; the
interpreter keeps a quiet payload). bfloat16 -> float32 keeps the payload (a shift, as torch).

Not converted in-kernel (:func:`converts` is False; the caller casts with torch first): float
-> integer (torch's result is undefined behaviour in C++ for NaN and out-of-range values and
differs between CPU and CUDA), complex, and the unsigned 16/32/64-bit dtypes (except between
identical dtypes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["converts", "code_of", "raw_code", "CODES"]

# The codes (the kernels compare against these literals; a module-level constant read inside a
# kernel would be re-checked by Triton on every launch). X*: raw bits of that many bytes.
B1, U8, I8, I16, I32, I64, F16, BF16, F32, F64, X8, X16, X32, X64 = range(1, 15)

#: The dtypes the kernels convert between, by code.
CODES = {
    torch.bool: B1,
    torch.uint8: U8,
    torch.int8: I8,
    torch.int16: I16,
    torch.int32: I32,
    torch.int64: I64,
    torch.float16: F16,
    torch.bfloat16: BF16,
    torch.float32: F32,
    torch.float64: F64,
}
_FLOATS = (F16, BF16, F32, F64)
#: A key's conversion constexprs (source code, destination code, elements per unit, bytes per
#: source and destination element) when it is copied as raw bytes instead.
BYTES_CV = (0, 0, 1, 1, 1)
_RAW = {1: X8, 2: X16, 4: X32, 8: X64}
_BYTES = {B1: 1, U8: 1, I8: 1, I16: 2, I32: 4, I64: 8, F16: 2, BF16: 2, F32: 4, F64: 8, X8: 1,
          X16: 2, X32: 4, X64: 8}  # fmt: skip


def code_of(dtype: torch.dtype) -> int | None:
    """The kernels' code of ``dtype`` (``None``: not converted in-kernel)."""
    return CODES.get(dtype)


def raw_code(dtype: torch.dtype) -> int | None:
    """The code that moves ``dtype``'s elements as raw bits (``None``: wider than 8 bytes)."""
    return _RAW.get(dtype.itemsize)


def converts(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether the kernels write ``src`` elements into ``dst`` in-kernel, bit for bit as
    ``dst_tensor.copy_(src_tensor)``. False: the caller casts with torch first (``src.to(dst)``).

    True for identical dtypes, bool -> anything, int -> int or float, float -> float or bool.
    """
    if src == dst:
        return True
    s, d = CODES.get(src), CODES.get(dst)
    if s is None or d is None:
        return False
    return not (s in _FLOATS and d not in _FLOATS and d != B1)


def storage_bytes(code: int) -> int:
    """Bytes per element of a code."""
    return _BYTES[code]


# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------


@triton.jit
def typed(base, C: tl.constexpr):
    """``base`` (any pointer) as a pointer to elements of code ``C``, in the type the kernels
    load and store them as: bool as uint8, bfloat16 and float16 as their uint16 bits (the
    interpreter has no bfloat16 arithmetic; a narrowed value is made as bits), raw codes as
    unsigned integers of their width. Codes: 1 bool, 2 uint8, 3 int8, 4 int16, 5 int32,
    6 int64, 7 float16, 8 bfloat16, 9 float32, 10 float64, 11-14 raw 1, 2, 4, 8 bytes."""
    if C == 9:
        p = base.to(tl.pointer_type(tl.float32))
    elif C == 10:
        p = base.to(tl.pointer_type(tl.float64))
    elif C == 6:
        p = base.to(tl.pointer_type(tl.int64))
    elif C == 5:
        p = base.to(tl.pointer_type(tl.int32))
    elif C == 4:
        p = base.to(tl.pointer_type(tl.int16))
    elif C == 3:
        p = base.to(tl.pointer_type(tl.int8))
    elif C == 14:
        p = base.to(tl.pointer_type(tl.uint64))
    elif C == 13:
        p = base.to(tl.pointer_type(tl.uint32))
    elif C == 7 or C == 8 or C == 12:
        p = base.to(tl.pointer_type(tl.uint16))
    else:  # 1 bool, 2 uint8, 11 raw bytes
        p = base.to(tl.pointer_type(tl.uint8))
    return p


@triton.jit
def _bf16_of_f32(u):
    # Round to nearest even on the float32 bits: add 0x7FFF plus the lowest kept bit, keep the
    # top 16. Carries run into the exponent as they should (max float32 -> inf).
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FFF, r).to(tl.uint16)


@triton.jit
def _f16_of_f32(u):
    a = u & 0x7FFFFFFF
    # Normal float16 range [2**-14, 65520): rebias the exponent (127 -> 15, i.e. -112 << 10)
    # after rounding away 13 bits to nearest even.
    h_n = ((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10)
    # Below 2**-14: a subnormal m * 2**-24, m = |x| * 2**24 = mant >> (126 - e) rounded to
    # nearest even (the implicit bit made explicit; any shift past 24 leaves 0).
    e = a >> 23
    sh = tl.minimum(126 - e, 31)
    m = (a & 0x7FFFFF) | 0x800000
    q = m >> sh
    # The dropped bits moved to the top: m's bit 0 is dropped with sh >= 14, so the top word
    # is even and its half avoids 0x80000000 (wider than int32) by one more shift.
    rem = (m << (32 - sh)) >> 1
    h_s = q + ((rem + (q & 1)) > 0x40000000).to(tl.uint32)
    h = tl.where(a < 0x38800000, h_s, tl.where(a < 0x477FF000, h_n, 0x7C00))
    h = h | ((u >> 16) & 0x8000)
    return tl.where(a > 0x7F800000, 0x7FFF, h).to(tl.uint16)


@triton.jit
def _narrow16(f, D: tl.constexpr):
    """float32 values -> the bits of bfloat16 (``D`` 8) or float16 (7), nearest even."""
    u = f.to(tl.uint32, bitcast=True)
    if D == 8:
        h = _bf16_of_f32(u)
    else:
        h = _f16_of_f32(u)
    return h


@triton.jit
def cvt(x, S: tl.constexpr, D: tl.constexpr):
    """Elements ``x`` loaded through ``typed(p, S)``, converted to what ``typed(q, D)`` stores
    (codes as in :func:`typed`)."""
    if S == D:
        y = x
    elif D == 1:  # -> bool: x != 0 (floats compared as float32: -0.0 is False, NaN True)
        if S == 8:
            x = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        elif S == 7:
            x = x.to(tl.float16, bitcast=True).to(tl.float32)
        y = tl.where(x != 0, 1, 0).to(tl.uint8)
    elif (
        D == 7 or D == 8 or D == 9 or D == 10
    ):  # -> a float: the value as float32 first (float64 for a float64 destination)
        if S == 1:
            x = tl.where(x != 0, 1, 0)
        if S == 8:
            f = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        elif S == 7:
            f = x.to(tl.float16, bitcast=True).to(tl.float32)
        elif D == 10:
            f = x.to(tl.float64)
        else:
            f = x.to(tl.float32)
        if D == 7 or D == 8:
            y = _narrow16(f, D)
        elif D == 10:
            y = f.to(tl.float64)
        else:
            y = f
    else:  # -> an integer, from an integer or bool: extended or truncated as C casts
        if S == 1:
            x = tl.where(x != 0, 1, 0)
        if D == 6:
            y = x.to(tl.int64)
        elif D == 5:
            y = x.to(tl.int32)
        elif D == 4:
            y = x.to(tl.int16)
        elif D == 3:
            y = x.to(tl.int8)
        else:
            y = x.to(tl.uint8)
    return y
