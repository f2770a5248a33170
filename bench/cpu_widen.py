"""The CPU path of a widening minibatch gather (compact storage served as float32) against the
full-precision gather of the same rows.

    python bench/cpu_widen.py [--reps 41] [--threads 1]

Per key: ``index_select`` of float32 rows against ``ops._select`` serving bfloat16 rows as
float32 (both into fresh outputs). Per epoch: the locomotion key set (12 keys, 4096 envs x 24
steps, 4 minibatches, env-major rows of the (T, N) storages) with every key float32, against the
same with ``obs`` and ``critic_obs`` kept in bfloat16 and served as float32, on the PyTorch
path: through ``ops.gatherer`` (whose float32 path today writes into recycled outputs) and
through ``ops.torch_gather`` (fresh outputs for both). Thread CPU time (other processes on a
shared machine do not count), min / p20 / median over interleaved repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rollout_buffers import ops  # noqa: E402

T, N, MB = 24, 4096, 4
LOCO = [(235,), (235,), (12,), (12,), (12,), (), (1,), (1,), (), (), (), ()]


def timed(cases: dict, reps: int) -> None:
    res = {k: [] for k in cases}
    for f in cases.values():
        f()
    for _ in range(reps):
        for k, f in cases.items():
            t0 = time.thread_time()
            f()
            res[k].append(time.thread_time() - t0)
    for k, v in res.items():
        v.sort()
        print(f"| {k} | {v[0] * 1e3:.2f} | {v[len(v) // 5] * 1e3:.2f} | "
              f"{statistics.median(v) * 1e3:.2f} |")  # fmt: skip


def per_key(reps: int) -> None:
    for rows, width, batch in ((T * N, 235, T * N // MB), (T * N, 12, T * N // MB),
                               (T * N, 0, T * N // MB), (8192 * 32, 358, 8192)):  # fmt: skip
        shape = (rows, width) if width else (rows,)
        full = torch.randn(shape)
        half = full.bfloat16()
        idx = torch.randperm(rows)[:batch]
        print(f"\n{batch} of {rows} rows of {width or 1} (ms): | case | min | p20 | median |")
        timed(
            {
                "float32 index_select": lambda f=full, i=idx: torch.index_select(f, 0, i),
                "bfloat16 -> float32, ops._select": lambda h=half, i=idx: ops._select(
                    h, i, torch.float32
                ),
            },
            reps,
        )


def epoch(reps: int) -> None:
    n, b = T * N, T * N // MB
    full = [torch.randn(T, N, *s) for s in LOCO]
    compact = [f.bfloat16() if i < 2 else f for i, f in enumerate(full)]
    k = len(LOCO)
    g_full = ops.gatherer(full, [ops.ENV_MAJOR] * k, [n] * k, n, b)
    g_compact = ops.gatherer(
        compact, [ops.ENV_MAJOR] * k, [n] * k, n, b, out_dtypes=[torch.float32] * k
    )
    perm = torch.randperm(n)
    for a, c in zip(g_full(perm, b), g_compact(perm, b), strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape

    def run(g):
        p = torch.randperm(n)
        for i in range(MB):
            g(p, i * b)

    def run_ref(srcs, ods):
        p = torch.randperm(n)
        rows = torch.remainder(p, T) * N + torch.div(p, T, rounding_mode="floor")
        flat = [s.reshape(n, *s.shape[2:]) for s in srcs]
        for i in range(MB):
            ops.torch_gather(flat, rows, i * b, b, out_dtypes=ods)

    f32 = [torch.float32] * k
    print(f"\nepoch of {MB} minibatches, {k} keys (ms): | case | min | p20 | median |")
    timed(
        {
            "ops.gatherer, every key float32 (recycled outputs)": lambda: run(g_full),
            "ops.gatherer, obs, critic_obs bfloat16 served as float32": lambda: run(g_compact),
            "ops.torch_gather, every key float32": lambda: run_ref(full, None),
            "ops.torch_gather, obs, critic_obs bfloat16 -> float32": lambda: run_ref(compact, f32),
        },
        reps,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.reps} repetitions")
    per_key(args.reps)
    epoch(max(args.reps // 3, 5))


if __name__ == "__main__":
    main()
