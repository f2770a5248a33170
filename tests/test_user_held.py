"""Nothing a user holds changes behind their back, and no kernel reads outside a tensor.

Each test holds references the way real training code does (another process, a weak
reference, autograd on an input, a second thread, torch.compile with its default backend, an
edited permutation, a view or a detached alias of a buffer) and checks that the library gives
what the original module (``bench/original.py``) or the PyTorch path gives. The Triton cases
run the kernels under Triton's interpreter (CPU tensors).
"""

from __future__ import annotations

import threading
import weakref
from typing import Dict  # noqa: UP035 - TorchScript reads the annotation

import pytest
import torch
from conftest import kernel_device

import rollout_buffers as rb
from bench import original
from rollout_buffers import DictDataset, ExperienceBuffer, SequenceDataset
from rollout_buffers.backend import use_backend
from rollout_buffers.errors import RolloutOverlapError

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test once on the PyTorch path and once on the Triton kernels (interpreted)."""
    if request.param == "triton":
        kernel_device()
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def lazy_make_dict():
    previous = rb.lazy_make_dict()
    rb.set_lazy_make_dict(True)
    yield
    rb.set_lazy_make_dict(previous)


def _rollout(num_envs=256, num_steps=8, width=64, seed=0):
    """The issue's CPU buffer: minibatch outputs of 128 KiB (512 rows x 64 floats)."""
    g = torch.Generator().manual_seed(seed)
    b = ExperienceBuffer(num_envs, num_steps, "cpu")
    b.register_key("obs", shape=(width,))
    b.batch_update_data("obs", torch.randn(num_steps, num_envs, width, generator=g))
    flat = b.obs.transpose(0, 1).reshape(num_envs * num_steps, width).clone()
    return b, flat


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),)).clone()


# -- 1. a minibatch handed out is never written again ------------------------------------------


def test_a_minibatch_storage_kept_alone_keeps_its_bytes(backend):
    b, flat = _rollout()
    ds = DictDataset(512, b.make_dict())
    storage = ds[0]["obs"].untyped_storage()  # the tensor is dropped; its storage is kept
    before = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)).clone()
    ds[1], ds[2], ds[3]
    after = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
    assert torch.equal(after, before)
    assert torch.equal(after.view(torch.float32).view(512, 64), flat[:512])


def test_a_dropped_minibatch_is_freed_as_the_original_frees_it(backend):
    b, _ = _rollout()
    ds = DictDataset(512, b.make_dict())
    ref = weakref.ref(ds[0]["obs"])
    ds[1], ds[2]
    assert ref() is None


def _child(inbox, outbox):
    x = inbox.get()
    snapshot = x.clone()
    outbox.put("received")
    inbox.get()  # the parent has served more minibatches
    outbox.put(bool(torch.equal(x, snapshot)))


def test_a_minibatch_sent_to_another_process_is_not_overwritten_there(backend):
    b, flat = _rollout()
    ds = DictDataset(512, b.make_dict())
    ctx = torch.multiprocessing.get_context("fork")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(inbox, outbox))
    child.start()
    try:
        inbox.put(ds[0]["obs"])
        assert outbox.get(timeout=30) == "received"
        for i in range(1, 4):
            assert torch.equal(ds[i % 2]["obs"], flat[(i % 2) * 512 : (i % 2 + 1) * 512])
        inbox.put("check")
        assert outbox.get(timeout=30) is True
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def test_minibatches_take_autograd_on_their_inputs_and_arrive_without_it(backend):
    # A gradient penalty on the inputs: requires_grad_() on a batch, then later batches.
    b, flat = _rollout()
    ds = DictDataset(512, b.make_dict())
    for i in range(len(ds)):
        x = ds[i]["obs"].requires_grad_()
        (x * x).sum().backward()
        assert torch.equal(x.grad, 2 * flat[i * 512 : (i + 1) * 512])
    with torch.no_grad():
        assert not any(batch["obs"].requires_grad for batch in ds)


