"""Generalized advantage estimation (GAE) as one Triton launch.

The recurrence runs backwards in time, per column (one column = one env, or one (env, k) pair
for a value head of width k):

    delta[t] = r[t] + gamma * nv[t] - v[t]
    adv[t]   = delta[t] + gamma * lam * (1 - d[t]) * adv[t + 1]      (adv[T] = 0)
    ret[t]   = adv[t] + v[t]

Columns are independent, so each program owns a block of ``BC`` columns and walks all of time.
Two variants:

- ``walk``: one time step per loop iteration. Simple, but every iteration stores before the next
  one loads, and the compiler cannot hoist a load above a store that may alias it, so each step
  costs about one memory latency: few bytes in flight per program.
- ``scan``: ``BT`` steps per iteration. The whole ``[BT, BC]`` tile is loaded first (BT x more
  bytes in flight), the recurrence inside the tile is an associative scan over affine maps
  ``x -> d + c * x`` (composition is associative), and the carry from the later chunk is applied
  afterwards. Same arithmetic count up to the scan's log factor; memory-bound either way.

``auto`` picks ``scan``. That choice is reasoned, not measured (the kernels were written without
a GPU at hand): ``bench/bench_gae.py`` times both variants on CUDA, so rerun it and revisit
:func:`_pick_variant` with numbers.

Arithmetic is in fp32 whatever the storage dtype (fp64 when the values are fp64); bf16 / fp16
loads are converted before any arithmetic (also required by Triton's CPU interpreter).
Offsets are int64: a (T, N, k) rollout can pass 2**31 elements.

Inputs arrive validated by :func:`rollout_buffers.gae.compute_gae`; the launcher checks nothing
but the memory layout it needs.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gae", "aot_specs", "aot_num_warps"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _col(o_c, K: tl.constexpr):
    # Column offset inside one time row. K > 1: the tensor is (T, N) broadcast over a value
    # head of width K, so column (n, j) reads element n. The branch keeps o_c // 1 out of the
    # IR so the axis analysis still sees a plain arange: contiguous, coalesced rows.
    if K != 1:
        o_c = o_c // K
    return o_c


@triton.jit
def _ld(p, o, m, F64: tl.constexpr):
    # Load, then convert to the accumulation dtype before any arithmetic.
    b = tl.load(p + o, mask=m, other=0)
    if F64:
        b = b.to(tl.float64)
    else:
        b = b.to(tl.float32)
    return b


@triton.jit
def _st(p, o, x, m, RNE_BF16: tl.constexpr):
    # Triton's interpreter (3.9) converts fp32 -> bf16 by truncation; GPUs round to nearest
    # even (cvt.rn.bf16.f32). Under the interpreter, round in integer arithmetic instead so
    # the CPU tests see what a GPU writes (NaN payloads aside).
    if RNE_BF16:
        if p.dtype.element_ty == tl.bfloat16:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            x = b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(p + o, x, mask=m)


@triton.jit
def _affine(c_a, d_a, c_b, d_b):
    # Compose x -> d_a + c_a * x (applied first: the later time step) with x -> d_b + c_b * x.
    return c_a * c_b, d_b + c_b * d_a


@triton.jit
def _factors(g_hi, g_lo, gl_hi, gl_lo, F64: tl.constexpr, BC: tl.constexpr):
    """gamma, gamma * lam and a zero block of BC columns, in the accumulation dtype.

    The factors arrive as an fp32 pair (hi + lo): Triton passes Python floats as fp32, and the
    pair keeps ~48 bits for fp64 inputs. fp32 needs only hi.
    """
    if F64:
        g = tl.cast(g_hi, tl.float64) + tl.cast(g_lo, tl.float64)
        gl = tl.cast(gl_hi, tl.float64) + tl.cast(gl_lo, tl.float64)
        zero = tl.zeros([BC], dtype=tl.float64)
    else:
        g = g_hi
        gl = gl_hi
        zero = tl.zeros([BC], dtype=tl.float32)
    return g, gl, zero


@triton.jit
def _gae_walk_kernel(
    p_r, p_v, p_nv, p_d, p_adv, p_ret,
    T, C,
    s_r, s_v, s_nv, s_d, s_adv, s_ret,
    g_hi, g_lo, gl_hi, gl_lo,
    K_R: tl.constexpr, K_D: tl.constexpr, F64: tl.constexpr, RNE_BF16: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    i_c = tl.program_id(0).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_cr = _col(o_c, K_R)
    o_cd = _col(o_c, K_D)
    g, gl, b_adv = _factors(g_hi, g_lo, gl_hi, gl_lo, F64, BC)
    for i_t in range(0, T):
        o_t = (T - 1 - i_t).to(tl.int64)
        b_r = _ld(p_r, o_t * s_r + o_cr, m_c, F64)
        b_v = _ld(p_v, o_t * s_v + o_c, m_c, F64)
        b_nv = _ld(p_nv, o_t * s_nv + o_c, m_c, F64)
        b_d = _ld(p_d, o_t * s_d + o_cd, m_c, F64)
        b_adv = b_r + g * b_nv - b_v + gl * (1 - b_d) * b_adv
        _st(p_adv, o_t * s_adv + o_c, b_adv, m_c, RNE_BF16)
        _st(p_ret, o_t * s_ret + o_c, b_adv + b_v, m_c, RNE_BF16)


@triton.jit
def _gae_scan_kernel(
    p_r, p_v, p_nv, p_d, p_adv, p_ret,
    T, C,
    s_r, s_v, s_nv, s_d, s_adv, s_ret,
    g_hi, g_lo, gl_hi, gl_lo,
    K_R: tl.constexpr, K_D: tl.constexpr, F64: tl.constexpr, RNE_BF16: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    i_c = tl.program_id(0).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_cr = _col(o_c, K_R)[None, :]
    o_cd = _col(o_c, K_D)[None, :]
    o_cv = o_c[None, :]
    g, gl, b_carry = _factors(g_hi, g_lo, gl_hi, gl_lo, F64, BC)
    # Row i of a chunk is time t0 - i: rows run backwards in time, so a plain forward scan
    # (no `reverse=`, no flip) follows the recurrence. The last chunk is partial at t < 0;
    # its masked rows come after every valid row in scan order and cannot affect them.
    o_i = tl.arange(0, BT)
    for i_k in range(0, tl.cdiv(T, BT)):
        n_valid = tl.minimum(T - i_k * BT, BT)
        o_t = (T - 1 - i_k * BT - o_i).to(tl.int64)[:, None]
        m = (o_t >= 0) & m_c[None, :]
        b_r = _ld(p_r, o_t * s_r + o_cr, m, F64)
        b_v = _ld(p_v, o_t * s_v + o_cv, m, F64)
        b_nv = _ld(p_nv, o_t * s_nv + o_cv, m, F64)
        b_d = _ld(p_d, o_t * s_d + o_cd, m, F64)
        b_delta = b_r + g * b_nv - b_v
        b_coef = gl * (1 - b_d)
        # After the scan, row i maps the carry (adv just after this chunk) to adv at row i.
        b_c, b_e = tl.associative_scan((b_coef, b_delta), 0, _affine)
        b_adv = b_e + b_c * b_carry[None, :]
        _st(p_adv, o_t * s_adv + o_cv, b_adv, m, RNE_BF16)
        _st(p_ret, o_t * s_ret + o_cv, b_adv + b_v, m, RNE_BF16)
        # The next (earlier) chunk continues from the earliest valid row of this one. A masked
        # sum picks that row exactly (the other terms are zeros).
        b_carry = tl.sum(tl.where(o_i[:, None] == n_valid - 1, b_adv, 0), axis=0)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

VARIANTS = ("auto", "scan", "walk")


def _block_cols(C: int) -> int:
    """Columns per program: the grid is only cdiv(C, BC) wide, since each program walks all of
    time. Stay at one warp (32 columns) until there are ~512 programs (about 4 per SM on a
    132-SM H100), then widen the blocks up to 256 columns."""
    return min(256, max(32, triton.next_power_of_2(C // 512)))


def _num_warps(BC: int) -> int:
    """One warp per 32 columns, at most 4: a thread owns one column (or two at BC = 256) and,
    in the scan, every row of it, so the scan over time never leaves the thread."""
    return max(1, min(4, BC // 32))


def _block_rows(T: int, BC: int) -> int:
    """Time steps per chunk of the scan variant: ~16 elements per thread per tensor (a [16, 32]
    tile on one warp, [8, 256] on four), enough loads in flight without spilling on sm_80/90."""
    per_thread_cols = BC // (32 * _num_warps(BC))
    return max(2, min(16 // per_thread_cols, triton.next_power_of_2(T)))


def _pick_variant(T: int, C: int) -> str:
    # Unmeasured default (see the module docstring): the scan keeps BT x more loads in flight.
    return "scan"


def _dense_rows(x: Tensor) -> Tensor:
    """``x`` if each time row ``x[t]`` is one dense run of memory (any time stride), else a
    contiguous copy. Only unusual views (e.g. ``v[..., 0]`` of a wider head) pay the copy."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return x.contiguous()
        expected *= size
    return x


