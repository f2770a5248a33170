"""Shared pieces of bench/: workloads, the three implementations' epoch phases, timing, naming.

Timing rules, the same in every script:
- GPU: CUDA events around each timed region, the device idle (synchronized) before it starts,
  warm-up runs excluded; host time of the same call measured with ``perf_counter``.
- CPU: ``perf_counter`` around each call.
- Implementations are interleaved (their order rotates every repetition) so that drift and
  other users of the machine hit them all alike; results are medians with p20 / p80.
- Inputs rotate over a pool larger than the last-level cache, so small cases are not flattered
  by data left warm by the previous repetition.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rollout_buffers as rb
from bench import original

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# Bigger than any last-level cache we run on (H100 L2: 50 MB): input pools at least this big.
CACHE_BYTES = 64 << 20
GPU_WORKLOADS = ("locomotion", "humanoid", "humanoid_large", "many_small")
# The rollout-memory table's rows (every training workload; ci is a shape for interpreters).
MEMORY_WORKLOADS = ("protomotions_amp", *GPU_WORKLOADS)


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def workloads_path() -> Path:
    """$ROLLOUT_BUFFERS_WORKLOADS, else bench/workloads.json (the project's shared/workloads.json
    and more, kept in the repository so a bare clone on a GPU machine has it: every workload of
    shared/ unchanged, plus the benchmarks' own workloads (protomotions_amp) and fields
    (``compact_keys``: the observation keys kept in bfloat16 in the compact runs);
    tests/test_packaging.py checks that against shared/ when shared/ is there)."""
    env = os.environ.get("ROLLOUT_BUFFERS_WORKLOADS")
    candidates = [Path(env)] if env else []
    candidates += [ROOT / "bench" / "workloads.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "workloads.json not found in "
        + ", ".join(map(str, candidates))
        + "; set ROLLOUT_BUFFERS_WORKLOADS=/path/to/workloads.json"
    )


def load_workloads() -> dict[str, dict]:
    """Every workload with ``like`` resolved (top-level fields of the child replace the parent's)."""
    raw = json.loads(workloads_path().read_text())
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}

    def resolve(name: str) -> dict:
        w = dict(raw[name])
        parent = w.pop("like", None)
        if parent is None:
            w.setdefault("dataset_only_keys", {})
            return w
        return {**resolve(parent), **w}

    return {name: {"name": name, **resolve(name)} for name in raw}


def row_bytes(spec: dict) -> int:
    return math.prod(spec["shape"]) * DTYPES[spec["dtype"]].itemsize


def rollout_bytes(w: dict) -> int:
    """Bytes of one whole rollout: every key, every step, every env."""
    return w["num_envs"] * w["num_steps"] * sum(row_bytes(s) for s in w["keys"].values())


def extra_bytes(w: dict) -> int:
    """Bytes of the dataset-only keys (e.g. an expert buffer shorter than the rollout)."""
    return sum(s["rows"] * row_bytes(s) for s in w["dataset_only_keys"].values())


