"""Pins behaviours a mutation run (mutmut, ``make mutate``) showed untested.

compute_gae: fp32 accumulation for fp32 values, outputs written over inputs (values, a shifted
view of them), the output device under a default-device context, and its error messages in
full (they name the argument, the expected and the received value). The out= overlap rule at
its edges: adjacent halves of one buffer are fine in either order, a partial overlap is refused
in either order, one-element outputs too, and an empty rollout has nothing to overlap. The GAE
launcher: each variant runs its own kernel, an unknown one is refused by name, inputs whose rows
are not dense are read as what they are, and the AOT warp counts follow the documented rule.

The step-write overlap check: a source whose last element is its step's first, a broadcast row
of the buffer written over the whole buffer (both refused, with the full message), the next
step's row (not an overlap), a key with empty rows before an overlapping one, meta buffers
(no memory, nothing to overlap). The host pool: switched off and on again by set_host_pool.
"""

from __future__ import annotations

import gc

import pytest
import torch

import rollout_buffers
from rollout_buffers import DictDataset, ExperienceBuffer, backend
from rollout_buffers.errors import RolloutOverlapError, RolloutTypeError, RolloutValueError
from rollout_buffers.gae import compute_gae

GAMMA, LAM = 0.99, 0.95


@pytest.fixture(
    params=["torch", pytest.param("triton", marks=pytest.mark.interpreter)],
)
def name(request):
    """The backend: torch, then triton on CPU tensors under Triton's interpreter (skipped where
    the interpreter is off, e.g. on a CUDA machine: tests/test_gpu.py covers the kernels)."""
    if request.param == "triton":
        request.getfixturevalue("interpreted_kernels")
    return request.param


def rollout(T, N, k=None, seed=0):
    """(rewards, values, next_values, dones): fp32, (T, N) or (T, N, k) values, bool dones."""
    g = torch.Generator().manual_seed(seed)
    shape = (T, N) if k is None else (T, N, k)
    r, v, nv = (torch.randn(shape, generator=g) for _ in range(3))
    return r, v, nv, torch.rand(shape, generator=g) < 0.15


def sequential(r, v, nv, d, gamma=GAMMA, lam=LAM):
    """The documented recurrence in float64, step by step: (advantages, returns)."""
    r, v, nv, d = (x.double() for x in (r, v, nv, d))
    adv, last = torch.zeros_like(v), torch.zeros_like(v[0])
    for t in reversed(range(v.shape[0])):
        last = r[t] + gamma * nv[t] - v[t] + gamma * lam * (1 - d[t]) * last
        adv[t] = last
    return adv, adv + v


def close(x, ref):
    return torch.allclose(x.double(), ref, rtol=1e-5, atol=1e-5)


def gae(name, *args, **kwargs):
    with backend.use_backend(name):
        return compute_gae(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# compute_gae: accumulation, aliasing, devices
# ---------------------------------------------------------------------------------------------


def test_fp32_values_accumulate_in_fp32(name):
    """1 + 0.99 * 1e8 - 99e6 is 1 in float64 but 0 in float32 (ulp 8 at 1e8): fp32 values
    accumulate in fp32 on both backends, float64 values in float64."""
    r, d = torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.bool)
    v, nv = torch.full((1, 2), 99e6), torch.full((1, 2), 1e8)
    adv, ret = gae(name, r, v, nv, d, GAMMA, LAM)
    assert adv.tolist() == [[0.0, 0.0]] and torch.equal(ret, v)
    adv64, _ = gae(name, r.double(), v.double(), nv.double(), d, GAMMA, LAM)
    assert torch.allclose(adv64, torch.ones(1, 2, dtype=torch.float64), atol=1e-6)


def test_advantages_may_overwrite_values(name):
    """out=(values, returns): returns still add the values as they were before the call."""
    r, v, nv, d = rollout(9, 7, 2)
    ref_adv, ref_ret = sequential(r, v, nv, d)
    ret = torch.empty_like(v)
    adv, _ = gae(name, r, v, nv, d, GAMMA, LAM, out=(v, ret))
    assert adv is v
    assert close(v, ref_adv) and close(ret, ref_ret)


def test_returns_over_values_whose_shifted_view_is_next_values(name):
    """values = buf[:-1], next_values = buf[1:], returns written over values: every step still
    reads next_values as they were (T = 20 spans two chunks of the scan kernel)."""
    T, N = 20, 5
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(T + 1, N, generator=g)
    r = torch.randn(T, N, generator=g)
    d = torch.rand(T, N, generator=g) < 0.15
    ref_adv, ref_ret = sequential(r, buf[:-1].clone(), buf[1:].clone(), d)
    adv = torch.empty(T, N)
    gae(name, r, buf[:-1], buf[1:], d, GAMMA, LAM, out=(adv, buf[:-1]))
    assert close(adv, ref_adv) and close(buf[:-1], ref_ret)


