"""Host overhead per call: small writes where the copy itself is tiny, so the time is the call.

Single-key ``update_data`` of 64 envs x 12 floats, and ``update_step`` with 4 and 16 such keys
against the original's per-key ``update_data`` loop; rollout_buffers against the original
(bench/original.py), interleaved in the same run, median [p20, p80] over repetitions of blocks
of calls (steady state: on CUDA the block is synchronized at its end, so a call costs
max(host time, device time)). Writes bench/results/host_overhead-<device>.md.

    python bench/host_overhead.py [--repeats 61] [--calls 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rollout_buffers as rb  # noqa: E402
from bench import common as c  # noqa: E402
from bench import original  # noqa: E402

NUM_ENVS, WIDTH, NUM_STEPS = 64, 12, 32


def buffers(num_keys: int, device: torch.device):
    """Ours and the original's buffer with ``num_keys`` keys, and 4 rotating input sets."""
    ours = rb.ExperienceBuffer(NUM_ENVS, NUM_STEPS, device=device)
    orig = original.ExperienceBuffer(NUM_ENVS, NUM_STEPS, device=device)
    keys = [f"k{i}" for i in range(num_keys)]
    for k in keys:
        ours.register_key(k, (WIDTH,))
        orig.register_key(k, (WIDTH,))
    sets = [{k: torch.randn(NUM_ENVS, WIDTH, device=device) for k in keys} for _ in range(4)]
    return ours, orig, sets


def cases(device: torch.device) -> dict[str, dict]:
    """case -> {impl: fn(k)} where k is the call number (it picks the step and the input set)."""
    out = {}
    ours, orig, sets = buffers(1, device)
    out["update_data, 1 key"] = {
        "rollout_buffers": lambda k: ours.update_data("k0", k % NUM_STEPS, sets[k % 4]["k0"]),
        "original": lambda k: orig.update_data("k0", k % NUM_STEPS, sets[k % 4]["k0"]),
    }
    for n in (4, 16):
        ours_n, orig_n, sets_n = buffers(n, device)

        def orig_loop(k, b=orig_n, s=sets_n):
            for key, v in s[k % 4].items():
                b.update_data(key, k % NUM_STEPS, v)

        out[f"update_step, {n} keys"] = {
            "rollout_buffers": lambda k, b=ours_n, s=sets_n: b.update_step(k % NUM_STEPS, s[k % 4]),
            "original": orig_loop,
        }
    if device.type == "cuda":  # on CPU the auto backend is the torch path: nothing to compare
        for case in out.values():
            fn = case["rollout_buffers"]

            def forced(k, fn=fn):
                with rb.use_backend("torch"):
                    fn(k)

            case["rollout_buffers (torch path)"] = forced
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=61)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed block")
    args = ap.parse_args()
    device = c.pick_device()
    print(f"device: {c.device_label(device)}; {args.repeats} blocks of {args.calls} calls per impl")
    rows = []
    for case, fns in cases(device).items():
        res = c.per_call_seconds(fns, device, args.calls, args.repeats)
        base = res["original"]["median"]
        for impl, st in res.items():
            us = {k: v * 1e6 for k, v in st.items() if k != "n"}
            rows.append([
                case, impl, f"{us['median']:.2f} [{us['p20']:.2f}, {us['p80']:.2f}]",
                f"{base / st['median']:.2f}x",
            ])  # fmt: skip
    label, launch = c.empty_launch(device)
    ref = c.per_call_seconds({label: lambda k: launch()}, device, args.calls, args.repeats)[label]
    rows.append(
        [
            f"reference: {label}",
            "",
            f"{ref['median'] * 1e6:.2f} [{ref['p20'] * 1e6:.2f}, {ref['p80'] * 1e6:.2f}]",
            "",
        ]
    )
    headers = ["case", "impl", "µs per call, median [p20, p80]", "speedup over original"]
    print(c.text_table(headers, rows))
    lines = [f"# Host overhead per call: {c.device_label(device)}", ""]
    lines += c.header(device, c.command_line())
    lines += [
        "",
        f"Keys of {NUM_ENVS} envs x {WIDTH} float32 ({NUM_ENVS * WIDTH * 4} B per key per step), "
        f"{NUM_STEPS} steps, the step cycling every call, 4 rotating input sets. Per call = a "
        f"block of {args.calls} calls timed as one region / {args.calls}"
        + (" (CUDA events, block synchronized at its end)" if device.type == "cuda" else "")
        + f"; median [p20, p80] over {args.repeats} blocks, implementations interleaved. "
        "`update_step, N keys` is one update_step call for rollout_buffers and N update_data "
        "calls (the original's only way) for the original.",
        "",
        *c.md_table(headers, rows),
    ]
    path = c.write_text(c.RESULTS / f"host_overhead-{c.device_slug(device)}.md", lines)
    print("wrote", path.relative_to(c.ROOT))


if __name__ == "__main__":
    main()
