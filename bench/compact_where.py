"""Where the CPU path spends the time of compact storage's minibatches (locomotion, CPU scale).

bench/run.py shows compact observation keys making locomotion's epoch slower on CPU (its
minibatch phase: 5 epochs x 4 minibatches, every one gathering 235-wide obs and critic_obs),
while the writes get faster. This script splits that phase:

1. The minibatch phase of bench/common.py's epoch (``ours_phases``, as run.py runs it), full keys
   against compact ones, interleaved, with torch.profiler's CPU time per operator of one epoch:
   how much goes to ``index_select`` (the gathers), ``copy_`` (ops._select's widening, 256 KiB
   chunks at a time) and the rest.
2. One key's minibatch (12288 of 49152 rows of 235), outputs rotating over a pool larger than
   the last-level cache as the minibatches' recycled outputs are: the float32 gather, today's
   ``ops._select`` widening gather, the same two passes over the whole minibatch with a recycled
   bfloat16 temporary (one ``index_select`` + one ``copy_``), and their parts; and a prototype
   of one fused pass (``torch.compile`` of ``out.copy_(src[idx])``: inductor's CPU code gathers
   the bfloat16 rows and widens them in one loop), which no eager torch operator does.

Thread CPU time, medians [p20, p80]; writes bench/results/compact_where-cpu.md.

    python bench/compact_where.py [--reps 31]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as c  # noqa: E402
from rollout_buffers import ops  # noqa: E402


def stats(v: list[float]) -> str:
    v = sorted(v)
    return (
        f"{statistics.median(v) * 1e3:.2f} [{v[len(v) // 5] * 1e3:.2f}, "
        f"{v[4 * len(v) // 5] * 1e3:.2f}]"
    )


def interleaved(cases: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    res = {k: [] for k in cases}
    names = list(cases)
    for r in range(warmup + reps):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.thread_time()
            cases[k]()
            if r >= warmup:
                res[k].append(time.thread_time() - t0)
    return res


def epoch_split(w: dict, reps: int) -> list[str]:
    dev = torch.device("cpu")
    inputs = c.make_inputs(w, dev)
    impls = {
        "full keys": c.ours_phases(w, dev, inputs),
        "compact obs": c.ours_phases(w, dev, inputs, compact=True),
    }
    data = {}

    def case(name):
        f = impls[name]

        def run():
            f[2](data.pop(name))
            data[name] = f[1](f[0](0))  # the next epoch's mapping, outside the timed region

        data[name] = f[1](f[0](0))
        return run

    times = interleaved({n: case(n) for n in impls}, reps)
    rows = []
    for name, f in impls.items():
        d = f[1](f[0](0))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            f[2](d)
        ops_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        calls = {e.key: e.count for e in prof.key_averages()}
        total = sum(ops_us.values())
        sel, cp = ops_us.get("aten::index_select", 0), ops_us.get("aten::copy_", 0)
        rows.append(
            [name, stats(times[name]), f"{sel / 1e3:.1f} ({calls.get('aten::index_select', 0)})",
             f"{cp / 1e3:.1f} ({calls.get('aten::copy_', 0)})", f"{(total - sel - cp) / 1e3:.1f}"]
        )  # fmt: skip
    full, comp = (statistics.median(times[n]) for n in impls)
    return [
        f"## 1. The minibatch phase of one epoch: {c.describe(w)}",
        "",
        *c.md_table(
            [
                "keys",
                "minibatch phase, ms",
                "index_select ms (calls)",
                "copy_ ms (calls)",
                "other operators ms",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"Speed of compact: {full / comp:.2f}x (full median / compact median). Per-operator "
        "columns: torch.profiler self CPU time of one profiled epoch (the profiler adds its own "
        "overhead).",
    ]


def one_key(reps: int, envs: int, steps: int, minibatches: int, width: int = 235) -> list[str]:
    n, b = envs * steps, envs * steps // minibatches
    g = torch.Generator().manual_seed(0)
    full = torch.randn(n, width, generator=g)
    half = full.bfloat16()
    pool = c.pool_size(b * width * 4, lo=4, hi=16)
    outs = [torch.randn(b, width, generator=g) for _ in range(pool)]
    tmps = [torch.randn(b, width, generator=g).bfloat16() for _ in range(pool)]
    idxs = [torch.randperm(n, generator=g)[:b] for _ in range(pool)]
    at = [0]

    def rot(fn):
        def run():
            i = at[0] = (at[0] + 1) % pool
            fn(outs[i], tmps[i], idxs[i], outs[(i + pool // 2) % pool])

        return run

    cases = {
        "float32 gather: index_select into the output": rot(
            lambda o, t, i, _: torch.index_select(full, 0, i, out=o)
        ),
        "bfloat16 widening gather today: ops._select (256 KiB chunks)": rot(
            lambda o, t, i, _: ops._select(half, i, torch.float32, o)
        ),
        "two passes, whole minibatch: index_select into a recycled bfloat16 temp, copy_": rot(
            lambda o, t, i, _: o.copy_(torch.index_select(half, 0, i, out=t))
        ),
        "  its 1st pass: bfloat16 index_select into the temp": rot(
            lambda o, t, i, _: torch.index_select(half, 0, i, out=t)
        ),
        "  its 2nd pass: copy_ widening the temp into the output": rot(
            lambda o, t, i, _: o.copy_(t)
        ),
        "plain float32 copy_ of the output's bytes (no gather, no conversion)": rot(
            lambda o, t, i, other: o.copy_(other)
        ),
    }
    note = ""
    try:  # a prototype of one fused pass: inductor's CPU code gathers and widens in one loop
        fused = torch.compile(lambda out, src, idx: out.copy_(src[idx]), dynamic=False)
        fused(outs[0], half, idxs[0])
        assert torch.equal(outs[0], half[idxs[0]].float())
        cases["prototype, one fused pass: torch.compile'd out.copy_(src[idx])"] = rot(
            lambda o, t, i, _: fused(o, half, i)
        )
    except Exception as exc:  # no C++ compiler, or inductor cannot run here
        note = f"(the fused prototype did not run: {type(exc).__name__}: {str(exc)[:120]})"
    for f in cases.values():
        for _ in range(pool):
            f()
    res = interleaved(cases, reps)
    return [
        f"## 2. One key's minibatch: {b} of {n} rows of {width}, outputs rotating over {pool} "
        f"({pool * b * width * 4 / 2**20:.0f} MiB: not in cache, as recycled outputs are)",
        "",
        *c.md_table(["case", "ms median [p20, p80]"], [[k, stats(v)] for k, v in res.items()]),
        *([note] if note else []),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--cpu-max-mb", type=int, default=128)
    args = ap.parse_args()
    device = c.pick_device()
    if device.type == "cuda":
        print("compact_where: measures the CPU path; hiding the GPU")
        device = torch.device("cpu")
        c.set_cpu_threads()
    w, _ = c.scale_down(c.load_workloads()["locomotion"], args.cpu_max_mb << 20)
    lines = ["# Compact storage on the CPU path: where the minibatch time goes", ""]
    lines += c.header(device, c.command_line())
    lines += ["", *epoch_split(w, args.reps), ""]
    lines += one_key(args.reps, w["num_envs"], w["num_steps"], w["num_minibatches"])
    print("\n".join(lines))
    path = c.write_text(c.RESULTS / "compact_where-cpu.md", lines)
    print("wrote", path.relative_to(c.ROOT))


if __name__ == "__main__":
    main()
