"""Shared pieces of the byte-moving kernels: word pointers, word widths, descriptor tables.

Every kernel here moves raw bytes. A key is copied in *units* of ``WB`` bytes (16, 8, 4, 2 or
1), the widest width that the row size, the strides and both base addresses allow, so one
kernel serves every dtype and a float32 row of 16+ aligned bytes moves as 128-bit words.
A 16-byte unit is four int32 lanes laid out as a ``[n, 4]`` block: the compiler can prove
those four lanes contiguous and 16-byte aligned, which is what makes it emit
``ld.global.v4.b32`` / ``st.global.v4.b32`` (checked by ``python -m rollout_buffers.kernels.aot``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Bytes one program moves per key. 16 KiB = 8 x 16-byte words per thread at 4 warps: enough
# loads in flight per thread to cover DRAM latency, few enough registers that nothing spills,
# and a locomotion step (8.6 MB) still makes ~500 programs (~4 per SM on an H100).
BLOCK_BYTES = 16384
# Units handled per loop iteration: bounds the registers live at once (1024 units x 16 bytes
# = 32 data registers per thread at 4 warps) whatever the unit width.
CHUNK = 1024
NUM_WARPS = 4
# A kernel's integer divisions run in 32 bits (about 4x cheaper than 64-bit ones, which the
# GPU emulates) unless a key holds this many units or more.
I32_LIMIT = 2**31

# Descriptor tables built so far, keyed by their contents (device included): a hit is always a valid table.
# Bounded so that swap_and_flatten01 on many throwaway tensors cannot grow it without end.
_TABLES: dict[tuple, tuple] = {}
_TABLES_MAX = 256
# The step write's tables describe a buffer's own storages, which a captured CUDA graph keeps
# using: they live here, never evicted (one small table per set of buffers a process writes),
# so churn in the gather tables (new minibatch sources every epoch) cannot free them.
STEP_TABLES: dict[tuple, tuple] = {}
# Tables first built while a CUDA graph was being captured (see cached_table).
_CAPTURED: list[tuple] = []


@triton.jit
def unit_ptrs(base, uoff, WB: tl.constexpr):
    """Pointers ``[n, V]`` to the units ``uoff`` (int64 ``[n]``) of a region at ``base``.

    ``base`` is any pointer, aligned to ``WB`` bytes (the launchers guarantee it).
    """
    if WB == 16:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int32)), 16)
        o = (uoff * 4)[:, None] + tl.arange(0, 4)[None, :]
    elif WB == 8:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int64)), 8)
        o = uoff[:, None]
    elif WB == 4:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int32)), 4)
        o = uoff[:, None]
    elif WB == 2:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int16)), 2)
        o = uoff[:, None]
    else:
        p = base.to(tl.pointer_type(tl.int8))
        o = uoff[:, None]
    return p + o


@triton.constexpr_function
def pow2(k):
    """The smallest power of two >= k (a vector over the keys of a launch needs one)."""
    return 1 << max(k - 1, 0).bit_length()


@triton.jit
def tile_ptrs(base, o_r, o_c, WB: tl.constexpr):
    """Pointers ``[R, C, V]`` to units ``o_r[:, None] + o_c[None, :]`` of a region at ``base``
    (row offsets ``o_r`` and column offsets ``o_c`` in units): a row tile whose columns are a
    plain range, so a row moves as coalesced (for 16-byte units, 128-bit) accesses."""
    o = o_r[:, None] + o_c[None, :]
    if WB == 16:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int32)), 16)
        o = (o * 4)[:, :, None] + tl.arange(0, 4)[None, None, :]
    elif WB == 8:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int64)), 8)
        o = o[:, :, None]
    elif WB == 4:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int32)), 4)
        o = o[:, :, None]
    elif WB == 2:
        p = tl.multiple_of(base.to(tl.pointer_type(tl.int16)), 2)
        o = o[:, :, None]
    else:
        p = base.to(tl.pointer_type(tl.int8))
        o = o[:, :, None]
    return p + o


@triton.jit
def tile_vptrs(p, o_r, o_c, V: tl.constexpr):
    """:func:`tile_ptrs` for a typed pointer ``p`` and units of ``V`` elements (an element
    key, see ``_convert.py``): pointers ``[R, C, V]``; the caller states ``p``'s alignment."""
    o = o_r[:, None] + o_c[None, :]
    if V > 1:
        q = p + ((o * V)[:, :, None] + tl.arange(0, V)[None, None, :])
    else:
        q = p + o[:, :, None]
    return q


@triton.jit
def addr(a):
    """An int64 address loaded from a descriptor table, as a byte pointer."""
    return a.to(tl.pointer_type(tl.int8))