def test_a_pass_in_inference_mode_then_a_normal_pass(backend):
    b, flat = _rollout()
    ds = DictDataset(512, b.make_dict())
    with torch.inference_mode():
        for _batch in ds:
            pass
    for i, batch in enumerate(ds):
        assert not batch["obs"].is_inference()
        assert torch.equal(batch["obs"], flat[i * 512 : (i + 1) * 512])


def test_python_attributes_set_on_a_minibatch_do_not_reappear(backend):
    b, _ = _rollout()
    ds = DictDataset(512, b.make_dict())
    ds[0]["obs"].tag = "first"
    for i in range(1, len(ds)):
        assert not hasattr(ds[i]["obs"], "tag")


# -- 2. the permutation, however it was changed ---------------------------------------------------


def _edited(perm, how):
    if how == "in place":  # also what the original's NumPy permutation takes
        perm[1] = 13
        perm[2] = -3
    elif how == "copy_":
        perm.copy_(torch.tensor([0, 13, -3, 3, 4, 5, 6, 7]))
    else:  # ".data ="
        perm.data = torch.tensor([0, 13, -3, 3, 4, 5, 6, 7])


@pytest.mark.parametrize("how", ["in place", "copy_", ".data ="])
def test_an_edited_permutation_wraps_as_the_original_wraps(backend, how):
    ours = DictDataset(4, {"x": torch.arange(16.0).view(8, 2)})
    theirs = original.DictDataset(4, {"x": torch.arange(16.0).view(8, 2)})
    ours[0], theirs[0]
    _edited(ours.shuffled_to_original, how)
    _edited(theirs.shuffled_to_original, "in place")  # a NumPy array there
    assert ours[0]["x"].tolist() == theirs[0]["x"].tolist() == [[0, 1], [10, 11], [10, 11], [6, 7]]
    assert torch.equal(ours[1]["x"], theirs[1]["x"])
    ours.shuffled_to_original[1] = 1  # edited back into range: no wrap needed, same rows
    theirs.shuffled_to_original[1] = 1
    assert torch.equal(ours[0]["x"], theirs[0]["x"])


def test_an_edit_of_the_permutation_from_numpy_never_reads_outside_the_tensor(backend):
    # A write the version counter cannot see (NumPy shares the memory): whatever is served
    # must be rows of the tensor, never bytes from outside it.
    x = torch.arange(16.0).view(8, 2)
    ds = DictDataset(4, {"x": x})
    ds[0]
    ds.shuffled_to_original.numpy()[1:3] = [10**9, -(10**9)]
    try:
        out = ds[0]["x"]
    except IndexError:  # PyTorch's index_select bounds its indices itself
        return
    assert all(row in x.tolist() for row in out.tolist())


# -- 3. a cache is valid while its source is what it was made from -------------------------------


def test_an_in_place_edit_of_a_strided_source_is_seen(backend):
    adv = torch.arange(64.0).view(16, 4)[:, ::2]
    d = {"adv": adv}
    ds = DictDataset(4, d)
    ds[0]
    d["adv"].sub_(100)
    assert torch.equal(ds[1]["adv"], adv[4:8])


@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_a_source_given_new_data_is_read_from_its_new_storage(backend, strided):
    x = torch.arange(32.0).view(8, 4)
    x = x[:, ::2] if strided else x[:, :2].contiguous()
    ds = DictDataset(4, {"x": x})
    ds[0]
    x.data = x.data * -1
    assert torch.equal(ds[0]["x"], x[:4])
    assert torch.equal(ds[1]["x"], x[4:])


def test_a_sequence_dataset_sees_what_a_strided_storage_holds_when_read(backend):
    x = torch.zeros(4, 2, 4)[..., ::2]
    ds = SequenceDataset({"x": x}, 2, 4, dones=None, shuffle=False)
    ds[0]
    x.fill_(1.0)
    ds.refresh()
    assert torch.equal(ds[0]["x"], torch.ones(2, 4, 2))


