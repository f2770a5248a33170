"""Sequence minibatches for recurrent policies (part of `make bench`): rollout_buffers against
rsl_rl's RolloutStorage and its ``recurrent_mini_batch_generator``, on the same rollout.

Workload: locomotion of shared/workloads.json (4096 envs x 24 steps, 4 minibatches, 5 epochs,
its 12 keys) plus the states of rsl_rl's recurrent actor-critic: an LSTM of 2 layers x 256 for
the actor and one for the critic, ``h`` and ``c`` each, stored every step (4 keys of (2, 256)).
On CPU the number of envs is divided by a power of two until the rollout fits ``--cpu-max-mb``.

Implementations, interleaved round by round, each fed the same per-step tensors:
- ``chunks seq_len=8`` / ``chunks seq_len=24``: SequenceDataset, shuffled chunks; 4 minibatches
  per epoch, a new shuffle per epoch.
- ``trajectories (rsl_rl layout)``: TrajectoryDataset, rsl_rl's padded layout and envs in order.
- ``rsl_rl``: RolloutStorage.add_transition per step, recurrent_mini_batch_generator(4, 5).
Every one serves the fields rsl_rl's generator serves (observations, actions, values, returns,
advantages, log-probs, distribution parameters, hidden states, masks / resets).

Phases per iteration: ``write`` (every key of every step: update_step / add_transition),
``serve`` (building the dataset and every minibatch of every epoch), ``whole`` (both).
Ratios are rsl_rl / ours, the median of the per-round ratios: above 1 rsl_rl is slower. Then
the host cost per minibatch at a small number of envs (``--host-envs``), where Python and
dispatch dominate: µs per minibatch, the dataset built once and iterated epoch after epoch.

    python bench/bench_sequences.py [--repeats 11] [--cpu-max-mb 96] [--host-envs 16]

Writes bench/results/sequences-<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rollout_buffers as rb  # noqa: E402
from bench import common as c  # noqa: E402
from bench import rsl_rl_peer  # noqa: E402

HIDDEN = {"h_a": (2, 256), "c_a": (2, 256), "h_c": (2, 256), "c_c": (2, 256)}
# rsl_rl's fixed fields; every other key rides in its observations TensorDict (and is padded).
RSL_FIELDS = {"actions": "actions", "neglogp": "actions_log_prob", "value": "values",
              "rewards": "rewards", "dones": "dones", "advantages": "advantages",
              "returns": "returns"}  # fmt: skip
RSL_DIST = ("mean_action", "action_std")
NOT_SERVED = ("rewards", "dones")  # rsl_rl's generator serves neither
PHASES = ("write", "serve", "whole")


def workload(cpu_max_mb: int, device: torch.device) -> tuple[dict, str]:
    w = dict(c.load_workloads()["locomotion"])
    w["keys"] = {
        **w["keys"],
        **{k: {"shape": list(s), "dtype": "float32"} for k, s in HIDDEN.items()},
    }
    if device.type == "cuda":
        return w, "full size"
    small, factor = c.scale_down(w, cpu_max_mb << 20)
    return small, "full size" if factor == 1 else f"num_envs / {factor}"


def make_steps(w: dict, device: torch.device, seed: int = 0) -> list[dict]:
    """A pool of per-step inputs; the hidden states as an LSTM returns them, (layers, N, H)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = w["num_envs"]
    out = []
    step_bytes = c.rollout_bytes(w) // w["num_steps"]
    for _ in range(c.pool_size(step_bytes)):
        step = {}
        for k, s in w["keys"].items():
            if k in HIDDEN:
                layers, hid = s["shape"]
                step[k] = torch.randn(layers, n, hid, device=device, generator=gen)
            elif k == "dones":
                step[k] = (torch.rand(n, device=device, generator=gen) < 0.02).to(
                    c.DTYPES[s["dtype"]]
                )
            else:
                step[k] = c.random_tensor((n, *s["shape"]), c.DTYPES[s["dtype"]], device, gen)
        out.append(step)
    return out


