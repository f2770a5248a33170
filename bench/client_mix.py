"""Recorded call mixes of real training code, replayed per call against the original module.

Two mixes, each replayed with its sources' properties (views, strides, dtypes, shapes), on
rollout_buffers and on the original (bench/original.py) in the same run, interleaved call by call
(which of the two goes first alternates), every call timed on its own:

* ``amp``: ProtoMotions' AMP agent, one env: 24 keys registered; per step 15 ``update_data`` in
  the agent's order (``dones`` a bool source into its int64 key, ``amp_rewards`` a ``.flatten()``
  view of an ``(N, 1)`` output, the rest fresh and contiguous); then 11 ``batch_update_data`` of
  ``(T, N[, 1])`` tensors, ``make_dict``, a ``DictDataset`` of that dict plus two expert-style
  keys shorter than the rollout (indexed modulo), and the minibatch loop, every key of every
  minibatch read. ``register_key`` is timed on separate buffers (all 24 keys, a few builds).
* ``isaac``: an Isaac Lab / rsl_rl style step: the policy and critic observations are column
  slices of one concatenated ``(N, 470)`` tensor, ``actions_log_prob`` a ``.squeeze(-1)`` view,
  ``dones`` a bool source into a bool key, the rest fresh. Written (a) with one ``update_step``
  per step and (b) with one ``update_data`` per key; the original has no ``update_step``, so both
  are compared with its per-key ``update_data`` loop (the row ``update_data loop(isaac)`` is the
  sum of (b)'s per-key calls of a step).

Sources are made before the timed calls (a pool of tensors rotating over steps; every call gets a
fresh tensor object over pooled memory, or a fresh view), so a timing is the call alone.

Two paths, one results file each (bench/results/client_mix-<path>.md):

* ``cpu``: CPU tensors, one torch thread; per call the thread's CPU time (``--clock cpu``, the
  default: other processes on a shared machine do not count) or wall time (``--clock wall``),
  less the clock's own cost (measured at start).
* ``host``: the CUDA code path's host cost, without a GPU: run in a fresh process (no
  TRITON_INTERPRET) under the project's host-cost instrument, shared/tools/host_launch.py (its
  fake mode: a stand-in libcuda under Triton's real launcher, storage-less stand-in CUDA tensors,
  eager torch operators on them run on meta tensors and calibrated; see its docstring). Loaded
  from beside the checkout, or ``--tool``. Every row is host_launch's "est. CUDA" per call: the
  thread's CPU time + 2.0 µs per launch + 0.15 µs per pointer argument + 2.5 µs per eager GPU
  operation, allocation excluded (outputs pooled). Stand-ins here also get a storage object
  (data pointer only, no memory) so the library's overlap checks of view sources can run.
  Stand-ins hold no memory, so this path runs at ProtoMotions' size (``--host-envs 4096``). Not
  run where a CUDA device is present (the stand-ins would replace its driver).

How to read the tables: one row per call type, ``n`` calls each; ours and the original's median
and p90 in µs per call; ratios ours / original (below 1: we are faster). p90 matters: a slow call
every few steps can hide under a good median. The last line sums up every CPU row (ratio of
medians / ratio of p90s, ``y`` when <= 1.00) and, from the host path, ``update_step(isaac) /
original per-key loop`` (target <= 0.5). Exit status 0 (a measurement) unless ``--check``: then 1
when a CPU ratio (median or p90) is above 1.10.

    python bench/client_mix.py [--path both|cpu|host] [--envs 1024] [--steps 32] [--rollouts 20]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

F32, I64, BOOL = torch.float32, torch.int64, torch.bool
CHECK_LIMIT = 1.10  # --check: a CPU ratio above this fails
HOST_TARGET = 0.5  # update_step(isaac) / original per-key loop, est. CUDA
# host_launch's defaults for what its stand-ins leave out (µs): see its docstring.
DRIVER = SimpleNamespace(driver_launch_us=2.0, driver_pointer_us=0.15, eager_enqueue_us=2.5)

# ---------------------------------------------------------------------------------------------
# The recorded mixes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What one call hands over: a view of, or a fresh tensor object over, a pooled tensor."""

    key: str
    pool: str  # the pooled tensor it reads (several sources may read one)
    view: Callable[[Tensor], Tensor] | None  # None: a fresh tensor object, not a view
    what: str  # for the table


def fresh(key: str, what: str = "") -> Source:
    return Source(key, key, None, what or "fresh, contiguous")


