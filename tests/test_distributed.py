"""Two ranks, one buffer each: minibatches never mix ranks' rollouts.

``torch.multiprocessing.spawn`` starts two processes joined by ``torch.distributed`` (gloo on
CPU through a file:// rendezvous; NCCL on two GPUs when there are two). Each rank fills its own
``ExperienceBuffer`` with data that encodes the rank, builds a ``DictDataset`` shuffled by a
per-rank generator and all-reduces once per minibatch (as a data-parallel optimizer step
would). Each rank checks that its minibatches are exactly a permutation of its own rollout, and
the all-reduced sums equal the two rollouts' totals.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
NUM_ENVS, NUM_STEPS, BATCH = 16, 8, 32  # 128 rows, 4 minibatches per epoch
EPOCHS = 3
TIMEOUT_S = 60  # the whole spawn, start-up included; typically a few seconds


def rollout_value(rank: int, step: int, env: int) -> int:
    """A distinct integer per (rank, step, env): a row from the other rank cannot pass."""
    return rank * 1_000_000 + env * 1_000 + step


def _worker(rank: int, backend: str, init_file: str, result_dir: str) -> None:
    # Imports inside: the child process starts fresh (spawn), and a failure is written out.
    try:
        from rollout_buffers import DictDataset, ExperienceBuffer, use_backend

        device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=30),
        )
        with use_backend("auto" if device.type == "cuda" else "torch"):
            buf = ExperienceBuffer(NUM_ENVS, NUM_STEPS, device=device)
            buf.register_key("id", dtype=torch.int64)
            buf.register_key("obs", shape=(3,), dtype=torch.float64)
            envs = torch.arange(NUM_ENVS, device=device)
            gen = torch.Generator(device=device).manual_seed(1234 + rank)  # per-rank seed
            perms = []
            for epoch in range(EPOCHS):
                for step in range(NUM_STEPS):
                    ids = rollout_value(rank, step, 0) + envs * 1_000 + epoch * 100
                    buf.update_step(step, {"id": ids, "obs": ids.double()[:, None].expand(-1, 3)})
                data = buf.make_dict()
                expected = data["id"].clone()
                dataset = DictDataset(BATCH, data, shuffle=True, generator=gen)
                perms.append(dataset.shuffled_to_original.clone())
                seen, reduced_total = [], 0
                for batch in dataset:
                    assert torch.equal(batch["obs"], batch["id"].double()[:, None].expand(-1, 3))
                    seen.append(batch["id"])
                    total = batch["id"].sum().clone()
                    dist.all_reduce(total)  # one collective per minibatch
                    reduced_total += int(total)
                seen = torch.cat(seen)
                assert torch.equal(seen.sort().values, expected.sort().values), (
                    "not a permutation of own rollout"
                )
                assert not torch.equal(seen, expected), "minibatches were not shuffled"
                assert ((seen // 1_000_000) == rank).all(), "a row of the other rank"
                both = sum(
                    rollout_value(r, s, e) + epoch * 100
                    for r in range(WORLD)
                    for s in range(NUM_STEPS)
                    for e in range(NUM_ENVS)
                )
                assert reduced_total == both, (reduced_total, both)
            # per-rank generators: the two ranks drew different permutations
            mine = torch.stack(perms)
            others = [torch.empty_like(mine) for _ in range(WORLD)]
            dist.all_gather(others, mine)
            assert not torch.equal(others[0], others[1]), "both ranks drew the same permutations"
            assert torch.equal(others[rank], mine)
        dist.barrier()
        dist.destroy_process_group()
        Path(result_dir, f"ok{rank}").write_text("ok")
    except BaseException:
        Path(result_dir, f"error{rank}").write_text(traceback.format_exc())
        raise


def run_two_ranks(backend: str, tmp_path: Path) -> None:
    init_file = tmp_path / "rendezvous"
    ctx = mp.spawn(_worker, args=(backend, str(init_file), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s")
    except mp.ProcessRaisedException:
        errors = [p.read_text() for p in sorted(tmp_path.glob("error*"))]
        pytest.fail("a rank failed:\n" + "\n".join(errors))
    finally:
        for process in ctx.processes:  # only the processes started above
            if process.is_alive():
                process.terminate()
                process.join(5)
    assert sorted(p.name for p in tmp_path.glob("ok*")) == [f"ok{r}" for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_cpu_ranks_gloo_each_minibatch_is_from_its_own_rollout(tmp_path, monkeypatch):
    if "GLOO_SOCKET_IFNAME" not in os.environ:  # stay on loopback (the children inherit it)
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    run_two_ranks("gloo", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="needs 2 CUDA devices and NCCL",
)
def test_two_gpu_ranks_nccl_each_minibatch_is_from_its_own_rollout(tmp_path):
    run_two_ranks("nccl", tmp_path)
