"""GAE: ProtoMotions' per-step Python loop (eager, and under torch.compile) vs compute_gae.

Run: ``python bench/bench_gae.py`` (or ``make bench-gae``). Prints a markdown table and writes
it to ``bench/results/gae-<device>.md``. Times are medians over repeats (CUDA events on GPU,
``perf_counter`` on CPU). GB/s counts the bytes GAE must move: read rewards, values,
next_values and dones, write advantages and returns. The copy column is ``dst.copy_(src)``
moving the same number of bytes (half read, half written): the device's practical ceiling.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rollout_buffers import backend
from rollout_buffers.gae import compute_gae

GAMMA, LAM = 0.99, 0.95
CASES = [(24, 4096), (32, 8192), (64, 1024), (2048, 8192)]
CPU_SHRINK = {(2048, 8192): (2048, 1024)}  # the full case is ~0.4 GB of traffic per call
COMPILE_MAX_T = 256  # torch.compile unrolls the loop: a 2048-step graph takes far too long


def discount_values(mb_fdones, mb_values, mb_rewards, mb_next_values, gamma, tau):
    """ProtoMotions' loop, as PPO code calls it before make_dict (one step per iteration)."""
    lastgaelam = 0
    mb_advs = torch.zeros_like(mb_rewards)
    for t in reversed(range(mb_rewards.shape[0])):
        not_done = 1.0 - mb_fdones[t]
        delta = mb_rewards[t] + gamma * mb_next_values[t] - mb_values[t]
        lastgaelam = delta + gamma * tau * not_done * lastgaelam
        mb_advs[t] = lastgaelam
    return mb_advs


def loop_gae(rewards, values, next_values, dones):
    adv = discount_values(dones, values, rewards, next_values, GAMMA, LAM)
    return adv, adv + values


def make_inputs(T: int, N: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    r, v, nv = (torch.randn(T, N, device=device, generator=g) for _ in range(3))
    d = (torch.rand(T, N, device=device, generator=g) < 0.02).float()  # ProtoMotions' fdones
    return r, v, nv, d


def bytes_moved(inputs, T: int, N: int) -> int:
    read = sum(x.numel() * x.element_size() for x in inputs)
    return read + 2 * T * N * inputs[1].element_size()


def median_us(fn: Callable[[], object], device: str, budget_s: float, max_reps: int = 500):
    """Median time of ``fn`` in microseconds: 2 warm-up calls, then repeats within a budget."""
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        if device == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_us(nbytes: int, device: str, budget_s: float) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_us(lambda: dst.copy_(src), device, budget_s)


def check(ours, ref) -> None:
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def bench_case(T: int, N: int, device: str, budget_s: float, do_compile: bool) -> dict:
    inputs = make_inputs(T, N, device)
    out = tuple(torch.empty(T, N, device=device) for _ in range(2))
    check(compute_gae(*inputs, GAMMA, LAM), loop_gae(*inputs))
    row = {"T": T, "N": N, "bytes": bytes_moved(inputs, T, N)}
    row["eager loop"] = median_us(lambda: loop_gae(*inputs), device, budget_s)
    if do_compile and T <= COMPILE_MAX_T:
        compiled = torch.compile(loop_gae, dynamic=False)
        t0 = time.perf_counter()
        compiled(*inputs)
        row["compile s"] = time.perf_counter() - t0
        row["compiled loop"] = median_us(lambda: compiled(*inputs), device, budget_s)
    row["ours"] = median_us(lambda: compute_gae(*inputs, GAMMA, LAM, out=out), device, budget_s)
    if device == "cuda" and backend.use_triton(torch.device(device)):
        from rollout_buffers.kernels import gae as _k

        for variant in ("walk", "scan"):
            launch = lambda v=variant: _k.gae(*inputs, *out, GAMMA, LAM, variant=v)
            for x in out:  # what this variant leaves unwritten shows
                x.fill_(float("nan"))
            launch()
            check(out, loop_gae(*inputs))  # this variant's own output, not the previous one's
            row[f"kernel {variant}"] = median_us(launch, device, budget_s)
    row["copy"] = copy_us(row["bytes"], device, budget_s)
    return row


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {n} thread{'s' * (n != 1)}"


def slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def fmt_us(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def table(rows: list[dict]) -> str:
    methods = [m for m in ("eager loop", "compiled loop", "kernel walk", "kernel scan", "ours")]
    methods = [m for m in methods if any(m in r for r in rows)]
    head = ["T", "N", "MB moved", *[f"{m} (µs)" for m in methods]]
    head += ["ours GB/s", "copy GB/s", "ours / copy", "ours vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gbs, copy_gbs = r["bytes"] / r["ours"] / 1e3, r["bytes"] / r["copy"] / 1e3
        cells = [str(r["T"]), str(r["N"]), f"{r['bytes'] / 1e6:.1f}"]
        cells += [fmt_us(r.get(m)) for m in methods]
        cells += [f"{gbs:.1f}", f"{copy_gbs:.1f}", f"{gbs / copy_gbs:.0%}"]
        cells.append(f"{r['eager loop'] / r['ours']:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: see bench/common.py)"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # With every core in torch's pool, any other process on the machine stalls each op at
        # its barrier: timings swung 10-50x between runs with 2 threads, not with 1.
        torch.set_num_threads(args.threads)

    notes = []
    if args.device == "cpu" and hasattr(os, "getloadavg"):
        # CPU timings swing with anything else running (torch's thread pool spins on busy cores).
        notes.append(f"CPU load average (1 min) at start: {os.getloadavg()[0]:.2f}.")
    rows = []
    for T, N in CASES:
        if args.device == "cpu" and (T, N) in CPU_SHRINK:
            T2, N2 = CPU_SHRINK[(T, N)]
            notes.append(f"CPU: ({T}, {N}) shrunk to ({T2}, {N2}) to keep the run short.")
            T, N = T2, N2
        print(f"  T={T} N={N} ...", file=sys.stderr, flush=True)
        rows.append(bench_case(T, N, args.device, args.budget, not args.no_compile))
    if not args.no_compile:
        notes.append(
            f"compiled loop: `torch.compile(dynamic=False)` of the same loop, skipped for T > "
            f"{COMPILE_MAX_T} (it unrolls every step into one graph); compile times (s): "
            + ", ".join(f"T={r['T']}: {r['compile s']:.0f}" for r in rows if "compile s" in r)
            + "."
        )
    ours = "the Triton kernel (auto = scan)" if args.device == "cuda" else "the PyTorch path"
    notes.append(f"ours: `compute_gae(..., out=...)`, here {ours}; fp32 values, float dones.")
    triton_version = "not installed"
    if backend.triton_available():
        import triton

        triton_version = triton.__version__
    cmd = "python bench/bench_gae.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    report = "\n".join(
        [
            f"# GAE: per-step loop vs compute_gae on {device_name(args.device)}",
            "",
            f"torch {torch.__version__}, triton {triton_version}, command: `{cmd}`, "
            f"{time.strftime('%Y-%m-%d')}. Median µs per call.",
            "",
            table(rows),
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    print(report)
    if not args.no_write:
        path = Path(__file__).parent / "results" / f"gae-{slug(args.device)}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