def vec_elems(sb: int, db: int, counts, src_addr: int = 0, dst_align: int = 16) -> int:
    """Elements per unit of an element key (one converted in-kernel): the widest power of two
    ``v`` with ``v`` elements of either side in 16 bytes, dividing every count (elements per
    row or step, strides in elements), with ``v * sb`` dividing the source address and
    ``v * db`` the destination's alignment (``src_addr`` 0 where loads are scalar)."""
    v = 16 // max(sb, db)
    while v > 1 and (any(c % v for c in counts) or src_addr % (v * sb) or dst_align % (v * db)):
        v //= 2
    return v


def word_bytes(*values: int) -> int:
    """The widest unit (16, 8, 4, 2 or 1 bytes) dividing every value (sizes, strides, addresses)."""
    x = 16
    for v in values:
        x |= v
    return x & -x


def dense_rows(t: torch.Tensor, start: int) -> bool:
    """Whether dims ``start..`` of ``t`` are laid out densely (each row is one byte string)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[start:]), reversed(t.stride()[start:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def n_programs(nbytes: int) -> int:
    return -(-nbytes // BLOCK_BYTES)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_tiles(row_bytes: int, wb: int, depth: int = 1) -> tuple[int, int, int, int]:
    """How a program copies rows of ``row_bytes`` bytes in ``wb``-byte units.

    Returns ``(RU, R, CB, NT)``: ``RU`` units per row, tiles of ``R`` rows x ``CB`` columns
    (``ceil(RU / CB)`` column blocks per row, ``R * CB <= CHUNK`` units at a time: the
    registers' bound) and ``NT`` tiles per program, so that a program moves about
    ``BLOCK_BYTES``. A gather (``depth`` 1) takes the power-of-two ``CB`` that wastes the
    fewest lanes in at most 16 blocks (ties: the wider) and ``R = CHUNK // CB``. A transpose
    walks ``depth`` rows per tile row; a row is one block when it fits ``CHUNK`` units, and
    ``R = CHUNK // CB`` too.
    """
    ru = row_bytes // wb
    if ru == 0:  # rows of no bytes: nothing to copy, no programs
        return 0, 1, 1, 1
    if depth == 1:
        cb, lanes = 1, None
        b = min(next_pow2(ru), CHUNK)
        while b >= 1 and -(-ru // b) <= 16:
            n = -(-ru // b) * b
            if lanes is None or n < lanes:
                cb, lanes = b, n
            b //= 2
        r = CHUNK // cb
    else:
        # A transpose program walks all `depth` rows of its R columns: a tile of CHUNK units
        # per step keeps every thread busy (a static check of the sm_90 build: 45 instructions
        # per 940-byte row with R=1, 0.096 per byte moved, against ~0.03 with R=4).
        cb = min(next_pow2(ru), CHUNK)
        r = max(CHUNK // cb, 1)
    nt = max(1, BLOCK_BYTES // max(r * depth * row_bytes, 1))
    return ru, r, cb, nt


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when these modules are
# imported: kernels built for the interpreter must never see CUDA tensors (they would read the
# device addresses in a descriptor table from host memory and crash the process).
_INTERPRETED = interpreter()


def cached_table(key: tuple, build, store: dict | None = None, cols: int = 8):
    """A descriptor table on the device, built once per distinct ``key``.

    ``key`` must identify the table's contents (device, pointers, shapes, strides, dtypes), so
    a hit is always a valid table even after a storage is freed and its address reused.
    ``build()`` returns ``(device, rows, extra)``: ``rows`` become an int64 ``[len(rows), cols]``
    tensor on ``device``; ``extra`` is whatever host-side facts the launcher wants kept with it.
    Returns ``(table, extra, host_copy)``. The copy to the device goes through pinned memory,
    non-blocking, so a miss does not synchronize the host either (the pinned buffer lives as
    long as the entry). ``store`` is the cache to use: the shared, bounded one by default, or
    :data:`STEP_TABLES`, which is never evicted.
    """
    bounded = store is None
    store = _TABLES if bounded else store
    hit = store.get(key)
    if hit is not None:
        return hit
    device, rows, extra = build()
    if device.type == "cuda" and _INTERPRETED:
        raise RuntimeError(
            "rollout_buffers.kernels was imported with TRITON_INTERPRET=1 (Triton's CPU "
            f"interpreter) and cannot run on {device} tensors; unset TRITON_INTERPRET before "
            "the first import, or use backend 'torch'"
        )
    if bounded and len(store) >= _TABLES_MAX:
        store.clear()
    host = torch.tensor(
        [list(r) + [0] * (cols - len(r)) for r in rows], dtype=torch.int64, device="cpu"
    )  # on the host, whatever default device a context sets
    capturing = False
    if device.type == "cuda":
        host = host.pin_memory()
        with torch.cuda.device(device):
            capturing = torch.cuda.is_current_stream_capturing()
            dev = host.to(device, non_blocking=True)
    else:
        dev = host
    entry = (dev, extra, host)
    if capturing:
        # Under CUDA-graph capture the copy above is recorded, not run: the table fills only
        # when the graph replays. Keep it alive for the graph; never serve it to eager calls.
        _CAPTURED.append(entry)
        return entry
    store[key] = entry
    return entry


# ---------------------------------------------------------------------------------------------
# Launch plans: Triton's compiled launcher, called directly
# ---------------------------------------------------------------------------------------------
#
# ``kernel[grid](...)`` costs ~8 us of host time before the driver sees anything (binding,
# specialization, the cache key, a re-check of every global the kernel reads, launch metadata
# for the profiler hooks): more than the GPU needs for a whole rollout step. Once a launch has
# been compiled, everything that decides which compiled kernel runs is known to the caller, so
# the caller keeps a LaunchPlan under a key that pins it (constexprs, the 16-byte alignment of
# every pointer, the integer arguments Triton specializes on) and replays the compiled
# kernel's launcher with the runtime arguments only. The arguments and their order are exactly
# what ``JITFunction.run`` passes (the same call in triton 3.6 and 3.9; tests/test_launch_plan.py
# checks it against Triton's own path under a stand-in driver), with pointers as ints.

try:  # launch hooks (profilers such as proton): when any is set, the generic path runs them
    from triton import knobs as _knobs

    _RUNTIME = _knobs.runtime
except ImportError:  # pragma: no cover - older triton
    _RUNTIME = None


def _hooks_idle() -> bool:
    r = _RUNTIME
    if r is None:
        return False
    enter, leave = r.launch_enter_hook, r.launch_exit_hook
    return (enter is None or not getattr(enter, "calls", True)) and (
        leave is None or not getattr(leave, "calls", True)
    )


class LaunchPlan:
    """One kernel launch with a fixed grid and fixed constexprs, replayed without Triton's binder.

    ``plan.direct(*args)`` launches with the runtime arguments (pointers as ints, tuples as
    tuples) and returns True, or returns False when the plan is not warm yet (the first call,
    Triton's CPU interpreter) or a launch hook is set: the caller then launches through
    ``plan.generic(*tensor_args)``, which is ``fn[grid](...)`` and warms the plan.
    """

    __slots__ = ("fn", "grid", "cx", "tail", "num_warps", "device", "run", "function", "meta",
                 "stream")  # fmt: skip

    def __init__(self, fn, grid: int, cx: dict, device: torch.device, num_warps: int = NUM_WARPS):
        self.fn, self.grid, self.cx, self.num_warps = fn, grid, cx, num_warps
        # Constexprs come last in every kernel of this package, in this order.
        names = list(fn.arg_names)
        self.tail = tuple(cx[n] for n in names[len(names) - len(cx) :])
        assert set(names[len(names) - len(cx) :]) == set(cx), (names, list(cx))
        self.device = device.index if device.type == "cuda" else None
        self.run = None

    def generic(self, *args) -> None:
        """Launch through ``fn[grid](...)`` (tensors for pointers); keep the compiled kernel."""
        args = tuple(map(_launch_arg, args))
        with device_guard_index(self.device):
            ck = self.fn[(self.grid,)](*args, **self.cx, num_warps=self.num_warps)
        if ck is not None and self.run is None and hasattr(ck, "packed_metadata"):
            from triton.runtime.driver import driver

            self.run, self.function, self.meta = ck.run, ck.function, ck.packed_metadata
            self.stream = driver.active.get_current_stream

    def direct(self, *args) -> bool:
        run = self.run
        if run is None or not _hooks_idle():
            return False
        dev = self.device
        if dev is None:  # a stand-in driver (tests): its own notion of the current device
            from triton.runtime.driver import driver

            run(self.grid, 1, 1, self.stream(driver.active.get_current_device()), self.function,
                self.meta, None, None, None, *args, *self.tail)  # fmt: skip
            return True
        # torch's own C entry points (what Triton's driver calls too), looked up per call so
        # that they follow whatever torch._C holds: launch on the tensors' device and its
        # current stream, whatever the current device is.
        c = torch._C
        prev = c._cuda_getDevice()
        if prev != dev:
            c._cuda_exchangeDevice(dev)
        try:
            run(self.grid, 1, 1, c._cuda_getCurrentRawStream(dev), self.function, self.meta,
                None, None, None, *args, *self.tail)  # fmt: skip
        finally:
            if prev != dev:
                c._cuda_exchangeDevice(prev)
        return True


def _launch_arg(a):
    """``a`` as Triton's binder takes it: it has no complex pointer type (its dtype table has no
    entry for ``complex64``), and the kernels move bytes, so a complex tensor goes in as its
    real view (the same address); a tuple of tensors element by element."""
    if type(a) is tuple:
        return tuple(map(_launch_arg, a))
    if isinstance(a, torch.Tensor) and a.is_complex():
        return torch.view_as_real(a.resolve_conj())
    return a


def device_guard_index(index: int | None):
    if index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(index)
