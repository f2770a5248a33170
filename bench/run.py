"""End-to-end benchmark (`make bench`): every phase of a PPO epoch, per workload, side by side.

Phases: rollout writes (every key of every step), make_dict, minibatches (every minibatch of
every mini-epoch, with the workload's dataset-only keys indexed modulo), and the whole epoch.
Implementations, in the same run and interleaved: rollout_buffers (auto backend, make_dict's
lazy mapping), the same with the workload's ``compact_keys`` (its observation keys) kept in
bfloat16 storage and served in float32 (compact storage, same float32 inputs), the same with
the eager make_dict (``set_lazy_make_dict(False)``), rollout_buffers forced to its PyTorch
path, the original (bench/original.py), the original under torch.compile (GPU only), and the
physical limit: the device's plain ``copy_`` of the same bytes. Also the memory an epoch costs
(flattened copies; on CUDA the allocator's peak), the rollout memory of every workload at full
size with and without compact observation keys next to the original's, and compact against
full keys phase by phase. Writes bench/results/<device>.{md,json,png}.

    python bench/run.py [--workloads locomotion,humanoid] [--repeats 11] [--cpu-max-mb 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import rollout_buffers as rb  # noqa: E402
from bench import common as c  # noqa: E402

PHASES = ("rollout writes", "make_dict", "minibatches", "whole epoch")
UNIT = {
    "rollout writes": "step",
    "make_dict": "call",
    "minibatches": "minibatch",
    "whole epoch": "epoch",
}
AUTO, EAGER, TORCH, ORIG, COMPILED = (
    "rollout_buffers (auto)",
    "rollout_buffers (auto, eager make_dict)",
    "rollout_buffers (torch path)",
    "original",
    "original + torch.compile",
)
COMPACT = "rollout_buffers (auto, compact obs)"
DEFAULT_WORKLOADS = (*c.GPU_WORKLOADS, "protomotions_amp")


def phase_sizes(w: dict) -> dict[str, tuple[int, int]]:
    """phase -> (calls per epoch, bytes each call writes); the bytes moved are twice that."""
    rows, steps = w["num_envs"] * w["num_steps"], w["num_steps"]
    row = sum(c.row_bytes(s) for s in w["keys"].values()) + sum(
        c.row_bytes(s) for s in w["dataset_only_keys"].values()
    )
    batch = rows // w["num_minibatches"]
    return {
        "rollout writes": (steps, c.rollout_bytes(w) // steps),
        "make_dict": (1, c.rollout_bytes(w)),
        "minibatches": (w["num_epochs"] * w["num_minibatches"], batch * row),
    }


def plan(names: list[str], device: torch.device, cpu_max_mb: int) -> list[tuple[dict, str]]:
    """The workloads to run, each with a note on how it was scaled to fit this device."""
    all_w = c.load_workloads()
    out = []
    for name in names:
        w = all_w[name]
        if device.type == "cuda":
            # 6 implementations' buffers and make_dict outputs (alive together: the phases are
            # interleaved; the compact one's buffer is smaller), plus the copy-reference pair
            need = 13 * c.rollout_bytes(w) + 2 * c.extra_bytes(w)
            budget = int(0.8 * torch.cuda.mem_get_info(device)[0])
            small, factor = c.scale_down(w, budget // 10) if need > budget else (w, 1)
        else:
            small, factor = c.scale_down(w, cpu_max_mb << 20)
        note = "full size" if factor == 1 else f"num_envs and dataset-only rows / {factor}"
        out.append((small, note))
    return out


def build_impls(w: dict, device: torch.device, inputs: dict, notes: list[str]) -> dict[str, list]:
    impls = {
        AUTO: c.ours_phases(w, device, inputs, "auto"),
        COMPACT: c.ours_phases(w, device, inputs, "auto", compact=True),
        EAGER: c.ours_phases(w, device, inputs, "auto", lazy=False),
        TORCH: c.ours_phases(w, device, inputs, "torch"),
        ORIG: c.original_phases(w, device, inputs),
    }
    if device.type == "cuda":
        impls[COMPILED] = c.compiled_original_phases(w, device, inputs)
    for name in list(impls):  # one untimed epoch each: compiles, autotunes, or shows it can't run
        try:
            f = impls[name]
            f[2](f[1](f[0](0)))
        except Exception as exc:  # e.g. the Triton kernels not available in this version
            notes.append(f"{w['name']}: {name} skipped: {type(exc).__name__}: {str(exc)[:200]}")
            del impls[name]
    return impls


def bench_workload(w: dict, device: torch.device, repeats: int, warmup: int, bar, notes) -> dict:
    inputs = c.make_inputs(w, device)
    impls = build_impls(w, device, inputs, notes)
    names = list(impls)
    t, h = c.interleaved_epochs(impls, repeats, warmup, device, bar)
    times = {n: dict(zip(PHASES, t[n], strict=True)) for n in names}
    hosts = {n: dict(zip(PHASES, h[n], strict=True)) for n in names}

    sizes = phase_sizes(w)
    copy = {
        p: c.copy_seconds(nbytes, device, repeats=max(repeats, 7))
        for p, (_, nbytes) in sizes.items()
    }
    copy_s = {p: sizes[p][0] * copy[p]["median"] for p in sizes}
    copy_s["whole epoch"] = sum(copy_s.values())
    payload = {p: n * b for p, (n, b) in sizes.items()}
    payload["whole epoch"] = sum(payload.values())
    calls = {p: n for p, (n, _) in sizes.items()}
    calls["whole epoch"] = 1

    launches = {}
    for name in names:
        fns = impls[name]
        data = fns[1](fns[0](0))  # a make_dict output for the minibatch count
        launches[name] = {  # in this order: make_dict needs every step written once since the last
            "rollout writes": c.count_launches(fns[0], 0, device),
            "make_dict": c.count_launches(fns[1], None, device),
            "minibatches": c.count_launches(fns[2], data, device),
        }
        launches[name]["whole epoch"] = (
            None if None in launches[name].values() else sum(launches[name].values())
        )

    memory = {name: c.epoch_memory(w, impls[name], device) for name in names}

    out = {}
    for p in PHASES:
        base = c.stats(times[ORIG][p])["median"] if ORIG in times else None
        for name in names:
            st = c.stats(times[name][p])
            out.setdefault(p, {})[name] = {
                **st,
                "samples": times[name][p],
                "host_per_call": c.stats([h / calls[p] for h in hosts[name][p]])["median"],
                "gbps": 2 * payload[p] / st["median"] / 1e9,
                "fraction_of_copy": copy_s[p] / st["median"],
                "speedup": base / st["median"] if base else None,
                "launches": launches[name][p],
            }
        out[p]["copy_"] = {
            "median": copy_s[p],
            "gbps": 2 * payload[p] / copy_s[p] / 1e9,
            "per_call": copy.get(p),
        }
    return {
        "workload": w,
        "payload_bytes": payload,
        "calls": calls,
        "phases": out,
        "memory": memory,
    }


def update_step_vs_launch(device: torch.device) -> dict:
    """Target 4: update_step with 16 small keys against one empty launch (seconds per call)."""
    buf = rb.ExperienceBuffer(64, 32, device=device)
    data = [{f"k{i}": torch.randn(64, 12, device=device) for i in range(16)} for _ in range(4)]
    for k in data[0]:
        buf.register_key(k, (12,))
    label, launch = c.empty_launch(device)
    res = c.per_call_seconds(
        {
            "update_step (16 keys)": lambda k: buf.update_step(k % 32, data[k % 4]),
            label: lambda k: launch(),
        },
        device,
        calls=200,
        repeats=15,
    )
    return {"label": label, **{n: v["median"] for n, v in res.items()}}


def targets(device: torch.device, results: dict, host: dict) -> list[str]:
    """The targets to report against (not thresholds): met / missed and by how much."""

    def speedups(phase):
        return {
            n: r["phases"][phase][AUTO]["speedup"]
            for n, r in results.items()
            if AUTO in r["phases"][phase]
        }

    def verdict(value, goal, fmt):
        return f"{'met' if value >= goal else 'missed'}: {fmt(value)} (target {fmt(goal)})"

    x = lambda v: f"{v:.2f}x"
    pct = lambda v: f"{100 * v:.0f}%"
    lines = ["## Targets", ""]
    gpu = device.type == "cuda"
    for phase, label in (
        ("rollout writes", "rollout writes"),
        ("minibatches", "minibatches"),
        ("whole epoch", "whole epoch"),
    ):
        goal = f"- H100: {label} >= 3x faster than the original: "
        if not gpu:
            lines.append(goal + "not measured: no GPU")
            continue
        sp = speedups(phase)
        if not sp:
            lines.append(goal + "not measured: the auto backend did not run (see notes)")
            continue
        lines.append(goal + "; ".join(f"{n} {verdict(v, 3.0, x)}" for n, v in sp.items()))
    for phase in ("make_dict", "minibatches"):
        goal = f"- H100: {phase} >= 85% of copy bandwidth at humanoid_large: "
        r = results.get("humanoid_large", {}).get("phases", {}).get(phase, {}).get(AUTO)
        if not gpu:
            lines.append(goal + "not measured: no GPU")
        elif r is None:
            lines.append(goal + "not measured: humanoid_large or the auto backend did not run")
        else:
            lines.append(goal + verdict(r["fraction_of_copy"], 0.85, pct))
    goal = "- H100: update_step with 16 keys within 2x of one empty kernel launch: "
    if not gpu:
        lines.append(goal + "not measured: no GPU")
    else:
        ratio = host["update_step (16 keys)"] / host[host["label"]]
        lines.append(
            goal + f"{'met' if ratio <= 2 else 'missed'}: {ratio:.2f}x "
            f"({host['update_step (16 keys)'] * 1e6:.1f} µs vs {host[host['label']] * 1e6:.1f} µs, "
            f"{host['label']}; target <= 2x)"
        )
    goal = "- CPU: the epoch with compact observation keys at least as fast as with full keys: "
    if gpu:
        ratios = {n: compact_vs_full(r).get("whole epoch") for n, r in results.items()}
        lines.append(
            goal
            + "not a target on the GPU; here full / compact whole epoch: "
            + "; ".join(f"{n} {v['speed']:.2f}x" for n, v in ratios.items() if v)
        )
    else:
        verdicts = []
        for n, r in results.items():
            v = compact_vs_full(r).get("whole epoch")
            if v:
                q = v["paired"]
                verdicts.append(
                    f"{n} {'met' if v['speed'] >= 1 else 'missed'} {v['speed']:.2f}x "
                    f"(per round {q['median']:.2f}x [{q['p20']:.2f}x, {q['p80']:.2f}x])"
                )
        lines.append(goal + ("; ".join(verdicts) or "not measured (the compact run did not run)"))
    goal = "- CPU: no phase slower than the original: "
    if gpu:
        lines.append(goal + "not measured here (a GPU run); see bench/results/cpu.md")
    else:
        slower = []
        for n, r in results.items():
            for p in PHASES:
                a, o = r["phases"][p].get(AUTO), r["phases"][p].get(ORIG)
                if a and o and a["speedup"] < 1:
                    overlap = a["p20"] <= o["p80"]
                    slower.append(
                        f"{n} {p} {a['speedup']:.2f}x ({100 * (1 / a['speedup'] - 1):.0f}% slower"
                        + (", within the p20-p80 spread" if overlap else "")
                        + ")"
                    )
        worst = min(
            r["phases"][p][AUTO]["speedup"]
            for r in results.values()
            for p in PHASES
            if AUTO in r["phases"][p]
        )
        lines.append(
            goal
            + ("met" if not slower else "missed: " + "; ".join(slower))
            + f" (lowest speedup {worst:.2f}x)"
        )
    return lines


def compact_vs_full(r: dict) -> dict[str, dict]:
    """Per phase: compact observation keys against full keys, from the same interleaved rounds.
    ``speed``: full median / compact median (above 1: compact faster); ``paired``: stats of the
    per-round ratio full / compact (each round ran both back to back, so drift cancels)."""
    out = {}
    for p in PHASES:
        full, comp = r["phases"][p].get(AUTO), r["phases"][p].get(COMPACT)
        if full and comp:
            pairs = [f / k for f, k in zip(full["samples"], comp["samples"], strict=True)]
            out[p] = {
                "full": full,
                "compact": comp,
                "speed": full["median"] / comp["median"],
                "paired": c.stats(pairs),
            }
    return out


def compact_lines(results: dict) -> list[str]:
    rows = []
    for n, r in results.items():
        keys = ", ".join(c.compact_keys(r["workload"]))
        for p, v in compact_vs_full(r).items():
            q = v["paired"]
            rows.append([
                n, p, c.fmt_stats(v["full"]), c.fmt_stats(v["compact"]), f"**{v['speed']:.2f}x**",
                f"{q['median']:.2f}x [{q['p20']:.2f}x, {q['p80']:.2f}x]", keys if p == PHASES[0] else "",
            ])  # fmt: skip
    if not rows:
        return []
    return [
        "## Compact observation keys against full keys",
        "",
        f"`{AUTO}` (every key in its dtype) against `{COMPACT}` (the workload's compact keys "
        f"stored in {str(c.COMPACT_STORAGE).removeprefix('torch.')}, written from the same "
        "float32 inputs and served in float32), interleaved in the same rounds. Speed = full "
        "median / compact median (above 1x: compact faster); per round = the same ratio round "
        "by round, median [p20, p80].",
        "",
        *c.md_table(
            [
                "workload",
                "phase",
                "full keys",
                "compact obs",
                "speed of compact",
                "per round",
                "compact keys",
            ],
            rows,
        ),
    ]


def rollout_memory_lines(results: dict) -> list[str]:
    every = c.load_workloads()
    names = [*c.MEMORY_WORKLOADS, *(n for n in results if n not in c.MEMORY_WORKLOADS)]
    return ["## Rollout memory", "", *c.memory_table([every[n] for n in names])]


def memory_lines(device: torch.device, results: dict) -> list[str]:
    what = (
        "peak of torch.cuda.max_memory_allocated over one epoch, above the memory allocated "
        "before it (flattened copies, minibatch outputs)"
        if device.type == "cuda"
        else "bytes of flattened copies of the rollout one epoch makes (make_dict's env-major "
        "tensors; a lazy make_dict's values only when read)"
    )
    impls = [
        i
        for i in (AUTO, COMPACT, EAGER, TORCH, ORIG, COMPILED)
        if any(i in r["memory"] for r in results.values())
    ]
    rows = [[n] + [f"{r['memory'][i] / 2**20:.1f} MiB" if i in r["memory"] else "" for i in impls]
            for n, r in results.items()]  # fmt: skip
    return ["## Memory per epoch", "", f"{what}.", "", *c.md_table(["workload", *impls], rows)]


def write_results(device, results, host, notes, meta) -> list[Path]:
    slug = c.device_slug(device)
    lines = [f"# rollout_buffers benchmark: {c.device_label(device)}", ""]
    lines += c.header(device, meta["command"])
    lines += [
        "",
        "Time = median [p20, p80] over the repetitions of the whole phase per epoch, "
        f"{meta['repeats']} repetitions after {meta['warmup']} warm-up rounds, implementations "
        "interleaved. GB/s = 2 x bytes written / time (read + write). Fraction of copy = the time "
        "of the device's plain `copy_` moving the same bytes (same number of calls of the same "
        "size) / the implementation's time. Host time = the Python call's own time per "
        "step / make_dict call / minibatch / epoch. Launches = device kernels + memcpys per phase "
        "(torch.profiler; GPU only).",
        "",
        "## Workloads",
        "",
    ]
    lines += [f"- {n}: {c.describe(r['workload'])} ({r['note']})" for n, r in results.items()]
    lines += ["", "## Results", ""]
    rows = []
    for p in PHASES:
        for n, r in results.items():
            for impl, v in r["phases"][p].items():
                if impl == "copy_":
                    rows.append(
                        [
                            p,
                            n,
                            "copy_ (physical limit)",
                            c.fmt_time(v["median"]),
                            "",
                            "",
                            f"{v['gbps']:.1f}",
                            "100%",
                            "",
                        ]
                    )
                    continue
                rows.append([
                    p, n, impl, c.fmt_stats(v), c.fmt_time(v["host_per_call"]),
                    "" if v["launches"] is None else v["launches"], f"{v['gbps']:.1f}",
                    f"{100 * v['fraction_of_copy']:.0f}%", "" if v["speedup"] is None else f"{v['speedup']:.2f}x",
                ])  # fmt: skip
    lines += c.md_table(
        ["phase", "workload", "impl", "time median [p20, p80]", "host per call", "launches", "GB/s",
         "fraction of copy", "speedup over original"],
        rows,
    )  # fmt: skip
    lines += ["", *compact_lines(results)]
    lines += ["", *rollout_memory_lines(results)]
    lines += ["", *memory_lines(device, results), "", *targets(device, results, host)]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in notes] or ["- none"]
    md = c.write_text(c.RESULTS / f"{slug}.md", lines)

    every = c.load_workloads()
    rollout_memory = {n: c.memory_from_sizes(every[n]) for n in {*c.MEMORY_WORKLOADS, *results}}
    raw = {
        "meta": meta,
        "update_step_vs_launch": host,
        "notes": notes,
        "results": results,
        "rollout_memory_full_size": rollout_memory,
    }
    js = c.RESULTS / f"{slug}.json"
    js.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    png = plot(device, results, meta, c.RESULTS / f"{slug}.png")
    return [md, js, png]


def plot(device, results, meta, path: Path) -> Path:
    """Grouped bars: speedup over the original per phase (panel) and workload (group), log
    scale, bars drawn from 1x so that slower-than-the-original points down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    impls = [
        i
        for i in (AUTO, COMPACT, EAGER, TORCH, COMPILED)
        if any(i in r["phases"]["make_dict"] for r in results.values())
    ]
    names = list(results)
    fig, axes = plt.subplots(1, len(PHASES), figsize=(4.4 * len(PHASES), 4.8), sharey=True)
    width = 0.8 / max(len(impls), 1)
    colors = {AUTO: "tab:blue", COMPACT: "tab:cyan", EAGER: "tab:purple", TORCH: "tab:orange",
              COMPILED: "tab:green"}  # fmt: skip
    speedups = [1.0]
    for ax, p in zip(axes, PHASES, strict=True):
        for k, impl in enumerate(impls):
            xs, ys = [], []
            for j, n in enumerate(names):
                v = results[n]["phases"][p].get(impl)
                if v and v["speedup"]:
                    xs.append(j + (k - (len(impls) - 1) / 2) * width)
                    ys.append(v["speedup"])
            speedups += ys
            bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=impl, color=colors[impl])
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", lw=1)
        ax.set_title(p)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    ticks = [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]
    lo, hi = min(speedups) / 1.25, max(speedups) * 1.25
    axes[0].set_ylim(lo, hi)
    axes[0].yaxis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
    axes[0].yaxis.set_minor_locator(NullLocator())
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
    axes[0].set_ylabel("speedup over the original (log scale; above 1x = faster)")
    axes[0].legend(fontsize=8, loc="upper left")
    v = meta["versions"]
    note = (
        "" if device.type == "cuda" else " | no GPU: scaled-down workloads, torch.compile skipped"
    )
    fig.suptitle(
        f"{meta['device']} | torch {v['torch']} | triton {v['triton']}{note}\n{meta['command']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (GPU 20, CPU 21)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--cpu-max-mb", type=int, default=128, help="CPU: scale rollouts down to this size"
    )
    args = ap.parse_args()
    device = c.pick_device()
    repeats = args.repeats or (20 if device.type == "cuda" else 21)
    notes = []
    if device.type != "cuda":
        notes.append(
            f"CPU timings use {torch.get_num_threads()} torch thread(s) ($BENCH_CPU_THREADS, "
            "default 1): on a shared machine a multi-threaded op stalls at its barrier whenever "
            "another process holds a core; see set_cpu_threads in bench/common.py"
        )
        notes.append(
            "no GPU: the auto backend runs the PyTorch path here, so 'auto' and 'torch path' are "
            "the same code (their difference is noise); torch.compile of the original skipped "
            "(GPU only); GPU targets not measured"
        )
    work = plan(args.workloads.split(","), device, args.cpu_max_mb)
    print(
        f"device: {c.device_label(device)}; {repeats} repetitions after {args.warmup} warm-up rounds"
    )
    for w, note in work:
        print(f"  {w['name']}: {c.describe(w)} ({note})")
    results = {}
    with tqdm(total=len(work) * (repeats + args.warmup), unit="round") as bar:
        for w, note in work:
            bar.set_description(w["name"])
            results[w["name"]] = {
                **bench_workload(w, device, repeats, args.warmup, bar, notes),
                "note": note,
            }
    host = update_step_vs_launch(device)
    meta = {
        "device": c.device_label(device),
        "versions": c.versions(),
        "command": c.command_line(),
        "repeats": repeats,
        "warmup": args.warmup,
    }
    paths = write_results(device, results, host, notes, meta)
    rows = []
    for p in PHASES:
        for n, r in results.items():
            for impl, v in r["phases"][p].items():
                if impl != "copy_":
                    sp = "" if v["speedup"] is None else f"{v['speedup']:.2f}x"
                    rows.append(
                        [p, n, impl, c.fmt_stats(v), f"{100 * v['fraction_of_copy']:.0f}%", sp]
                    )
    print(
        c.text_table(
            ["phase", "workload", "impl", "median [p20, p80]", "of copy", "vs original"], rows
        )
    )
    print("\n".join(compact_lines(results)))
    print("\n".join(rollout_memory_lines(results)))
    print("\n".join(memory_lines(device, results)))
    print("\n".join(targets(device, results, host)[2:]))
    print("wrote", ", ".join(str(p.relative_to(c.ROOT)) for p in paths))


if __name__ == "__main__":
    main()
