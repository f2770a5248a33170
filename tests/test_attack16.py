"""Adversarial findings against the fast paths (attack16). Each test states the expected
behaviour; the comment above it says what goes wrong today."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import rollout_buffers
from bench import original
from rollout_buffers import DictDataset, ExperienceBuffer, SequenceDataset, swap_and_flatten01
from rollout_buffers.backend import use_backend
from rollout_buffers.flatdict import StaleRolloutError


def _need_backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from rollout_buffers.backend import interpreter_enabled

        if not interpreter_enabled():
            pytest.skip("needs Triton's interpreter")


def _rollout(num_envs=8, num_steps=4, shape=(), seed=0):
    buf = ExperienceBuffer(num_envs, num_steps, device="cpu")
    buf.register_key("x", shape=shape)
    g = torch.Generator().manual_seed(seed)
    for t in range(num_steps):
        buf.update_data("x", t, torch.randn((num_envs, *shape), generator=g))
    return buf


# --- 1. stale permutation (ABA of the permutation's address + version stamp) ----------------


# Today: _TorchGatherer keys its per-permutation rows on (data_ptr, _version, shape, stride).
# Two shuffles without a read in between free the first permutation and NumPy/malloc hands
# its address to the third, with version 0 again: the gatherer serves the rows of a
# permutation that no longer exists (every minibatch of the epoch is the old one).
def test_dataset_over_make_dict_serves_the_current_permutation_after_two_shuffles():
    np.random.seed(0)
    with use_backend("torch"):
        buf = _rollout()
        d = buf.make_dict()
        flat = swap_and_flatten01(buf.x)
        ds = DictDataset(8, d, shuffle=True)
        for _ in range(20):
            ds[0]
            ds.shuffle()
            ds.shuffle()
            perm = ds.shuffled_to_original
            assert torch.equal(ds[0]["x"], flat[perm[:8]])


# Same root cause through the dataset's own stamp: a permutation the caller assigns that lands
# at the address of the last one checked (two assignments without a read between) is not
# adopted: its out-of-range entries are not known to wrap, and the gatherer replays the rows
# of the permutation it last saw.
def test_dataset_adopts_an_assigned_permutation_at_a_recycled_address():
    n = 32
    with use_backend("torch"):
        buf = _rollout()
        d = buf.make_dict()
        flat = swap_and_flatten01(buf.x)
        ds = DictDataset(8, d)
        for _ in range(20):
            ds.shuffled_to_original = torch.from_numpy(np.random.permutation(n))
            ds[0]
            ds.shuffled_to_original = torch.from_numpy(np.random.permutation(n))
            c = np.random.permutation(n)
            c -= n  # entries in [-n, 0): the original wraps them (Python's modulo)
            ds.shuffled_to_original = torch.from_numpy(c)
            assert torch.equal(ds[0]["x"], flat[c[:8] % n])


# Today: a NumPy permutation assigned to shuffled_to_original is adopted as a tensor that
# ALIASES the caller's array (torch.as_tensor), stamped by address + version. An in-place edit
# of that array (np.random.shuffle(p), p -= n) bumps no version: over a make_dict() mapping the
# dataset keeps serving the old order; over plain tensors an out-of-range edit raises torch's
# bare "index out of range" instead of wrapping; on the Triton backend every row silently
# becomes the last one (the kernel's clamp). The original reads the array it was given.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("source", ["make_dict", "plain"])
def test_dataset_follows_in_place_edits_of_an_assigned_numpy_permutation(source, backend):
    _need_backend(backend)
    n = 32
    with use_backend(backend):
        buf = _rollout()
        flat = swap_and_flatten01(buf.x)
        td = buf.make_dict() if source == "make_dict" else {"x": flat}
        ds = DictDataset(8, td)
        p = np.random.permutation(n)
        ds.shuffled_to_original = p
        ds[0]
        np.random.shuffle(p)
        assert torch.equal(ds[0]["x"], flat[p[:8]])
        p -= n  # entries in [-n, 0): the original wraps them
        assert torch.equal(ds[0]["x"], flat[p[:8] % n])


# --- 2. thread race: a DictDataset over a kept mapping reads the live storage ----------------


# Today: DictDataset.__getitem__ over a pending make_dict() mapping checks freshness, then
# gathers straight from the buffer's storage without the mapping's lock. A writer thread's
# update_data (copy-on-write, then write) that runs between the check and the gather makes
# the minibatch hold the NEW rollout, not the one make_dict() returned (the eager dict's).
# The interleaving is forced at the point where the gather allocates its output.
def test_dataset_minibatch_over_kept_mapping_is_not_torn_by_a_concurrent_write(monkeypatch):
    from rollout_buffers import _hostmem, ops

    with use_backend("torch"):
        T, N, D = 4, 512, 64  # minibatch of 512 KiB: the pooled host-memory output path
        buf = ExperienceBuffer(N, T, device="cpu")
        buf.register_key("x", shape=(D,))
        for t in range(T):
            buf.update_data("x", t, torch.zeros(N, D))
        d = buf.make_dict()
        ds = DictDataset(T * N, d)
        expected = swap_and_flatten01(buf.x).clone()

        in_gather, written = threading.Event(), threading.Event()
        real_empty = _hostmem.empty

        def empty(*args):
            if not in_gather.is_set():
                in_gather.set()
                written.wait(timeout=2.0)  # let the writer run now (a possible schedule)
            return real_empty(*args)

        monkeypatch.setattr(ops._hostmem, "empty", empty)

        def writer():
            in_gather.wait(timeout=5.0)
            buf.update_data("x", 0, torch.ones(N, D))
            written.set()

        th = threading.Thread(target=writer)
        th.start()
        batch = ds[0]["x"]
        th.join()
        assert torch.equal(batch, expected)  # today: the rows of step 0 are ones
        assert torch.equal(d["x"], expected)


# --- 3. buffer specs / step plans guarded by identity + address, not dtype / layout ----------


def _write(buf, method, index, data):
    if method == "update_data":
        buf.update_data("obs", index, data)
    else:
        buf.update_step(index, {"obs": data})


# Today: after `buffer.obs.data = buffer.obs.data.view(torch.int32)` (same address) the cached
# spec/step plan still writes through float32 step views: 3.0 lands as its float bits
# (1077936128) instead of the int 3 that assignment (and the original) writes.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", ["update_data", "update_step"])
def test_write_after_data_dtype_view_casts_like_assignment(method, backend):
    if backend == "triton":
        pytest.importorskip("triton")
        from rollout_buffers.backend import interpreter_enabled

        if not interpreter_enabled() and not torch.cuda.is_available():
            pytest.skip("needs Triton's interpreter")
    with use_backend(backend):
        buf = ExperienceBuffer(5, 3, device="cpu")
        buf.register_key("obs", shape=(4,))
        _write(buf, method, 0, torch.zeros(5, 4))
        _write(buf, method, 0, torch.zeros(5, 4))  # warm the plan
        buf.obs.data = buf.obs.data.view(torch.int32)
        _write(buf, method, 1, torch.full((5, 4), 3.0))
        assert buf.obs.dtype == torch.int32
        assert buf.obs[1].tolist() == [[3] * 4] * 5


# Today: after `buffer.obs.resize_(T, N, 2)` (same address, contiguous, (T, N) kept) the spec
# keeps row shape (N, 4): a (N, 2) row, which the original writes, is refused, and a (N, 4)
# row is accepted and written through the stale step views into the wrong elements.
def test_update_data_after_resize_takes_the_new_row_shape():
    ref = original.ExperienceBuffer(5, 3, "cpu")
    buf = ExperienceBuffer(5, 3, device="cpu")
    for b in (ref, buf):
        b.register_key("obs", shape=(4,))
        b.update_data("obs", 0, torch.zeros(5, 4))
        b.obs.resize_(3, 5, 2)
        b.update_data("obs", 1, torch.full((5, 2), 3.0))
    assert torch.equal(buf.obs, ref.obs)
    with pytest.raises(RuntimeError):
        buf.update_data("obs", 1, torch.full((5, 4), 3.0))  # as torch's assignment refuses it


# Today: the eager get_dict (set_lazy_make_dict(False)) on the Triton backend replays the
# flattener prepared before `buffer.obs.data = buffer.obs.data.view(T, N, 2, 2)`: it returns
# shape (15, 4) where swap_and_flatten01 (and the torch backend) return (15, 2, 2).
def test_eager_get_dict_after_data_reshape_matches_swap_and_flatten01(monkeypatch):
    pytest.importorskip("triton")
    from rollout_buffers.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setattr(rollout_buffers.flatdict, "_lazy", False)
    with use_backend("triton"):
        buf = ExperienceBuffer(5, 3, device="cpu")
        buf.register_key("obs", shape=(4,))
        buf.batch_update_data("obs", torch.arange(60.0).view(3, 5, 4))
        buf.get_dict()
        buf.obs.data = buf.obs.data.view(3, 5, 2, 2)
        got = buf.get_dict()["obs"]
    assert torch.equal(got, buf.obs.transpose(0, 1).reshape(15, 2, 2))


# --- 4. Triton gather reads past the end of SequenceDataset.chunk_ids ------------------------


# Today: after `ds.chunk_ids.data = short` (or resize_) the Triton gather still reads
# batch_size ids per minibatch from the new (shorter) tensor: it reads past its end (here into
# the sentinel 7s that follow it in memory) instead of refusing or reading only what is there.
@pytest.mark.parametrize("how", [".data =", "resize_"])
def test_triton_sequence_gather_never_reads_past_chunk_ids(how):
    pytest.importorskip("triton")
    from rollout_buffers.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs Triton's interpreter")
    x = torch.arange(8, dtype=torch.float32).view(
        2, 4
    )  # chunk c (seq 1) of env e: x[c % 2, c // 2]
    with use_backend("triton"):
        ds = SequenceDataset({"x": x}, 1, 4, dones=None, shuffle=False)
        if how == ".data =":
            mem = torch.tensor([0, 0, 7, 7, 7, 7, 7, 7])
            ds.chunk_ids.data = mem[:2]
        else:
            ds.chunk_ids.copy_(torch.tensor([0, 0, 7, 7, 7, 7, 7, 7]))
            ds.chunk_ids.resize_(2)
        try:
            batch = ds[0]["x"]
        except (IndexError, ValueError, RuntimeError):
            return  # refusing is fine
        assert 7.0 not in batch.tolist()[0], batch  # 7.0 = chunk 7, read from past the ids


# --- 5. raises where the original works ------------------------------------------------------


# Today: torch.compile(fullgraph=True) of a step calling update_data / batch_update_data fails
# ("Data pointer comparison" / "Observed exception"): the fast-path guards compare data_ptr()
# in Python. The original's update_data (`buffer[index] = data`) traces.
@pytest.mark.parametrize("method", ["update_data", "batch_update_data"])
def test_update_data_compiles_with_fullgraph_like_the_original(method):
    def step(b, x):
        if method == "update_data":
            b.update_data("obs", 1, x[0])
        else:
            b.batch_update_data("obs", x)
        return x + 1

    results = []
    for cls in (original.ExperienceBuffer, ExperienceBuffer):
        torch._dynamo.reset()
        b = cls(5, 3, device="cpu")
        b.register_key("obs", shape=(4,))
        torch.compile(step, backend="eager", fullgraph=True)(b, torch.ones(3, 5, 4))
        results.append(b.obs.clone())
    assert torch.equal(results[0], results[1])


# Today: a CPU minibatch of 128 KiB or more is made over a NumPy block (_hostmem): its storage
# is not resizable, so `resize_`, `torch.cat(..., out=mb)` and other out= calls that resize
# raise "Trying to resize storage that is not resizable"; the original's minibatch (and any
# tensor PyTorch allocates) resizes.
@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="documented difference (README): with the host pool on (the default), a large CPU "
    "minibatch lives over a pooled block and cannot grow in place; set_host_pool(False) or clone()",
)
def test_cpu_minibatch_is_resizable_like_the_originals():
    x = torch.randn(4096, 64)
    with use_backend("torch"):
        ds = DictDataset(4096, {"x": x})
        mb = ds[0]["x"]
        torch.cat([x, x], out=mb)
        assert torch.equal(mb, torch.cat([x, x]))
        ds[0]["x"].resize_(8192, 64)


def test_cpu_minibatch_is_resizable_with_the_host_pool_off():
    x = torch.randn(4096, 64)
    rollout_buffers.set_host_pool(False)
    try:
        with use_backend("torch"):
            ds = DictDataset(4096, {"x": x})
            mb = ds[0]["x"]
            torch.cat([x, x], out=mb)
            assert torch.equal(mb, torch.cat([x, x]))
            ds[0]["x"].resize_(8192, 64)
    finally:
        rollout_buffers.set_host_pool(True)


# Today: `buffer.obs.share_memory_()` (also what a torch.multiprocessing queue does to a
# tensor it sends) moves the storage without changing a byte; the pending mapping sees a new
# address and raises StaleRolloutError ("written ... bypassing the API"). The original's dict
# (and the eager switch) reads fine.
def test_make_dict_value_reads_after_the_storage_moves_to_shared_memory():
    buf = _rollout(shape=(4,))
    d = buf.make_dict()
    expected = swap_and_flatten01(buf.x)
    buf.x.share_memory_()
    try:
        got = d["x"]
    except StaleRolloutError as exc:
        pytest.fail(f"nothing was written: {exc}")
    assert torch.equal(got, expected)


# Today: under a default-device context (`with torch.device(...)`, torch.set_default_device)
# a CPU minibatch of 128 KiB or more fails: _hostmem.empty makes `torch.empty(0)` on the
# default device and set_()s a CPU storage into it ("Attempted to set the storage of a tensor
# on device 'meta' to a storage on different device 'cpu'"). The original's indexing works.
def test_cpu_minibatch_under_a_default_device_context_like_the_originals():
    x = torch.randn(4096, 64)
    ref = original.DictDataset(1024, {"x": x})
    with use_backend("torch"):
        ds = DictDataset(1024, {"x": x})
        with torch.device("meta"):
            expected = ref[0]["x"]
            got = ds[0]["x"]
    assert got.device.type == "cpu"
    assert torch.equal(got, expected)


# Today: a Python number written under a default-device context becomes a tensor on that
# device (torch.tensor(0.5) without device=) and is refused as "received meta", where
# PyTorch's own assignment `buffer.o[0] = 0.5` works.
def test_update_data_python_number_under_a_default_device_context():
    buf = ExperienceBuffer(4, 2, device="cpu")
    buf.register_key("o")
    with torch.device("meta"):
        buf.update_data("o", 0, 0.5)
    assert buf.o[0].tolist() == [0.5] * 4


# Today: after `del buffer.obs` the write fast path indexes self._buffers and raises a bare
# KeyError('obs'); the original (getattr) raised AttributeError, which the contract keeps.
@pytest.mark.parametrize("method", ["update_data", "update_step"])
def test_write_of_a_deleted_buffer_raises_attribute_error(method):
    buf = ExperienceBuffer(4, 2, device="cpu")
    buf.register_key("obs")
    del buf.obs
    with pytest.raises(AttributeError, match="obs"):
        if method == "update_data":
            buf.update_data("obs", 0, torch.ones(4))
        else:
            buf.update_step(0, {"obs": torch.ones(4)})


# Today: a compiled update_step (fullgraph, aot_eager) whose source is a view of another key's
# destination written earlier in the same call gives the simultaneous result (x[0] = the OLD
# y[0]); eager update_step (and the README) give PyTorch's sequential result, x[0] = the new
# y[0]. AOTAutograd's functionalization reads the source view before the opaque op mutates y.
AOT_SNAPSHOT = pytest.mark.xfail(
    strict=True,
    reason="documented limitation (README): under torch.compile's aot_eager backend, AOTAutograd "
    "hands the opaque write a snapshot of a source that views a buffer (inductor and eager give "
    "the eager result)",
)


@AOT_SNAPSHOT
@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_compiled_update_step_with_cross_key_alias_is_sequential_like_eager(compiler):
    def build():
        b = ExperienceBuffer(2, 2, device="cpu")
        b.register_key("x")
        b.register_key("y")
        b.batch_update_data("x", torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        b.batch_update_data("y", -torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        return b

    def step(b, i, new):
        b.update_step(i, {"y": new, "x": b.y[i]})

    torch._dynamo.reset()
    compiled, eager = build(), build()
    new = torch.full((2,), 100.0)
    torch.compile(step, backend=compiler, fullgraph=True)(compiled, 0, new)
    step(eager, 0, new)
    assert eager.x[0].tolist() == [100.0, 100.0]
    assert torch.equal(compiled.x, eager.x)
    assert torch.equal(compiled.y, eager.y)


# Today (same root as above): under aot_eager the compiled update_step gets a snapshot of a
# source that overlaps its own destination, so the overlap that eager update_step (and the
# compiled one under inductor) refuses with RolloutOverlapError is silently written.
@AOT_SNAPSHOT
def test_compiled_update_step_refuses_an_overlapping_source_like_eager():
    b = ExperienceBuffer(4, 2, device="cpu")
    b.register_key("x")
    b.batch_update_data("x", torch.arange(8.0).view(2, 4))

    def step(b):
        b.update_step(0, {"x": b.x.view(-1)[1:5]})

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="overlaps its destination"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(b)


# --- 6. silent differences between backends --------------------------------------------------


# Today: an out-of-range chunk id written into SequenceDataset.chunk_ids gives different rows
# on the two backends (Triton clamps it to the last chunk; the torch path reads env c // nc past
# the last env, i.e. rows of other envs/steps), with no error on either.
def test_sequence_dataset_out_of_range_chunk_id_same_on_both_backends():
    pytest.importorskip("triton")
    from rollout_buffers.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs Triton's interpreter")
    x = torch.arange(24, dtype=torch.float32).view(4, 3, 2)
    out = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            ds = SequenceDataset({"x": x}, 2, 3, dones=None, shuffle=False)
            ds.chunk_ids[0] = 6  # 3 envs x 2 chunks: ids 0..5
            try:
                out[backend] = ds[0]["x"]
            except (IndexError, ValueError, RuntimeError) as exc:
                out[backend] = type(exc)
    if isinstance(out["torch"], torch.Tensor) and isinstance(out["triton"], torch.Tensor):
        assert torch.equal(out["torch"], out["triton"])
    else:
        assert out["torch"] == out["triton"]