def test_a_buffer_given_new_data_is_written_and_read_there(backend):
    b = ExperienceBuffer(3, 2, "cpu")
    b.register_key("obs", shape=(2,))
    b.update_data("obs", 0, torch.ones(3, 2))  # warm the fast path
    b.obs.data = torch.full((2, 3, 2), 5.0)
    b.update_data("obs", 1, torch.full((3, 2), 7.0))
    b.update_step(0, {"obs": torch.full((3, 2), 3.0)})
    assert b.obs[0].eq(3).all() and b.obs[1].eq(7).all()
    assert torch.equal(b.make_dict()["obs"], b.obs.transpose(0, 1).reshape(6, 2))


# -- 4. overlap from storages, whatever made the alias --------------------------------------------


def _aliases(b):
    flat = b.a.view(-1)
    return {
        "detach": lambda: flat[1:5].detach(),
        "as_strided": lambda: torch.as_strided(b.a, (4,), (1,), 1),
        "set_": lambda: torch.empty(0).set_(b.a.untyped_storage(), 1, (4,)),
    }


@pytest.mark.parametrize("alias", ["detach", "as_strided", "set_"])
@pytest.mark.parametrize("call", ["update_data", "update_step", "warm update_step"])
def test_a_source_aliasing_its_destination_is_refused_before_anything_is_written(
    backend, alias, call
):
    b = ExperienceBuffer(4, 2, "cpu")
    b.register_key("a")
    b.register_key("c")
    b.batch_update_data("a", torch.arange(8.0).view(2, 4))
    if call == "warm update_step":
        b.update_step(1, {"a": torch.ones(4), "c": torch.ones(4)})
    before = b.a.clone(), b.c.clone()
    src = _aliases(b)[alias]()
    with pytest.raises(RolloutOverlapError, match="clone"):
        if call == "update_data":
            b.update_data("a", 0, src)
        else:
            b.update_step(0, {"a": src, "c": torch.full((4,), 9.0)})
    assert torch.equal(b.a, before[0]) and torch.equal(b.c, before[1])


def test_a_batch_source_aliasing_the_buffer_is_refused(backend):
    b = ExperienceBuffer(4, 2, "cpu")
    b.register_key("a")
    before = b.a.clone()
    src = torch.as_strided(b.a.detach(), (2, 4), (2, 1))  # rows overlapping rows
    with pytest.raises(RolloutOverlapError):
        b.batch_update_data("a", src)
    assert torch.equal(b.a, before)


# -- 5. lazy sign flags are applied before any byte copy ------------------------------------------


@pytest.mark.parametrize("flag", ["neg", "conj"])
def test_a_lazily_negated_or_conjugated_source_is_written_as_its_value(backend, flag):
    dtype = torch.complex64 if flag == "conj" else torch.float32
    b = ExperienceBuffer(4, 2, "cpu")
    b.register_key("a", shape=(3,), dtype=dtype)
    b.register_key("c")
    b.update_step(0, {"a": torch.ones(4, 3, dtype=dtype), "c": torch.ones(4)})  # warm
    b.update_data("a", 0, torch.ones(4, 3, dtype=dtype))
    x = (torch.randn(4, 3, dtype=torch.complex64) if flag == "conj" else torch.randn(4, 3)).to(
        dtype
    )
    lazy = (x.conj() if flag == "conj" else torch._neg_view(x)).detach()
    want = x.conj().resolve_conj() if flag == "conj" else -x
    assert lazy.is_conj() or lazy.is_neg()
    b.update_step(1, {"a": lazy, "c": torch.ones(4)})
    assert torch.equal(b.a[1], want)
    b.update_data("a", 0, lazy)
    assert torch.equal(b.a[0], want)
    ds = DictDataset(4, {"a": lazy})
    assert torch.equal(ds[0]["a"], want)