# ProtoMotions AMP (registration order and shapes as recorded from its agent).
AMP_KEYS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("terrain", (256,), F32),
    ("max_coords_obs", (358,), F32),
    ("historical_max_coords_obs", (2864,), F32),
    ("steering", (5,), F32),
    ("action", (69,), F32),
    ("mean_action", (69,), F32),
    ("neglogp", (), F32),
    ("value", (1,), F32),
    ("disc_logits", (1,), F32),
    ("disc_value", (1,), F32),
    ("rewards", (), F32),
    ("unnormalized_rewards", (), F32),
    ("dones", (), I64),
    ("next_value", (1,), F32),
    ("returns", (), F32),
    ("advantages", (), F32),
    ("unnormalized_value", (1,), F32),
    ("unnormalized_next_value", (1,), F32),
    ("amp_rewards", (), F32),
    ("unnormalized_amp_rewards", (), F32),
    ("next_disc_value", (1,), F32),
    ("disc_returns", (), F32),
    ("unnormalized_disc_value", (1,), F32),
    ("unnormalized_next_disc_value", (1,), F32),
]
# Per step, in the agent's call order.
AMP_STEP: list[Source] = [
    *(fresh(k) for k in ("terrain", "max_coords_obs", "historical_max_coords_obs", "steering")),
    *(fresh(k) for k in ("action", "mean_action", "neglogp", "value", "disc_logits")),
    fresh("disc_value"),
    fresh("dones", "bool (N,), fresh, into the int64 key"),
    *(fresh(k) for k in ("rewards", "next_value", "next_disc_value")),
    Source("amp_rewards", "amp_rewards", lambda x: x.flatten(), ".flatten() view of (N, 1)"),
]
# After the rollout: the keys computed over the whole rollout (rewards and amp_rewards again,
# normalized), each (T, N[, 1]), fresh and contiguous.
AMP_BATCH: list[str] = [
    "unnormalized_rewards", "rewards", "unnormalized_amp_rewards", "amp_rewards",
    "unnormalized_value", "unnormalized_next_value", "returns", "advantages",
    "unnormalized_disc_value", "unnormalized_next_disc_value", "disc_returns",
]  # fmt: skip
# Dataset-only keys added to make_dict's mapping (as the agent adds its expert data): a width
# like the discriminator's observation and lengths of a fraction of the rollout's rows (modelled,
# not recorded: the recorded run had one env).
AMP_EXTRA: dict[str, tuple[int, tuple[int, ...]]] = {  # key -> (rows divisor, shape)
    "expert_disc_obs": (2, (1050,)),
    "replay_disc_obs": (4, (1050,)),
}

# Isaac Lab / rsl_rl: observation groups are column slices of one concatenated tensor.
ISAAC_OBS = {"policy_obs": (0, 235), "critic_obs": (235, 470)}
ISAAC_KEYS: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("policy_obs", (235,), F32),
    ("critic_obs", (235,), F32),
    ("actions", (12,), F32),
    ("rewards", (), F32),
    ("dones", (), BOOL),
    ("values", (1,), F32),
    ("actions_log_prob", (), F32),
    ("action_mean", (12,), F32),
    ("action_sigma", (12,), F32),
]
ISAAC_STEP: list[Source] = [
    *(
        Source(k, "obs", lambda x, a=a, b=b: x[:, a:b], f"column slice [:, {a}:{b}] of (N, 470)")
        for k, (a, b) in ISAAC_OBS.items()
    ),
    fresh("actions"),
    fresh("rewards"),
    fresh("dones", "bool (N,), fresh, into a bool key"),
    fresh("values"),
    Source("actions_log_prob", "log_prob", lambda x: x.squeeze(-1), ".squeeze(-1) view of (N, 1)"),
    fresh("action_mean"),
    fresh("action_sigma"),
]


