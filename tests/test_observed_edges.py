"""Edge behaviours a mutation-testing run showed untested: each test here pins one observable
behaviour (a result, an error class, a message) that a surviving mutant changed without any
other test noticing.

Unless a test says otherwise it runs on the PyTorch backend with lazy ``make_dict`` (the
defaults), on tiny CPU tensors; tests that also exercise a kernel path run under
``use_backend("triton")`` too (Triton's CPU interpreter here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import kernel_device

import rollout_buffers.dataset as dataset_module
from bench import original
from rollout_buffers import (
    DictDataset,
    ExperienceBuffer,
    FlatDict,
    RolloutIndexTypeError,
    RolloutTypeError,
    RolloutValueError,
    SequenceDataset,
    StaleRolloutError,
    lazy_make_dict,
    set_lazy_make_dict,
    unpad_trajectories,
    use_backend,
)

N, T = 2, 2  # 2 envs x 2 steps: 4 env-major rows


@pytest.fixture(autouse=True)
def _lazy_torch():
    """Lazy make_dict on the torch backend, whatever the environment says; restored after."""
    before = lazy_make_dict()
    set_lazy_make_dict(True)
    with use_backend("torch"):
        yield
    set_lazy_make_dict(before)


def _device(name: str) -> str:
    """The device backend ``name`` runs on here (skips 'triton' where it cannot run)."""
    return "cpu" if name == "torch" else kernel_device()


def _buffer(device: str = "cpu") -> ExperienceBuffer:
    """A 2-env x 2-step buffer with every step of every key written (distinct values)."""
    b = ExperienceBuffer(N, T, device=device)
    b.register_key("obs", (2,))
    b.register_key("rew")
    b.batch_update_data("obs", torch.arange(T * N * 2, dtype=torch.float32).view(T, N, 2))
    b.batch_update_data("rew", 100 + torch.arange(T * N, dtype=torch.float32).view(T, N))
    return b


def _flat(t: torch.Tensor) -> torch.Tensor:
    """What the original make_dict returned for a storage: an env-major copy."""
    return original.swap_and_flatten01(t).clone()


def _made_mapping(b: ExperienceBuffer) -> FlatDict:
    """A make_dict() result whose every value has been read."""
    d = b.make_dict()
    list(d.values())
    assert isinstance(d, FlatDict)
    return d


# ---------------------------------------------------------------------------------------------
# ExperienceBuffer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [True, False], ids=repr)
def test_update_step_refuses_a_bool_step_and_writes_nothing(step):
    b = _buffer()
    data = {k: getattr(b, k).clone() for k in b.keys()}
    store = dict(b.store_dict)
    row = {"obs": torch.full((N, 2), -9.0), "rew": torch.full((N,), -9.0)}
    with pytest.raises(RolloutIndexTypeError) as info:
        b.update_step(step, row)
    msg = str(info.value)
    assert "update_step" in msg and "integer" in msg and f"{step!r} (bool)" in msg, msg
    for key, before in data.items():
        assert torch.equal(getattr(b, key), before), key
    assert b.store_dict == store
    # Once update_step has a prepared write for these keys, a bool is still refused.
    b.update_step(0, row)
    with pytest.raises(RolloutIndexTypeError):
        b.update_step(step, {"obs": torch.full((N, 2), 5.0), "rew": torch.full((N,), 5.0)})
    assert torch.equal(b.obs[1], data["obs"][1]) and torch.equal(b.rew[1], data["rew"][1])


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_make_dict_includes_a_key_registered_after_an_earlier_make_dict(name):
    device = _device(name)
    with use_backend(name):
        b = _buffer(device)
        first = b.make_dict()
        assert list(first) == ["obs", "rew"]
        b.register_key("done", dtype=torch.bool)
        done = torch.tensor([[True, False], [False, True]], device=device)
        b.batch_update_data("done", done)
        b.batch_update_data("obs", b.obs.clone())
        b.batch_update_data("rew", b.rew.clone())
        second = b.make_dict()
        assert list(second) == ["obs", "rew", "done"]
        for key in ("obs", "rew", "done"):
            assert torch.equal(second[key], _flat(getattr(b, key))), key
        assert list(b.get_dict()) == ["obs", "rew", "done"]


# ---------------------------------------------------------------------------------------------
# FlatDict: the mapping make_dict() returns
# ---------------------------------------------------------------------------------------------


def test_a_dict_or_a_made_mapping_merges_like_the_eager_dict():
    b = _buffer()
    d = _made_mapping(b)
    eager = {k: _flat(getattr(b, k)) for k in b.keys()}
    merged = {"x": 1, "rew": 0} | d
    assert type(merged) is dict
    assert list(merged) == list({"x": 1, "rew": 0} | eager) == ["x", "rew", "obs"]
    assert merged["x"] == 1
    for key in eager:
        assert torch.equal(merged[key], eager[key]), key


def test_a_made_mapping_compares_unequal_to_a_plain_dict_like_the_eager_dict():
    b = _buffer()
    d = _made_mapping(b)
    assert (d != {}) is True
    assert (d != dict(d)) is False
    assert (d != {"obs": d["obs"]}) is True
    assert ({} != d) is True


@pytest.mark.parametrize("made", [False, True], ids=["pending", "made"])
def test_or_with_a_non_dict_on_the_left_is_a_type_error(made):
    b = _buffer()
    d = _made_mapping(b) if made else b.make_dict()
    with pytest.raises(TypeError, match="unsupported operand type"):
        [1] | d  # noqa: B018
    with pytest.raises(TypeError, match="unsupported operand type"):
        d | [1]  # noqa: B018


def test_pop_of_a_missing_key_returns_the_default_and_without_one_raises_key_error():
    b = _buffer()
    d = b.make_dict()  # pending: nothing read yet
    assert d.pop("missing", None) is None
    assert d.pop("missing", "fallback") == "fallback"
    with pytest.raises(KeyError, match="missing"):
        d.pop("missing")
    assert torch.equal(d.pop("rew", None), _flat(b.rew))
    assert list(d) == ["obs"]


def _step_rew(buf, index, rew):
    buf.update_step(index, {"rew": rew})


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_a_bypass_write_stays_stale_across_a_compiled_update_step_of_another_key(compiler):
    torch._dynamo.reset()
    b = _buffer()
    compiled = torch.compile(_step_rew, backend=compiler, fullgraph=True)
    d = b.make_dict()  # kept, unread
    b.obs[0] = 9.0  # a write that bypasses the API
    compiled(b, 1, torch.full((N,), -5.0))
    assert torch.equal(b.rew[1], torch.full((N,), -5.0))  # the compiled write happened
    with pytest.raises(StaleRolloutError, match="'obs'"):
        d["obs"]  # never the data written behind the API's back


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_a_compiled_update_step_keeps_the_written_keys_pre_write_value_beside_a_stale_one(
    compiler,
):
    torch._dynamo.reset()
    b = _buffer()
    rew_before = _flat(b.rew)
    compiled = torch.compile(_step_rew, backend=compiler, fullgraph=True)
    d = b.make_dict()  # kept, unread
    b.obs[0] = 9.0  # a write that bypasses the API
    compiled(b, 1, torch.full((N,), -5.0))
    assert torch.equal(d["rew"], rew_before)  # copied before the compiled write
    with pytest.raises(StaleRolloutError, match="'obs'"):
        d["obs"]


# ---------------------------------------------------------------------------------------------
# DictDataset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("entry", [5, -3, 1])
def test_dict_dataset_wraps_an_assigned_one_element_permutation_like_the_original(name, entry):
    device = _device(name)
    data = {"x": torch.tensor([[7.0, 8.0]], device=device)}
    ref = original.DictDataset(1, {"x": data["x"].cpu()})
    ref.shuffled_to_original = np.array([entry])
    with use_backend(name):
        ds = DictDataset(1, data)
        ds.shuffled_to_original = torch.tensor([entry])
        got = ds[0]
    assert torch.equal(got["x"].cpu(), ref[0]["x"])


def test_dict_dataset_keeps_each_shuffles_pinned_host_buffer_until_the_next(monkeypatch):
    """The non-blocking copy of a shuffle's permutation reads its (pinned) host buffer: the
    dataset must hold the buffer each shuffle returns until the next shuffle replaces it."""
    handed: list[torch.Tensor] = []

    def fake_host_to_device(array, device, out=None):
        host = torch.from_numpy(np.asarray(array, dtype=np.int64))
        handed.append(host.clone())  # stands in for the pinned buffer a CUDA copy reads
        return host.to(device), handed[-1]

    monkeypatch.setattr(dataset_module, "host_to_device", fake_host_to_device)
    ds = DictDataset(2, {"x": torch.arange(4.0)}, shuffle=True)
    assert len(handed) == 1 and ds._pinned is handed[0]
    for n in (2, 3):
        ds.shuffle()
        assert len(handed) == n and ds._pinned is handed[-1]
        assert torch.equal(ds.shuffled_to_original, handed[-1])


# ---------------------------------------------------------------------------------------------
# sequences
# ---------------------------------------------------------------------------------------------


def _storages() -> dict[str, torch.Tensor]:
    """(T=4, N=3) storages: 2 chunks of 2 steps per env, 6 chunks."""
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randn(4, 3, 2, generator=g),
        "h": torch.randn(4, 3, 5, generator=g),
        "dones": torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]).bool(),
    }


def _np_rng_state() -> tuple:
    """NumPy's global RNG state, comparable with ==: (key words, position, ...)."""
    name, key, *rest = np.random.get_state()
    return (name, tuple(key.tolist()), *rest)


