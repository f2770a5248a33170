"""Compile every kernel specialization ahead of time, for sm_80 and sm_90, without a GPU.

    python -m rollout_buffers.kernels.aot      (make aot)

Builds each kernel for every unit width (16, 8, 4, 2, 1 bytes) and mode flag a launcher can
pick, plus multi-key variants, with ``triton.compile`` and an explicit ``GPUTarget``; reads
registers, stack and local memory from the cubin (``cuobjdump -res-usage``) and the vector
widths and 64-bit address arithmetic from the PTX. Prints one row per kernel and exits
non-zero on a compile error or on any spill (local memory or stack in use).
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


def _variants():
    """(label, kernel module, kernel name, signature, constexprs, num_warps) for every
    specialization."""
    from ._common import BLOCK_BYTES, CHUNK

    common = {"BB": BLOCK_BYTES, "CH": CHUNK}
    out = []

    def sw(label, wbs, flats, i32s):
        k = len(wbs)
        sig = {"tab": "*i64", "srcs": ("*i8",) * k, "s_us": ("i64",) * k, "index": "i32"}
        cx = {"K": k, "WB": wbs, "FLAT": flats, "I32": i32s, **common}
        out.append((label, "step_write", "_step_write_kernel", sig, cx, 4))

    def tf(label, keys):  # keys: (wb, row bytes, i32)
        k = len(keys)
        sig = {"tab": "*i64", "outs": ("*i8",) * k}
        tiles = [_tiles(rb, wb, steps=24) for wb, rb, _ in keys]
        cx = {"K": k, "WB": tuple(w for w, _, _ in keys), "I32": tuple(i for _, _, i in keys)}
        cx.update(zip(("RU", "R", "CB", "NT"), map(tuple, zip(*tiles, strict=True))))
        out.append((label, "transpose_flatten", "_transpose_flatten_kernel", sig, cx, 4))

    def pg(label, keys):  # keys: (wb, row bytes, mode, mod, i32)
        k = len(keys)
        sig = {"tab": "*i64", "outs": ("*i8",) * k, "perm": "*i64", "start": "i32", "nb": "i32",
               "seq": "i32", "nc": "i32"}  # fmt: skip
        tiles = [_tiles(rb, wb) for wb, rb, *_ in keys]
        cx = {"K": k}
        cx.update(
            zip(("WB", "MODE", "MOD", "I32"), (tuple(x[i] for x in keys) for i in (0, 2, 3, 4)))
        )
        cx.update(zip(("RU", "R", "CB", "NT"), map(tuple, zip(*tiles, strict=True))))
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
    print(
        f"{'kernel':<36} {'arch':<6} {'regs':>5} {'spill':>6} {'smem':>6} "
        f"{'ld bits':>7} {'st bits':>7} {'addr64':>6}"
    )
    for label, arch, row, err in results:
        if err is not None:
            bad += 1
            print(f"{label:<36} sm_{arch:<3} COMPILE ERROR {err}")
            continue
        flag = ""
        if row["spill"]:
            bad += 1
            flag = "  <- SPILL"
        elif "wb=16" in label and min(row["ld"], row["st"]) < 128:
            bad += 1
            flag = "  <- 16-byte units not moved as 128-bit accesses"
        print(
            f"{label:<36} sm_{arch:<3} {row['regs']:>5} {row['spill']:>6} {row['smem']:>6} "
            f"{row['ld']:>7} {row['st']:>7} {'yes' if row['a64'] else 'no':>6}{flag}"
        )
    print(f"{len(results)} builds in {time.time() - t0:.1f} s, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
