"""The Triton kernels on a real GPU: bit equality at workload sizes, no host synchronization,
CUDA-graph capture of ``update_step``, and a buffer on a second GPU. Skipped without CUDA."""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from rollout_buffers import DictDataset, ExperienceBuffer, ops, use_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def compiled_kernels():
    """These tests need the kernels compiled for the GPU, not Triton's CPU interpreter (which
    cannot be switched off once triton is imported)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is on: run the GPU tests in a process without it")


def step_write(*args):
    return importlib.import_module("rollout_buffers.kernels").step_write(*args)


def transpose_flatten(*args):
    return importlib.import_module("rollout_buffers.kernels").transpose_flatten(*args)


def permuted_gather(*args):
    return importlib.import_module("rollout_buffers.kernels").permuted_gather(*args)


DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def _workload(name):
    # bench/workloads.json is the copy kept in the repository (a bare clone on a GPU machine
    # has no shared/): without it these tests would skip, not run.
    for path in (
        ROOT / "shared" / "workloads.json",
        ROOT.parent / "shared" / "workloads.json",
        ROOT / "bench" / "workloads.json",
    ):
        if path.exists():
            return json.loads(path.read_text())[name]
    pytest.skip("workloads.json not found (shared/ or bench/)")


def rand(shape, dtype, device="cuda"):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, shape, device=device, dtype=torch.int64).to(dtype)


def _keys(w):
    return {k: (tuple(v["shape"]), DTYPES[v["dtype"]]) for k, v in w["keys"].items()}


@pytest.mark.parametrize("name", ["locomotion", "humanoid"])
def test_kernels_bit_equal_at_workload_sizes(name):
    w = _workload(name)
    n, t = w["num_envs"], w["num_steps"]
    keys = _keys(w)
    dsts = [rand((t, n, *s), d) for s, d in keys.values()]
    refs = [x.clone() for x in dsts]
    for index in range(t):
        srcs = [rand((n, *s), d) for s, d in keys.values()]
        if index % 2:  # sources that are views: a row slice and an expanded row
            srcs[0] = rand((2 * n, *srcs[0].shape[1:]), srcs[0].dtype)[::2]
            srcs[-1] = srcs[-1][:1].expand_as(srcs[-1])
        step_write(dsts, index, srcs)
        ops.torch_write_step(refs, index, srcs)
    for k, a, b in zip(keys, dsts, refs, strict=True):
        assert torch.equal(a, b), k

    flat = transpose_flatten(dsts)
    for k, a, b in zip(keys, flat, ops.torch_flatten(dsts), strict=True):
        assert torch.equal(a, b), k

    rows = n * t
    extra = w.get("dataset_only_keys", {})
    tensors = flat + [rand((v["rows"], *v["shape"]), DTYPES[v["dtype"]]) for v in extra.values()]
    perm = torch.randperm(rows, device="cuda")
    batch = rows // w["num_minibatches"]
    for start in range(0, rows, batch):
        got = permuted_gather(tensors, perm, start, batch)
        for a, b in zip(got, ops.torch_gather(tensors, perm, start, batch), strict=True):
            assert torch.equal(a, b)
    torch.cuda.synchronize()


def _epoch(buf, w, sources, generator):
    for index in range(w["num_steps"]):
        buf.update_step(index, sources)
    data = buf.make_dict()
    dataset = DictDataset(
        data["rewards"].shape[0] // w["num_minibatches"], data, shuffle=True, generator=generator
    )
    batches = 0
    for _ in range(w["num_epochs"]):
        for _batch in dataset:
            batches += 1
        dataset.shuffle()
    return batches


@pytest.mark.parametrize("use_generator", [True, False], ids=["generator", "numpy-shuffle"])
def test_no_host_sync_in_a_full_epoch(use_generator):
    # numpy-shuffle: the default shuffle draws on the host (as the original did) and copies
    # the permutation through pinned memory, non-blocking: no synchronization either.
    w = _workload("locomotion")
    buf = ExperienceBuffer(w["num_envs"], w["num_steps"], device="cuda")
    for k, (s, d) in _keys(w).items():
        buf.register_key(k, shape=s, dtype=d)
    sources = {k: rand((w["num_envs"], *s), d) for k, (s, d) in _keys(w).items()}
    gen = torch.Generator(device="cuda") if use_generator else None
    with use_backend("triton"):
        _epoch(buf, w, sources, gen)  # warm-up: compiles the kernels, builds the tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _epoch(buf, w, sources, gen)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_update_step_replays_in_a_cuda_graph():
    n, t = 1024, 4
    keys = {
        "obs": ((45,), torch.float32),
        "actions": ((12,), torch.float32),
        "rewards": ((), torch.float32),
        "dones": ((), torch.bool),
        "img": ((3, 5), torch.uint8),
        "value": ((1,), torch.float16),
    }
    buf = ExperienceBuffer(n, t, device="cuda")
    for k, (s, d) in keys.items():
        buf.register_key(k, shape=s, dtype=d)
    static = {k: rand((n, *s), d) for k, (s, d) in keys.items()}
    with use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            buf.update_step(2, static)  # warm-up: compile and build the table outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            buf.update_step(2, static)
    for _ in range(3):
        fresh = {k: rand((n, *s), d) for k, (s, d) in keys.items()}
        for k in keys:
            static[k].copy_(fresh[k])
        graph.replay()
        torch.cuda.synchronize()
        for k in keys:
            assert torch.equal(getattr(buf, k)[2], fresh[k]), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_buffer_on_a_second_gpu():
    n, t = 333, 5
    buf = ExperienceBuffer(n, t, device="cuda:1")
    ref = ExperienceBuffer(n, t, device="cuda:1")
    keys = {"obs": ((7,), torch.float32), "rewards": ((), torch.float32), "d": ((), torch.bool)}
    for k, (s, d) in keys.items():
        buf.register_key(k, shape=s, dtype=d)
        ref.register_key(k, shape=s, dtype=d)
    assert torch.cuda.current_device() == 0
    for index in range(t):
        step = {k: rand((n, *s), d, device="cuda:1") for k, (s, d) in keys.items()}
        with use_backend("triton"):
            buf.update_step(index, step)
        with use_backend("torch"):
            ref.update_step(index, step)
    with use_backend("triton"):
        data = buf.make_dict()
        batch = DictDataset(n, data)[2]
    with use_backend("torch"):
        want = ref.make_dict()
        want_batch = DictDataset(n, want)[2]
    torch.cuda.synchronize("cuda:1")
    for k in keys:
        assert data[k].device == torch.device("cuda:1")
        assert torch.equal(data[k], want[k]), k
        assert torch.equal(batch[k], want_batch[k]), k
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("variant", ["walk", "scan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(24, 4096), (33, 1000, 2), (1, 5)])
def test_gae_kernel_matches_torch_and_does_not_sync(variant, dtype, shape, device="cuda"):
    """The GAE kernel compiled for the GPU against the PyTorch path (tolerance: FMA and the
    scan's association differ), (T, N) rewards and bool dones broadcast over a value head."""
    from rollout_buffers.gae import torch_gae

    gae = importlib.import_module("rollout_buffers.kernels.gae")
    t, n = shape[:2]
    v, nv = rand(shape, dtype, device), rand(shape, dtype, device)
    r = rand((t, n), dtype, device)
    d = torch.rand((t, n), device=device) < 0.05
    adv, ret = (torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2))
    gae.gae(r, v, nv, d, adv, ret, 0.99, 0.95, variant=variant)  # compiles
    adv.fill_(float("nan"))
    ret.fill_(float("nan"))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        gae.gae(r, v, nv, d, adv, ret, 0.99, 0.95, variant=variant)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    want = [torch.empty_like(adv), torch.empty_like(ret)]
    torch_gae(r, v, nv, d, 0.99, 0.95, *want)
    tol = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {}}.get(dtype, {})
    for got, ref in zip((adv, ret), want, strict=True):
        torch.testing.assert_close(got, ref, **tol)