def amp_pools(n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The pooled tensors of one AMP step: name -> (shape, dtype)."""
    spec = {k: (s, d) for k, s, d in AMP_KEYS}
    out = {s.key: ((n, *spec[s.key][0]), spec[s.key][1]) for s in AMP_STEP}
    out["dones"] = ((n,), BOOL)
    out["amp_rewards"] = ((n, 1), F32)
    return out


def isaac_pools(n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {k: ((n, *s), d) for k, s, d in ISAAC_KEYS if k not in ISAAC_OBS}
    out["obs"] = ((n, 470), F32)
    out["log_prob"] = ((n, 1), F32)
    del out["actions_log_prob"]
    return out


# ---------------------------------------------------------------------------------------------
# A path: how tensors are made and calls are timed (CPU, or the CUDA path through stand-ins)
# ---------------------------------------------------------------------------------------------


@dataclass
class Rig:
    name: str  # "cpu" or "host"
    device: torch.device
    rb: ModuleType  # rollout_buffers
    orig: ModuleType  # bench/original.py
    tensor: Callable[[tuple[int, ...], torch.dtype], Tensor]  # a new pooled tensor
    alias: Callable[[Tensor], Tensor]  # a new tensor object over the same memory, not a view
    prepare: Callable[[Tensor], Tensor]  # applied to every source and buffer made
    building: Callable[[], contextlib.AbstractContextManager]  # around making sources/buffers
    timing: Callable[[bool], contextlib.AbstractContextManager]  # around timed calls (alloc?)
    measure: Callable[[Callable[..., Any], tuple], tuple[Any, float, dict]]  # (out, µs, counts)
    clock: str
    overhead_ns: int
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    counts: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    what: dict[str, str] = field(default_factory=dict)  # row -> what its source is
    last: tuple[float, dict] = (0.0, {})  # the last timed call's µs and counts

    def time(self, row: str, impl: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn(*args)`` once, timed; record µs (and, on the host path, counts) under row."""
        out, us, counts = self.measure(fn, args)
        self.record(row, impl, us, counts)
        self.last = (us, counts)
        return out

    def record(self, row: str, impl: str, us: float, counts: dict) -> None:
        self.samples.setdefault(row, {"ours": [], "original": []})[impl].append(us)
        acc = self.counts.setdefault(row, {}).setdefault(impl, {"calls": 0})
        acc["calls"] += 1
        for k, v in counts.items():
            acc[k] = acc.get(k, 0) + v


def clock_fn(clock: str) -> Callable[[], int]:
    return time.thread_time_ns if clock == "cpu" else time.perf_counter_ns


def clock_overhead(now: Callable[[], int]) -> int:
    """Median ns between two back-to-back clock reads: subtracted from every timing."""
    d = []
    for _ in range(5000):
        a = now()
        d.append(now() - a)
    return int(np.median(d))


def alias_cpu(t: Tensor) -> Tensor:
    """A new tensor object over ``t``'s memory that is no view (``_base is None``), as a fresh
    output of real code is; so that nothing can key on a pooled tensor's identity."""
    return torch.empty(0, dtype=t.dtype).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


def cpu_rig(clock: str) -> Rig:
    import rollout_buffers as rb
    from bench import common, original

    common.set_cpu_threads()  # one torch thread unless $BENCH_CPU_THREADS
    gen = torch.Generator().manual_seed(0)
    now = clock_fn(clock)
    over = clock_overhead(now)

    def measure(fn: Callable[..., Any], args: tuple) -> tuple[Any, float, dict]:
        t0 = now()
        out = fn(*args)
        t1 = now()
        return out, (t1 - t0 - over) / 1e3, {}

    return Rig(
        "cpu", torch.device("cpu"), rb, original,
        tensor=lambda shape, dtype: common.random_tensor(shape, dtype, torch.device("cpu"), gen),
        alias=alias_cpu, prepare=lambda t: t, building=contextlib.nullcontext,
        timing=lambda alloc=False: contextlib.nullcontext(), measure=measure,
        clock=clock, overhead_ns=over,
    )  # fmt: skip


def find_tool(given: str | None) -> Path | None:
    """shared/tools/host_launch.py: --tool, $HOST_LAUNCH_TOOL, beside the checkout or above it,
    or a copy in .shared-tools/ (how bench/gpu_session.sh carries it)."""
    if given:
        return Path(given) if Path(given).is_file() else None
    if os.environ.get("HOST_LAUNCH_TOOL"):
        return Path(os.environ["HOST_LAUNCH_TOOL"])
    candidates = [ROOT / ".shared-tools" / "host_launch.py"]
    candidates += [p / "shared" / "tools" / "host_launch.py" for p in ROOT.parents]
    return next((p for p in candidates if p.is_file()), None)


def host_rig(tool: Path, clock: str) -> Rig:
    """The CUDA code path under host_launch.py's fake mode (installed before anything imports
    the library or launches a kernel)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_launch", tool)
    H = importlib.util.module_from_spec(spec)
    sys.modules["host_launch"] = H
    spec.loader.exec_module(H)
    H.ENV.mode = "fake"
    H.install_fake_cuda()  # raises H.FakeModeError naming what no longer fits
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):  # as host_launch: one CPU, steadier per-call times
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    rb = H.import_library(ROOT)
    from bench import original

    fake = H.ENV.fake
    est = H.Estimator(DRIVER)
    H.calibrate_emulation(H.Bench(rounds=9, block_us=1000, clock=clock), est)
    now = clock_fn(clock)
    fake.set_clock(now)
    over = clock_overhead(now)
    twins: dict[int, Tensor] = {}

    def give_storage(t: Tensor) -> Tensor:
        # A stand-in has no storage; the library's overlap check of a view source reads its
        # storage's data pointer. Give it one: a CPU storage object at the stand-in's made-up
        # address (nothing reads it), bound as untyped_storage so the call costs what it costs
        # on a real tensor. Views of one stand-in share its storage's address, hence one twin.
        base = t.data_ptr() - t.storage_offset() * t.element_size()
        twin = twins.get(base)
        if twin is None:
            nbytes = H._storage_bytes(t.shape, t.stride(), t.dtype, t.storage_offset())
            store = torch._C._construct_storage_from_data_pointer(base, torch.device("cpu"), nbytes)
            twin = twins[base] = torch.empty(0, dtype=torch.uint8).set_(store)
        t.untyped_storage = twin.untyped_storage
        return t

    def alias(t: Tensor) -> Tensor:
        base = t.data_ptr() - t.storage_offset() * t.element_size()
        return H._standin(t.shape, t.dtype, t.stride(), t.storage_offset(), base)

    @contextlib.contextmanager
    def timing(alloc: bool = False) -> Iterator[None]:
        enter, leave = fake.timed(alloc)
        enter()
        try:
            yield
        finally:
            leave()

    keys = ("launches", "pointer_queries", "eager_ops", "eager_view", "eager_inplace",
            "eager_new", "eager_gpu_ops", "allocs", "syncs")  # fmt: skip

    def measure(fn: Callable[..., Any], args: tuple) -> tuple[Any, float, dict]:
        a, x0 = fake.counters(), fake.excluded_ns()
        t0 = now()
        out = fn(*args)
        t1 = now()
        x1, b = fake.excluded_ns(), fake.counters()
        counts = {k: b[k] - a[k] for k in keys}
        return out, est.project((t1 - t0 - (x1 - x0) - over) / 1e3, counts), counts

    return Rig(
        "host", H.ENV.device, rb, original,
        tensor=lambda shape, dtype: give_storage(H.device_tensor(shape, dtype)),
        alias=lambda t: give_storage(alias(t)), prepare=give_storage, building=H.setup_context,
        timing=timing, measure=measure, clock=clock, overhead_ns=over,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Replaying the mixes
# ---------------------------------------------------------------------------------------------


def make_pools(rig: Rig, pools: dict, count: int) -> list[dict[str, Tensor]]:
    with rig.building():
        return [{k: rig.tensor(s, d) for k, (s, d) in pools.items()} for _ in range(count)]


def step_sources(rig: Rig, pool: dict[str, Tensor], sources: list[Source]) -> dict[str, Tensor]:
    """One step's sources: fresh objects (a new view, or a new tensor over pooled memory)."""
    with rig.building():
        return {
            s.key: rig.prepare(s.view(pool[s.pool])) if s.view else rig.alias(pool[s.pool])
            for s in sources
        }


def buffers(rig: Rig, n: int, t: int, keys: list, impls: tuple[str, ...]) -> dict[str, Any]:
    """One ExperienceBuffer per impl name ('ours*' -> rollout_buffers, else the original)."""
    out = {}
    with rig.building():
        for name in impls:
            cls = rig.rb.ExperienceBuffer if name.startswith("ours") else rig.orig.ExperienceBuffer
            b = out[name] = cls(n, t, device=rig.device)
            for k, s, d in keys:
                b.register_key(k, s, d)
            for buf in b._buffers.values():
                rig.prepare(buf)
    return out


def read_batch(batch: dict[str, Tensor]) -> None:
    """A training loop reads every key of a minibatch."""
    for k in batch:
        batch[k]


def pair(rig: Rig, row: str, first: int, calls: dict[str, tuple]) -> list:
    """Time ours and the original's call (``calls[impl] = (fn, *args)``), ``first`` goes first."""
    order = ("ours", "original") if first % 2 == 0 else ("original", "ours")
    out = {impl: rig.time(row, impl, *calls[impl]) for impl in order}
    return [out["ours"], out["original"]]


def run_register_key(rig: Rig, n: int, t: int, builds: int) -> None:
    """register_key of the 24 AMP keys on new buffers, ours and the original's in turn."""
    for b in range(builds + 1):  # the first build warms up, untimed
        with rig.building():
            ours = rig.rb.ExperienceBuffer(n, t, device=rig.device)
            orig = rig.orig.ExperienceBuffer(n, t, device=rig.device)
        gc.collect()
        with rig.timing(True):  # on the host path: allocation counted (host_launch's proxy)
            for i, (k, s, d) in enumerate(AMP_KEYS):
                if b == 0:
                    ours.register_key(k, s, d)
                    orig.register_key(k, s, d)
                else:
                    pair(rig, "register_key", i + b, {
                        "ours": (ours.register_key, k, s, d),
                        "original": (orig.register_key, k, s, d)})  # fmt: skip
        del ours, orig
    rig.what["register_key"] = "24 keys, AMP shapes and dtypes"


def run_amp(rig: Rig, n: int, t: int, minibatches: int, rollouts: int, warmup: int) -> None:
    """The AMP mix: writes, batch writes, make_dict, DictDataset, minibatches; per rollout."""
    bufs = buffers(rig, n, t, AMP_KEYS, ("ours", "original"))
    step_pools = make_pools(rig, amp_pools(n), 4)
    spec = {k: (s, d) for k, s, d in AMP_KEYS}
    batch_pools = make_pools(rig, {k: ((t, n, *spec[k][0]), spec[k][1]) for k in AMP_BATCH}, 2)
    extra_pool = make_pools(
        rig, {k: ((n * t // div, *s), F32) for k, (div, s) in AMP_EXTRA.items()}, 1
    )[0]
    batch_size = n * t // minibatches
    for s in AMP_STEP:
        rig.what[f"update_data[{s.key}]"] = s.what
    rig.what["batch_update_data"] = f"{len(AMP_BATCH)} keys, (T, N[, 1]) fresh"
    rig.what["make_dict"] = "24 keys"
    extra = ", ".join(f"{k} N*T/{d} rows" for k, (d, _) in AMP_EXTRA.items())
    rig.what["DictDataset.__init__"] = f"make_dict's dict + {extra}, shuffle=True"
    rig.what["dataset[i]"] = f"batch {batch_size} of 26 keys, every key read"
    for r in range(warmup + rollouts):
        # Every call's source, made before the timed calls: one set per implementation.
        srcs = {
            impl: [step_sources(rig, step_pools[(r * t + i) % 4], AMP_STEP) for i in range(t)]
            for impl in ("ours", "original")
        }
        with rig.building():
            batch = {
                impl: {k: rig.alias(v) for k, v in batch_pools[r % 2].items()}
                for impl in ("ours", "original")
            }
            extras = {impl: {k: rig.alias(v) for k, v in extra_pool.items()} for impl in srcs}
        gc.collect()
        with rig.timing(False):
            call = _caller(rig, timed=r >= warmup)
            for i in range(t):
                for j, s in enumerate(AMP_STEP):
                    call(f"update_data[{s.key}]", i + j + r, {
                        impl: (bufs[impl].update_data, s.key, i, srcs[impl][i][s.key])
                        for impl in ("ours", "original")})  # fmt: skip
            for j, k in enumerate(AMP_BATCH):
                call("batch_update_data", j + r, {
                    impl: (bufs[impl].batch_update_data, k, batch[impl][k])
                    for impl in ("ours", "original")})  # fmt: skip
            data = call("make_dict", r, {
                impl: (bufs[impl].make_dict,) for impl in ("ours", "original")})  # fmt: skip
            for d, impl in zip(data, ("ours", "original")):
                d.update(extras[impl])  # as the agent adds its expert data
            ds = call("DictDataset.__init__", r, {
                "ours": (rig.rb.DictDataset, batch_size, data[0], True),
                "original": (rig.orig.DictDataset, batch_size, data[1], True)})  # fmt: skip
            for i in range(minibatches):
                call("dataset[i]", i + r, {
                    impl: (lambda d, i: read_batch(d[i]), ds[k], i)
                    for k, impl in enumerate(("ours", "original"))})  # fmt: skip
            del data, ds  # as the agent's train_epoch drops them before the next rollout
        del srcs, batch, extras
        gc.collect()


def _caller(rig: Rig, timed: bool) -> Callable[[str, int, dict], list]:
    """``call(row, first, calls)``: timed (``pair``) after the warm-up, plain calls before."""
    if timed:
        return lambda row, first, calls: pair(rig, row, first, calls)

    def untimed(row: str, first: int, calls: dict) -> list:
        return [calls[i][0](*calls[i][1:]) for i in ("ours", "original")]

    return untimed


def run_isaac(rig: Rig, n: int, t: int, rollouts: int, warmup: int) -> None:
    """The Isaac Lab mix: (a) update_step per step, (b) update_data per key, the original's
    per-key loop; interleaved per step, the order rotating."""
    bufs = buffers(rig, n, t, ISAAC_KEYS, ("ours_step", "ours_keys", "original"))
    pools = make_pools(rig, isaac_pools(n), 4)
    for s in ISAAC_STEP:
        rig.what[f"update_data[isaac:{s.key}]"] = s.what
    rig.what["update_step(isaac)"] = "9 keys, one call; original: its per-key update_data loop"
    rig.what["update_data loop(isaac)"] = "9 keys, sum of the per-key calls of a step"
    impls = ("ours_step", "ours_keys", "original")
    for r in range(warmup + rollouts):
        timed = r >= warmup
        srcs = {
            impl: [step_sources(rig, pools[(r * t + i) % 4], ISAAC_STEP) for i in range(t)]
            for impl in impls
        }
        gc.collect()
        with rig.timing(False):
            for i in range(t):
                k0 = (i + r) % 3
                for impl in impls[k0:] + impls[:k0]:
                    b, step = bufs[impl], srcs[impl][i]
                    if not timed:
                        if impl == "ours_step":
                            b.update_step(i, step)
                        else:
                            for key, x in step.items():
                                b.update_data(key, i, x)
                    elif impl == "ours_step":
                        rig.time("update_step(isaac)", "ours", b.update_step, i, step)
                    else:
                        who = "ours" if impl == "ours_keys" else "original"
                        total, counts = 0.0, {}
                        for key, x in step.items():
                            rig.time(f"update_data[isaac:{key}]", who, b.update_data, key, i, x)
                            total += rig.last[0]
                            for k, v in rig.last[1].items():
                                counts[k] = counts.get(k, 0) + v
                        rig.record("update_data loop(isaac)", who, total, counts)
                        if who == "original":  # update_step is compared with this loop too
                            rig.record("update_step(isaac)", who, total, counts)
            for b in bufs.values():
                b.make_dict()  # untimed: a new rollout begins (its result dropped)
        del srcs
        gc.collect()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def summarize(rig: Rig) -> list[dict]:
    rows = []
    for row, by in rig.samples.items():
        ours, orig = np.asarray(by["ours"]), np.asarray(by["original"])
        if not len(ours) or not len(orig):
            continue
        om, o9 = np.percentile(ours, [50, 90])
        pm, p9 = np.percentile(orig, [50, 90])
        counts = {
            impl: {k: v / c["calls"] for k, v in c.items() if k != "calls"}
            for impl, c in rig.counts.get(row, {}).items()
        }
        rows.append({
            "call": row, "source": rig.what.get(row, ""), "n": len(ours),
            "ours_median": float(om), "ours_p90": float(o9),
            "orig_median": float(pm), "orig_p90": float(p9),
            "ratio_median": float(om / pm), "ratio_p90": float(o9 / p9), "counts": counts,
        })  # fmt: skip
    order = [
        "register_key",
        *(f"update_data[{s.key}]" for s in AMP_STEP),
        "batch_update_data", "make_dict", "DictDataset.__init__", "dataset[i]",
        "update_step(isaac)", "update_data loop(isaac)",
        *(f"update_data[isaac:{s.key}]" for s in ISAAC_STEP),
    ]  # fmt: skip
    return sorted(rows, key=lambda r: order.index(r["call"]) if r["call"] in order else 99)


def fmt_us(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def table(rows: list[dict], host: bool) -> list[str]:
    head = ["call", "source", "n", "ours median", "ours p90", "original median", "original p90",
            "median ratio", "p90 ratio"]  # fmt: skip
    if host:
        head += ["ours launches / eager ops", "original eager ops"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['call']}`", r["source"], str(r["n"]), fmt_us(r["ours_median"]),
                 fmt_us(r["ours_p90"]), fmt_us(r["orig_median"]), fmt_us(r["orig_p90"]),
                 f"{r['ratio_median']:.2f}", f"{r['ratio_p90']:.2f}"]  # fmt: skip
        if host:
            o, p = r["counts"].get("ours", {}), r["counts"].get("original", {})
            cells += [f"{o.get('launches', 0):g} / {o.get('eager_ops', 0):g}",
                      f"{p.get('eager_ops', 0):g}"]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


def cpu_summary(rows: list[dict]) -> str:
    parts = [
        f"{r['call']} {r['ratio_median']:.2f}{'y' if r['ratio_median'] <= 1 else 'n'}"
        f"/{r['ratio_p90']:.2f}{'y' if r['ratio_p90'] <= 1 else 'n'}"
        for r in rows
    ]
    ok_m = sum(r["ratio_median"] <= 1 for r in rows)
    ok_p = sum(r["ratio_p90"] <= 1 for r in rows)
    return f"cpu ({ok_m}/{len(rows)} medians, {ok_p}/{len(rows)} p90s <= 1.00): " + ", ".join(parts)


def host_target(rows: list[dict]) -> str:
    r = next((r for r in rows if r["call"] == "update_step(isaac)"), None)
    if r is None:
        return "host: update_step(isaac)/original per-key loop = n/a (not measured)"
    v = r["ratio_median"]
    verdict = "met" if v <= HOST_TARGET else "missed"
    return (
        f"host est. CUDA: update_step(isaac)/original per-key loop = {v:.2f} "
        f"(p90 {r['ratio_p90']:.2f}; target <= {HOST_TARGET}: {verdict})"
    )


def header_lines(rig: Rig, args: argparse.Namespace, n: int, seconds: float) -> list[str]:
    from bench import common

    v = common.versions()
    if rig.name == "cpu":
        dev = common.device_label(rig.device)
        title = "CPU path (CPU tensors, µs per call)"
    else:
        dev = (common.device_label(torch.device("cpu")).split(", torch threads")[0]
               + ", torch threads 1, pinned to one CPU; no GPU: CUDA path through host_launch.py's "
               "stand-ins (fake sm_90 driver)")  # fmt: skip
        title = "CUDA path's host cost (est. CUDA µs per call, host_launch.py fake mode)"
    clock = (
        "thread CPU time (time.thread_time_ns)"
        if rig.clock == "cpu"
        else "wall time (time.perf_counter_ns)"
    )
    return [
        f"# client_mix, {title}: recorded call mixes, rollout_buffers vs the original",
        "",
        f"- command: `{args.command_line}`",
        f"- device: {dev}",
        f"- torch {v['torch']}, triton {v['triton']}, numpy {v['numpy']}, python {v['python']}, "
        f"rollout_buffers {v['rollout_buffers']}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; this path took {seconds:.0f} s",
        f"- sizes: {n} envs x {args.steps} steps; AMP {args.minibatches} minibatches, "
        f"{args.rollouts} rollouts after {args.warmup} warm-up; isaac the same envs and steps; "
        f"register_key {args.builds} builds after 1 warm-up",
        f"- clock: {clock} per call, the clock's own {rig.overhead_ns} ns subtracted; ours and "
        "the original interleaved call by call, the order alternating",
    ]


def write_results(rig: Rig, rows: list[dict], args: argparse.Namespace, n: int, secs: float,
                  extra: list[str]) -> Path:  # fmt: skip
    path = Path(args.out_dir) / f"client_mix-{rig.name}.md"
    lines = header_lines(rig, args, n, secs)
    if rig.name == "host":
        lines.append(
            "- est. CUDA = thread CPU time (emulated eager operators' own cost subtracted, "
            "calibrated) + 2.0 µs per launch + 0.15 µs per pointer argument + 2.5 µs per eager "
            "GPU operation; allocation excluded except in register_key (host_launch's proxy); "
            "the original's minibatch index copy to the device is inside its index operator and "
            "not counted (in the original's favour); pinning is stubbed (in ours' favour)"
        )
    lines += [
        "- notes: ours' make_dict is lazy (a mapping whose values are made when read; a "
        "DictDataset over it gathers from the (T, N) storage), the original's copies every key; "
        "`dataset[i]` includes reading every key of the minibatch; isaac's dones is a bool "
        "source into a bool key (AMP's: bool into int64)",
        "",
        *table(rows, rig.name == "host"),
        "",
        *extra,
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_path(rig: Rig, args: argparse.Namespace, n: int) -> list[dict]:
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: collections stay short
    run_register_key(rig, n, args.steps, args.builds)
    print(f"[{rig.name}] register_key done ({time.perf_counter() - t0:.0f} s)", flush=True)
    run_amp(rig, n, args.steps, args.minibatches, args.rollouts, args.warmup)
    print(f"[{rig.name}] amp done ({time.perf_counter() - t0:.0f} s)", flush=True)
    run_isaac(rig, n, args.steps, args.rollouts, args.warmup)
    print(f"[{rig.name}] isaac done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = summarize(rig)
    secs = time.perf_counter() - t0
    last = cpu_summary(rows) if rig.name == "cpu" else host_target(rows)
    path = write_results(rig, rows, args, n, secs, [last])
    print("\n".join(["", *table(rows, rig.name == "host"), ""]))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return rows


def run_host_child(args: argparse.Namespace) -> list[dict] | None:
    """The host path in a fresh process (the stand-ins must be in place before anything else)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "host.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--path", "host", "--json", str(out),
               "--command-line", args.command_line, *args.forward]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        try:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=900).returncode
        except subprocess.TimeoutExpired:
            rc = "on a 900 s timeout"
        if rc != 0 or not out.is_file():
            print(f"client_mix: the host path exited {rc}; not measured", flush=True)
            return None
        return json.loads(out.read_text())


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--path", choices=("both", "cpu", "host"), default="both")
    ap.add_argument("--envs", type=int, default=1024,
                    help="num_envs on the CPU path (scaled down from ProtoMotions' 4096: time, memory)")  # fmt: skip
    ap.add_argument("--host-envs", type=int, default=4096,
                    help="num_envs on the host path (stand-ins: no memory, so the real size)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=32, help="num_steps")
    ap.add_argument("--minibatches", type=int, default=8, help="AMP minibatches per rollout")
    ap.add_argument("--rollouts", type=int, default=20, help="timed rollouts per mix")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rollouts first")
    ap.add_argument("--builds", type=int, default=3, help="timed register_key builds")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--tool", help="path of shared/tools/host_launch.py (default: found beside)")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if a CPU median or p90 ratio is above {CHECK_LIMIT}")  # fmt: skip
    ap.add_argument("--json", help=argparse.SUPPRESS)  # the host child's results
    ap.add_argument("--command-line", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.command_line is None:
        args.command_line = " ".join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    # what the host child gets: every option but --path, --json, --command-line, --check
    args.forward = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("path", "json", "command_line", "check", "forward", "tool") and v is not None
    ] + ([f"--tool={args.tool}"] if args.tool else [])
    return args


def main() -> int:
    args = parse_args()
    cpu_rows: list[dict] | None = None
    host_rows: list[dict] | None = None
    if args.path == "host":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("client_mix: the host path needs a process without TRITON_INTERPRET")
            return 2 if args.json else 0
        if torch.cuda.is_available():  # the stand-ins would replace a real driver
            print("client_mix: a CUDA device is present; the host path's stand-ins are for "
                  "machines without one: not measured (time real CUDA calls instead)")  # fmt: skip
            return 2 if args.json else 0
        tool = find_tool(args.tool)
        if tool is None:
            print("client_mix: no shared/tools/host_launch.py found (pass --tool); host path "
                  "not measured")  # fmt: skip
            return 2 if args.json else 0
        try:
            rig = host_rig(tool, args.clock)
        except Exception as exc:  # H.FakeModeError: a stand-in no longer fits torch or Triton
            print(f"client_mix: the host path cannot run here ({type(exc).__name__}: {exc})")
            return 2 if args.json else 0
        host_rows = run_path(rig, args, args.host_envs)
        if args.json:
            Path(args.json).write_text(json.dumps(host_rows))
        print(host_target(host_rows), flush=True)
        sys.stderr.flush()
        # Skip the interpreter's teardown: Triton's bindings print pages of nanobind "leaked"
        # warnings at exit under the stand-in driver. Everything is written and flushed.
        os._exit(0)
    if args.path in ("both", "cpu"):
        cpu_rows = run_path(cpu_rig(args.clock), args, args.envs)
    if args.path == "both":
        host_rows = run_host_child(args)
    line = "client_mix ours/original per call, median/p90 (y: <= 1.00): " + (
        cpu_summary(cpu_rows) if cpu_rows else "cpu: not run"
    )
    if args.path == "both":
        line += " | " + host_target(host_rows or [])
    print(line)
    over = [r["call"] for r in cpu_rows or []
            if max(r["ratio_median"], r["ratio_p90"]) > CHECK_LIMIT]  # fmt: skip
    if args.check and over:
        print(f"--check: {len(over)} CPU ratio(s) above {CHECK_LIMIT}: {', '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
