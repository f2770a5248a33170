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


@triton.jit
def addr(a):
    """An int64 address loaded from a descriptor table, as a byte pointer."""
    return a.to(tl.pointer_type(tl.int8))


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


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s device: Triton launches on the current device, not the tensor's."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when these modules are
# imported: kernels built for the interpreter must never see CUDA tensors (they would read the
# device addresses in a descriptor table from host memory and crash the process).
_INTERPRETED = interpreter()


def cached_table(key: tuple, build, store: dict | None = None):
    """A descriptor table on the device, built once per distinct ``key``.

    ``key`` must identify the table's contents (device, pointers, shapes, strides, dtypes), so
    a hit is always a valid table even after a storage is freed and its address reused.
    ``build()`` returns ``(device, rows, extra)``: ``rows`` become an int64 ``[len(rows), 8]``
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
    host = torch.tensor([list(r) + [0] * (8 - len(r)) for r in rows], dtype=torch.int64)
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
