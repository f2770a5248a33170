"""Compile every kernel specialization ahead of time, for sm_80 and sm_90, without a GPU.

    python -m rollout_buffers.kernels.aot      (make aot)

Builds each kernel for every unit width (16, 8, 4, 2, 1 bytes) and mode flag a launcher can
pick, plus multi-key variants and the dtype conversions (``_convert.py``: narrowing step
writes, widening flattens and gathers in every mode, strided sources), with ``triton.compile``
and an explicit ``GPUTarget``; reads registers, stack and local memory from the cubin
(``cuobjdump -res-usage``) and the vector widths and 64-bit address arithmetic from the PTX.
Prints one row per kernel and exits non-zero on a compile error, on any spill (local memory or
stack in use), on 16-byte units not moved as 128-bit accesses, or on a conversion variant whose
loads or stores are narrower than its units (e.g. a float32 -> bfloat16 unit of 4 elements:
128-bit loads, 64-bit stores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("TRITON_INTERPRET", None)

ARCHS = (80, 90)
WIDTHS = (16, 8, 4, 2, 1)


def _tiles(row_bytes: int, wb: int, steps: int = 1):
    """(units per row, tile rows, column block, tiles per program) as the launchers pick them."""
    from ._common import row_tiles

    return row_tiles(row_bytes, wb, steps)


# Row sizes of the workloads (bytes): a scalar, a locomotion action (48), an observation (940),
# a humanoid target pose (5760): each at every unit width that divides it.
ROW_BYTES = (4, 48, 940, 5760, 16, 8, 2, 1)


# Conversion variants: the narrowest load and store (bits) their units must compile to.
EXPECT: dict[str, tuple[int, int]] = {}


def _variants():
    """(label, kernel module, kernel name, signature, constexprs, num_warps) for every
    specialization."""
    from ._common import BLOCK_BYTES, CHUNK
    from ._convert import BYTES_CV, CODES, storage_bytes

    common = {"BB": BLOCK_BYTES, "CH": CHUNK}
    out = []

    def sw(label, wbs, flats, i32s, cvs=None):
        # cvs: per key None (bytes) or (source dtype, destination dtype, V, mode: 0 flat,
        # 1 rows, 2 elements).
        k = len(wbs)
        cvs = cvs or (None,) * k
        cv, n_s = [], k
        for i, c in enumerate(cvs):
            if c is None:
                cv.append(BYTES_CV + (0, i))
            else:
                sc, dc = CODES[c[0]], CODES[c[1]]
                j = n_s if c[3] == 2 else i  # where its element stride is (ELEMS only)
                cv.append((sc, dc, c[2], storage_bytes(sc), storage_bytes(dc), c[3], j))
                n_s += c[3] == 2
        sig = {"tab": "*i64", "srcs": ("*i8",) * k, "s_us": ("i64",) * n_s, "index": "i32"}
        cx = {"K": k, "WB": wbs, "FLAT": flats, "I32": i32s, "CV": tuple(cv), **common}
        out.append((label, "step_write", "_step_write_kernel", sig, cx, 4))

    def conv(c, n_el):
        """(constexprs of a conversion, output row bytes, output unit bytes) for rows of n_el
        elements."""
        if c is None:
            return BYTES_CV, None, None
        sc, dc = CODES[c[0]], CODES[c[1]]
        db = storage_bytes(dc)
        return (sc, dc, c[2], storage_bytes(sc), db), n_el * db, c[2] * db

    def tf(label, keys):  # keys: (wb, row bytes, i32[, (src, dst, V)]): bytes or converted
        k = len(keys)
        sig = {"tab": "*i64", "outs": ("*i8",) * k}
        cvs, tiles = [], []
        for wb, rb, _, *c in keys:
            cv, orb, ub = conv(c[0] if c else None, rb)
            cvs.append(cv)
            tiles.append(_tiles(rb, wb, steps=24) if ub is None else _tiles(orb, ub, steps=24))
        cx = {"K": k, "WB": tuple(w for w, *_ in keys), "I32": tuple(x[2] for x in keys)}
        cx.update(zip(("RU", "R", "CB", "NT"), map(tuple, zip(*tiles, strict=True))))
        cx["CV"] = tuple(cvs)
        out.append((label, "transpose_flatten", "_transpose_flatten_kernel", sig, cx, 4))

    def pg(label, keys):  # keys: (wb, row bytes, mode, mod, i32[, (src, dst, V)])
        k = len(keys)
        sig = {"tab": "*i64", "outs": ("*i8",) * k, "perm": "*i64", "start": "i32", "nb": "i32",
               "seq": "i32", "nc": "i32"}  # fmt: skip
        cvs, tiles = [], []
        for wb, rb, *rest in keys:
            c = rest[3] if len(rest) > 3 else None
            cv, orb, ub = conv(c, rb)
            cvs.append(cv)
            tiles.append(_tiles(rb, wb) if ub is None else _tiles(orb, ub))
        cx = {"K": k}
        cx.update(
            zip(("WB", "MODE", "MOD", "I32"), (tuple(x[i] for x in keys) for i in (0, 2, 3, 4)))
        )
        cx.update(zip(("RU", "R", "CB", "NT"), map(tuple, zip(*tiles, strict=True))))
        cx["CV"] = tuple(cvs)
        out.append((label, "permuted_gather", "_permuted_gather_kernel", sig, cx, 4))

    for w in WIDTHS:
        sw(f"step_write wb={w} flat", (w,), (True,), (True,))
        sw(f"step_write wb={w} rows", (w,), (False,), (True,))
        for rb in ROW_BYTES:
            if rb % w == 0 and rb // w <= 1440:
                tf(f"transpose_flatten wb={w} row={rb}", [(w, rb, True)])
                pg(f"permuted_gather wb={w} row={rb}", [(w, rb, 0, False, True)])
        pg(f"permuted_gather wb={w} mod", [(w, 16 * w, 0, True, True)])
        pg(f"permuted_gather wb={w} env-major", [(w, 48 if w <= 16 else w, 1, False, True)])
        pg(f"permuted_gather wb={w} chunks", [(w, 48 if w <= 16 else w, 2, False, True)])
    # 64-bit index arithmetic (keys of 2**31 units or more).
    sw("step_write wb=16 rows i64", (16,), (False,), (False,))
    tf("transpose_flatten wb=16 i64", [(16, 5760, False)])
    pg("permuted_gather wb=16 mod i64", [(16, 5760, 0, True, False)])
    pg("permuted_gather wb=16 env-major i64", [(16, 5760, 1, True, False)])
    pg("permuted_gather wb=16 chunks i64", [(16, 5760, 2, False, False)])
    # One launch over many keys of mixed widths and modes.
    n = len(WIDTHS)
    sw("step_write 5 keys mixed", WIDTHS, (True, False) * 2 + (True,), (True,) * n)
    tf("transpose_flatten 5 keys mixed", [(w, 48, True) for w in WIDTHS])
    pg("permuted_gather 5 keys mixed", [(w, 48, m % 3, m == 0, True) for m, w in enumerate(WIDTHS)])
    sw("step_write 16 keys", (16,) * 16, (True,) * 16, (True,) * 16)

    # Conversions (see _convert.py): each unit is V elements, at most 16 bytes of either side,
    # so the expected widths are V times each side's element. Rows counts are in elements for
    # the converted flatten / gather keys (the "row bytes" slot of tf / pg).
    import torch

    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    b1, i32, i64, u8 = torch.bool, torch.int32, torch.int64, torch.uint8

    def bits_of(dt, v):
        return 8 * dt.itemsize * v

    for src, dst, v in ((f32, bf16, 4), (f32, f16, 4), (f64, f32, 2), (bf16, f32, 4),
                        (f16, f32, 4), (b1, i64, 2), (i32, f32, 4), (u8, i64, 2),
                        (i64, bf16, 2), (f64, bf16, 2), (f32, b1, 4)):  # fmt: skip
        name = f"step_write {str(src)[6:]}->{str(dst)[6:]} flat v={v}"
        sw(name, (0,), (False,), (True,), ((src, dst, v, 0),))
        EXPECT[name] = (bits_of(src, v), bits_of(dst, v))
    # One-byte destinations store a byte at a time whatever the unit: Triton's coalescing gives
    # an i8 store of [1024, 4] one element per thread (a layout conversion through 2 KiB of
    # shared memory, as for the byte path's 1-byte units). float -> bool is a rare pair.
    EXPECT["step_write float32->bool flat v=4"] = (128, 8)
    sw("step_write f32->bf16 rows v=4", (0,), (False,), (True,), ((f32, bf16, 4, 1),))
    EXPECT["step_write f32->bf16 rows v=4"] = (128, 64)
    sw("step_write f32->bf16 flat v=4 i64", (0,), (False,), (False,), ((f32, bf16, 4, 0),))
    EXPECT["step_write f32->bf16 flat v=4 i64"] = (128, 64)
    # Strided sources: a column x[:, ::k] (element stride) loads one element at a time and
    # still stores V; a column x[:, 0] of an (N, 3) tensor is rows of one element.
    sw("step_write f32 strided cols v=4", (0,), (False,), (True,), ((f32, f32, 4, 2),))
    EXPECT["step_write f32 strided cols v=4"] = (32, 128)
    sw("step_write f64->f32 strided cols v=2", (0,), (False,), (True,), ((f64, f32, 2, 2),))
    EXPECT["step_write f64->f32 strided cols v=2"] = (64, 64)
    sw("step_write b1->i64 column v=1", (0,), (False,), (True,), ((b1, i64, 1, 1),))
    EXPECT["step_write b1->i64 column v=1"] = (8, 64)
    # The locomotion step as training code passes it: 10 byte keys, dones bool -> int64,
    # rewards float64 -> float32, the value a column, the actions a slice.
    sw(
        "step_write 12 keys, 4 converted/strided",
        (16, 16, 0, 16, 16, 4, 0, 4, 0, 0, 4, 4),
        (True, True, False, True, True, True, False, True, False, False, True, True),
        (True,) * 12,
        (None, None, (f32, f32, 4, 1), None, None, None, (f32, f32, 1, 2), None,
         (f64, f32, 2, 0), (b1, i64, 2, 0), None, None),
    )  # fmt: skip
    # Widening flatten and gathers (a bfloat16 / float16 storage served as float32): rows of
    # 48 and 235 elements and scalars.
    for src, dst, v in ((bf16, f32, 4), (f16, f32, 4), (bf16, f64, 2), (f32, bf16, 4)):
        tag = f"{str(src)[6:]}->{str(dst)[6:]}"
        for n_el, vv in ((48, v), (235, 1), (1, 1)):
            name = f"transpose_flatten {tag} row={n_el} v={vv}"
            tf(name, [(0, n_el, True, (src, dst, vv))])
            EXPECT[name] = (bits_of(src, vv), bits_of(dst, vv))
        for mode, mname in ((0, "rows"), (1, "env-major"), (2, "chunks")):
            name = f"permuted_gather {tag} {mname} v={v}"
            pg(name, [(0, 48, mode, False, True, (src, dst, v))])
            EXPECT[name] = (bits_of(src, v), bits_of(dst, v))
    pg("permuted_gather bf16->f32 mod i64", [(0, 5760 // 4, 0, True, False, (bf16, f32, 4))])
    EXPECT["permuted_gather bf16->f32 mod i64"] = (64, 128)
    pg("permuted_gather 4 keys, 2 widened", [(16, 48, 1, False, True), (0, 12, 1, False, True,
       (bf16, f32, 4)), (4, 4, 1, False, True), (0, 235, 1, False, True, (f16, f32, 1))])  # fmt: skip
    # GAE: one thread per column walking time, so its loads are 32-bit by design (coalesced
    # across the warp); no 128-bit check applies to it.
    from .gae import aot_num_warps, aot_specs

    for fn, sig, cx, name in aot_specs():
        out.append((name, "gae", fn.__name__, sig, cx, aot_num_warps(cx)))
    return out


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile(job):
    label, module, name, sig, cx, num_warps, arch = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"rollout_buffers.kernels.{module}"), name)
    sig = dict(sig, **{k: "constexpr" for k in cx})
    # Pointer arguments 16-byte aligned, as the caching allocator hands them out.
    attrs = {}
    for i, ty in enumerate(sig.values()):
        if isinstance(ty, tuple):
            attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(len(ty))})
        elif ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
        c = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
        )
    except Exception as e:  # noqa: BLE001 - reported, then the run fails
        return label, arch, None, f"{type(e).__name__}: {str(e)[:400]}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    use = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ptx = c.asm["ptx"]
    # Data accesses are the predicated ones (masked tails); the descriptor-table loads are not.
    data = [ln for ln in ptx.splitlines() if re.match(r"\s*@%p\d+ (ld|st)\.global", ln)]

    def bits(op):
        widths = [0]
        for ln in data:
            m = re.search(op + r"\.global(?:\.\w+)*?(?:\.v(\d))?\.[bsu](\d+)", ln)
            if m:
                widths.append(int(m.group(1) or 1) * int(m.group(2)))
        return max(widths)

    a64 = bool(re.search(r"\b(mul\.wide\.[su]32|m(ul|ad)\.lo\.s64|shl\.b64)\b", ptx))
    row = {
        "regs": int(use.get("REG", -1)),
        "spill": int(use.get("LOCAL", 0)) + int(use.get("STACK", 0)),
        "smem": c.metadata.shared,
        "ld": bits("ld"),
        "st": bits("st"),
        "a64": a64,
    }
    return label, arch, row, None


def main() -> int:
    t0 = time.time()
    jobs = [(*v, arch) for arch in ARCHS for v in _variants()]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
        results = list(ex.map(_compile, jobs))
    bad = 0
    w = max(len(r[0]) for r in results) + 1
    print(
        f"{'kernel':<{w}} {'arch':<6} {'regs':>5} {'spill':>6} {'smem':>6} "
        f"{'ld bits':>7} {'st bits':>7} {'addr64':>6}"
    )
    for label, arch, row, err in results:
        if err is not None:
            bad += 1
            print(f"{label:<{w}} sm_{arch:<3} COMPILE ERROR {err}")
            continue
        flag = ""
        if row["spill"]:
            bad += 1
            flag = "  <- SPILL"
        elif "wb=16" in label and min(row["ld"], row["st"]) < 128:
            bad += 1
            flag = "  <- 16-byte units not moved as 128-bit accesses"
        elif label in EXPECT and (row["ld"] < EXPECT[label][0] or row["st"] < EXPECT[label][1]):
            bad += 1
            flag = f"  <- units of {EXPECT[label]} bits (ld, st) moved narrower"
        print(
            f"{label:<{w}} sm_{arch:<3} {row['regs']:>5} {row['spill']:>6} {row['smem']:>6} "
            f"{row['ld']:>7} {row['st']:>7} {'yes' if row['a64'] else 'no':>6}{flag}"
        )
    print(f"{len(results)} builds in {time.time() - t0:.1f} s, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