# -- 6. complex dtypes on every path ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex32, torch.complex64, torch.complex128], ids=str)
def test_complex_keys_on_every_path(backend, dtype):
    g = torch.Generator().manual_seed(3)
    t, n = 4, 3

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.complex64, generator=g).to(dtype)

    b = ExperienceBuffer(n, t, "cpu")
    b.register_key("z", shape=(2,), dtype=dtype)
    b.register_key("c")
    rows = [rand(n, 2) for _ in range(t)]
    for i in range(t):
        if i % 2:
            b.update_data("z", i, rows[i])
            b.update_data("c", i, torch.ones(n))
        else:
            b.update_step(i, {"z": rows[i], "c": torch.ones(n)})
    want = torch.stack(rows).transpose(0, 1).reshape(t * n, 2)
    bits = lambda z: torch.view_as_real(z)  # noqa: E731 - exact bytes, NaN-safe
    assert torch.equal(bits(b.make_dict()["z"]), bits(want))
    perm = torch.randperm(t * n, generator=g)
    ds = DictDataset(6, b.get_dict())
    ds.shuffled_to_original = perm
    assert torch.equal(bits(ds[1]["z"]), bits(want[perm[6:]]))
    seq = SequenceDataset(b, 2, 3, keys=["z"], dones=None, shuffle=False)
    # chunks 0, 1, 2 in order: env 0 steps 0-1, env 0 steps 2-3, env 1 steps 0-1
    want = torch.stack([b.z[0:2, 0], b.z[2:4, 0], b.z[0:2, 1]], dim=1)
    assert torch.equal(bits(seq[0]["z"]), bits(want))


# -- 7. a kept mapping across threads ------------------------------------------------------------


def _race(seed: int) -> None:
    """One thread reads a kept mapping while another writes the buffer through the API."""
    b, flat = _rollout(num_envs=64, num_steps=4, width=16, seed=seed)
    d = b.make_dict()
    errors, got = [], {}
    start = threading.Barrier(2)

    def reader():
        start.wait()
        try:
            got["obs"] = d["obs"]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer():
        start.wait()
        try:
            b.update_data("obs", 0, torch.full((64, 16), -1.0))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert torch.equal(got["obs"], flat)  # what make_dict() returned
    assert b.obs[0].eq(-1).all() and b.store_dict["obs"] == 1  # the write happened


def test_reading_a_kept_mapping_while_another_thread_writes_the_buffer(backend):
    for trial in range(20):
        _race(trial)


# -- 8. torch.compile as users run it --------------------------------------------------------------


def _step(b, i, obs):
    b.update_step(i, {"obs": obs, "r": obs.sum(-1)})


def _small():
    b = ExperienceBuffer(5, 3, "cpu")
    b.register_key("obs", shape=(4,))
    b.register_key("r")
    return b


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_a_mapping_kept_across_a_compiled_update_step_returns_its_values(compiler):
    torch._dynamo.reset()
    b = _small()
    step = torch.compile(_step, backend=compiler, fullgraph=True)
    for i in range(3):
        step(b, i, torch.randn(5, 4))
    want = b.obs.transpose(0, 1).reshape(15, 4).clone()
    d = b.make_dict()
    step(b, 0, torch.randn(5, 4))
    assert torch.equal(d["obs"], want)


def test_fullgraph_compile_after_an_eager_update_step():
    torch._dynamo.reset()
    b = _small()
    b.update_step(0, {"obs": torch.randn(5, 4), "r": torch.randn(5)})
    step = torch.compile(_step, backend="eager", fullgraph=True)
    obs = torch.randn(5, 4)
    step(b, 1, obs)
    assert torch.equal(b.obs[1], obs) and b.store_dict == {"obs": 3, "r": 3}


# -- 9. readers below Python ----------------------------------------------------------------------


def test_torchscript_gets_the_values_or_an_error_naming_the_eager_switch():
    @torch.jit.script
    def total(d: Dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: UP006
        return d["obs"].sum()

    b, flat = _rollout(num_envs=4, num_steps=2, width=3)
    d = b.make_dict()
    try:
        assert torch.equal(total(d), flat.sum())
    except RuntimeError as exc:
        assert "set_lazy_make_dict(False)" in str(exc)
    d.values()  # made: a plain dict to TorchScript
    assert torch.equal(total(d), flat.sum())


def test_a_placeholder_read_below_python_names_the_eager_switch():
    b, _ = _rollout(num_envs=4, num_steps=2, width=3)
    d = b.make_dict()
    for value in (dict.__getitem__(d, "obs"), *dict.values(d), *(v for _, v in dict.items(d))):
        assert "set_lazy_make_dict(False)" in repr(value)
