"""Recurrent PPO on CartPole with the velocities hidden, trained from SequenceDataset minibatches.

The policy sees only the cart's position and the pole's angle; to balance it must estimate the
velocities from what it saw before, which a GRU learns to do. The rollout goes into an
ExperienceBuffer (with the GRU state each step started from), GAE runs on the buffer, and PPO
trains on shuffled chunks of ``--seq-len`` steps: each chunk starts from its stored state, and
the state restarts from zero where ``resets`` says an episode ended inside the chunk.

    python examples/recurrent_cartpole.py                  # ~15 s on 2 CPU cores
    python examples/recurrent_cartpole.py --iterations 30 --envs 32

Prints the mean return of the episodes that ended in each iteration (200 = balanced to the time
limit; a random policy gets ~22), and the time spent in rollout_buffers per iteration. Where
rsl_rl is installed (``make setup`` installs it) it also times rsl_rl's RolloutStorage on the
same rollout: ``add_transition`` per step and its ``recurrent_mini_batch_generator`` (padded
trajectories) for the same epochs and minibatches, next to ours serving the same layout
(TrajectoryDataset).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rollout_buffers as rb

# ---------------------------------------------------------------------------------------------
# The environment: the classic cart-pole, batched in torch, positions observed only
# ---------------------------------------------------------------------------------------------


class CartPole:
    """``num_envs`` cart-poles stepped together (gym's CartPole-v1 dynamics, 200-step limit)."""

    GRAVITY, CART, POLE, HALF_LEN, FORCE, DT = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    X_LIMIT, THETA_LIMIT, MAX_STEPS = 2.4, 12 * 2 * np.pi / 360, 200

    def __init__(self, num_envs: int, generator: torch.Generator) -> None:
        self.g = generator
        self.state = torch.zeros(num_envs, 4)
        self.steps = torch.zeros(num_envs, dtype=torch.long)
        self._reset(torch.ones(num_envs, dtype=torch.bool))

    def _reset(self, which: torch.Tensor) -> None:
        fresh = (torch.rand(self.state.shape, generator=self.g) - 0.5) * 0.1
        self.state = torch.where(which[:, None], fresh, self.state)
        self.steps = torch.where(which, 0, self.steps)

    def observe(self) -> torch.Tensor:
        return self.state[:, [0, 2]]  # cart position, pole angle: no velocities

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``action`` (0: push left, 1: push right); returns (reward, done) and resets the
        envs that are done (time limit included)."""
        x, x_dot, th, th_dot = self.state.unbind(1)
        force = (action.float() * 2 - 1) * self.FORCE
        cos, sin = th.cos(), th.sin()
        total, pm_len = self.CART + self.POLE, self.POLE * self.HALF_LEN
        tmp = (force + pm_len * th_dot**2 * sin) / total
        th_acc = (self.GRAVITY * sin - cos * tmp) / (
            self.HALF_LEN * (4.0 / 3.0 - self.POLE * cos**2 / total)
        )
        x_acc = tmp - pm_len * th_acc * cos / total
        self.state = torch.stack(
            [
                x + self.DT * x_dot,
                x_dot + self.DT * x_acc,
                th + self.DT * th_dot,
                th_dot + self.DT * th_acc,
            ],
            dim=1,
        )
        self.steps += 1
        fell = (self.state[:, 0].abs() > self.X_LIMIT) | (self.state[:, 2].abs() > self.THETA_LIMIT)
        done = fell | (self.steps >= self.MAX_STEPS)
        self._reset(done)
        return torch.ones(len(done)), done


# ---------------------------------------------------------------------------------------------
# The policy: a GRU with an actor head and a critic head
# ---------------------------------------------------------------------------------------------


class RecurrentPolicy(nn.Module):
    def __init__(self, obs_dim: int = 2, hidden: int = 64, actions: int = 2) -> None:
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh())
        self.gru = nn.GRUCell(hidden, hidden)
        self.actor = nn.Linear(hidden, actions)
        self.critic = nn.Linear(hidden, 1)

    def step(self, obs: torch.Tensor, h: torch.Tensor):
        """One step: (logits, value, next state)."""
        h = self.gru(self.encoder(obs * 4.0), h)
        return self.actor(h), self.critic(h).squeeze(-1), h

    def unroll(self, obs: torch.Tensor, h0: torch.Tensor, resets: torch.Tensor):
        """A chunk: ``obs`` (seq, B, obs_dim) from ``h0`` (B, hidden), the state zeroed at the
        steps where ``resets`` (seq, B) is true. Returns logits (seq, B, A), values (seq, B)."""
        h, logits, values = h0, [], []
        for s in range(obs.shape[0]):
            h = torch.where(resets[s, :, None], 0.0, h)
            lg, v, h = self.step(obs[s], h)
            logits.append(lg)
            values.append(v)
        return torch.stack(logits), torch.stack(values)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def make_buffer(
    num_envs: int, num_steps: int, hidden: int, compact: bool = False
) -> rb.ExperienceBuffer:
    """The rollout's keys; ``compact`` keeps the observations and the GRU states in bfloat16
    (served as float32)."""
    buffer = rb.ExperienceBuffer(num_envs, num_steps, device="cpu")
    storage = torch.bfloat16 if compact else None
    buffer.register_key("obs", (2,), storage=storage)
    buffer.register_key("h", (hidden,), storage=storage)  # the state each step starts from
    buffer.register_key("actions", dtype=torch.long)
    buffer.register_key("logp")
    buffer.register_key("value")
    buffer.register_key("next_value")
    buffer.register_key("rewards")
    buffer.register_key("dones", dtype=torch.bool)
    buffer.register_key("advantages")
    buffer.register_key("returns")
    return buffer


class Timer:
    """Seconds spent inside ``with timer:`` blocks, accumulated."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t


def ppo_loss(policy, batch, clip=0.2, value_coef=0.5, entropy_coef=0.01):
    logits, values = policy.unroll(batch["obs"], batch["h"], batch["resets"])
    dist = torch.distributions.Categorical(logits=logits)
    logp = dist.log_prob(batch["actions"])
    adv = batch["advantages"]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = (logp - batch["logp"]).exp()
    actor = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
    critic = (values - batch["returns"]).pow(2).mean()
    return actor + value_coef * critic - entropy_coef * dist.entropy().mean()


def train(
    iterations: int = 60,
    num_envs: int = 64,
    num_steps: int = 32,
    seq_len: int = 8,
    num_minibatches: int = 4,
    epochs: int = 4,
    hidden: int = 64,
    lr: float = 3e-3,
    gamma: float = 0.99,
    lam: float = 0.95,
    reward_scale: float = 0.1,
    seed: int = 0,
    compare_rsl_rl: bool = False,
    log=print,
    compact: bool = False,
) -> dict:
    """Train; returns per iteration the mean episode return and the seconds spent in
    rollout_buffers (and in rsl_rl's storage on the same data when ``compare_rsl_rl``).

    Rewards are stored times ``reward_scale``: with returns of up to ~100 the value loss would
    swamp the actor's gradient in the shared GRU (its norm is clipped), and learning crawls.

    ``compact``: observations and GRU states kept in bfloat16 storage (served as float32).

    Torch's and NumPy's global RNGs are left as they were: the run draws from its own
    generators (same seed, same run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the network's initialization
        return _train(
            iterations, num_envs, num_steps, seq_len, num_minibatches, epochs, hidden, lr,
            gamma, lam, reward_scale, seed, compare_rsl_rl, log, compact,
        )  # fmt: skip


def _train(iterations, num_envs, num_steps, seq_len, num_minibatches, epochs, hidden, lr,
           gamma, lam, reward_scale, seed, compare_rsl_rl, log, compact=False):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    env = CartPole(num_envs, g)
    policy = RecurrentPolicy(hidden=hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    buffer = make_buffer(num_envs, num_steps, hidden, compact)
    chunks = num_envs * num_steps // seq_len
    peer = (
        _RslRlTiming(num_envs, num_steps, hidden, num_minibatches, epochs)
        if compare_rsl_rl
        else None
    )

    h = torch.zeros(num_envs, hidden)
    ep_return = torch.zeros(num_envs)
    out = {"returns": [], "library_s": [], "gae_s": [], "rsl_rl_s": [], "ours_rsl_layout_s": []}
    for it in range(iterations):
        lib, gae = Timer(), Timer()  # storage and minibatches; GAE (rsl_rl's PPO does its own)
        finished = []
        with torch.no_grad():
            for t in range(num_steps):
                obs = env.observe()
                logits, value, h_next = policy.step(obs, h)
                action = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
                logp = torch.distributions.Categorical(logits=logits).log_prob(action)
                reward, done = env.step(action)
                step = {"obs": obs, "h": h, "actions": action, "logp": logp, "value": value,
                        "rewards": reward * reward_scale, "dones": done}  # fmt: skip
                with lib:
                    buffer.update_step(t, step)
                if peer:
                    peer.add(step)
                ep_return += reward
                finished += ep_return[done].tolist()
                ep_return[done] = 0
                h = torch.where(done[:, None], 0.0, h_next)  # a new episode starts from zero
            last_value = policy.step(env.observe(), h)[1]
            # next_value[t]: the value of the state after step t, zero where the episode ended
            # (the time limit is treated as an end, which this short example can afford).
            next_value = torch.cat([buffer.value[1:], last_value[None]]) * ~buffer.dones
            with gae:
                buffer.batch_update_data("next_value", next_value)
                buffer.compute_gae(gamma, lam, values="value")
            with lib:
                dataset = rb.SequenceDataset(
                    buffer, seq_len, chunks // num_minibatches, hidden="h", generator=g
                )
        for epoch in range(epochs):
            with lib:
                if epoch:
                    dataset.shuffle()
            for i in range(len(dataset)):
                with lib:
                    batch = dataset[i]
                loss = ppo_loss(policy, batch)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
                opt.step()
        mean = float(np.mean(finished)) if finished else (out["returns"] or [0.0])[-1]
        out["returns"].append(mean)
        out["library_s"].append(lib.seconds)
        out["gae_s"].append(gae.seconds)
        line = (f"iter {it:3d}  mean return {mean:6.1f}  ({len(finished):3d} episodes)  "
                f"rollout_buffers {lib.seconds * 1e3:5.2f} ms + GAE {gae.seconds * 1e3:4.2f} ms")  # fmt: skip
        if peer:
            theirs, ours_same = peer.finish(buffer)
            out["rsl_rl_s"].append(theirs)
            out["ours_rsl_layout_s"].append(ours_same)
            line += f"  | rsl_rl {theirs * 1e3:5.2f} ms"
        log(line)
    return out


class _RslRlTiming:
    """rsl_rl's RolloutStorage fed the same rollout: add_transition per step, then every
    minibatch of its recurrent generator; against TrajectoryDataset on our buffer (the same
    padded layout) plus our writes. Seconds per iteration."""

    def __init__(self, num_envs, num_steps, hidden, num_minibatches, epochs):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tensordict import TensorDict

        from bench import rsl_rl_peer  # the repository's loader of the installed rsl_rl

        self.rsl = rsl_rl_peer.load()
        if self.rsl is None:
            raise RuntimeError(f"rsl_rl is not available: {rsl_rl_peer.why_not()}")
        self.TensorDict = TensorDict
        self.n, self.mb, self.epochs = num_envs, num_minibatches, epochs
        obs = TensorDict({"policy": torch.zeros(num_envs, 2)}, batch_size=[num_envs])
        self.storage = self.rsl.RolloutStorage("rl", num_envs, num_steps, obs, (1,), device="cpu")
        self.seconds = 0.0

    def add(self, step):
        tr = self.rsl.RolloutStorage.Transition()
        tr.observations = self.TensorDict({"policy": step["obs"]}, batch_size=[self.n])
        tr.actions = step["actions"][:, None].float()
        tr.rewards, tr.dones = step["rewards"], step["dones"]
        tr.values, tr.actions_log_prob = step["value"][:, None], step["logp"]
        tr.distribution_params = (step["logp"][:, None],)
        tr.hidden_states = (step["h"][None], None)  # rsl_rl keeps (layers, envs, hidden)
        t = time.perf_counter()
        self.storage.add_transition(tr)
        self.seconds += time.perf_counter() - t

    def finish(self, buffer):
        t = time.perf_counter()
        for _ in self.storage.recurrent_mini_batch_generator(self.mb, self.epochs):
            pass
        theirs = self.seconds + time.perf_counter() - t
        self.storage.clear()
        self.seconds = 0.0
        t = time.perf_counter()
        ds = rb.TrajectoryDataset(buffer, self.n // self.mb, padded="obs", hidden="h")
        for _ in range(self.epochs):
            for _ in ds:
                pass
        return theirs, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--envs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rsl-rl", action="store_true", help="skip the rsl_rl timing")
    ap.add_argument(
        "--compact", action="store_true",
        help="keep observations and GRU states in bfloat16 storage (served as float32)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    compare = not args.no_rsl_rl
    if compare:
        try:
            _RslRlTiming(args.envs, args.steps, 64, 4, 4)
        except Exception as exc:  # not installed here: train without the comparison
            print(f"(no rsl_rl comparison: {exc})")
            compare = False
    t = time.perf_counter()
    out = train(args.iterations, args.envs, args.steps, args.seq_len, seed=args.seed,
                compare_rsl_rl=compare, compact=args.compact)  # fmt: skip
    wall = time.perf_counter() - t
    r = out["returns"]
    print(f"\nmean return: first iteration {r[0]:.1f}, best {max(r):.1f}, "
          f"last 5 iterations {np.mean(r[-5:]):.1f}; {wall:.1f} s")  # fmt: skip
    lib, gae = np.median(out["library_s"]) * 1e3, np.median(out["gae_s"]) * 1e3
    print(f"rollout_buffers per iteration: writes, dataset and every minibatch {lib:.2f} ms "
          f"(median), GAE {gae:.2f} ms")  # fmt: skip
    if compare:
        theirs = np.median(out["rsl_rl_s"]) * 1e3
        same = np.median(out["ours_rsl_layout_s"]) * 1e3
        print(
            f"rsl_rl's RolloutStorage on the same rollout (add_transition per step, every "
            f"minibatch of its recurrent generator): {theirs:.2f} ms (median), {theirs / lib:.2f}x "
            f"ours; TrajectoryDataset serving rsl_rl's layout: {same:.2f} ms"
        )


if __name__ == "__main__":
    main()
