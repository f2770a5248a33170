"""CPU paths: make_dict, minibatch gathers and step writes, rollout_buffers' PyTorch path against
the original and against candidate variants of ``rollout_buffers/ops.py``'s ``torch_*``.

- make_dict: ours (``ops.torch_flatten``: ``empty`` + ``copy_`` of the transposed view) vs the
  original (``transpose(0, 1).reshape``) vs ``transpose(0, 1).contiguous()``.
- minibatches, one mini-epoch (permutation drawn + every batch gathered, every key):
  ours (``ops.torch_gather``: ``index_select``) vs the original (NumPy permutation + per-key
  fancy indexing with ``rows % len``) vs ``src[idx]`` vs ``index_select(..., out=preallocated)``.
- step writes: ours (``ops.torch_write_step``, now ``dst[t] = src``) vs
  ``dst.select(t).copy_(src)``, the spelling it replaced.
The same variants are also swept over row widths (1 B .. 4 KiB). Median [p20, p80] over
repetitions, variants interleaved, inputs rotating. Writes bench/results/cpu_paths-cpu.md.

    python bench/cpu_paths.py [--repeats 15] [--cpu-max-mb 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import common as c  # noqa: E402
from bench import original  # noqa: E402
from rollout_buffers import ops  # noqa: E402

CPU = torch.device("cpu")
WIDTHS = {  # row bytes -> (trailing shape, dtype)
    1: ((), torch.bool),
    4: ((), torch.float32),
    8: ((), torch.int64),
    12: ((3,), torch.float32),
    16: ((4,), torch.float32),
    64: ((16,), torch.float32),
    256: ((64,), torch.float32),
    940: ((235,), torch.float32),
    4096: ((1024,), torch.float32),
}

# -- make_dict variants: list of (T, N, *shape) buffers -> list of (N*T, *shape) -------------------


def flatten_contiguous(bufs):
    return [b.transpose(0, 1).contiguous().view(-1, *b.shape[2:]) for b in bufs]


FLATTEN = {
    "ours: empty + copy_ (ops.torch_flatten)": ops.torch_flatten,
    "original: transpose.reshape": lambda bufs: [original.swap_and_flatten01(b) for b in bufs],
    "transpose.contiguous()": flatten_contiguous,
}

# -- gather variants: one mini-epoch over tensors (the longest has n rows), batch size B ----------


def _mod_indices(idx, tensors, n):
    """Per tensor, the batch's indices modulo its length (one remainder per distinct length)."""
    by_len = {n: idx}
    return [by_len.setdefault(t.shape[0], torch.remainder(idx, t.shape[0])) for t in tensors]


def epoch_ours(tensors, n, batch, outs=None):
    perm = torch.randperm(n)
    for s in range(0, n, batch):
        ops.torch_gather(tensors, perm, s, batch)


def epoch_fancy(tensors, n, batch, outs=None):
    perm = torch.randperm(n)
    for s in range(0, n, batch):
        [t[i] for t, i in zip(tensors, _mod_indices(perm[s : s + batch], tensors, n), strict=True)]


def epoch_out(tensors, n, batch, outs):
    perm = torch.randperm(n)
    for s in range(0, n, batch):
        for t, i, o in zip(
            tensors, _mod_indices(perm[s : s + batch], tensors, n), outs, strict=True
        ):
            torch.index_select(t, 0, i, out=o)


def epoch_original(tensors, n, batch, outs=None):
    perm = np.random.permutation(n)
    for s in range(0, n, batch):
        rows = perm[s : s + batch]
        [t[rows % len(t)] for t in tensors]


GATHER = {
    "ours: index_select (ops.torch_gather)": epoch_ours,
    "original: NumPy perm + v[rows % len]": epoch_original,
    "src[idx]": epoch_fancy,
    "index_select(out=preallocated)": epoch_out,
}

# -- step-write variants: every key at step t --------------------------------------------------------


def write_select_copy(dsts, t, srcs):
    for d, s in zip(dsts, srcs, strict=True):
        d.select(0, t).copy_(s)


WRITE = {
    "ours: dst[t] = src (ops.torch_write_step)": ops.torch_write_step,
    "dst.select(0, t).copy_(src)": write_select_copy,
}


def compare(variants: dict, make_call, repeats: int, bar) -> dict[str, dict]:
    """Interleaved stats of ``make_call(variant_fn)(rep)`` for every variant."""
    res = c.interleave({n: make_call(f) for n, f in variants.items()}, repeats, 2, CPU)
    bar.update(1)
    return {n: c.stats(v) for n, v in res.items()}


def workload_cases(w: dict, repeats: int, bar) -> dict[str, dict]:
    shapes = [(tuple(s["shape"]), c.DTYPES[s["dtype"]]) for s in w["keys"].values()]
    t, n = w["num_steps"], w["num_envs"]
    sets = c.pool_size(c.rollout_bytes(w))
    bufs = [[c.random_tensor((t, n, *sh), dt, CPU) for sh, dt in shapes] for _ in range(sets)]
    out = {"make_dict": compare(FLATTEN, lambda f: lambda r: f(bufs[r % sets]), repeats, bar)}

    extra = [
        c.random_tensor((s["rows"], *s["shape"]), c.DTYPES[s["dtype"]], CPU)
        for s in w["dataset_only_keys"].values()
    ]
    flat = [[*ops.torch_flatten(b), *extra] for b in bufs]
    rows, batch = n * t, n * t // w["num_minibatches"]
    outs = [torch.empty((batch, *x.shape[1:]), dtype=x.dtype) for x in flat[0]]
    out["minibatches (one mini-epoch)"] = compare(
        GATHER, lambda f: lambda r: f(flat[r % sets], rows, batch, outs), repeats, bar
    )

    steps = [[c.random_tensor((n, *sh), dt, CPU) for sh, dt in shapes] for _ in range(sets)]
    out["rollout writes (all steps)"] = compare(
        WRITE,
        lambda f: lambda r: [f(bufs[0], s, steps[(r + s) % sets]) for s in range(t)],
        repeats,
        bar,
    )
    return out


