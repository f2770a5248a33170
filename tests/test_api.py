"""The public API contract of rollout_buffers (DESIGN.md, "Public API (the contract)"), point by point.

Every test uses CPU tensors and small sizes, so that the suite also runs on the Triton kernels
under Triton's CPU interpreter (``ROLLOUT_BUFFERS_BACKEND=triton TRITON_INTERPRET=1``). Tests that
depend on the selected backend force one with ``use_backend`` or are skipped where they cannot
hold.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import DTYPES, ROOT, bits, random_tensor, requires_cuda

import rollout_buffers
from rollout_buffers import (
    BackendUnavailableError,
    DictDataset,
    ExperienceBuffer,
    get_backend,
    set_backend,
    swap_and_flatten01,
    use_backend,
)
from rollout_buffers import backend as backend_module

CPU = "cpu"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert actual.device == expected.device, (actual.device, expected.device)
    assert torch.equal(bits(actual), bits(expected))


def flat_env_major(steps: list[torch.Tensor]) -> torch.Tensor:
    """Row ``env * num_steps + step`` is ``steps[step][env]``, built row by row (no reshape)."""
    num_steps, num_envs = len(steps), steps[0].shape[0]
    return torch.stack([steps[s][e] for e in range(num_envs) for s in range(num_steps)])


def special_values(shape, dtype, generator) -> torch.Tensor:
    """Random data of ``dtype``; floats also carry NaN, +-inf, -0.0 and a subnormal."""
    t = random_tensor(shape, dtype, generator=generator)
    if dtype.is_floating_point:
        tiny = torch.finfo(dtype).smallest_normal / 2
        specials = torch.tensor(
            [float("nan"), float("inf"), float("-inf"), -0.0, tiny], dtype=torch.float64
        )
        flat = t.view(-1)
        n = min(flat.numel(), specials.numel())
        flat[:n] = specials[:n].to(dtype)
    return t


@pytest.fixture
def restore_backend():
    saved = get_backend()
    yield
    set_backend(saved)


# ---------------------------------------------------------------------------------------------
# swap_and_flatten01
# ---------------------------------------------------------------------------------------------

ODD_SHAPES = [(2, 3), (3, 2), (1, 5), (5, 1), (1, 1), (3, 5, 7), (4, 3, 2, 3), (3, 4, 0)]


def test_swap_and_flatten01_of_none_is_none():
    assert swap_and_flatten01(None) is None


@pytest.mark.parametrize("arr", [torch.tensor(1.0), torch.arange(4)], ids=["0d", "1d"])
def test_swap_and_flatten01_rejects_fewer_than_two_dims(arr):
    with pytest.raises(ValueError, match=re.escape(str(tuple(arr.shape)))):
        swap_and_flatten01(arr)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swap_and_flatten01_equals_transpose_reshape(dtype, shape):
    g = torch.Generator().manual_seed(10 * ODD_SHAPES.index(shape) + DTYPES.index(dtype))
    arr = random_tensor(shape, dtype, generator=g)
    s0, s1, *rest = shape
    out = swap_and_flatten01(arr)
    assert_bits_equal(out, arr.transpose(0, 1).reshape(s0 * s1, *rest))
    assert out.is_contiguous()


def test_swap_and_flatten01_row_j_s0_plus_i_is_arr_i_j():
    s0, s1 = 3, 4
    arr = torch.arange(s0 * s1 * 2).reshape(s0, s1, 2)
    out = swap_and_flatten01(arr)
    for i in range(s0):
        for j in range(s1):
            assert torch.equal(out[j * s0 + i], arr[i, j])


def _non_contiguous_inputs():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 5, 4, generator=g)
    return {
        "transposed": base.transpose(0, 1),
        "strided_dim1": base[:, ::2],
        "strided_trailing": base[..., ::2],
        "permuted_trailing": base.permute(0, 2, 1),
        "offset_slice": base[1:, 2:, 1:],
        "expanded": torch.randn(1, 5, 3, generator=g).expand(4, 5, 3),
        "int_transposed": torch.arange(60, dtype=torch.int32).reshape(3, 4, 5).transpose(0, 2),
    }


@pytest.mark.parametrize("name", list(_non_contiguous_inputs()))
def test_swap_and_flatten01_handles_non_contiguous_inputs(name):
    arr = _non_contiguous_inputs()[name]
    s0, s1, *rest = arr.shape
    out = swap_and_flatten01(arr)
    assert_bits_equal(out, arr.contiguous().transpose(0, 1).reshape(s0 * s1, *rest))
    assert out.is_contiguous()


@pytest.mark.parametrize("shape", [(1, 4, 2), (4, 1, 2), (1, 1, 3), (1, 4), (4, 1)], ids=str)
def test_swap_and_flatten01_returns_a_new_tensor_even_when_a_dim_is_one(shape):
    arr = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    before = arr.clone()
    out = swap_and_flatten01(arr)
    assert out.untyped_storage().data_ptr() != arr.untyped_storage().data_ptr()
    out.fill_(-1)
    assert torch.equal(arr, before)


# ---------------------------------------------------------------------------------------------
# ExperienceBuffer: construction, registration, module behaviour
# ---------------------------------------------------------------------------------------------


def test_experience_buffer_default_device_is_cuda_when_available_else_cpu():
    buffer = ExperienceBuffer(num_envs=2, num_steps=3)
    buffer.register_key("obs")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert buffer.obs.device.type == expected


def test_experience_buffer_is_a_torch_module():
    assert isinstance(ExperienceBuffer(2, 3, device=CPU), torch.nn.Module)


def test_register_key_allocates_steps_by_envs_by_shape_with_default_float():
    buffer = ExperienceBuffer(num_envs=5, num_steps=3, device=CPU)
    buffer.register_key("rew")
    buffer.register_key("obs", shape=(4, 2))
    buffer.register_key("done", shape=(), dtype=torch.bool)
    assert buffer.rew.shape == (3, 5) and buffer.rew.dtype == torch.float32
    assert buffer.obs.shape == (3, 5, 4, 2) and buffer.obs.dtype == torch.float32
    assert buffer.done.shape == (3, 5) and buffer.done.dtype == torch.bool
    assert buffer.store_dict == {"rew": 0, "obs": 0, "done": 0}


def test_register_key_rejects_a_duplicate_key_and_keeps_the_first():
    buffer = ExperienceBuffer(2, 3, device=CPU)
    buffer.register_key("obs", shape=(4,))
    first = buffer.obs
    with pytest.raises(KeyError, match="obs"):
        buffer.register_key("obs", shape=(7,), dtype=torch.int64)
    assert buffer.obs is first and buffer.obs.shape == (3, 2, 4)


@pytest.mark.parametrize("name", ["num_envs", "store_dict", "make_dict", "training", "forward"])
def test_register_key_rejects_a_name_that_clashes_with_an_attribute(name):
    buffer = ExperienceBuffer(2, 3, device=CPU)
    before = getattr(buffer, name)
    with pytest.raises(KeyError, match=name):
        buffer.register_key(name)
    assert name not in dict(buffer.named_buffers())
    assert name not in buffer.store_dict
    assert getattr(buffer, name) is before or getattr(buffer, name) == before


def test_buffers_are_non_persistent_and_reachable_as_attributes():
    buffer = ExperienceBuffer(2, 3, device=CPU)
    buffer.register_key("obs", shape=(4,))
    buffer.register_key("rew")
    assert len(buffer.state_dict()) == 0
    buffer.load_state_dict({})  # strict: no buffer is expected back
    named = dict(buffer.named_buffers())
    assert set(named) == {"obs", "rew"}
    assert buffer.obs is named["obs"] and buffer.rew is named["rew"]
    data = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    buffer.update_data("obs", 1, data)
    assert torch.equal(buffer.obs[1], data)


@pytest.mark.parametrize(
    "cast, float_dtype",
    [
        (lambda m: m.half(), torch.float16),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(CPU, torch.float64), torch.float64),
    ],
    ids=["half", "double", "to_bfloat16", "to_cpu_float64"],
)
def test_cast_module_then_writes_and_make_dict_use_the_new_dtype(cast, float_dtype):
    num_envs, num_steps = 3, 4
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,))
    buffer.register_key("count", dtype=torch.int64)
    # build whatever the buffer caches about its storages before the cast
    buffer.update_data("obs", 0, torch.ones(num_envs, 2))
    buffer.update_step(1, {"obs": torch.ones(num_envs, 2), "count": torch.ones(num_envs).long()})
    buffer.get_dict()
    assert cast(buffer) is buffer
    assert buffer.obs.dtype == float_dtype and buffer.count.dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    obs = [torch.randn(num_envs, 2, generator=g) for _ in range(num_steps)]
    count = [torch.randint(-100, 100, (num_envs,), generator=g) for _ in range(num_steps)]
    for s in range(num_steps):
        if s % 2:
            buffer.update_data("obs", s, obs[s])  # float32 data, cast on write
            buffer.update_data("count", s, count[s])
        else:
            buffer.update_step(s, {"obs": obs[s], "count": count[s]})
    assert torch.equal(buffer.obs[2], obs[2].to(float_dtype))
    out = buffer.make_dict()
    assert_bits_equal(out["obs"], flat_env_major([o.to(float_dtype) for o in obs]))
    assert_bits_equal(out["count"], flat_env_major(count))


def test_batch_update_data_after_cast_writes_the_cast_buffer():
    buffer = ExperienceBuffer(2, 3, device=CPU).double()
    buffer.register_key("obs", shape=(2,))  # registered after the cast: float32
    buffer.double()
    data = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(3))
    buffer.batch_update_data("obs", data)
    assert_bits_equal(buffer.make_dict()["obs"], flat_env_major(list(data.double())))


def test_to_another_device_moves_buffers_and_later_keys_follow():
    # 'meta' stands in for a second device on a CPU-only machine; forced onto the torch path.
    with use_backend("torch"):
        buffer = ExperienceBuffer(2, 3, device=CPU)
        buffer.register_key("obs", shape=(4,))
        buffer.to("meta")
        assert buffer.obs.device.type == "meta"
        buffer.register_key("rew")
        assert buffer.rew.device.type == "meta"
        for s in range(3):
            buffer.update_step(s, {"obs": torch.empty(2, 4, device="meta"), "rew": 0.5})
        out = buffer.make_dict()
        assert out["obs"].device.type == "meta" and out["obs"].shape == (6, 4)
        assert out["rew"].device.type == "meta" and out["rew"].shape == (6,)


@pytest.mark.gpu
@requires_cuda
def test_cuda_then_writes_and_make_dict_run_on_the_new_device():
    num_envs, num_steps = 3, 4
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,))
    buffer.update_data("obs", 0, torch.zeros(num_envs, 2))
    buffer.cuda()
    buffer.register_key("rew", dtype=torch.float16)
    assert buffer.obs.is_cuda and buffer.rew.is_cuda
    obs = [torch.randn(num_envs, 2, device="cuda") for _ in range(num_steps)]
    rew = [torch.randn(num_envs, device="cuda") for _ in range(num_steps)]
    for s in range(num_steps):
        buffer.update_step(s, {"obs": obs[s], "rew": rew[s]})
    out = buffer.make_dict()
    assert_bits_equal(out["obs"], flat_env_major(obs))
    assert_bits_equal(out["rew"], flat_env_major([r.half() for r in rew]))


# ---------------------------------------------------------------------------------------------
# ExperienceBuffer: writes
# ---------------------------------------------------------------------------------------------


def test_update_data_takes_the_step_positionally_as_index_or_as_step():
    buffer = ExperienceBuffer(2, 3, device=CPU)
    buffer.register_key("obs", shape=(2,))
    a, b, c = (torch.full((2, 2), float(v)) for v in (1, 2, 3))
    buffer.update_data("obs", 2, a)
    buffer.update_data("obs", step=0, data=b)
    buffer.update_data(key="obs", index=1, data=c)
    assert torch.equal(buffer.obs, torch.stack([b, c, a]))
    assert buffer.store_dict["obs"] == 6


@pytest.mark.parametrize(
    "data",
    [
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([[1.0], [2.0], [3.0], [4.0]]),
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.arange(12.0).reshape(1, 4, 3),
        torch.tensor(2.5),
        -1.5,
        7,
    ],
    ids=["row", "column", "leading_one", "extra_leading_one", "0d", "python_float", "python_int"],
)
def test_update_data_broadcasts_like_pytorch_assignment(data):
    num_envs, num_steps = 4, 3
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(3,))
    expected = torch.zeros(num_steps, num_envs, 3)
    expected[1] = data
    buffer.update_data("obs", 1, data)
    assert torch.equal(buffer.obs, expected)


CAST_CASES = [
    (torch.float64, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.int32),
    (torch.float64, torch.int64),
    (torch.int64, torch.float16),
    (torch.int32, torch.uint8),
    (torch.float32, torch.bool),
    (torch.bool, torch.float32),
    (torch.int64, torch.bool),
]


@pytest.mark.parametrize("src, dst", CAST_CASES, ids=lambda d: str(d).replace("torch.", ""))
def test_update_data_and_update_step_cast_like_pytorch_assignment(src, dst):
    num_envs, num_steps = 5, 2
    g = torch.Generator().manual_seed(11)
    if src.is_floating_point:
        data = (torch.randn(num_envs, 2, generator=g, dtype=torch.float64) * 50).to(src)
        data[0, 0] = 0.0
        if dst == torch.uint8:
            data = data.abs()
    elif src == torch.bool:
        data = torch.randint(0, 2, (num_envs, 2), generator=g).bool()
    else:
        data = torch.randint(0, 200, (num_envs, 2), generator=g).to(src)
        data[0, 0] = 0
    expected = torch.zeros(num_steps, num_envs, 2, dtype=dst)
    expected[0] = data
    expected[1] = data
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("x", shape=(2,), dtype=dst)
    buffer.update_data("x", 0, data)
    buffer.update_step(1, {"x": data})
    assert_bits_equal(buffer.x, expected)


def test_update_step_writes_every_key_of_mixed_dtypes_at_one_step():
    num_envs, num_steps = 4, 3
    specs = {
        "obs": ((5,), torch.float32),
        "act": ((2,), torch.float16),
        "rew": ((), torch.float64),
        "done": ((), torch.bool),
        "idx": ((), torch.int64),
        "img": ((2, 3), torch.uint8),
        "logp": ((), torch.bfloat16),
        "cnt": ((1,), torch.int32),
    }
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    for key, (shape, dtype) in specs.items():
        buffer.register_key(key, shape=shape, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    steps = {
        k: [random_tensor((num_envs, *shape), dtype, generator=g) for _ in range(num_steps)]
        for k, (shape, dtype) in specs.items()
    }
    buffer.update_step(1, {k: v[1] for k, v in steps.items()})
    for key in specs:
        assert_bits_equal(getattr(buffer, key)[1], steps[key][1])
        for other in (0, 2):  # the other steps are untouched
            assert not getattr(buffer, key)[other].any()
        assert buffer.store_dict[key] == 2
    # a subset of the keys: the others keep their tracking
    buffer.update_step(0, {"obs": steps["obs"][0], "done": steps["done"][0]})
    assert buffer.store_dict["obs"] == 3 and buffer.store_dict["done"] == 3
    assert buffer.store_dict["act"] == 2
    for s in (0, 2):
        buffer.update_step(s, {k: v[s] for k, v in steps.items()})
    out = buffer.make_dict()
    assert list(out) == list(specs)
    for key in specs:
        assert_bits_equal(out[key], flat_env_major(steps[key]))


def test_update_step_accepts_any_mapping_and_broadcasts_per_key():
    buffer = ExperienceBuffer(3, 2, device=CPU)
    buffer.register_key("obs", shape=(2,))
    buffer.register_key("rew", dtype=torch.float64)
    row = torch.tensor([1.0, -2.0])
    buffer.update_step(1, types.MappingProxyType({"obs": row, "rew": 0.25}))
    assert torch.equal(buffer.obs[1], row.expand(3, 2))
    assert torch.equal(buffer.rew[1], torch.full((3,), 0.25, dtype=torch.float64))
    assert not buffer.obs[0].any() and not buffer.rew[0].any()


def test_update_step_accepts_a_tensordict():
    tensordict = pytest.importorskip("tensordict")
    buffer = ExperienceBuffer(3, 2, device=CPU)
    buffer.register_key("obs", shape=(2,))
    buffer.register_key("rew")
    td = tensordict.TensorDict({"obs": torch.randn(3, 2), "rew": torch.randn(3)}, batch_size=[3])
    buffer.update_step(0, td)
    assert torch.equal(buffer.obs[0], td["obs"]) and torch.equal(buffer.rew[0], td["rew"])
    assert buffer.store_dict == {"obs": 1, "rew": 1}


def test_batch_update_data_writes_the_whole_buffer_and_marks_every_step():
    num_envs, num_steps = 3, 4
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,))
    buffer.register_key("rew")
    data = torch.randn(num_steps, num_envs, 2, generator=torch.Generator().manual_seed(2))
    buffer.update_data("obs", 1, torch.ones(num_envs, 2))
    buffer.batch_update_data("obs", data)
    assert torch.equal(buffer.obs, data)
    assert buffer.store_dict == {"obs": buffer.total_sum(), "rew": 0}
    buffer.batch_update_data("rew", torch.zeros(num_steps, num_envs))
    assert_bits_equal(buffer.make_dict()["obs"], flat_env_major(list(data)))


@pytest.mark.parametrize("num_steps", [1, 2, 4, 7, 32])
def test_total_sum_is_the_sum_of_step_plus_one(num_steps):
    buffer = ExperienceBuffer(2, num_steps, device=CPU)
    assert buffer.total_sum() == (num_steps + 1) * num_steps / 2
    assert buffer.total_sum() == sum(s + 1 for s in range(num_steps))


def test_store_dict_tracks_distinct_steps_exactly():
    num_envs, num_steps = 2, 4
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("a")
    buffer.register_key("b", shape=(2,))
    assert buffer.store_dict == {"a": 0, "b": 0}
    buffer.update_data("a", 2, torch.ones(num_envs))
    assert buffer.store_dict == {"a": 3, "b": 0}
    buffer.update_data("a", 2, torch.ones(num_envs))  # the same step again: no double count
    assert buffer.store_dict == {"a": 3, "b": 0}
    buffer.update_step(0, {"a": 1.0, "b": 2.0})
    buffer.update_step(0, {"a": 1.0})
    assert buffer.store_dict == {"a": 4, "b": 1}
    buffer.update_data("a", 1, torch.ones(num_envs))
    buffer.update_data("a", 3, torch.ones(num_envs))
    assert buffer.store_dict["a"] == buffer.total_sum()
    buffer.update_data("a", 3, torch.ones(num_envs))
    assert buffer.store_dict["a"] == buffer.total_sum()
    buffer.batch_update_data("b", torch.zeros(num_steps, num_envs, 2))
    assert buffer.store_dict["b"] == buffer.total_sum()
    buffer.make_dict()
    assert buffer.store_dict == {"a": 0, "b": 0}


# ---------------------------------------------------------------------------------------------
# ExperienceBuffer: reads
# ---------------------------------------------------------------------------------------------


def _fill(buffer: ExperienceBuffer, key: str, steps) -> None:
    for s in steps:
        buffer.update_data(key, s, torch.full(getattr(buffer, key).shape[1:], float(s + 1)))


def test_make_dict_rejects_missing_steps_naming_key_and_steps():
    num_steps = 12
    buffer = ExperienceBuffer(2, num_steps, device=CPU)
    buffer.register_key("obs", shape=(3,))
    buffer.register_key("rew")
    _fill(buffer, "obs", range(num_steps))
    _fill(buffer, "rew", [s for s in range(num_steps) if s not in (7, 10)])
    tracked = dict(buffer.store_dict)
    with pytest.raises(ValueError) as excinfo:
        buffer.make_dict()
    message = str(excinfo.value)
    prefix = "Problem with 'rew'"
    assert message.startswith(prefix)
    numbers = {int(n) for n in re.findall(r"(?<![\d.])\d+(?![\d.])", message[len(prefix) :])}
    assert {7, 10} <= numbers
    # a failed make_dict resets nothing: write the missing steps and it succeeds
    assert buffer.store_dict == tracked
    _fill(buffer, "rew", [7, 10])
    out = buffer.make_dict()
    assert torch.equal(out["rew"][7::num_steps], torch.full((2,), 8.0))


def test_make_dict_rejects_a_key_never_written():
    buffer = ExperienceBuffer(2, 3, device=CPU)
    buffer.register_key("obs")
    buffer.register_key("val")
    _fill(buffer, "obs", range(3))
    with pytest.raises(ValueError, match=r"^Problem with 'val'"):
        buffer.make_dict()


def test_make_dict_resets_the_tracking():
    num_steps = 3
    buffer = ExperienceBuffer(2, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,))
    _fill(buffer, "obs", range(num_steps))
    buffer.make_dict()
    assert buffer.store_dict == {"obs": 0}
    with pytest.raises(ValueError, match=r"^Problem with 'obs'"):
        buffer.make_dict()
    _fill(buffer, "obs", reversed(range(num_steps)))
    assert buffer.make_dict()["obs"].shape == (2 * num_steps, 2)


def test_make_dict_returns_env_major_rows():
    num_envs, num_steps = 4, 3
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,), dtype=torch.int64)
    buffer.register_key("rew", dtype=torch.int32)
    for s in range(num_steps):
        env = torch.arange(num_envs)
        buffer.update_data("obs", s, torch.stack([s * 100 + env * 10, s * 100 + env * 10 + 1], 1))
        buffer.update_data("rew", s, (s * 100 + env).int())
    out = buffer.make_dict()
    assert out["obs"].shape == (num_envs * num_steps, 2)
    assert out["rew"].shape == (num_envs * num_steps,)
    for e in range(num_envs):
        for s in range(num_steps):
            row = e * num_steps + s
            assert out["obs"][row].tolist() == [s * 100 + e * 10, s * 100 + e * 10 + 1]
            assert out["rew"][row].item() == s * 100 + e


@pytest.mark.parametrize("num_envs, num_steps", [(1, 3), (3, 1), (1, 1), (3, 2)])
def test_make_dict_and_get_dict_return_copies_not_views(num_envs, num_steps):
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,))
    _fill(buffer, "obs", range(num_steps))
    snapshot = buffer.obs.clone()
    viewed = buffer.get_dict()["obs"]
    out = buffer.make_dict()["obs"]
    assert_bits_equal(out, flat_env_major(list(snapshot)))
    out.fill_(-7)
    viewed.fill_(-9)
    assert torch.equal(buffer.obs, snapshot)  # neither result is a view of the buffer
    assert torch.equal(out, torch.full_like(out, -7))  # nor of each other
    buffer.update_data("obs", 0, torch.zeros(num_envs, 2))
    assert torch.equal(out, torch.full_like(out, -7))  # later writes leave old results alone


def test_get_dict_neither_checks_nor_resets():
    num_envs, num_steps = 3, 4
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    buffer.register_key("obs", shape=(2,))
    buffer.register_key("rew")
    _fill(buffer, "obs", [0, 2])
    view = buffer.get_dict()  # incomplete: no error
    assert list(view) == ["obs", "rew"]
    assert_bits_equal(view["obs"], flat_env_major(list(buffer.obs)))
    assert_bits_equal(view["rew"], torch.zeros(num_envs * num_steps))
    assert buffer.store_dict == {"obs": 4, "rew": 0}
    _fill(buffer, "obs", [1, 3])
    _fill(buffer, "rew", range(num_steps))
    full = buffer.get_dict()
    assert buffer.store_dict == {"obs": buffer.total_sum(), "rew": buffer.total_sum()}
    out = buffer.make_dict()  # tracking survived both get_dict calls
    for key in out:
        assert_bits_equal(out[key], full[key])


def test_make_dict_and_get_dict_of_a_buffer_without_keys_are_empty_dicts():
    buffer = ExperienceBuffer(2, 3, device=CPU)
    view = buffer.get_dict()
    assert isinstance(view, dict) and dict(view) == {}
    out = buffer.make_dict()
    assert isinstance(out, dict) and dict(out) == {}


def test_repr_names_sizes_device_and_every_keys_shape_and_dtype():
    buffer = ExperienceBuffer(num_envs=5, num_steps=3, device=CPU)
    buffer.register_key("obs", shape=(4, 2))
    buffer.register_key("done", dtype=torch.bool)
    buffer.register_key("rew")
    text = repr(buffer)
    assert text.startswith("ExperienceBuffer(")
    for part in (
        "num_envs=5",
        "num_steps=3",
        "device=cpu",
        "obs: (4, 2) torch.float32",
        "done: () torch.bool",
        "rew: () torch.float32",
    ):
        assert part in text, f"{part!r} not in {text!r}"
    buffer.double()  # the repr follows a cast (float keys only), as the buffers do
    text = repr(buffer)
    for part in ("obs: (4, 2) torch.float64", "done: () torch.bool", "rew: () torch.float64"):
        assert part in text, f"{part!r} not in {text!r}"


# ---------------------------------------------------------------------------------------------
# DictDataset
# ---------------------------------------------------------------------------------------------


def _rows(tensor: torch.Tensor, indices) -> torch.Tensor:
    return torch.stack([tensor[int(i) % tensor.shape[0]] for i in indices])


def test_dict_dataset_attributes():
    obs, short = torch.randn(12, 3), torch.arange(5)
    data = {"obs": obs, "short": short}
    dataset = DictDataset(4, data)
    assert dataset.batch_size == 4
    assert dataset.num_tensors == 12
    assert dataset.do_shuffle is False
    assert list(dataset.tensor_dict) == ["obs", "short"]
    assert dataset.tensor_dict["obs"] is obs and dataset.tensor_dict["short"] is short
    perm = dataset.shuffled_to_original
    assert isinstance(perm, torch.Tensor) and perm.dim() == 1 and perm.dtype == torch.int64
    assert torch.equal(perm, torch.arange(12))
    assert DictDataset(4, data, shuffle=True).do_shuffle is True


def test_dict_dataset_num_batches_and_len():
    dataset = DictDataset(batch_size=6, tensor_dict={"a": torch.zeros(24, 2), "b": torch.zeros(5)})
    assert dataset.num_batches() == 4 and len(dataset) == 4
    assert len(DictDataset(24, {"a": torch.zeros(24)})) == 1
    assert len(DictDataset(1, {"a": torch.zeros(7)})) == 7


def test_dict_dataset_indexes_shorter_tensors_modulo_their_length():
    long = torch.arange(12) * 10
    short = torch.arange(5) + 100
    mid = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    dataset = DictDataset(4, {"long": long, "short": short, "mid": mid})
    for i in range(3):
        idx = range(4 * i, 4 * i + 4)
        batch = dataset[i]
        assert torch.equal(batch["long"], _rows(long, idx))
        assert torch.equal(batch["short"], _rows(short, idx))
        assert torch.equal(batch["mid"], _rows(mid, idx))
    assert dataset[2]["short"].tolist() == [103, 104, 100, 101]


def test_dict_dataset_shuffled_batches_follow_the_permutation_modulo():
    gen = torch.Generator().manual_seed(9)
    long = torch.randn(24, 3, generator=gen)
    short = torch.randint(0, 1000, (7,), generator=gen)
    dataset = DictDataset(6, {"long": long, "short": short}, shuffle=True, generator=gen)
    perm = dataset.shuffled_to_original
    assert not torch.equal(perm, torch.arange(24))
    for i in range(len(dataset)):
        idx = perm[6 * i : 6 * i + 6]
        assert torch.equal(dataset[i]["long"], _rows(long, idx))
        assert torch.equal(dataset[i]["short"], _rows(short, idx))


def test_dict_dataset_permutation_is_on_the_data_device_and_reproducible_with_a_generator():
    data = {"x": torch.arange(64)}
    a = DictDataset(8, data, shuffle=True, generator=torch.Generator().manual_seed(123))
    b = DictDataset(8, data, shuffle=True, generator=torch.Generator().manual_seed(123))
    c = DictDataset(8, data, shuffle=True, generator=torch.Generator().manual_seed(124))
    assert a.shuffled_to_original.device == data["x"].device
    assert torch.equal(a.shuffled_to_original, b.shuffled_to_original)
    assert not torch.equal(a.shuffled_to_original, c.shuffled_to_original)
    a.shuffle()
    b.shuffle()
    assert torch.equal(a.shuffled_to_original, b.shuffled_to_original)
    for i in range(len(a)):
        assert torch.equal(a[i]["x"], b[i]["x"])


def test_dict_dataset_shuffles_with_numpys_global_rng_and_leaves_torchs_alone():
    """Without a generator the permutation is np.random.permutation(n), as the original drew it:
    NumPy's seed decides it, torch's global RNG (actions, replay sampling) is not touched."""
    data = {"x": torch.arange(64)}
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            np.random.seed(1)
            expected = np.random.permutation(64)
            torch.manual_seed(5)
            np.random.seed(1)
            torch_state = torch.get_rng_state()
            first = DictDataset(8, data, shuffle=True).shuffled_to_original
            assert torch.equal(torch.get_rng_state(), torch_state)
            torch.manual_seed(6)
            np.random.seed(1)
            other_torch_seed = DictDataset(8, data, shuffle=True).shuffled_to_original
            torch.manual_seed(5)
            np.random.seed(2)
            other_numpy_seed = DictDataset(8, data, shuffle=True).shuffled_to_original
    finally:
        np.random.set_state(np_state)
    assert first.dtype == torch.int64 and first.dim() == 1 and first.device == data["x"].device
    assert first.tolist() == expected.tolist()
    assert torch.equal(first, other_torch_seed)
    assert not torch.equal(first, other_numpy_seed)


def test_dict_dataset_with_a_generator_leaves_both_global_rngs_alone():
    data = {"x": torch.arange(64)}
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    dataset = DictDataset(8, data, shuffle=True, generator=torch.Generator().manual_seed(0))
    dataset.shuffle()
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


def test_dict_dataset_shuffle_draws_a_new_permutation():
    data = {"x": torch.arange(64), "y": torch.arange(64) * 2}
    dataset = DictDataset(16, data, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dataset.shuffled_to_original, torch.arange(64))
    dataset.shuffle()
    first = dataset.shuffled_to_original.clone()
    assert not torch.equal(first, torch.arange(64))
    assert torch.equal(first.sort().values, torch.arange(64))
    assert first.dtype == torch.int64 and first.dim() == 1
    dataset.shuffle()
    second = dataset.shuffled_to_original
    assert not torch.equal(first, second)
    assert torch.equal(second.sort().values, torch.arange(64))
    assert torch.equal(dataset[0]["x"], second[:16])
    assert torch.equal(dataset[3]["y"], second[48:] * 2)


def test_dict_dataset_negative_index_counts_from_the_end():
    data = {"x": torch.arange(12), "y": torch.arange(5)}
    dataset = DictDataset(3, data, shuffle=True, generator=torch.Generator().manual_seed(1))
    for i in range(1, len(dataset) + 1):
        neg, pos = dataset[-i], dataset[len(dataset) - i]
        assert torch.equal(neg["x"], pos["x"]) and torch.equal(neg["y"], pos["y"])


def test_dict_dataset_raises_index_error_past_the_end():
    dataset = DictDataset(3, {"x": torch.arange(12)})
    for bad in (4, 5, 100, -5, -6):
        with pytest.raises(IndexError):
            dataset[bad]
    assert torch.equal(dataset[3]["x"], torch.arange(9, 12))


def test_dict_dataset_iteration_yields_exactly_len_batches():
    data = {"x": torch.arange(20), "y": torch.randn(20, 2)}
    dataset = DictDataset(5, data, shuffle=True, generator=torch.Generator().manual_seed(2))
    batches = list(dataset)
    assert len(batches) == len(dataset) == 4
    for i, batch in enumerate(batches):
        assert set(batch) == {"x", "y"}
        assert torch.equal(batch["x"], dataset[i]["x"])
        assert torch.equal(batch["y"], dataset[i]["y"])
    assert len([b for b in dataset]) == 4  # a second epoch works too


def test_dict_dataset_shuffled_epoch_is_a_permutation_of_all_rows():
    n = 48
    gen = torch.Generator().manual_seed(8)
    obs = torch.randn(n, 3, generator=gen)
    data = {"id": torch.arange(n), "obs": obs}
    dataset = DictDataset(12, data, shuffle=True, generator=gen)
    for _ in range(2):
        batches = list(dataset)
        ids = torch.cat([b["id"] for b in batches])
        assert not torch.equal(ids, torch.arange(n))
        assert torch.equal(ids.sort().values, torch.arange(n))
        assert torch.equal(ids, dataset.shuffled_to_original)  # the current permutation
        assert torch.equal(torch.cat([b["obs"] for b in batches]), obs[ids])
        dataset.shuffle()


def test_dict_dataset_rejects_a_batch_size_that_does_not_divide_the_longest_tensor():
    with pytest.raises(ValueError, match=r"^12 5"):
        DictDataset(5, {"x": torch.zeros(12), "short": torch.zeros(10)})


# ---------------------------------------------------------------------------------------------
# every dtype of the contract, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exactly_through_writes_make_dict_and_batches(dtype):
    num_envs, num_steps, batch = 6, 4, 8
    shapes = {"scalar": (), "vec": (3,), "mat": (2, 2), "step": (5,)}
    g = torch.Generator().manual_seed(DTYPES.index(dtype))
    steps = {
        k: [special_values((num_envs, *shape), dtype, g) for _ in range(num_steps)]
        for k, shape in shapes.items()
    }
    buffer = ExperienceBuffer(num_envs, num_steps, device=CPU)
    for key, shape in shapes.items():
        buffer.register_key(key, shape=shape, dtype=dtype)
    for s in (2, 0, 3, 1):
        buffer.update_data("scalar", s, steps["scalar"][s])
        buffer.update_data("vec", step=s, data=steps["vec"][s])
        buffer.update_step(s, {"step": steps["step"][s]})
    buffer.batch_update_data("mat", torch.stack(steps["mat"]))
    out = buffer.make_dict()
    expected = {k: flat_env_major(v) for k, v in steps.items()}
    assert list(out) == list(shapes)
    for key in shapes:
        assert_bits_equal(out[key], expected[key])

    short = special_values((5, 2), dtype, g)
    out["short"] = short
    expected["short"] = short
    dataset = DictDataset(batch, out, shuffle=True, generator=torch.Generator().manual_seed(3))
    perm = dataset.shuffled_to_original
    assert len(dataset) == num_envs * num_steps // batch
    for i, got in enumerate(dataset):
        idx = perm[i * batch : (i + 1) * batch]
        assert list(got) == list(expected)
        for key, full in expected.items():
            assert_bits_equal(got[key], _rows(full, idx))


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------


def test_backend_set_get_and_use(restore_backend):
    set_backend("torch")
    assert get_backend() == "torch"
    with use_backend("auto"):
        assert get_backend() == "auto"
        with use_backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "auto"
    assert get_backend() == "torch"
    with pytest.raises(RuntimeError, match="boom"), use_backend("auto"):
        raise RuntimeError("boom")
    assert get_backend() == "torch"
    set_backend("auto")
    assert get_backend() == "auto"


@pytest.mark.parametrize("name", ["cuda", "pytorch", "", None])
def test_unknown_backend_name_is_an_error(restore_backend, name):
    set_backend("torch")
    with pytest.raises(ValueError):
        set_backend(name)
    with pytest.raises(ValueError), use_backend(name):
        pass
    assert get_backend() == "torch"


@pytest.mark.parametrize(
    "value, expected", [("auto", "auto"), ("triton", "triton"), ("torch", "torch"), (None, "auto")]
)
def test_rollout_buffers_backend_environment_variable_sets_the_initial_backend(
    restore_backend, monkeypatch, value, expected
):
    if value is None:
        monkeypatch.delenv("ROLLOUT_BUFFERS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ROLLOUT_BUFFERS_BACKEND", value)
    importlib.reload(backend_module)
    assert rollout_buffers.get_backend() == expected


def test_unknown_rollout_buffers_backend_environment_value_fails_at_import():
    env = dict(os.environ, ROLLOUT_BUFFERS_BACKEND="bogus")
    proc = subprocess.run(
        [sys.executable, "-c", "import rollout_buffers"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "bogus" in proc.stderr


def test_auto_and_torch_backends_run_on_cpu_tensors():
    arr = torch.arange(6).reshape(2, 3)
    for name in ("auto", "torch"):
        with use_backend(name):
            assert torch.equal(swap_and_flatten01(arr), arr.t().reshape(6))
            dataset = DictDataset(3, {"x": torch.arange(6)})
            assert torch.equal(dataset[1]["x"], torch.arange(3, 6))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(restore_backend, monkeypatch):
    # The backend reads TRITON_INTERPRET at call time, so switching it off here is enough.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    buffer = ExperienceBuffer(2, 3, device=CPU)
    buffer.register_key("obs")
    dataset = DictDataset(3, {"x": torch.arange(6)})
    pattern = "TRITON_INTERPRET" if backend_module.triton_available() else "triton"
    set_backend("triton")
    with pytest.raises(BackendUnavailableError, match=pattern):
        swap_and_flatten01(torch.zeros(2, 3))
    with pytest.raises(BackendUnavailableError, match=pattern):
        buffer.update_data("obs", 0, torch.ones(2))
    with pytest.raises(BackendUnavailableError, match=pattern):
        buffer.update_step(0, {"obs": torch.ones(2)})
    with pytest.raises(BackendUnavailableError, match=pattern):
        buffer.get_dict()
    with pytest.raises(BackendUnavailableError, match=pattern):
        dataset[0]
    with pytest.raises(BackendUnavailableError, match=pattern):
        rollout_buffers.compute_gae(*[torch.zeros(3, 2)] * 4, 0.99, 0.95)
    assert not buffer.obs.any() and buffer.store_dict == {"obs": 0}