class Ours:
    """rollout_buffers: update_step per step (hidden states written as (N, layers, H) views),
    then SequenceDataset (``seq_len``) or TrajectoryDataset (``seq_len=None``)."""

    def __init__(self, w, device, pool, seq_len):
        self.w, self.pool, self.seq = w, pool, seq_len
        n, t = w["num_envs"], w["num_steps"]
        self.buf = rb.ExperienceBuffer(n, t, device=device)
        for k, s in w["keys"].items():
            self.buf.register_key(k, tuple(s["shape"]), c.DTYPES[s["dtype"]])
        self.steps = [
            {k: v.transpose(0, 1) if k in HIDDEN else v for k, v in p.items()} for p in pool
        ]
        self.data_keys = [k for k in w["keys"] if k not in HIDDEN and k not in NOT_SERVED]
        self.obs_keys = [k for k in self.data_keys if k not in RSL_FIELDS and k not in RSL_DIST]

    def write(self, r):
        for t in range(self.w["num_steps"]):
            self.buf.update_step(t, self.steps[(r * self.w["num_steps"] + t) % len(self.steps)])

    def serve(self, r):
        w = self.w
        if self.seq is None:
            ds = rb.TrajectoryDataset(self.buf, w["num_envs"] // w["num_minibatches"],
                                      padded=self.obs_keys, keys=[k for k in self.data_keys if k not in self.obs_keys],
                                      hidden=list(HIDDEN))  # fmt: skip
        else:
            chunks = w["num_envs"] * w["num_steps"] // self.seq
            ds = rb.SequenceDataset(self.buf, self.seq, chunks // w["num_minibatches"],
                                    keys=self.data_keys, hidden=list(HIDDEN))  # fmt: skip
        for epoch in range(w["num_epochs"]):
            if epoch and self.seq is not None:
                ds.shuffle()
            for _ in ds:
                pass
        return ds


class RslRl:
    """rsl_rl's RolloutStorage: add_transition per step (transitions built beforehand, as a
    policy hands them over), then every minibatch of recurrent_mini_batch_generator."""

    def __init__(self, w, device, pool, rsl):
        from tensordict import TensorDict

        self.w, self.rsl = w, rsl
        n = w["num_envs"]
        keys = w["keys"]
        self.obs_keys = [
            k for k in keys if k not in RSL_FIELDS and k not in RSL_DIST and k not in HIDDEN
        ]
        example = TensorDict({k: pool[0][k] for k in self.obs_keys}, batch_size=[n], device=device)
        self.st = rsl.RolloutStorage("rl", n, w["num_steps"], example, tuple(keys["actions"]["shape"]),
                                     device=str(device))  # fmt: skip
        self.trs = []
        for p in pool:
            tr = rsl.RolloutStorage.Transition()
            tr.observations = TensorDict(
                {k: p[k] for k in self.obs_keys}, batch_size=[n], device=device
            )
            tr.actions, tr.rewards, tr.dones = p["actions"], p["rewards"], p["dones"]
            tr.values, tr.actions_log_prob = p["value"], p["neglogp"]
            tr.distribution_params = tuple(p[k] for k in RSL_DIST)
            tr.hidden_states = ((p["h_a"], p["c_a"]), (p["h_c"], p["c_c"]))
            # advantages / returns: rsl_rl's PPO fills them after the rollout; written per step
            # here, so that both libraries write the same keys per step.
            self.trs.append((tr, p["advantages"].view(-1, 1), p["returns"].view(-1, 1)))

    def write(self, r):
        st, t_steps = self.st, self.w["num_steps"]
        st.clear()
        for t in range(t_steps):
            tr, adv, ret = self.trs[(r * t_steps + t) % len(self.trs)]
            st.advantages[st.step].copy_(adv)
            st.returns[st.step].copy_(ret)
            st.add_transition(tr)

    def serve(self, r):
        w = self.w
        for _ in self.st.recurrent_mini_batch_generator(w["num_minibatches"], w["num_epochs"]):
            pass