def test_new_outputs_are_on_values_device_under_a_default_device_context(name):
    r, v, nv, d = rollout(5, 3)
    ref_adv, ref_ret = sequential(r, v, nv, d)
    with torch.device("meta"):
        adv, ret = gae(name, r, v, nv, d, GAMMA, LAM)
    assert adv.device.type == ret.device.type == "cpu"
    assert close(adv, ref_adv) and close(ret, ref_ret)


# ---------------------------------------------------------------------------------------------
# compute_gae: error messages in full
# ---------------------------------------------------------------------------------------------


def _good():
    return list(rollout(4, 3, 2))


@pytest.mark.parametrize(
    "arg,label", [(0, "rewards"), (1, "values"), (2, "next_values"), (3, "dones")]
)
def test_each_argument_that_is_not_a_tensor_is_named(arg, label):
    args = _good()
    args[arg] = [1.0]
    with pytest.raises(RolloutTypeError) as info:
        compute_gae(*args, GAMMA, LAM)
    assert str(info.value) == f"compute_gae: '{label}' must be a torch.Tensor, got list"


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_next_values_must_be_floating_point(dtype):
    args = _good()
    args[2] = torch.zeros(4, 3, 2, dtype=dtype)
    with pytest.raises(RolloutValueError) as info:
        compute_gae(*args, GAMMA, LAM)
    assert str(info.value) == (
        f"compute_gae: 'next_values' must be float16, bfloat16, float32 or float64, got dtype "
        f"{dtype}"
    )


def test_a_device_mismatch_names_the_device_of_values():
    args = _good()
    args[2] = torch.zeros(4, 3, 2, device="meta")
    with pytest.raises(RolloutValueError) as info:
        compute_gae(*args, GAMMA, LAM)
    assert str(info.value) == (
        "compute_gae: 'next_values' is on device meta, expected cpu (the device of 'values')"
    )


@pytest.mark.parametrize(
    "out,got",
    [
        (lambda v: (v.clone(), v.clone(), v.clone()), "tuple"),
        (lambda v: [v.clone()], "list"),
        (lambda v: torch.stack([v, v]), "Tensor"),
    ],
    ids=["three", "one", "tensor"],
)
def test_out_must_be_a_pair(out, got):
    r, v, nv, d = _good()
    with pytest.raises(RolloutTypeError) as info:
        compute_gae(r, v, nv, d, GAMMA, LAM, out=out(v))
    assert str(info.value) == (
        f"compute_gae: 'out' must be a pair (advantages, returns) of tensors, got {got}"
    )


def test_errors_about_out_name_the_entry():
    r, v, nv, d = _good()
    ok = torch.full_like(v, 7.0)
    cases = [
        (([1.0], ok), RolloutTypeError, "compute_gae: 'out[0]' must be a torch.Tensor, got list"),
        ((ok, "x"), RolloutTypeError, "compute_gae: 'out[1]' must be a torch.Tensor, got str"),
        (
            (torch.empty(4, 3), ok),
            RolloutValueError,
            "compute_gae: 'out[0]' has shape (4, 3), expected (4, 3, 2) (from 'values' of shape "
            "(4, 3, 2))",
        ),
        (
            (torch.empty(2, 4, 3).permute(1, 2, 0), ok),
            RolloutValueError,
            "compute_gae: 'out[0]' must be contiguous (got strides (3, 1, 12) for shape "
            "(4, 3, 2)); pass a contiguous tensor or a view of one, e.g. "
            "buffer.view(values.shape)",
        ),
    ]
    for out, cls, message in cases:
        with pytest.raises(cls) as info:
            compute_gae(r, v, nv, d, GAMMA, LAM, out=out)
        assert str(info.value) == message
    assert (ok == 7.0).all()


# ---------------------------------------------------------------------------------------------
# compute_gae: out= overlap at its edges
# ---------------------------------------------------------------------------------------------

_SHARE = "compute_gae: 'out[0]' and 'out[1]' must not share memory"


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["first-second", "second-first"])
def test_adjacent_halves_of_one_buffer_are_valid_outputs(name, order):
    r, v, nv, d = rollout(4, 3, 2)
    ref_adv, ref_ret = sequential(r, v, nv, d)
    big = torch.full((2, 4, 3, 2), float("nan"))
    adv, ret = gae(name, r, v, nv, d, GAMMA, LAM, out=(big[order[0]], big[order[1]]))
    assert close(big[order[0]], ref_adv) and close(big[order[1]], ref_ret)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["earlier-later", "later-earlier"])