def _as_loadable(x: Tensor) -> Tensor:
    # bool storage is one byte of 0/1: read it as uint8 (a view, no copy).
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def _split(x: float) -> tuple[float, float]:
    """``x`` as fp32 hi + lo, so the kernel can rebuild it in fp64 to ~48 bits."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    dones: Tensor,
    adv: Tensor,
    ret: Tensor,
    gamma: float,
    lam: float,
    variant: str = "auto",
) -> None:
    """Write GAE advantages into ``adv`` and returns into ``ret`` in one launch.

    ``values``, ``next_values``, ``adv``, ``ret``: shape (T, N) or (T, N, k); ``rewards`` and
    ``dones``: the same, or (T, N) broadcast over k. ``adv`` and ``ret`` must have dense time
    rows (the caller passes contiguous tensors); inputs that do not are copied.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown GAE variant {variant!r}: expected one of {VARIANTS}")
    T, C = values.shape[0], values[0].numel()
    if T == 0 or C == 0:
        return
    k = values.shape[2] if values.dim() == 3 else 1
    r, v, nv, d = (_as_loadable(_dense_rows(x)) for x in (rewards, values, next_values, dones))
    g_hi, g_lo = _split(gamma)
    gl_hi, gl_lo = _split(gamma * lam)
    BC = _block_cols(C)
    meta = dict(
        K_R=k if r.dim() < v.dim() else 1,
        K_D=k if d.dim() < v.dim() else 1,
        F64=values.dtype == torch.float64,
        RNE_BF16=values.device.type == "cpu",  # CPU tensors in Triton: the interpreter
        BC=BC,
        num_warps=_num_warps(BC),
    )
    if variant == "auto":
        variant = _pick_variant(T, C)
    if variant == "scan":
        fn, meta["BT"] = _gae_scan_kernel, _block_rows(T, BC)
    else:
        fn = _gae_walk_kernel
    args = (r, v, nv, d, adv, ret, T, C)
    strides = tuple(x.stride(0) for x in (r, v, nv, d, adv, ret))
    grid = (triton.cdiv(C, BC),)
    if values.device.type == "cuda":
        # Triton launches on the current device, not the tensors' one: guard for cuda:1, ...
        with torch.cuda.device(values.device):
            fn[grid](*args, *strides, g_hi, g_lo, gl_hi, gl_lo, **meta)
    else:  # TRITON_INTERPRET=1 on CPU tensors
        fn[grid](*args, *strides, g_hi, g_lo, gl_hi, gl_lo, **meta)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time builds
