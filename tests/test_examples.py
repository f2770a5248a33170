"""The programs in examples/ run, and do what they claim (at a small size)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recurrent_cartpole_learns_from_sequence_minibatches():
    # A random policy balances ~20 steps; 12 iterations of PPO on chunks of 8 steps take it past
    # 60 in every seed tried (0-9: 66-114 over the last 3 iterations).
    example = load_example("recurrent_cartpole")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds barrier waits (as main() does)
    try:
        out = example.train(iterations=12, seed=0, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    returns = out["returns"]
    assert len(returns) == len(lines) == 12
    assert returns[0] < 25, returns
    assert np.mean(returns[-3:]) > 60, returns
    assert all(s > 0 for s in out["library_s"])
    # it draws from its own generators: the global RNGs are where they were
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_recurrent_cartpole_script_runs_and_times_rsl_rl_where_installed():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recurrent_cartpole.py"), "--iterations", "2",
         "--envs", "16", "--steps", "16"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "iter   1  mean return" in done.stdout
    assert "rollout_buffers per iteration" in done.stdout
    from bench import rsl_rl_peer

    if rsl_rl_peer.load() is not None:
        assert "rsl_rl's RolloutStorage on the same rollout" in done.stdout, done.stdout
