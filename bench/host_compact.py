"""Host cost of compact storage on the CUDA path, measured without a GPU: full keys vs compact.

Runs the project's host-cost instrument, ``shared/tools/host_launch.py`` (not part of this
repository: found beside the checkout or beside the folder that holds it, or given with
``--tool``), in its fake mode, as bench/host_sequences.py does: a stand-in libcuda under
Triton's real launcher and stand-in CUDA tensors, so the library's CUDA code path runs unmodified
and only the driver's own time is estimated. Each call is the instrument's own public case
(its 12 locomotion keys, 4096 envs x 24 steps, 4 minibatches), built twice: once with every key
in its dtype, once with the observation keys (``obs``, ``critic_obs``: 235 floats each) kept in
bfloat16 storage (``register_key(..., storage=torch.bfloat16)``) and written from the same
float32 sources. Rows: ``update_step`` of the 12 keys, ``get_dict()`` + reading every value,
``dataset[i]`` of ``DictDataset(batch, make_dict(), shuffle=True)`` + reading every value, and one
trivial Triton launch for scale. All cases are timed together, interleaved.

Prints a table and writes bench/results/host_compact-fake-cpu.md; exit status 2 when the
instrument is missing or cannot run here, 1 when a compact call's est. CUDA cost is more than
``--tolerance`` (default 5%) above the full-key call's.

    python bench/host_compact.py [--tool PATH] [--rounds 15]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMPACT = ("obs", "critic_obs")  # the observation keys of the instrument's locomotion set


def find_tool(given: str | None) -> Path:
    if given:
        return Path(given)
    for shared in (ROOT.parent / "shared", ROOT.parent.parent / "shared"):
        if (shared / "tools" / "host_launch.py").is_file():
            return shared / "tools" / "host_launch.py"
    return ROOT.parent / "shared" / "tools" / "host_launch.py"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_tool(path: Path):
    spec = importlib.util.spec_from_file_location("host_launch", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["host_launch"] = mod
    spec.loader.exec_module(mod)
    return mod


class CompactLibrary:
    """The library as the instrument's public cases see it (``rb.ExperienceBuffer``,
    ``rb.DictDataset``...), except that a buffer registers the COMPACT keys with bfloat16
    storage. Everything else is the library itself, so both variants run the same case code."""

    def __init__(self, rb, storage):
        self._rb, self._storage = rb, storage

    def __getattr__(self, name):
        return getattr(self._rb, name)

    def ExperienceBuffer(self, *args, **kwargs):  # noqa: N802 (the library's class name)
        buf = self._rb.ExperienceBuffer(*args, **kwargs)
        register, storage = buf.register_key, self._storage

        def register_key(key, shape=(), dtype=None, **kw):
            if key in COMPACT:
                kw["storage"] = storage
            return (
                register(key, shape, dtype, **kw)
                if dtype is not None
                else register(key, shape, **kw)
            )

        buf.register_key = register_key  # an instance attribute: the class stays the library's
        return buf


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tool", default=None, help="path to host_launch.py")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block-us", type=float, default=2000.0)
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()
    tool = find_tool(args.tool)
    if not tool.is_file():
        print(f"host_compact: no host-cost instrument at {tool}; nothing measured")
        return 2
    H = load_tool(tool)
    import torch

    H.ENV.mode = "fake"
    try:
        H.install_fake_cuda()
    except H.FakeModeError as exc:
        print(f"host_compact: fake mode cannot run: {exc}")
        return 2
    torch.set_num_threads(1)
    rb = H.import_library(ROOT)
    notes = []
    from rollout_buffers.kernels import _common

    if getattr(_common, "_CUDA", ()) is None:
        # as in bench/host_sequences.py: a CPU-only torch has no _cuda_exchangeDevice
        _common._CUDA = (torch._C._cuda_getDevice, abs, torch._C._cuda_getCurrentRawStream)
        notes.append("kernels/_common._CUDA stood in for here (the instrument predates it)")

    libs = {"full keys": rb, "compact obs": CompactLibrary(rb, torch.bfloat16)}
    calls = {
        "update_step, 12 keys": H.public_update_step,
        "get_dict + read every value, 12 keys": H.public_get_dict,
        "dataset[i] + read every value, 12 keys": H.public_minibatch,
    }
    specs = {"trivial launch: kernel[(1,)](x)": H.public_trivial}
    for call, build in calls.items():
        for variant, lib in libs.items():
            specs[f"{call}: {variant}"] = functools.partial(build, lib, 12)
    bench = H.Bench(args.rounds, args.block_us)
    est = H.Estimator(
        SimpleNamespace(driver_launch_us=2.0, driver_pointer_us=0.15, eager_enqueue_us=2.5)
    )
    cases, counts, failures = H.build_cases(specs)
    for call in calls:  # the compact buffers really are compact
        sc = cases.get(f"{call}: compact obs")
        if sc is not None and sc.keep is not None:
            dtypes = {k: sc.keep.buf._buffers[k].dtype for k in COMPACT}
            if set(dtypes.values()) != {torch.bfloat16}:
                raise SystemExit(f"host_compact: {call}: compact keys stored as {dtypes}")
    try:
        H.calibrate_emulation(bench, est)
    except Exception as exc:
        notes.append(f"emulation calibration failed: {exc}")
    res = H.run_public(bench, cases, failures)
    ests = H.estimates_for(res, counts, est)

    def cnt(name):
        c = counts.get(name, {})
        return f"{c.get('launches', 0):g} / {c.get('pointer_queries', 0):g} / {c.get('eager_ops', 0):g}"

    rows, worst = [], {}
    for call in calls:
        full, comp = f"{call}: full keys", f"{call}: compact obs"
        if full not in res or comp not in res:
            rows.append([call, "not measured", "", "", "", "", "", ""])
            continue
        ratio = ests[comp] / ests[full]
        worst[call] = ratio
        rows.append(
            [
                call,
                H.fmt(res[full]),
                H.fmt(res[comp]),
                f"{res[comp]['median'] / res[full]['median']:.2f}",
                f"{ests[full]:.1f}",
                f"{ests[comp]:.1f}",
                f"**{ratio:.2f}**",
                f"{cnt(full)}; {cnt(comp)}",
            ]
        )
    trivial = "trivial launch: kernel[(1,)](x)"
    if trivial in res:
        rows.append(
            [trivial, H.fmt(res[trivial]), "", "", f"{ests[trivial]:.1f}", "", "", cnt(trivial)]
        )
    table = H.md_table(
        [
            "call",
            "host µs, full keys",
            "host µs, compact obs",
            "host ratio",
            "est. CUDA µs, full",
            "est. CUDA µs, compact",
            "est. ratio (compact / full)",
            "launches / pointer queries / eager ops: full; compact",
        ],
        rows,
    )
    bad = {c: r for c, r in worst.items() if r > 1 + args.tolerance}
    verdict = (
        "compact storage adds no host cost on the CUDA path (every est. ratio <= "
        f"{1 + args.tolerance:.2f})"
        if worst and not bad
        else "compact storage costs more host time: "
        + ", ".join(f"{c} {r:.2f}" for c, r in bad.items())
        if bad
        else "not measured"
    )
    command = " ".join([Path(sys.executable).name, *sys.argv])
    header = [
        "# Host cost of compact storage on the CUDA path (fake CUDA, no GPU)",
        "",
        f"- command: `{command}` (instrument: `{tool}`, fake mode)",
        f"- CPU: {cpu_model()}, 1 torch thread, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- workload: the instrument's 12 locomotion keys, {H.NUM_ENVS} envs x {H.NUM_STEPS} "
        f"steps, {H.NUM_MINIBATCHES} minibatches; compact obs = {', '.join(COMPACT)} stored in "
        "bfloat16, written from float32 sources, served in float32",
        "- host µs: the thread's CPU time per call, median [p20, p80] over interleaved blocks "
        f"({args.rounds} rounds); est. CUDA: host µs + 2.0 µs per launch + 0.15 µs per pointer "
        "query + 2.5 µs per eager GPU operation (the instrument's defaults). No GPU ran this.",
        "",
    ]
    lines = [*header, table, "", f"Verdict: {verdict}."]
    lines += [f"- note: {n}" for n in notes]
    lines += [f"- not measured: {n}: {f}" for n, f in failures.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "host_compact-fake-cpu.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}")
    if failures or not worst:
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