def scale_down(w: dict, max_bytes: int) -> tuple[dict, int]:
    """Divide num_envs (and dataset-only rows) by a power of two until the rollout fits max_bytes.

    Everything else (steps, keys, minibatch count, epochs) is kept, so the phases keep their
    shape: the same number of calls, each moving fewer bytes. Returns (workload, factor).
    """
    factor = 1
    while rollout_bytes(w) // factor > max_bytes and w["num_envs"] // (factor * 2) >= 8:
        factor *= 2
    if factor == 1:
        return w, 1
    out = dict(w, num_envs=w["num_envs"] // factor)
    out["dataset_only_keys"] = {
        k: dict(s, rows=max(1, s["rows"] // factor)) for k, s in w["dataset_only_keys"].items()
    }
    return out, factor


def describe(w: dict) -> str:
    rows = w["num_envs"] * w["num_steps"]
    extra = ", ".join(f"{k} {s['rows']} rows" for k, s in w["dataset_only_keys"].items())
    return (
        f"{w['num_envs']} envs x {w['num_steps']} steps = {rows} rows, {len(w['keys'])} keys, "
        f"{rollout_bytes(w) / 1e6:.0f} MB rollout, {w['num_minibatches']} minibatches x "
        f"{w['num_epochs']} epochs" + (f", dataset-only: {extra}" if extra else "")
    )


def random_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen=None):
    if dtype == torch.bool:
        return torch.rand(shape, device=device, generator=gen) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, dtype=dtype, device=device, generator=gen)
    return torch.randn(shape, device=device, generator=gen).to(dtype)


def pool_size(set_bytes: int, lo: int = 2, hi: int = 8) -> int:
    """How many input sets to rotate over so the pool outgrows the last-level cache."""
    return max(lo, min(hi, math.ceil(CACHE_BYTES / max(set_bytes, 1))))


def make_inputs(w: dict, device: torch.device, seed: int = 0) -> dict:
    """Everything an epoch reads, made before any timing: a rotating pool of per-step inputs
    ({key: (num_envs, *shape)}) and the dataset-only tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = w["num_envs"]
    step_bytes = rollout_bytes(w) // w["num_steps"]
    pool = [
        {
            k: random_tensor((n, *s["shape"]), DTYPES[s["dtype"]], device, gen)
            for k, s in w["keys"].items()
        }
        for _ in range(pool_size(step_bytes))
    ]
    extra = {
        k: random_tensor((s["rows"], *s["shape"]), DTYPES[s["dtype"]], device, gen)
        for k, s in w["dataset_only_keys"].items()
    }
    return {"pool": pool, "extra": extra}


# ---------------------------------------------------------------------------------------------
# Compact storage and the memory a rollout costs
# ---------------------------------------------------------------------------------------------

#: The storage dtype of a workload's ``compact_keys`` in the compact runs (observations: bfloat16
#: keeps float32's range, so no observation overflows to inf as it could in float16).
COMPACT_STORAGE = torch.bfloat16


def compact_keys(w: dict) -> list[str]:
    """The observation keys the compact runs keep in :data:`COMPACT_STORAGE` (workloads.json's
    ``compact_keys``; none when a workload does not say)."""
    return list(w.get("compact_keys", ()))


def ours_buffer(w: dict, device: torch.device, compact: bool = False) -> rb.ExperienceBuffer:
    """An ExperienceBuffer with the workload's keys, its compact keys in COMPACT_STORAGE if asked."""
    buf = rb.ExperienceBuffer(w["num_envs"], w["num_steps"], device=device)
    narrow = set(compact_keys(w)) if compact else set()
    for k, s in w["keys"].items():
        kw = {"storage": COMPACT_STORAGE} if k in narrow else {}
        buf.register_key(k, tuple(s["shape"]), DTYPES[s["dtype"]], **kw)
    return buf


MEMORY_COLUMNS = ("original", "ours", "ours, compact obs")


def memory_from_sizes(w: dict) -> dict[str, dict[str, int]]:
    """Bytes an epoch holds at its peak, per implementation, from the workload's sizes.

    - original: the rollout + make_dict's flattened copy of it (same bytes) + one minibatch's
      copies (the dict its DictDataset returns);
    - ours: the rollout (``buffer.nbytes``) + one minibatch's copies: make_dict's lazy mapping
      makes no flattened copy and DictDataset gathers from the storages;
    - ours, compact obs: the same with the ``compact_keys`` stored in COMPACT_STORAGE; the
      minibatch serves them widened, so its copies are as big as the full-precision one's.

    A minibatch has every key's rows, the dataset-only keys' included (their own tensors are the
    same in every column and not counted). Returns column -> {part: bytes, "total": bytes}.
    """
    rows = w["num_envs"] * w["num_steps"]
    batch = rows // w["num_minibatches"]
    narrow = set(compact_keys(w))
    full = rollout_bytes(w)
    small = rows * sum(
        math.prod(s["shape"]) * COMPACT_STORAGE.itemsize if k in narrow else row_bytes(s)
        for k, s in w["keys"].items()
    )
    mb = batch * sum(row_bytes(s) for s in [*w["keys"].values(), *w["dataset_only_keys"].values()])
    parts = {
        "original": {"rollout": full, "flattened copy": full, "minibatch": mb},
        "ours": {"rollout": full, "flattened copy": 0, "minibatch": mb},
        "ours, compact obs": {"rollout": small, "flattened copy": 0, "minibatch": mb},
    }
    return {n: {**p, "total": sum(p.values())} for n, p in parts.items()}


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def memory_from_objects(w: dict) -> dict[str, dict[str, int]]:
    """The same bytes as :func:`memory_from_sizes`, read off real objects on the CPU: each
    implementation's buffer (``buffer.nbytes`` for ours), its make_dict values once read (the
    original's flattened copy; ours reads none: an epoch of minibatches never makes them) and
    its first minibatch's tensors. Allocates the rollout three times over, plus the original's
    flattened copy: call it on a scaled-down workload."""
    cpu = torch.device("cpu")
    rows = w["num_envs"] * w["num_steps"]
    batch = rows // w["num_minibatches"]
    extra = {
        k: torch.zeros((s["rows"], *s["shape"]), dtype=DTYPES[s["dtype"]])
        for k, s in w["dataset_only_keys"].items()
    }
    whole = {
        k: torch.zeros((w["num_steps"], w["num_envs"], *s["shape"]), dtype=DTYPES[s["dtype"]])
        for k, s in w["keys"].items()
    }
    out = {}
    orig = original.ExperienceBuffer(w["num_envs"], w["num_steps"], device=cpu)
    for k, s in w["keys"].items():
        orig.register_key(k, tuple(s["shape"]), DTYPES[s["dtype"]])
        orig.batch_update_data(k, whole[k])
    data = orig.make_dict()
    flat = _tensor_bytes(data.values())
    mb = original.DictDataset(batch, {**data, **extra})[0]
    out["original"] = {
        "rollout": _tensor_bytes(orig.buffers()),
        "flattened copy": flat,
        "minibatch": _tensor_bytes(mb.values()),
    }
    del orig, data, mb
    for name, compact in (("ours", False), ("ours, compact obs", True)):
        buf = ours_buffer(w, cpu, compact)
        for k, x in whole.items():
            buf.batch_update_data(k, x)
        data = buf.make_dict()
        data.update(extra)
        mb = rb.DictDataset(batch, data)[0]
        made = [dict.get(data, k) for k in w["keys"]]  # raw slots: only values made are tensors
        out[name] = {
            "rollout": buf.nbytes,
            "flattened copy": _tensor_bytes(v for v in made if isinstance(v, torch.Tensor)),
            "minibatch": _tensor_bytes(mb.values()),
        }
        del buf, data, mb
    return {n: {**p, "total": sum(p.values())} for n, p in out.items()}


def memory_check(w: dict, max_bytes: int = 8 << 20) -> str:
    """memory_from_sizes against memory_from_objects at a scaled-down size; raises on a mismatch."""
    small, _ = scale_down(w, max_bytes)
    want, got = memory_from_sizes(small), memory_from_objects(small)
    if want != got:
        raise AssertionError(f"{w['name']}: memory from sizes {want} != from objects {got}")
    return f"{small['num_envs']} envs"


def fmt_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def memory_table(workloads: Sequence[dict], check: bool = True) -> list[str]:
    """Markdown lines: per workload at its full size, the bytes an epoch holds at its peak for
    the original, ours and ours with compact observation keys (from :func:`memory_from_sizes`),
    each formula first checked against real objects at a small scale when ``check``."""
    rows, checked = [], []
    for w in workloads:
        if check:
            checked.append(f"{w['name']} at {memory_check(w)}")
        m = memory_from_sizes(w)
        o, u, k = (m[c]["total"] for c in MEMORY_COLUMNS)
        rows.append(
            [
                f"{w['name']} ({w['num_envs']} x {w['num_steps']}, {w['num_minibatches']} mb)",
                fmt_bytes(m["ours"]["rollout"]),
                fmt_bytes(m["ours, compact obs"]["rollout"]),
                fmt_bytes(m["ours"]["minibatch"]),
                f"**{fmt_bytes(o)}**",
                f"**{fmt_bytes(u)}** ({u / o:.0%})",
                f"**{fmt_bytes(k)}** ({k / o:.0%})",
                ", ".join(compact_keys(w)) or "-",
            ]
        )
    lines = [
        "Bytes an epoch holds at its peak, full-size workloads, computed from their sizes. "
        "original = rollout + make_dict's flattened copy (as big as the rollout) + one "
        "minibatch's copies; ours = rollout + one minibatch (make_dict makes no flattened copy); "
        "ours, compact obs = the same with the compact keys stored in "
        f"{str(COMPACT_STORAGE).removeprefix('torch.')} (a minibatch still serves them in "
        "float32, so it is as big). Percentages: of the original.",
        "",
        *md_table(
            [
                "workload (envs x steps, minibatches)",
                "rollout",
                "rollout, compact obs",
                "one minibatch",
                "original",
                "ours",
                "ours, compact obs",
                "compact keys",
            ],
            rows,
        ),  # fmt: skip
    ]
    if checked:
        lines += [
            "",
            "Checked against real CPU objects (each buffer's bytes, `buffer.nbytes` for ours, the "
            "make_dict values made, the first minibatch's tensors) at a small scale: "
            + "; ".join(checked)
            + ": equal.",
        ]
    return lines


# ---------------------------------------------------------------------------------------------
# The implementations, as three phases of one PPO epoch: writes(i) -> make_dict -> minibatches
# ---------------------------------------------------------------------------------------------


def ours_phases(
    w: dict,
    device: torch.device,
    inputs: dict,
    backend: str = "auto",
    lazy: bool = True,
    compact: bool = False,
) -> list[Callable]:
    """rollout_buffers: update_step per step (all keys in one call), make_dict, DictDataset.

    The dataset-only keys are added to make_dict's mapping in place (``data.update``), as
    ProtoMotions' AMP agent adds its expert keys; ``lazy=False`` runs with the eager make_dict
    (``set_lazy_make_dict(False)``: the flattened copies made at once, as before);
    ``compact=True`` keeps the workload's ``compact_keys`` in :data:`COMPACT_STORAGE` (the same
    float32 inputs, narrowed by the writes, served in float32).
    """
    buf = ours_buffer(w, device, compact)
    pool, extra, steps = inputs["pool"], inputs["extra"], w["num_steps"]
    batch = w["num_envs"] * steps // w["num_minibatches"]

    def writes(i):
        with rb.use_backend(backend):
            for t in range(steps):
                buf.update_step(t, pool[(i * steps + t) % len(pool)])

    def make_dict(_):
        lazy_before = rb.lazy_make_dict()
        rb.set_lazy_make_dict(lazy)
        try:
            with rb.use_backend(backend):
                return buf.make_dict()
        finally:
            rb.set_lazy_make_dict(lazy_before)

    def minibatches(data):
        with rb.use_backend(backend):
            data.update(extra)
            ds = rb.DictDataset(batch, data, shuffle=True)
            for epoch in range(w["num_epochs"]):
                if epoch:
                    ds.shuffle()
                for _ in ds:
                    pass

    return [writes, make_dict, minibatches]


def original_phases(w: dict, device: torch.device, inputs: dict) -> list[Callable]:
    """bench/original.py: update_data per key per step, make_dict, NumPy-permuted DictDataset."""
    buf = original.ExperienceBuffer(w["num_envs"], w["num_steps"], device=device)
    for k, s in w["keys"].items():
        buf.register_key(k, tuple(s["shape"]), DTYPES[s["dtype"]])
    pool, extra, steps = inputs["pool"], inputs["extra"], w["num_steps"]
    batch = w["num_envs"] * steps // w["num_minibatches"]

    def writes(i):
        for t in range(steps):
            for k, v in pool[(i * steps + t) % len(pool)].items():
                buf.update_data(k, t, v)

    def make_dict(_):
        return buf.make_dict()

    def minibatches(data):
        data.update(extra)
        ds = original.DictDataset(batch, data, shuffle=True)
        for epoch in range(w["num_epochs"]):
            if epoch:
                ds.shuffle()
            for b in range(len(ds)):  # the original's assert-based __getitem__ ends no for-loop
                ds[b]

    return [writes, make_dict, minibatches]


def compiled_original_phases(w: dict, device: torch.device, inputs: dict) -> list[Callable]:
    """The original's three hot loops under torch.compile (same program, same host permutation).

    The per-key write loop, the per-key swap_and_flatten01 and the per-key modulo gather are
    each one compiled function over all keys; the NumPy permutation and its host-to-device copy
    stay as in the original, since they are part of what the original does per minibatch.
    """

    def write(dsts, t, srcs):
        for d, s in zip(dsts, srcs, strict=True):
            d[t] = s

    def flatten(bufs):
        return [original.swap_and_flatten01(b) for b in bufs]

    def gather(tensors, rows):
        return [v[rows % v.shape[0]] for v in tensors]

    # Fresh compiles per workload: Dynamo caches on the code objects above, which every call of
    # this function shares, so a later workload would otherwise get shape-dynamic kernels
    # (automatic dynamic after the first workload's shapes) and count toward the recompile limit.
    torch._dynamo.reset()
    write_c, flatten_c, gather_c = (torch.compile(f) for f in (write, flatten, gather))
    keys = list(w["keys"])
    bufs = [
        torch.zeros(
            (w["num_steps"], w["num_envs"], *s["shape"]), dtype=DTYPES[s["dtype"]], device=device
        )
        for s in w["keys"].values()
    ]
    pool, extra, steps = inputs["pool"], inputs["extra"], w["num_steps"]
    pool_lists = [[p[k] for k in keys] for p in pool]
    n_rows = w["num_envs"] * steps
    batch = n_rows // w["num_minibatches"]

    def writes(i):
        for t in range(steps):
            write_c(bufs, t, pool_lists[(i * steps + t) % len(pool)])

    def make_dict(_):
        return dict(zip(keys, flatten_c(bufs), strict=True))

    def minibatches(data):
        tensors = [*data.values(), *extra.values()]
        for _ in range(w["num_epochs"]):
            perm = np.random.permutation(n_rows)
            for b in range(w["num_minibatches"]):
                rows = torch.as_tensor(perm[b * batch : (b + 1) * batch], device=device)
                gather_c(tensors, rows)

    return [writes, make_dict, minibatches]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def epoch_memory(w: dict, fns: Sequence[Callable], device: torch.device) -> int:
    """Memory one epoch costs beyond the buffers and inputs, in bytes.

    CPU: the bytes of the flattened copies of the rollout that the epoch made (make_dict's
    env-major tensors; a lazy mapping's values only if something read them). CUDA: the peak of
    ``torch.cuda.max_memory_allocated`` over the epoch, above what was allocated before it
    (flattened copies, minibatch outputs, tables).
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fns[2](fns[1](fns[0](0)))
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    data = fns[1](fns[0](0))
    fns[2](data)
    # dict.get: the raw slot, which a lazy mapping's unread values leave without a tensor
    values = [dict.get(data, k) for k in w["keys"]]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable, arg: Any, device: torch.device) -> tuple[Any, float, float]:
    """``(fn(arg), device seconds, host seconds)``.

    On CUDA the call starts on an idle device (synchronized first) and is timed with CUDA
    events, so its time is its own work, not a backlog left by what ran before; the host time
    is how long the Python call took to return (launch overhead, validation, ...). On CPU both
    are the wall-clock time.
    """
    if device.type != "cuda":
        h = time.perf_counter()
        out = fn(arg)
        h = time.perf_counter() - h
        return out, h, h
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    h = time.perf_counter()
    out = fn(arg)
    h = time.perf_counter() - h
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end) / 1e3, h


def interleaved_epochs(
    impls: dict[str, Sequence[Callable]], rounds: int, warmup: int, device: torch.device, bar=None
) -> tuple[dict, dict]:
    """Time the three phases of an epoch (writes(r) -> make_dict -> minibatches) and the whole
    epoch for every implementation, interleaved phase by phase: in each round every
    implementation runs its writes, then every one its make_dict, then its minibatches, in an
    order that rotates every round. So a burst of load from elsewhere on the machine hits all
    implementations alike instead of one whole epoch of one of them.

    The whole epoch: on CUDA a separate epoch run straight through, without the
    synchronizations that separate the phases (overlap between phases counts); on CPU nothing
    is asynchronous and it is the sum of the round's phases.
    Returns (times, host times): name -> [4 lists of seconds], warm-up rounds excluded.
    """
    names = list(impls)
    times = {n: [[] for _ in range(4)] for n in names}
    hosts = {n: [[] for _ in range(4)] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        args = dict.fromkeys(names, r)
        row_t = {n: [] for n in names}
        row_h = {n: [] for n in names}
        for k in range(3):
            for n in order:
                args[n], t, h = time_call(impls[n][k], args[n], device)
                row_t[n].append(t)
                row_h[n].append(h)
        for n in order:
            if device.type == "cuda":
                f = impls[n]
                _, t, h = time_call(lambda i, f=f: f[2](f[1](f[0](i))), r, device)
            else:
                t, h = sum(row_t[n]), sum(row_h[n])
            row_t[n].append(t)
            row_h[n].append(h)
        if r >= warmup:
            for n in names:
                for k in range(4):
                    times[n][k].append(row_t[n][k])
                    hosts[n][k].append(row_h[n][k])
        if bar is not None:
            bar.update(1)
    return times, hosts


def interleave(
    fns: dict[str, Callable[[int], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    progress=None,
) -> dict[str, list[float]]:
    """Time ``fn(rep)`` for every fn, ``repeats`` times each after ``warmup`` untimed rounds.

    The order of the implementations rotates every round. ``rep`` lets a fn pick its input set
    from a rotating pool. Returns name -> list of seconds.
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            _, t, _ = time_call(fns[name], r, device)
            if r >= warmup:
                out[name].append(t)
        if progress is not None:
            progress.update(1)
    return out


def stats(samples: Sequence[float]) -> dict[str, float]:
    """median, p20, p80 (seconds) and the sample count."""
    a = np.asarray(samples, dtype=float)
    p20, med, p80 = np.percentile(a, [20, 50, 80])
    return {"median": float(med), "p20": float(p20), "p80": float(p80), "n": len(a)}


def count_launches(fn: Callable, arg: Any, device: torch.device) -> int | None:
    """Device activities (kernels, memcpys, memsets) that one call of ``fn(arg)`` causes (CUDA only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(arg)
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def copy_seconds(
    nbytes: int, device: torch.device, repeats: int, warmup: int = 3
) -> dict[str, float]:
    """The physical limit: ``dst.copy_(src)`` between two plain buffers of ``nbytes``.

    Returns stats of the time per copy; the copy moves 2 * nbytes (read + write).
    """
    nbytes = max(int(nbytes), 1)
    pairs = [
        (torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255),
         torch.empty(nbytes, dtype=torch.uint8, device=device))
        for _ in range(pool_size(2 * nbytes, lo=1, hi=8))
    ]  # fmt: skip
    samples = interleave(
        {"copy": lambda r: pairs[r % len(pairs)][1].copy_(pairs[r % len(pairs)][0])},
        repeats,
        warmup,
        device,
    )
    return stats(samples["copy"])


def empty_launch(device: torch.device) -> tuple[str, Callable[[], None]]:
    """The smallest launch on ``device``: an empty Triton kernel on CUDA (else torch's ``zero_``
    of one element); on CPU a call of an empty Python function. Returns (label, fn)."""
    if device.type == "cuda":
        try:
            import triton

            @triton.jit
            def _empty(x):
                pass

            x = torch.empty(1, device=device)
            return "empty Triton kernel launch", lambda: _empty[(1,)](x)
        except Exception:
            x = torch.empty(1, device=device)
            return "torch zero_ of 1 element (no Triton)", x.zero_
    return "empty Python call", lambda: None


def per_call_seconds(
    fns: dict[str, Callable[[int], Any]],
    device: torch.device,
    calls: int,
    repeats: int,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Steady-state seconds per call: blocks of ``calls`` calls (``fn(k)`` with k the call
    number), timed as one region and divided by ``calls``; implementations interleaved."""

    def block(fn):
        def run(r):
            for k in range(r * calls, (r + 1) * calls):
                fn(k)

        return run

    samples = interleave({n: block(f) for n, f in fns.items()}, repeats, warmup, device)
    return {n: stats([s / calls for s in v]) for n, v in samples.items()}


# ---------------------------------------------------------------------------------------------
# Naming and writing results
# ---------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    """CUDA when there is a GPU, else CPU (then with :func:`set_cpu_threads` applied)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    set_cpu_threads()
    return torch.device("cpu")


def set_cpu_threads() -> None:
    """CPU timings use $BENCH_CPU_THREADS torch threads, default 1.

    Why not all cores: on a shared machine a multi-threaded op waits at its barrier for a
    thread that another process has descheduled. Measured on the 2-core development box with
    other jobs running: a 1 MB transpose copy took 14 ms median with 2 threads, 50 µs with 1;
    implementations then differ by whose op happened to stall. One thread compares them per core.
    """
    torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "absent (not importable)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_v,
        "numpy": np.__version__,
        "rollout_buffers": rb.__version__,
    }


def header(device: torch.device, command: str) -> list[str]:
    """The lines every results file starts with: device, versions, the exact command."""
    v = versions()
    return [
        f"- device: {device_label(device)}",
        f"- torch {v['torch']}, triton {v['triton']}, numpy {v['numpy']}, "
        f"python {v['python']}, rollout_buffers {v['rollout_buffers']}",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def fmt_time(s: float) -> str:
    """Seconds in a readable unit."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_stats(st: dict[str, float]) -> str:
    return f"{fmt_time(st['median'])} [{fmt_time(st['p20'])}, {fmt_time(st['p80'])}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width table for the terminal."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def write_text(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
