"""Pins behaviours of rollout_buffers/sequences.py that a mutation run showed untested.

A mutation run (mutmut, ``make mutate``) left mutants of sequences.py alive: code changes that
every existing test let pass. Each test here pins one user-visible behaviour those mutants
change: full error messages (they name the function, the key, the expected and the received
value), the classes of the errors, which keys a minibatch holds and in which dtype, where the
library allocates (the data's device, not torch's default device), what a TensorDict or another
mapping gives back, and the shuffling state. /work/wt/survivor_diffs/sequences.classified.md
maps every survivor to the test that kills it, or says why none can.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import kernel_device, requires_cuda

import rollout_buffers
from bench import rsl_rl_peer
from rollout_buffers import (
    ExperienceBuffer,
    SequenceDataset,
    TrajectoryDataset,
    split_and_pad_trajectories,
    unpad_trajectories,
    use_backend,
)
from rollout_buffers import backend as backend_module

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def backends():
    """'torch', and 'triton' where the kernels run on CPU tensors here (Triton's interpreter):
    these tests build their data on the CPU."""
    out = ["torch"]
    try:
        import triton  # noqa: F401

        if backend_module.interpreter_enabled():
            out.append("triton")
    except ImportError:
        pass
    return out


def good(t=6, n=4):
    """Storages for a dataset: obs (3,), dones, a hidden state (2, 5)."""
    return {"obs": torch.zeros(t, n, 3), "dones": torch.zeros(t, n), "h": torch.zeros(t, n, 2, 5)}


def rollout(t=4, n=3):
    """Distinct values per (step, env) and dones that cut trajectories."""
    x = torch.arange(t * n * 2, dtype=torch.float32).reshape(t, n, 2)
    dones = torch.zeros(t, n, dtype=torch.bool)
    dones[1, 0] = dones[0, 1] = dones[2, 2] = True
    return x, dones


def raises_exactly(cls, message, call):
    """``call()`` raises ``cls`` (a rollout_buffers error) whose message is ``message``."""
    with pytest.raises(cls) as info:
        call()
    assert isinstance(info.value, rollout_buffers.RolloutBuffersError)
    assert str(info.value) == message
    return info.value


@pytest.fixture
def np_rng():
    """NumPy's global RNG, restored after the test."""
    state = np.random.get_state()
    yield np.random
    np.random.set_state(state)


class ItemsOnly:
    """Not a ``collections.abc.Mapping``: only ``items()`` (what the original called)."""

    def __init__(self, data):
        self._data = data

    def items(self):
        return self._data.items()


rsl = rsl_rl_peer.load()
needs_rsl_rl = pytest.mark.skipif(rsl is None, reason=f"rsl_rl: {rsl_rl_peer.why_not()}")


# ---------------------------------------------------------------------------------------------
# Sources: what a dataset accepts, what it refuses and how it says so
# ---------------------------------------------------------------------------------------------


def test_an_object_with_items_that_is_not_a_mapping_is_a_source():
    s = good()
    s["obs"] = torch.arange(6 * 4 * 3, dtype=torch.float32).reshape(6, 4, 3)
    ours = SequenceDataset(ItemsOnly(s), 3, 4, hidden="h", shuffle=False)[1]
    ref = SequenceDataset(s, 3, 4, hidden="h", shuffle=False)[1]
    assert list(ours) == list(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k])
    traj = TrajectoryDataset(ItemsOnly(s), 2, padded="obs")[0]
    assert torch.equal(traj["obs"], TrajectoryDataset(s, 2, padded="obs")[0]["obs"])


@pytest.mark.parametrize("cls", [SequenceDataset, TrajectoryDataset])
def test_a_source_that_is_not_a_mapping_is_refused_with_its_type(cls):
    args = (3, 4) if cls is SequenceDataset else (2,)
    raises_exactly(
        TypeError,
        f"{cls.__name__}: expected an ExperienceBuffer or a mapping of key -> (num_steps, "
        "num_envs, ...) tensor, received list",
        lambda: cls([torch.zeros(6, 4)], *args),
    )


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: SequenceDataset(good(), 3, 4, hidden=5),
            "SequenceDataset: hidden must be a key or a sequence of keys (str), received 5",
        ),
        (
            lambda: SequenceDataset(good(), 3, 4, keys=5),
            "SequenceDataset: keys must be a key or a sequence of keys (str), received 5",
        ),
        (
            lambda: TrajectoryDataset(good(), 2, padded=5),
            "TrajectoryDataset: padded must be a key or a sequence of keys (str), received 5",
        ),
    ],
)
def test_a_key_argument_that_is_not_keys_is_refused_naming_the_argument(call, message):
    raises_exactly(TypeError, message, call)