def test_sequence_dataset_refresh_does_not_reshuffle_by_default():
    ds = SequenceDataset(_storages(), 2, 2, hidden="h", shuffle=False)
    assert torch.equal(ds.chunk_ids, torch.arange(6))
    state = _np_rng_state()
    ds.refresh()
    assert torch.equal(ds.chunk_ids, torch.arange(6))  # chunks still in order
    assert _np_rng_state() == state  # nothing drawn
    ds.refresh(shuffle=True)  # asked for: a draw from NumPy's global RNG
    assert _np_rng_state() != state
    assert torch.equal(ds.chunk_ids.sort().values, torch.arange(6))


@pytest.mark.parametrize("arg", ["keys", "hidden"])
def test_sequence_dataset_refuses_an_unordered_set_of_keys(arg):
    names = {"keys": {"obs"}, "hidden": {"h"}}[arg]
    kwargs = {"hidden": "h", arg: names}
    with pytest.raises(RolloutTypeError) as info:
        SequenceDataset(_storages(), 2, 2, **kwargs)
    msg = str(info.value)
    assert f"{arg} must be a key or a sequence of keys (str)" in msg, msg
    assert f"received {names!r}" in msg, msg


@pytest.mark.parametrize(
    "masks,received",
    [
        ([[True] * 3] * 4, "received list"),
        (torch.ones(4, 3, 1, dtype=torch.bool), "received shape (4, 3, 1), dtype torch.bool"),
    ],
    ids=["list", "3-d-bool"],
)
def test_unpad_trajectories_refuses_a_mask_that_is_not_a_2d_bool_tensor(masks, received):
    with pytest.raises(RolloutValueError) as info:
        unpad_trajectories(torch.zeros(4, 3), masks)
    msg = str(info.value)
    assert "masks: unpad_trajectories expected a (num_steps, num_traj) bool tensor" in msg, msg
    assert received in msg, msg