def clocks():
    return time.perf_counter(), time.thread_time()


def run_rounds(impls: dict, repeats: int, warmup: int) -> dict:
    """name -> phase -> list of (wall s, thread CPU s); implementations interleaved, their
    order rotating every round."""
    names = list(impls)
    out = {n: {p: [] for p in PHASES} for n in names}
    for r in range(warmup + repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            impl = impls[n]
            w0, c0 = clocks()
            impl.write(r)
            w1, c1 = clocks()
            impl.serve(r)
            w2, c2 = clocks()
            if r >= warmup:
                out[n]["write"].append((w1 - w0, c1 - c0))
                out[n]["serve"].append((w2 - w1, c2 - c1))
                out[n]["whole"].append((w2 - w0, c2 - c0))
        print(f"  round {r + 1}/{warmup + repeats}", end="\r", flush=True)
    print()
    return out


def host_per_minibatch(w: dict, device, rsl, envs: int, epochs: int, repeats: int) -> dict:
    """µs per minibatch at ``envs`` envs (Python and dispatch dominate): each dataset built
    once, then ``epochs`` epochs of every minibatch (rsl_rl: one generator of that many epochs,
    its padding done once, as ours)."""
    small = dict(w, num_envs=envs)
    pool = make_steps(small, device)[:2]
    impls = {f"chunks seq_len={s}": Ours(small, device, pool, s) for s in (8, 24)}
    impls["trajectories (rsl_rl layout)"] = Ours(small, device, pool, None)
    if rsl is not None:
        impls["rsl_rl"] = RslRl(small, device, pool, rsl)
    nmb = w["num_minibatches"]
    runs = {}
    for name, impl in impls.items():
        impl.write(0)
        if name == "rsl_rl":

            def run(impl=impl):
                for _ in impl.st.recurrent_mini_batch_generator(nmb, epochs):
                    pass

        else:
            ds = impl.serve(0)

            def run(ds=ds, shuffled=impl.seq is not None):
                for _ in range(epochs):
                    if shuffled:
                        ds.shuffle()
                    for _ in ds:
                        pass

        runs[name] = run
    samples = {n: [] for n in runs}
    for r in range(repeats + 1):
        for n in list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]:
            t0 = time.thread_time()
            runs[n]()
            if r:
                samples[n].append((time.thread_time() - t0) / (epochs * nmb) * 1e6)
    return {n: c.stats(s) for n, s in samples.items()}