def test_no_keys_to_serve_is_refused():
    err = raises_exactly(
        ValueError,
        "SequenceDataset: no keys to serve",
        lambda: SequenceDataset(good(), 3, 4, keys=[], dones=None),
    )
    assert isinstance(err, rollout_buffers.RolloutValueError)


def test_a_dataset_of_only_hidden_states_or_only_resets_serves_them():
    s = good()
    s["h"] = torch.randn(6, 4, 2, 5, generator=torch.Generator().manual_seed(0))
    s["dones"][1, 2] = 1
    only_h = SequenceDataset(s, 3, 4, keys=[], hidden="h", dones=None, shuffle=False)[0]
    assert list(only_h) == ["h"]
    assert torch.equal(only_h["h"], torch.stack([s["h"][(c % 2) * 3, c // 2] for c in range(4)]))
    only_resets = SequenceDataset(s, 3, 4, keys=[], shuffle=False)[1]
    assert list(only_resets) == ["resets"]
    # minibatch 1 is chunks 4..7: env 2's chunks 0 and 1, env 3's; env 2 was done at step 1
    assert only_resets["resets"].t().tolist() == [
        [False, False, True],
        [False, False, False],
        [False, False, False],
        [False, False, False],
    ]


def test_a_sparse_storage_is_refused_naming_its_layout():
    err = raises_exactly(
        RuntimeError,
        "obs: SequenceDataset expected a dense tensor, received layout torch.sparse_coo",
        lambda: SequenceDataset({**good(), "obs": torch.zeros(6, 4).to_sparse()}, 3, 4),
    )
    assert isinstance(err, rollout_buffers.RolloutLayoutError)


def test_an_empty_rollout_is_refused_and_a_one_step_rollout_is_served():
    err = raises_exactly(
        RuntimeError,
        "obs: SequenceDataset received an empty rollout of shape (0, 4)",
        lambda: SequenceDataset({k: v[:0] for k, v in good().items()}, 3, 4),
    )
    assert isinstance(err, rollout_buffers.RolloutShapeError)
    s = {k: v[:1] for k, v in good().items()}
    s["obs"] = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    batch = SequenceDataset(s, 1, 2, shuffle=False)[1]
    assert torch.equal(batch["obs"], s["obs"][:, 2:4])
    assert batch["resets"].tolist() == [[False, False]]
    traj = TrajectoryDataset(s, 2, padded="obs")[1]
    assert torch.equal(traj["obs"], s["obs"][:, 2:4]) and traj["masks"].all()


def test_a_dones_key_with_autograd_history_is_refused():
    # dones serves only the resets mask here (not a data key): it is checked all the same.
    raises_exactly(
        ValueError,
        "dones: SequenceDataset received a tensor with requires_grad=True; minibatches carry no "
        "autograd history: pass tensor.detach()",
        lambda: SequenceDataset(
            {**good(), "dones": torch.zeros(6, 4, requires_grad=True)}, 3, 4, keys=["obs"]
        ),
    )


@pytest.mark.parametrize(
    "call,cls,message",
    [
        (
            lambda: SequenceDataset({**good(), "dones": torch.zeros(6, 4, 2)}, 3, 4),
            ValueError,
            "dones: SequenceDataset expected the dones key 'dones' of shape (6, 4) or (6, 4, 1) "
            "and dtype bool, integer or floating point (nonzero = done), received shape "
            "(6, 4, 2), dtype torch.float32",
        ),
        (
            lambda: SequenceDataset(good(), 4, 4),
            ValueError,
            "4 6: SequenceDataset: seq_len 4 does not divide num_steps 6; choose a seq_len that "
            "divides it (nearest: 2, 3)",
        ),
        (  # 1 is a divisor too: the nearest may be 1
            lambda: SequenceDataset(good(t=5), 2, 4),
            ValueError,
            "2 5: SequenceDataset: seq_len 2 does not divide num_steps 5; choose a seq_len that "
            "divides it (nearest: 1, 5)",
        ),
        (
            lambda: SequenceDataset(good(), 3, 5),
            ValueError,
            "5 8: SequenceDataset: batch_size 5 does not divide the number of chunks (num_envs 4 "
            "x 2 chunks of 3 steps) = 8; choose a batch_size that divides it (nearest: 2, 4)",
        ),
        (
            lambda: SequenceDataset(good(), 3, 4, generator=5),
            TypeError,
            "SequenceDataset: generator must be a torch.Generator or None, received int",
        ),
        (
            lambda: SequenceDataset(
                {k: v.to("meta") for k, v in good().items()}, 3, 4, generator=torch.Generator()
            ),
            RuntimeError,
            "SequenceDataset: the generator is on cpu, the tensors on meta; create it with "
            "torch.Generator(device='meta')",
        ),
    ],
)
def test_sequence_dataset_error_messages_in_full(call, cls, message):
    raises_exactly(cls, message, call)


# ---------------------------------------------------------------------------------------------
# SequenceDataset: indexing, chunk_ids edits, num_batches
# ---------------------------------------------------------------------------------------------


def test_the_most_negative_batch_index_is_the_first_batch():
    x = torch.arange(24).reshape(4, 6)
    ds = SequenceDataset({"x": x}, 2, 4, dones=None, shuffle=False)
    assert len(ds) == 3
    assert torch.equal(ds[-3]["x"], ds[0]["x"])
    traj = TrajectoryDataset({"x": x, "dones": torch.zeros(4, 6)}, 2, padded="x")
    assert torch.equal(traj[-3]["x"], traj[0]["x"])


def test_a_bool_or_float_batch_index_is_refused_with_its_value_and_type():
    ds = SequenceDataset({"x": torch.arange(24).reshape(4, 6)}, 2, 4, dones=None, shuffle=False)
    for bad, shown in ((True, "True (bool)"), (1.0, "1.0 (float)")):
        err = raises_exactly(
            TypeError,
            "batch index must be an integer (a Python int, NumPy integer or 0-dim integer CPU "
            f"tensor), received {shown}",
            lambda bad=bad: ds[bad],
        )
        assert isinstance(err, IndexError)


def test_a_trajectory_dataset_index_past_the_end_names_the_number_of_batches():
    ds = TrajectoryDataset(good(), 2)
    err = raises_exactly(
        IndexError, "2 2: batch index 2 is out of range for 2 batches", lambda: ds[2]
    )
    assert isinstance(err, rollout_buffers.RolloutIndexError)


def test_num_batches_is_an_int():
    ds = SequenceDataset(good(), 3, 4, shuffle=False)
    assert ds.num_batches() == 2 and type(ds.num_batches()) is int
    traj = TrajectoryDataset(good(), 2)
    assert traj.num_batches() == len(traj) == 2 and type(traj.num_batches()) is int


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize(
    "replacement,shown",
    [
        (lambda: torch.arange(16)[::2], "shape (8,), dtype torch.int64"),  # not contiguous
        (lambda: torch.arange(8, dtype=torch.int32), "shape (8,), dtype torch.int32"),
    ],
    ids=["strided", "int32"],
)
def test_chunk_ids_replaced_by_an_unreadable_tensor_are_refused(name, replacement, shown):
    ds = SequenceDataset(good(), 3, 2, shuffle=False)
    with use_backend(name):
        ds[0]
        ds.chunk_ids.data = replacement()
        err = raises_exactly(
            ValueError,
            "SequenceDataset: chunk_ids must stay a contiguous 1-D int64 tensor of 8 chunk ids "
            f"on cpu; it now has {shown}, device cpu",
            lambda: ds[0],
        )
    assert isinstance(err, rollout_buffers.RolloutValueError)


# ---------------------------------------------------------------------------------------------
# Allocations follow the data's device, not torch's default device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", [False, True], ids=["numpy", "generator"])
def test_sequence_dataset_ignores_torchs_default_device(generator, np_rng):
    # torch.set_default_device / `with torch.device(...)` moves every factory call that names no
    # device: the resets mask, the chunk ids and the drawn permutation must stay with the data.
    x, dones = rollout(4, 3)
    s = {"x": x, "dones": dones}
    seed = 3
    np_rng.seed(seed)
    ref = SequenceDataset(
        s, 2, 3, generator=torch.Generator().manual_seed(seed) if generator else None
    )
    np_rng.seed(seed)
    with use_backend("torch"), torch.device("meta"):
        ds = SequenceDataset(
            s, 2, 3, generator=torch.Generator().manual_seed(seed) if generator else None
        )
        assert ds.chunk_ids.device.type == "cpu"
        assert torch.equal(ds.chunk_ids, ref.chunk_ids)
        for i in range(len(ds)):
            got, want = ds[i], ref[i]
            for k in want:
                assert got[k].device.type == "cpu"
                assert torch.equal(got[k], want[k])


def test_sequence_minibatches_on_the_kernel_path_ignore_torchs_default_device():
    # The kernels' descriptor tables are built on the host whatever default device a context
    # sets (they were made on it: a meta table the launch could not read; on a CUDA default, a
    # pin_memory() of a CUDA tensor).
    device = kernel_device()
    x, dones = rollout(4, 3)
    s = {"x": x.to(device), "dones": dones.to(device)}
    with use_backend("torch"):
        want = SequenceDataset(s, 2, 3, shuffle=False)[1]
    with use_backend("triton"), torch.device("meta"):
        got = SequenceDataset(s, 2, 3, shuffle=False)[1]
    for k in want:
        assert torch.equal(got[k], want[k])


def test_trajectory_functions_ignore_torchs_default_device():
    x, dones = rollout(4, 3)
    padded, masks = split_and_pad_trajectories(x, dones)
    with torch.device("meta"):
        p2, m2 = split_and_pad_trajectories(x, dones)
        back = unpad_trajectories(padded, masks)
        back_n = unpad_trajectories(padded, masks, num_envs=3)
        batch = TrajectoryDataset({"x": x, "dones": dones}, 1, padded="x")[1]
    assert p2.device.type == m2.device.type == "cpu"
    assert torch.equal(p2, padded) and torch.equal(m2, masks)
    assert torch.equal(back, x) and torch.equal(back_n, x)
    assert batch["x"].device.type == "cpu"
    assert torch.equal(batch["x"], split_and_pad_trajectories(x[:, 1:2], dones[:, 1:2])[0])


# ---------------------------------------------------------------------------------------------
# Compact keys (narrow storage) are served in their dtype
# ---------------------------------------------------------------------------------------------


def compact_buffer(t=4, n=4, dones=False):
    buf = ExperienceBuffer(n, t, device="cpu")
    buf.register_key("obs", (2,), storage=torch.bfloat16)
    buf.register_key("h", (3,), storage=torch.bfloat16)
    if dones:
        buf.register_key("dones", dtype=torch.bool)
    g = torch.Generator().manual_seed(2)
    for s in range(t):
        data = {"obs": torch.randn(n, 2, generator=g), "h": torch.randn(n, 3, generator=g)}
        if dones:
            data["dones"] = torch.rand(n, generator=g) < 0.4
        buf.update_step(s, data)
    return buf


@pytest.mark.parametrize("name", backends())
def test_compact_keys_without_dones_are_served_widened(name):
    # Every key compact and no resets mask: each key, data or hidden, served in float32.
    buf = compact_buffer()
    with use_backend(name):
        ds = SequenceDataset(buf, 2, 4, dones=None, hidden="h", shuffle=False)
        batch = ds[1]
    assert list(batch) == ["obs", "h"]
    assert batch["obs"].dtype == batch["h"].dtype == torch.float32
    ids = ds.chunk_ids[4:8]
    steps = (ids % 2) * 2
    assert torch.equal(batch["h"], buf.h[steps, ids // 2].float())
    assert torch.equal(batch["obs"], buf.obs[steps + torch.arange(2)[:, None], ids // 2].float())


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_trajectory_dataset_serves_compact_columns_widened(shuffle, np_rng):
    buf = compact_buffer(dones=True)
    np_rng.seed(1)
    perm = np.random.permutation(4) if shuffle else np.arange(4)
    np_rng.seed(1)
    ds = TrajectoryDataset(buf, 2, padded="h", shuffle=shuffle)
    for i in range(len(ds)):
        envs = perm[i * 2 : (i + 1) * 2].tolist()
        batch = ds[i]
        assert batch["obs"].dtype == torch.float32
        assert torch.equal(batch["obs"], buf.obs[:, envs].float())


# ---------------------------------------------------------------------------------------------
# TrajectoryDataset: construction and shuffling
# ---------------------------------------------------------------------------------------------


def test_trajectory_dataset_serves_the_keys_it_is_given():
    s = good()
    ds = TrajectoryDataset(s, 2, padded="obs", keys=["h"])
    assert ds.keys == ["h"]
    assert list(ds[0]) == ["obs", "masks", "h"]


@pytest.mark.parametrize(
    "call,cls,message",
    [
        (
            lambda: TrajectoryDataset(good(), 2, dones="done"),
            AttributeError,
            "done: TrajectoryDataset: unknown key 'done' (in dones); available keys: "
            "['obs', 'dones', 'h']",
        ),
        (
            lambda: TrajectoryDataset({**good(), "masks": torch.zeros(6, 4)}, 2),
            KeyError,
            "masks: TrajectoryDataset: 'masks' is the name of the mask in every minibatch; "
            "rename that key or leave it out of keys",
        ),
        (
            lambda: TrajectoryDataset({**good(), "h": torch.zeros(6, 5)}, 2),
            RuntimeError,
            "h: TrajectoryDataset expected shape (6, 4, ...) (num_steps, num_envs of 'obs'), "
            "received shape (6, 5)",
        ),
        (
            lambda: TrajectoryDataset({**good(), "dones": torch.zeros(6, 4, 2)}, 2),
            ValueError,
            "dones: TrajectoryDataset expected the dones key 'dones' of shape (6, 4) or (6, 4, 1) "
            "and dtype bool, integer or floating point (nonzero = done), received shape "
            "(6, 4, 2), dtype torch.float32",
        ),
        (
            lambda: TrajectoryDataset(good(), 0),
            ValueError,
            "TrajectoryDataset: batch_size must be a positive int, received 0",
        ),
    ],
)
def test_trajectory_dataset_error_messages_in_full(call, cls, message):
    err = raises_exactly(cls, message, call)
    if "unknown key" in message:
        assert isinstance(err, KeyError)


def test_a_trajectory_dataset_once_shuffled_stays_shuffled_across_refresh(np_rng):
    x, dones = rollout(4, 4)
    s = {"x": x, "dones": dones}
    ds = TrajectoryDataset(s, 2, padded="x")
    assert ds.do_shuffle is False
    np_rng.seed(4)
    ds.shuffle()
    assert ds.do_shuffle is True
    np_rng.seed(11)
    perm = np.random.permutation(4)
    np_rng.seed(11)
    ds.refresh()  # a shuffled dataset draws a new permutation from the new rollout
    assert ds.do_shuffle is True
    for i in range(2):
        envs = perm[i * 2 : (i + 1) * 2].tolist()
        assert torch.equal(ds[i]["dones"], dones[:, envs])


# ---------------------------------------------------------------------------------------------
# split_and_pad_trajectories / unpad_trajectories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,cls,message",
    [
        (
            lambda: split_and_pad_trajectories(torch.zeros(4, 3), torch.zeros(4)),
            RuntimeError,
            "dones: split_and_pad_trajectories expected dones of shape (num_steps, num_envs) or "
            "(num_steps, num_envs, 1), received shape (4,)",
        ),
        (
            lambda: split_and_pad_trajectories(torch.zeros(4, 3), torch.zeros(4, 3, 2)),
            ValueError,
            "dones: split_and_pad_trajectories expected the dones key 'dones' of shape (4, 3) or "
            "(4, 3, 1) and dtype bool, integer or floating point (nonzero = done), received "
            "shape (4, 3, 2), dtype torch.float32",
        ),
        (
            lambda: split_and_pad_trajectories(torch.zeros(0, 3), torch.zeros(0, 3)),
            RuntimeError,
            "dones: split_and_pad_trajectories received an empty rollout of shape (0, 3)",
        ),
        (
            lambda: split_and_pad_trajectories({"obs": [1, 2]}, torch.zeros(4, 3)),
            AttributeError,
            "obs: split_and_pad_trajectories expected a tensor, received list",
        ),
        (
            lambda: split_and_pad_trajectories([1, 2], torch.zeros(4, 3)),
            AttributeError,
            "split_and_pad_trajectories: expected a tensor or a mapping of tensors, received list",
        ),
        (
            lambda: unpad_trajectories({"x": [1, 2]}, torch.ones(4, 3, dtype=torch.bool)),
            RuntimeError,
            "x: unpad_trajectories expected shape (4, 3, ...) (that of masks), received list",
        ),
        (
            lambda: unpad_trajectories(
                {"x": torch.zeros(4, 3, device="meta")}, torch.ones(4, 3, dtype=torch.bool)
            ),
            RuntimeError,
            "x: unpad_trajectories: on meta, masks on cpu",
        ),
        (
            lambda: unpad_trajectories(
                torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), num_envs=0
            ),
            ValueError,
            "unpad_trajectories: num_envs must be a positive int, received 0",
        ),
    ],
)
def test_trajectory_function_error_messages_in_full(call, cls, message):
    raises_exactly(cls, message, call)


def test_unpad_trajectories_with_too_many_envs_reads_only_inside_the_tensors():
    # num_envs is trusted (no host read): a value too large must not read outside, whatever it
    # returns for the envs that do not exist.
    x, dones = rollout(4, 3)
    padded, masks = split_and_pad_trajectories(x, dones)
    back = unpad_trajectories(padded, masks, num_envs=5)
    assert back.shape == (4, 5, 2)
    assert torch.equal(back[:, :3], x)


def test_trajectory_functions_give_a_plain_dict_for_any_other_mapping():
    x, dones = rollout(4, 3)
    padded, masks = split_and_pad_trajectories(types.MappingProxyType({"x": x}), dones)
    assert type(padded) is dict and torch.equal(
        padded["x"], split_and_pad_trajectories(x, dones)[0]
    )
    for trajectories in ({"x": padded["x"]}, types.MappingProxyType({"x": padded["x"]})):
        back = unpad_trajectories(trajectories, masks)
        assert type(back) is dict and list(back) == ["x"]
        assert torch.equal(back["x"], x)


@needs_rsl_rl
def test_trajectory_functions_keep_a_tensordicts_device_and_batch_size_as_rsl_rl():
    from tensordict import TensorDict

    x, dones = rollout(4, 3)
    td = TensorDict({"x": x, "y": x[..., 0]}, batch_size=[4, 3], device="cpu")
    ours, masks = split_and_pad_trajectories(td, dones)
    theirs, theirs_m = rsl.split_and_pad_trajectories(td, dones)
    assert isinstance(ours, TensorDict)
    assert ours.device == theirs.device == torch.device("cpu")
    assert ours.batch_size == theirs.batch_size
    assert torch.equal(masks, theirs_m)
    theirs_back = rsl.unpad_trajectories(theirs, theirs_m)
    for back in (unpad_trajectories(ours, masks), unpad_trajectories(ours, masks, num_envs=3)):
        assert isinstance(back, TensorDict)
        assert back.device == theirs_back.device == torch.device("cpu")
        assert back.batch_size == theirs_back.batch_size == torch.Size([4, 3])
        for k in ("x", "y"):
            assert torch.equal(back[k], theirs_back[k])


# ---------------------------------------------------------------------------------------------
# CUDA: a generator on the tensors' CUDA device (not runnable without a GPU)
# ---------------------------------------------------------------------------------------------


@requires_cuda
def test_a_cuda_generator_on_the_tensors_device_is_accepted():
    s = {k: v.cuda() for k, v in good().items()}
    for device in ("cuda", f"cuda:{torch.cuda.current_device()}"):
        a = SequenceDataset(s, 3, 4, generator=torch.Generator(device=device).manual_seed(5))
        b = SequenceDataset(s, 3, 4, generator=torch.Generator(device="cuda").manual_seed(5))
        assert torch.equal(a.chunk_ids, b.chunk_ids)
        assert sorted(a.chunk_ids.tolist()) == list(range(8))
