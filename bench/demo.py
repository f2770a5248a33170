"""Demo (`make demo`): a synthetic Isaac-style PPO training loop on the `locomotion` workload.

Every training iteration: write every key of every step of the rollout (fresh random data,
made before timing and reused from a small rotating pool), make_dict, build a shuffled
DictDataset and iterate every minibatch of every mini-epoch (reshuffling each). make_dict's
mapping is lazy: the minibatches are gathered from the buffer, with no flattened copy; the demo
also prints the memory an epoch costs, and the rollout memory of every workload at full size
(the original's, ours, ours with the observation keys in compact bfloat16 storage). The same loop
runs with rollout_buffers (auto backend, ``update_step`` for all keys of a step) and with the
original module (bench/original.py, per-key ``update_data``), interleaved; at the end a table
of per-phase times. Full size on a GPU; on CPU the number of envs is scaled down so that the
demo finishes in under a minute.

    python bench/demo.py [--iterations 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import common as c  # noqa: E402

PHASES = ("rollout writes", "make_dict", "minibatches", "whole epoch")
OURS, ORIG = "rollout_buffers (auto)", "original"


def check_same_outputs(w: dict, device: torch.device, inputs: dict) -> str:
    """Write the same data into both implementations; their make_dict outputs must be identical."""
    ours = c.ours_phases(w, device, inputs)
    orig = c.original_phases(w, device, inputs)
    a = ours[1](ours[0](0))
    b = orig[1](orig[0](0))
    bad = [k for k in w["keys"] if not (a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
    if bad or a.keys() != b.keys():
        raise SystemExit(f"check FAILED: make_dict outputs differ for keys {bad}")
    return f"check: make_dict outputs identical (torch.equal) for all {len(a)} keys: OK"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=20, help="timed training iterations per impl")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    device = c.pick_device()
    full = c.load_workloads()["locomotion"]
    w, factor = (full, 1) if device.type == "cuda" else c.scale_down(full, 128 << 20)
    scale = (
        "full size"
        if factor == 1
        else f"scaled down for CPU: num_envs {full['num_envs']} -> {w['num_envs']}"
    )
    print(f"device: {c.device_label(device)}")
    print(f"workload locomotion ({scale}): {c.describe(w)}")

    inputs = c.make_inputs(w, device)
    print(check_same_outputs(w, device, inputs))

    impls = {OURS: c.ours_phases(w, device, inputs), ORIG: c.original_phases(w, device, inputs)}
    with tqdm(total=args.warmup + args.iterations, desc="PPO iterations", unit="it") as bar:
        times, _ = c.interleaved_epochs(impls, args.iterations, args.warmup, device, bar)

    rows = []
    for k, p in enumerate(PHASES):
        ours, orig = c.stats(times[OURS][k]), c.stats(times[ORIG][k])
        rows.append(
            [p, c.fmt_stats(ours), c.fmt_stats(orig), f"{orig['median'] / ours['median']:.2f}x"]
        )
    print()
    print(
        f"per training iteration, median [p20, p80] over {args.iterations} iterations "
        f"({'CUDA events' if device.type == 'cuda' else 'wall clock'}, {args.warmup} warm-up excluded):"
    )
    print(c.text_table(["phase", OURS, ORIG, "original / ours"], rows))
    mem = {n: c.epoch_memory(w, impls[n], device) for n in impls}
    what = (
        "peak allocated over one epoch (torch.cuda.max_memory_allocated, above the buffers)"
        if device.type == "cuda"
        else "flattened copies of the rollout one epoch makes"
    )
    print(
        f"\nmemory per epoch, {what}: "
        + ", ".join(f"{n} {m / 2**20:.1f} MiB" for n, m in mem.items())
    )
    every = c.load_workloads()
    print("\nrollout memory, full size, with and without compact observation keys:")
    print("\n".join(c.memory_table([every[n] for n in c.MEMORY_WORKLOADS])))


if __name__ == "__main__":
    main()
