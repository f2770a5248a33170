"""Host cost per call of the prepared launchers, without a GPU: the Python of one call.

Runs under tests/stand_in_driver.py (kernels compile for sm_90; a launch is handed to a no-op
in place of Triton's C launcher, so the number is the library's Python per call plus one
Python call, not the driver's time). Median [p20, p80] of the thread's CPU time per call over
blocks of calls::

    python bench/host_step_write.py [--blocks 41] [--calls 2000]

Cases: the locomotion step (12 keys, contiguous, 16-byte aligned, the destinations' dtypes)
through ``writer(t, srcs)`` and ``writer.dense(t, srcs)``; the same step when the sources come
as real training code passes them (a bool ``dones`` into an int64 key, float64 rewards, a column
and a slice of a wider tensor), which replays a plan cached by layout; a widening minibatch
gather (bfloat16 storage served as float32) against the same gather at full precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import stand_in_driver  # noqa: E402

stand_in_driver.install()

import rollout_buffers.kernels as K  # noqa: E402
import torch  # noqa: E402

N, T = 4096, 24
LOCO = [(235,), (235,), (12,), (12,), (12,), (), (1,), (1,), (), (), (), ()]
DONES = 9  # the int64 key


def _silence(plan_holder) -> None:
    """Replace the compiled kernels' launcher (the stand-in's Python recorder) by a no-op."""
    for plan in plan_holder:
        if plan.run is not None:
            plan.run = lambda *a: None


def per_call(fn, blocks: int, calls: int) -> tuple[float, float, float]:
    for _ in range(3):
        fn(0)
    xs = []
    for _ in range(blocks):
        t0 = time.thread_time_ns()
        for i in range(calls):
            fn(i)
        xs.append((time.thread_time_ns() - t0) / calls / 1e3)
    xs.sort()
    q = statistics.quantiles(xs, n=5)
    return statistics.median(xs), q[0], q[3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=41)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    dt = [torch.int64 if i == DONES else torch.float32 for i in range(len(LOCO))]
    dsts = [torch.zeros(T, N, *s, dtype=d) for s, d in zip(LOCO, dt, strict=True)]
    srcs = [torch.zeros(N, *s, dtype=d) for s, d in zip(LOCO, dt, strict=True)]
    w = K.step_writer(dsts)
    # As training code passes them: dones as bool, rewards as float64, the value a column of an
    # (N, 3) tensor, the actions a slice of a wider concatenated tensor.
    views = list(srcs)
    views[6] = torch.zeros(N, 3)[:, :1]
    views[2] = torch.zeros(N, 40)[:, 4:16]
    real = list(views)
    real[DONES] = torch.zeros(N, dtype=torch.bool)
    real[8] = torch.zeros(N, dtype=torch.float64)
    cases = {
        "step write, 12 keys, writer(t, srcs)": lambda i: w(i % T, srcs),
        "step write, 12 keys, writer.dense(t, srcs)": lambda i: w.dense(i % T, srcs),
        "step write, 12 keys, 2 of them views": lambda i: w(i % T, views),
    }
    if hasattr(K, "converts"):
        cases["step write, 12 keys as training code passes them (2 casts)"] = lambda i: w(
            i % T, real
        )
    for fn in cases.values():
        fn(0)
    _silence(p[0] for p in w.plans.values())
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}; "
          f"{args.blocks} blocks of {args.calls} calls; µs per call, median [p20, p80]")  # fmt: skip
    for name, fn in cases.items():
        m, lo, hi = per_call(fn, args.blocks, args.calls)
        print(f"| {name} | {m:.2f} [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main()