def test_outputs_overlapping_in_part_are_refused_in_either_order(order):
    """Two (4, 3, 2) views of one storage, 4 elements (16 bytes) apart."""
    r, v, nv, d = _good()
    flat = torch.full((24 + 4,), 7.0)
    views = (flat[:24].view(4, 3, 2), flat[4:].view(4, 3, 2))
    with pytest.raises(RolloutValueError) as info:
        compute_gae(r, v, nv, d, GAMMA, LAM, out=(views[order[0]], views[order[1]]))
    assert str(info.value) == _SHARE
    assert (flat == 7.0).all()


def test_one_element_outputs_must_not_be_the_same_tensor():
    r, v, nv, d = rollout(1, 1)
    x = torch.full((1, 1), 7.0)
    with pytest.raises(RolloutValueError) as info:
        compute_gae(r, v, nv, d, GAMMA, LAM, out=(x, x))
    assert str(info.value) == _SHARE
    assert x.item() == 7.0


def test_an_empty_rollout_returns_its_out_tensors(name):
    r, v, nv, d = rollout(0, 3)
    out = (torch.empty(0, 3), torch.empty(0, 3))
    adv, ret = gae(name, r, v, nv, d, GAMMA, LAM, out=out)
    assert adv is out[0] and ret is out[1]


# ---------------------------------------------------------------------------------------------
# The GAE launcher (rollout_buffers.kernels.gae), under Triton's interpreter
# ---------------------------------------------------------------------------------------------


def _launch(variant, r, v, nv, d):
    from rollout_buffers.kernels import gae as k

    adv, ret = torch.full_like(v, float("nan")), torch.full_like(v, float("nan"))
    k.gae(r, v, nv, d, adv, ret, GAMMA, LAM, variant=variant)
    return adv, ret


def test_inputs_with_two_strided_columns_are_read_as_columns(name):
    """Every input x[..., 0] of a (T, 2, 3) tensor: rows of two elements, 3 apart."""
    wide = rollout(6, 2, 3, seed=2)
    args = [x[..., 0] for x in wide]
    ref_adv, ref_ret = sequential(*args)
    adv, ret = gae(name, *args, GAMMA, LAM)
    assert close(adv, ref_adv) and close(ret, ref_ret)


@pytest.mark.skipif(not backend.triton_available(), reason="triton not installed")
def test_an_unknown_variant_is_refused_by_name():
    from rollout_buffers.kernels import gae as k

    r, v, nv, d = rollout(3, 2)
    adv, ret = torch.empty_like(v), torch.empty_like(v)
    with pytest.raises(ValueError) as info:
        k.gae(r, v, nv, d, adv, ret, GAMMA, LAM, variant="fast")
    assert str(info.value) == "unknown GAE variant 'fast': expected one of ('auto', 'scan', 'walk')"


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpreted_kernels")
def test_walk_runs_the_recurrence_step_by_step_and_auto_runs_the_scan():
    """walk evaluates the documented recurrence in fp32 in time order, so it equals that
    evaluation bit for bit; the scan re-associates it (composed affine maps), which moves
    some last bits on this rollout; auto is the scan (the module docstring's choice)."""
    r, v, nv, d = rollout(20, 5, seed=0)
    g, gl = torch.tensor(GAMMA), torch.tensor(GAMMA * LAM)  # fp32, as the kernel gets them
    want_adv, want_ret = torch.empty_like(v), torch.empty_like(v)
    last = torch.zeros(5)
    for t in reversed(range(20)):
        last = r[t] + g * nv[t] - v[t] + gl * (1 - d[t].float()) * last
        want_adv[t], want_ret[t] = last, last + v[t]
    walk, scan, auto = (_launch(x, r, v, nv, d) for x in ("walk", "scan", "auto"))
    assert torch.equal(walk[0], want_adv) and torch.equal(walk[1], want_ret)
    assert not torch.equal(scan[0], walk[0])
    assert close(scan[0], sequential(r, v, nv, d)[0])
    assert torch.equal(auto[0], scan[0]) and torch.equal(auto[1], scan[1])