def test_an_assigned_device_permutation_with_entries_outside_the_range_wraps():
    # A CUDA permutation is not read on the host (no synchronization): every key takes the
    # modulo on the device, and nothing outside a tensor is read.
    ds = DictDataset(
        2, {"a": torch.arange(4, device="cuda"), "s": torch.arange(3, device="cuda") + 10}
    )
    ds.shuffled_to_original = torch.tensor([5, 6, 7, -1], device="cuda")
    assert ds[0]["a"].tolist() == [1, 2] and ds[0]["s"].tolist() == [12, 10]
    assert ds[1]["a"].tolist() == [3, 3] and ds[1]["s"].tolist() == [11, 12]


def test_the_default_shuffle_copies_numpys_permutation_through_pinned_memory():
    state = np.random.get_state()
    try:
        np.random.seed(4)
        expected = np.random.permutation(4096)
        np.random.seed(4)
        dataset = DictDataset(512, {"x": torch.arange(4096, device="cuda")}, shuffle=True)
    finally:
        np.random.set_state(state)
    assert dataset._pinned is not None and dataset._pinned.is_pinned()
    perm = dataset.shuffled_to_original
    assert perm.device.type == "cuda" and perm.dtype == torch.int64
    with use_backend("triton"):
        ids = torch.cat([batch["x"] for batch in dataset])
    assert ids.cpu().tolist() == expected.tolist() == perm.cpu().tolist()