# ---------------------------------------------------------------------------------------------


def _signature(fn, r: str, v: str, d: str, out: str) -> dict[str, str]:
    types = {"p_r": f"*{r}", "p_v": f"*{v}", "p_nv": f"*{v}", "p_d": f"*{d}"}
    types |= {"p_adv": f"*{out}", "p_ret": f"*{out}", "T": "i32", "C": "i32"}
    types |= {s: "i32" for s in ("s_r", "s_v", "s_nv", "s_d", "s_adv", "s_ret")}
    types |= {s: "fp32" for s in ("g_hi", "g_lo", "gl_hi", "gl_lo")}
    types |= {s: "constexpr" for s in ("K_R", "K_D", "F64", "RNE_BF16", "BT", "BC")}
    return {a: types[a] for a in fn.arg_names}  # in the kernel's argument order


def aot_specs() -> list[tuple[object, dict[str, str], dict[str, object], str]]:
    """The specializations an ahead-of-time build should compile: (kernel, signature,
    constexprs, name) for ``triton.compile(ASTSource(fn, signature, constexprs), target=...)``.

    Compile each with ``num_warps=aot_num_warps(constexprs)``, the value the launcher uses.
    Covers both variants for fp32 / bf16 / fp16 / fp64 storage, bool (as u8) / int64 / fp32
    dones, a value head of width 2 with (T, N) rewards and dones, and the widest column block.
    """
    cases = [
        # (tag, rewards, values, dones, outputs, K_R, K_D, BC)
        ("fp32", "fp32", "fp32", "u8", "fp32", 1, 1, 32),
        ("fp32_i64dones", "fp32", "fp32", "i64", "fp32", 1, 1, 32),
        ("fp32_f32dones_k2", "fp32", "fp32", "fp32", "fp32", 2, 2, 32),
        ("fp32_wide", "fp32", "fp32", "u8", "fp32", 1, 1, 256),
        ("bf16", "bf16", "bf16", "u8", "bf16", 1, 1, 32),
        ("fp16", "fp16", "fp16", "u8", "fp16", 1, 1, 32),
        ("fp64", "fp64", "fp64", "u8", "fp64", 1, 1, 32),
    ]
    specs = []
    for tag, r, v, d, out, k_r, k_d, bc in cases:
        common = {"K_R": k_r, "K_D": k_d, "F64": v == "fp64", "RNE_BF16": False, "BC": bc}
        sig = _signature(_gae_walk_kernel, r, v, d, out)
        specs.append((_gae_walk_kernel, sig, dict(common), f"gae_walk_{tag}"))
        sig = _signature(_gae_scan_kernel, r, v, d, out)
        bt = _block_rows(1 << 30, bc)
        specs.append((_gae_scan_kernel, sig, common | {"BT": bt}, f"gae_scan_{tag}"))
    return specs


def aot_num_warps(constexprs: dict[str, object]) -> int:
    """``num_warps`` for one spec of :func:`aot_specs` (it depends on the column block)."""
    return _num_warps(int(constexprs["BC"]))