@pytest.mark.skipif(not backend.triton_available(), reason="triton not installed")
def test_aot_warp_counts_are_one_per_32_columns_at_most_four():
    """aot_num_warps is "the value the launcher uses": one warp per 32 columns, at most 4 (a
    power of two, an int: Triton compiles no other)."""
    from rollout_buffers.kernels import gae as k

    got = {bc: k.aot_num_warps({"BC": bc}) for bc in (32, 64, 128, 256)}
    assert got == {32: 1, 64: 2, 128: 4, 256: 4}
    assert all(type(w) is int for w in got.values())
    for _, _, constexprs, _ in k.aot_specs():
        assert k.aot_num_warps(constexprs) == min(4, constexprs["BC"] // 32)


# ---------------------------------------------------------------------------------------------
# Step writes: a source overlapping its destination
# ---------------------------------------------------------------------------------------------

T, N = 4, 3


def _overlap_message(where, key, step):
    return (
        f"{key}: {where} received a source that overlaps its destination ({step} of "
        f"'{key}'): the copy would read elements it has already written (torch refuses it as "
        f"well: 'some elements of the input tensor and the written-to tensor refer to a single "
        f"memory location'); clone() the source first"
    )


def _buffer(device="cpu"):
    buffer = ExperienceBuffer(N, T, device=device)
    buffer.register_key("rew")
    buffer.register_key("obs", shape=(2,))
    if device != "meta":
        buffer.rew.copy_(torch.arange(T * N, dtype=torch.float32).view(T, N))
        buffer.obs.copy_(torch.arange(T * N * 2, dtype=torch.float32).view(T, N, 2))
    return buffer


def test_a_source_ending_on_the_first_element_of_its_step_is_refused(name):
    """rew[2] = flat[4:7]: the source's last element is the step's first one."""
    buffer = _buffer()
    before = buffer.rew.clone()
    flat = buffer.rew.view(-1)
    with backend.use_backend(name), pytest.raises(RolloutOverlapError) as info:
        buffer.update_data("rew", 2, flat[2 * N - N + 1 : 2 * N + 1])
    assert str(info.value) == _overlap_message("update_data", "rew", "step 2")
    assert torch.equal(buffer.rew, before)


def test_a_row_of_the_buffer_broadcast_over_the_whole_buffer_is_refused(name):
    buffer = _buffer()
    before = buffer.rew.clone()
    with backend.use_backend(name), pytest.raises(RolloutOverlapError) as info:
        buffer.batch_update_data("rew", buffer.rew[T - 1])
    assert str(info.value) == _overlap_message("batch_update_data", "rew", "the whole buffer")
    assert torch.equal(buffer.rew, before)


def test_the_next_steps_row_is_not_an_overlap(name):
    """A source that starts where its destination step ends shares none of its bytes."""
    buffer = _buffer()
    want_rew, want_obs = buffer.rew[2].clone(), buffer.obs[2].clone()
    with backend.use_backend(name):
        buffer.update_data("rew", 1, buffer.rew[2])
        buffer.update_step(1, {"obs": buffer.obs[2]})
    assert torch.equal(buffer.rew[1], want_rew) and torch.equal(buffer.obs[1], want_obs)


def test_a_key_with_empty_rows_does_not_end_the_overlap_check(name):
    buffer = _buffer()
    buffer.register_key("none", shape=(0,))
    before = buffer.obs.clone()
    flat = buffer.obs.view(-1)
    source = flat[2 * N * 2 - 1 : 3 * N * 2 - 1].view(N, 2)  # step 1's rows, one element late
    with backend.use_backend(name), pytest.raises(RolloutOverlapError) as info:
        buffer.update_step(1, {"none": torch.empty(N, 0), "obs": source})
    assert str(info.value) == _overlap_message("update_step", "obs", "step 1")
    assert torch.equal(buffer.obs, before)


def test_a_meta_buffer_takes_meta_sources_of_any_layout():
    """Meta tensors hold no memory: a transposed meta source overlaps nothing."""
    buffer = _buffer("meta")
    with backend.use_backend("torch"):
        buffer.update_data("obs", 0, torch.empty(2, N, device="meta").t())
        buffer.update_step(0, {"obs": torch.empty(2, N, device="meta").t()})
        buffer.batch_update_data("obs", torch.empty(2, N, T, device="meta").permute(2, 1, 0))
    assert buffer.store_dict["obs"] == buffer.total_sum()


# ---------------------------------------------------------------------------------------------
# The host pool switch
# ---------------------------------------------------------------------------------------------


def test_set_host_pool_switches_the_pool_off_and_on_again():
    """Off: minibatches of 128 KiB and more come from torch.empty (resizable). On again: they
    are made over pooled blocks (not resizable), and a freed one is reused."""
    was = rollout_buffers.host_pool()
    # A minibatch of 1024 rows of 33 floats (132 KiB): a size no other test pools, so the block
    # freed below is the only one of its size in the pool.
    x = torch.randn(2048, 33)
    try:
        with backend.use_backend("torch"):
            rollout_buffers.set_host_pool(False)
            assert rollout_buffers.host_pool() is False
            dataset = DictDataset(1024, {"x": x})
            assert dataset[0]["x"].untyped_storage().resizable()
            rollout_buffers.set_host_pool(True)
            assert rollout_buffers.host_pool() is True
            first = dataset[0]["x"]
            assert not first.untyped_storage().resizable()
            assert torch.equal(first, x[:1024])
            address = first.data_ptr()
            del first
            gc.collect()
            second = dataset[1]["x"]
            assert second.data_ptr() == address and torch.equal(second, x[1024:])
    finally:
        rollout_buffers.set_host_pool(was)