def fake_cuda_host_cost() -> str:
    """bench/host_sequences.py's table, run in its own process (its stand-ins patch torch)."""
    script = Path(__file__).with_name("host_sequences.py")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    out = done.stdout.strip()
    print(out)
    if done.returncode:
        return f"not measured: {(out or done.stderr).strip().splitlines()[-1:]}"
    return "\n".join(line for line in out.splitlines() if not line.startswith("host cost per call"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--cpu-max-mb", type=int, default=96, help="CPU: scale the rollout down to this size"
    )
    ap.add_argument(
        "--host-envs", type=int, default=16, help="envs for the host cost per minibatch"
    )
    args = ap.parse_args()
    device = c.pick_device()
    rsl = rsl_rl_peer.load()
    w, note = workload(args.cpu_max_mb, device)
    print(f"device: {c.device_label(device)}; {c.describe(w)} + LSTM states ({note}); "
          f"rsl_rl: {rsl.version if rsl else 'not available: ' + rsl_rl_peer.why_not()}")  # fmt: skip
    pool = make_steps(w, device)
    impls = {f"chunks seq_len={s}": Ours(w, device, pool, s) for s in (8, 24)}
    impls["trajectories (rsl_rl layout)"] = Ours(w, device, pool, None)
    if rsl is not None:
        impls["rsl_rl"] = RslRl(w, device, pool, rsl)
    res = run_rounds(impls, args.repeats, args.warmup)
    host = host_per_minibatch(w, device, rsl, args.host_envs, 20, args.repeats)

    rows, table = [], {}
    for n in impls:
        for p in PHASES:
            wall = c.stats([s[0] for s in res[n][p]])
            cpu = c.stats([s[1] for s in res[n][p]])
            ratio = None
            if "rsl_rl" in res and n != "rsl_rl":
                ratio = float(np.median([a[1] / b[1] for a, b in zip(res["rsl_rl"][p], res[n][p])]))
            table.setdefault(n, {})[p] = {"wall": wall, "cpu": cpu, "rsl_rl_over_ours": ratio}
            rows.append(
                [
                    n,
                    p,
                    c.fmt_stats(wall),
                    c.fmt_stats(cpu),
                    "" if ratio is None else f"{ratio:.2f}x",
                ]
            )
    hrows = [[n, f"{s['median']:.1f} [{s['p20']:.1f}, {s['p80']:.1f}]"] for n, s in host.items()]
    meta = {"device": c.device_label(device), "versions": {**c.versions(), "rsl-rl-lib": rsl.version if rsl else None},
            "command": c.command_line(), "repeats": args.repeats, "warmup": args.warmup}  # fmt: skip
    lines = [f"# Sequence minibatches for recurrent policies: {c.device_label(device)}", ""]
    lines += c.header(device, meta["command"])
    lines += [
        "",
        f"Workload: {c.describe(w)}, plus an LSTM state of 2 layers x 256 for the actor and the "
        f"critic (h and c: 4 keys of (2, 256) per step) ({note}). rsl-rl-lib "
        f"{rsl.version if rsl else 'not installed'}.",
        "",
        "Per iteration: `write` = every key of every step (update_step / add_transition), "
        "`serve` = building the dataset and every minibatch of every epoch, `whole` = both. "
        f"Median [p20, p80] over {args.repeats} interleaved rounds after {args.warmup} warm-up "
        "rounds; wall clock and the CPU time of the (only) torch thread. rsl_rl / ours = the "
        "median of the per-round ratios of CPU time: above 1 rsl_rl is slower.",
        "",
    ]
    lines += c.md_table(["implementation", "phase", "wall", "thread CPU", "rsl_rl / ours"], rows)
    lines += [
        "",
        f"Host cost per minibatch at {args.host_envs} envs x {w['num_steps']} steps (µs of thread "
        "CPU per minibatch, median [p20, p80]; the dataset built once, 20 epochs of 4 minibatches "
        "per sample; rsl_rl: one generator of 20 epochs):",
        "",
    ]
    lines += c.md_table(["implementation", "µs per minibatch"], hrows)
    host_cuda = fake_cuda_host_cost()
    lines += ["", "Host cost per minibatch on the CUDA path, without a GPU (`python "
              "bench/host_sequences.py`: shared/tools/host_launch.py's stand-in CUDA driver; "
              "est. CUDA adds the driver's estimated share):", ""]  # fmt: skip
    lines += host_cuda.splitlines() or ["not measured"]
    lines += [
        "",
        "Notes: rsl_rl serves its minibatches in order, most fields as views of its storage; its "
        "padded observations are made once per generator. The chunks are shuffled and every "
        "minibatch is a gathered copy of every field (one launch on CUDA). No GPU measured here "
        "unless the header names one.",
    ]
    slug = c.device_slug(device)
    md = c.write_text(c.RESULTS / f"sequences-{slug}.md", lines)
    js = c.RESULTS / f"sequences-{slug}.json"
    js.write_text(
        json.dumps(
            {"meta": meta, "workload": w, "results": table, "host_us": host}, indent=1, default=str
        )
        + "\n"
    )
    print(c.text_table(["implementation", "phase", "wall", "thread CPU", "rsl_rl / ours"], rows))
    print(c.text_table(["implementation", "host µs per minibatch"], hrows))
    print("wrote", md.relative_to(c.ROOT), js.relative_to(c.ROOT))


if __name__ == "__main__":
    main()