def width_case(width: int, repeats: int, bar, rows: int = 131072, max_bytes: int = 64 << 20):
    """make_dict and gather variants on one key of ``width``-byte rows (32 steps, ``rows`` rows
    or fewer to stay under ``max_bytes``)."""
    shape, dtype = WIDTHS[width]
    t, n = 32, min(rows, max_bytes // width) // 32
    sets = c.pool_size(t * n * width)
    bufs = [c.random_tensor((t, n, *shape), dtype, CPU) for _ in range(sets)]
    flat = [[b.reshape(t * n, *shape)] for b in bufs]
    batch = t * n // 4
    outs = [torch.empty((batch, *shape), dtype=dtype)]
    return {
        f"make_dict, {width} B rows": compare(
            FLATTEN, lambda f: lambda r: f([bufs[r % sets]]), repeats, bar
        ),
        f"minibatches, {width} B rows": compare(
            GATHER, lambda f: lambda r: f(flat[r % sets], t * n, batch, outs), repeats, bar
        ),
    }


def host_bound_write(repeats: int, bar):
    """Step writes of one 64 x 12 float key, 32 steps: the call overhead, not the copy."""
    small = [torch.zeros(32, 64, 12)]
    srcs = [[torch.randn(64, 12)] for _ in range(4)]
    return compare(
        WRITE, lambda f: lambda r: [f(small, s, srcs[(r + s) % 4]) for s in range(32)], repeats, bar
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cpu-max-mb", type=int, default=128)
    ap.add_argument("--workloads", default=",".join(c.GPU_WORKLOADS))
    args = ap.parse_args()
    c.set_cpu_threads()
    all_w = c.load_workloads()
    work = [c.scale_down(all_w[n], args.cpu_max_mb << 20) for n in args.workloads.split(",")]
    print(f"{c.device_label(CPU)}; {args.repeats} repetitions, variants interleaved")
    for w, f in work:
        print(f"  {w['name']}: {c.describe(w)}" + (f" (num_envs / {f})" if f > 1 else ""))
    results = {}
    with tqdm(total=3 * len(work) + 2 * len(WIDTHS) + 1, unit="case") as bar:
        for w, _ in work:
            bar.set_description(w["name"])
            for case, res in workload_cases(w, args.repeats, bar).items():
                results[(case, w["name"])] = res
        bar.set_description("row widths")
        for width in WIDTHS:
            for case, res in width_case(width, args.repeats, bar).items():
                results[(case, "synthetic")] = res
        results[("step write, 64 x 12 floats (host-bound)", "synthetic")] = host_bound_write(
            args.repeats, bar
        )

    rows, slower = [], []
    for (case, wname), res in results.items():
        names = list(res)
        ours = res[names[0]]["median"]
        orig = res[names[1]]["median"] if "original" in names[1] else None
        best = min(names, key=lambda k: res[k]["median"])
        for k in names:
            st = res[k]
            vs_orig = f"{orig / st['median']:.2f}x" if orig else ""
            rows.append([
                case, wname, k, c.fmt_stats(st), vs_orig, f"{ours / st['median']:.2f}x",
                "best" if k == best else "",
            ])  # fmt: skip
        for k in names[1:]:  # every variant faster than ours, flagged when beyond the spread
            if res[k]["median"] < ours:
                clear = res[k]["p80"] < res[names[0]]["p20"]
                slower.append(
                    f"{case} ({wname}): '{k}' {100 * (ours / res[k]['median'] - 1):.0f}% faster "
                    f"than ours ({c.fmt_time(res[k]['median'])} vs {c.fmt_time(ours)})"
                    + ("" if clear else ", within the p20-p80 spread: noise")
                )
    headers = [
        "case",
        "workload",
        "variant",
        "median [p20, p80]",
        "speedup over original",
        "speedup over ours",
        "",
    ]
    print(c.text_table(headers, rows))
    print(
        "\n".join(["", "Where ours is not the fastest:", *slower])
        if slower
        else "ours fastest everywhere"
    )
    lines = [f"# CPU paths: {c.device_label(CPU)}", ""]
    lines += c.header(CPU, c.command_line())
    lines += [
        "",
        "Workloads scaled to fit ("
        + "; ".join(f"{w['name']}: {c.describe(w)}" for w, _ in work)
        + ").",
        f"Median [p20, p80] over {args.repeats} repetitions after 2 warm-up rounds, variants "
        "interleaved, inputs rotating over a pool bigger than the last-level cache. 'speedup "
        "over original' = original's median / this median (> 1: faster than the original); "
        "'speedup over ours' the same against rollout_buffers' current torch_* function. "
        "Minibatches include drawing the permutation (torch.randperm; NumPy for the original).",
        "",
        *c.md_table(headers, rows),
        "",
        "## Where ours is not the fastest",
        "",
        *([f"- {s}" for s in slower] or ["- nowhere"]),
    ]
    path = c.write_text(c.RESULTS / "cpu_paths-cpu.md", lines)
    print("wrote", path.relative_to(c.ROOT))


if __name__ == "__main__":
    main()
