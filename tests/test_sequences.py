"""Sequence minibatches for recurrent policies (rollout_buffers.sequences).

SequenceDataset (fixed-length chunks) against a step-by-step reference on both backends (the
Triton kernels under Triton's CPU interpreter here); split_and_pad_trajectories,
unpad_trajectories and TrajectoryDataset against rsl_rl's own code (bench/rsl_rl_peer.py loads
the pinned rsl-rl-lib that `make setup` installs) and against hand-checked examples.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import DTYPES, ROOT, bits, random_tensor, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

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


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert torch.equal(bits(actual), bits(expected))


def with_specials(t: torch.Tensor) -> torch.Tensor:
    """Floats also carry NaN (two payloads), -0.0 and inf: a copy must keep every bit."""
    if t.dtype.is_floating_point and t.numel() >= 4:
        flat = t.view(-1)
        flat[0], flat[1], flat[2] = float("nan"), -0.0, float("inf")
        if t.dtype == torch.float32:
            flat[3:4].view(torch.int32)[0] = 0x7FC00123  # a NaN with a payload
    return t


def backends():
    """'torch', and 'triton' where the kernels can run here (CUDA, or the interpreter)."""
    out = ["torch"]
    try:
        import triton  # noqa: F401

        if torch.cuda.is_available() or backend_module.interpreter_enabled():
            out.append("triton")
    except ImportError:
        pass
    return out


@pytest.fixture
def chunk_launches(monkeypatch):
    """The number of chunk-gather launches (calls of the kernels' prepared gatherer) in the test."""
    kernels = pytest.importorskip("rollout_buffers.kernels")
    calls = []
    real = kernels.gatherer

    def spy(*args, **kwargs):
        g = real(*args, **kwargs)

        def call(*a, **k):
            calls.append(len(args[0]))  # the number of sources of this launch
            return g(*a, **k)

        return call

    monkeypatch.setattr(kernels, "gatherer", spy)
    return calls


class HostReads(TorchDispatchMode):
    """Records the operators that make the host wait for device data on CUDA: reading a value
    (``item()``, ``int(t)``, a tensor-valued slice bound) and ops whose output shape depends on
    the data (``nonzero``, boolean indexing)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def reference_chunks(storages, dones, hidden, ids, seq, start, count):
    """Minibatch ``ids[start:start+count]`` of chunks, element by element."""
    t, n = next(iter(storages.values())).shape[:2]
    nc = t // seq
    out = {k: [] for k in storages}
    resets, first = [], {k: [] for k in hidden}
    for c in ids[start : start + count].tolist():
        env, t0 = c // nc, (c % nc) * seq
        for k, v in storages.items():
            out[k].append(torch.stack([v[t0 + s, env] for s in range(seq)]))
        if dones is not None:
            d = dones.reshape(t, n)
            resets.append(
                torch.tensor([s > 0 and bool(d[t0 + s - 1, env] != 0) for s in range(seq)])
            )
        for k, v in hidden.items():
            first[k].append(v[t0, env])
    batch = {k: torch.stack(v, dim=1) for k, v in out.items()}
    if dones is not None:
        batch["resets"] = torch.stack(resets, dim=1)
    batch.update({k: torch.stack(v) for k, v in first.items()})
    return batch


def mixed_storages(t, n, g):
    """Keys of several dtypes and row widths (bool, bf16, narrow scalars, 12-byte rows, rows
    wider than the kernel's tiles) and env-strided storages, ``(t, n, ...)`` each."""
    s = {
        "obs": with_specials(random_tensor((t, n, 5), torch.float32, generator=g)),
        "act": random_tensor((t, n, 3), torch.bfloat16, generator=g),
        "logp": with_specials(random_tensor((t, n), torch.float32, generator=g)),
        "flag": random_tensor((t, n), torch.bool, generator=g),
        "count": random_tensor((t, n, 2), torch.int64, generator=g),
        "img": random_tensor((t, n, 2, 3), torch.uint8, generator=g),
        "strided": random_tensor((t, 2 * n, 4), torch.float16, generator=g)[:, 1::2],
        # 4120-byte rows: the kernel copies them 16 rows x 64 units at a time, 9 column blocks
        # a row, so every minibatch spans several programs and a masked column tail.
        "wide": random_tensor((t, n, 1030), torch.float32, generator=g),
        "dones": torch.rand(t, n, generator=g) < 0.3,
        "h": random_tensor((t, n, 2, 4), torch.float32, generator=g),
        "c": random_tensor((t, 2 * n, 2, 4), torch.bfloat16, generator=g)[:, ::2],
    }
    return s


# ---------------------------------------------------------------------------------------------
# SequenceDataset: the minibatches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize(
    "t,n,seq,batch", [(6, 7, 3, 7), (9, 5, 9, 5), (4, 11, 1, 22), (6, 13, 3, 26)]
)
def test_sequence_minibatches_match_the_step_by_step_reference(
    name, t, n, seq, batch, chunk_launches
):
    # Odd seq_len, a chunk that is the whole rollout, seq_len 1, and minibatches of 26 chunks x
    # 3 steps (78 output rows: more than one row tile of the kernel).
    g = torch.Generator().manual_seed(t * 100 + n)
    storages = mixed_storages(t, n, g)
    hidden = ("h", "c")
    with use_backend(name):
        ds = SequenceDataset(storages, seq, batch, hidden=hidden, generator=g)
        assert len(ds) == ds.num_batches() == n * (t // seq) // batch
        seen = []
        for i, got in enumerate(ds):
            keys = [k for k in storages if k not in hidden]
            ref = reference_chunks(
                {k: storages[k] for k in keys},
                storages["dones"],
                {k: storages[k] for k in hidden},
                ds.chunk_ids,
                seq,
                i * batch,
                batch,
            )
            assert list(got) == [*keys, "resets", *hidden]
            for k in ref:
                assert_bits_equal(got[k], ref[k])
                assert got[k].is_contiguous()
            seen += ds.chunk_ids[i * batch : (i + 1) * batch].tolist()
        assert sorted(seen) == list(range(n * (t // seq)))  # every chunk once per epoch
    if name == "triton":  # one launch per minibatch for every key, the mask and the states
        assert chunk_launches == [len(storages) + 1] * len(ds)
    else:
        assert chunk_launches == []


def test_resets_restart_the_state_after_every_done_inside_a_chunk():
    # One env, 8 steps, chunks of 4: done at steps 1, 3 and 6. Step 2 restarts (after the done
    # at 1); step 4 starts a chunk (its stored state already restarted); step 7 restarts.
    dones = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.uint8)[:, None, None]
    ds = SequenceDataset({"dones": dones}, 4, 2, shuffle=False)
    batch = ds[0]
    assert batch["resets"].t().tolist() == [
        [False, False, True, False],
        [False, False, False, True],
    ]
    assert batch["dones"].shape == (4, 2, 1)


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.int32, torch.float32, torch.float64]
)
def test_dones_of_any_real_dtype_count_nonzero_as_done(dtype):
    d = torch.tensor([[0, 2], [-1, 0], [0, 0], [0, 0]])
    if dtype == torch.bool:
        d = d != 0
    elif dtype.is_floating_point:
        d = torch.tensor([[0.0, 0.5], [float("nan"), -0.0], [0.0, 0.0], [0.0, 0.0]], dtype=dtype)
    ds = SequenceDataset({"dones": d.to(dtype)}, 4, 2, shuffle=False)
    assert ds[0]["resets"].t().tolist() == [
        [False, False, True, False],
        [False, True, False, False],
    ]


def test_hidden_states_are_taken_at_each_chunks_first_step():
    t, n = 6, 2
    h = torch.arange(t * n * 3, dtype=torch.float32).reshape(t, n, 3)
    ds = SequenceDataset(
        {"x": torch.zeros(t, n), "h": h}, 2, 6, dones=None, hidden="h", shuffle=False
    )
    batch = ds[0]
    assert "resets" not in batch and batch["h"].shape == (6, 3)
    # chunk c: env c // 3, steps (c % 3) * 2 ...
    assert torch.equal(batch["h"], torch.stack([h[(c % 3) * 2, c // 3] for c in range(6)]))


@pytest.mark.parametrize("name", backends())
def test_sequence_dataset_over_an_experience_buffer_reads_its_storages(name):
    t, n = 4, 6
    buf = ExperienceBuffer(n, t, device="cpu")
    buf.register_key("obs", (2,))
    buf.register_key("dones", dtype=torch.bool)
    buf.register_key("h", (1, 3))
    g = torch.Generator().manual_seed(0)
    steps = [
        {
            "obs": torch.randn(n, 2, generator=g),
            "dones": torch.rand(n, generator=g) < 0.5,
            "h": torch.randn(n, 1, 3, generator=g),
        }
        for _ in range(t)
    ]
    with use_backend(name):
        for s, data in enumerate(steps):
            buf.update_step(s, data)
        ds = SequenceDataset(buf, 2, 4, hidden=["h"], generator=torch.Generator().manual_seed(1))
        assert ds.keys == ["obs", "dones"] and ds.hidden == ["h"]
        got = ds[1]
        ref = reference_chunks(
            {"obs": buf.obs, "dones": buf.dones}, buf.dones, {"h": buf.h}, ds.chunk_ids, 2, 4, 4
        )
        for k in ref:
            assert_bits_equal(got[k], ref[k])
        # No copy: a minibatch reads what the storage holds when it is read...
        buf.update_data("obs", 0, torch.full((n, 2), 7.0))
        buf.update_data("dones", 0, torch.ones(n, dtype=torch.bool))
        again = ds[1]
        assert torch.equal(
            again["obs"],
            buf.obs[(ds.chunk_ids[4:8] % 2) * 2 + torch.arange(2)[:, None], ds.chunk_ids[4:8] // 2],
        )
        # ...and resets follow the dones at the next shuffle() / refresh(), not before.
        assert torch.equal(again["resets"], got["resets"])
        ds.refresh()
        after = ds[1]
        first_chunks = ds.chunk_ids[4:8] % 2 == 0
        assert after["resets"][1][first_chunks].all()
        assert torch.equal(after["resets"][1][~first_chunks], got["resets"][1][~first_chunks])


def test_indexing_follows_dict_dataset():
    ds = SequenceDataset({"x": torch.arange(12).reshape(4, 3)}, 2, 2, dones=None, shuffle=False)
    assert len(ds) == 3
    assert torch.equal(ds[-1]["x"], ds[2]["x"])
    assert torch.equal(ds[np.int64(1)]["x"], ds[1]["x"])
    for bad in (3, -4):
        with pytest.raises(IndexError, match=f"{bad} 3: batch index {bad} is out of range"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]
    assert len(list(ds)) == 3  # iteration ends on IndexError / len
    # x[t, env] = 3 * t + env; chunks 0 and 1 are env 0's steps 0-1 and 2-3: (seq, batch)
    assert ds[0]["x"].tolist() == [[0, 6], [3, 9]]


# ---------------------------------------------------------------------------------------------
# SequenceDataset: shuffling follows DictDataset's rules
# ---------------------------------------------------------------------------------------------


def test_shuffle_draws_from_numpys_global_rng_and_leaves_torchs_alone():
    data = {"x": torch.zeros(4, 6)}
    np_state = np.random.get_state()
    try:
        np.random.seed(3)
        expected = np.random.permutation(12)
        expected2 = np.random.permutation(12)
        np.random.seed(3)
        torch_state = torch.get_rng_state()
        ds = SequenceDataset(data, 2, 4, dones=None)
        ids = ds.chunk_ids
        assert ids.tolist() == expected.tolist()
        ds.shuffle()
        assert ds.chunk_ids is ids and ids.tolist() == expected2.tolist()  # updated in place
        assert torch.equal(torch.get_rng_state(), torch_state)
    finally:
        np.random.set_state(np_state)


def test_shuffle_with_a_generator_draws_randperm_and_leaves_both_global_rngs_alone():
    data = {"x": torch.zeros(4, 6)}
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    ds = SequenceDataset(data, 2, 4, dones=None, generator=torch.Generator().manual_seed(9))
    ds.shuffle()
    g = torch.Generator().manual_seed(9)
    torch.randperm(12, generator=g)
    assert torch.equal(ds.chunk_ids, torch.randperm(12, generator=g))
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


def test_unshuffled_chunks_run_in_order():
    ds = SequenceDataset({"x": torch.zeros(4, 3)}, 2, 2, dones=None, shuffle=False)
    assert ds.chunk_ids.tolist() == list(range(6))


def test_serving_and_shuffling_read_no_device_value_on_the_host():
    # On CUDA these operators would synchronize; the detector is checked on rsl_rl-style code.
    g = torch.Generator().manual_seed(0)
    storages = mixed_storages(6, 4, g)
    with HostReads() as probe:
        ds = SequenceDataset(storages, 3, 4, hidden=("h", "c"), generator=g)
        for _ in range(2):
            ds.shuffle()
            for _ in ds:
                pass
    assert probe.ops == []
    with HostReads() as probe:
        last = storages["dones"].clone()
        last[-1] = True
        int(last.sum())  # what a tensor-valued bound or a trajectory count costs
        last.nonzero()
    assert probe.ops == ["_local_scalar_dense", "nonzero"]


# ---------------------------------------------------------------------------------------------
# SequenceDataset: errors name the key, the expected and the received value; nothing changes
# ---------------------------------------------------------------------------------------------


def good(t=6, n=4):
    return {"obs": torch.zeros(t, n, 3), "dones": torch.zeros(t, n), "h": torch.zeros(t, n, 2, 5)}


@pytest.mark.parametrize(
    "kwargs,storages,cls,parts",
    [
        (
            {"seq_len": 4},
            good(),
            ValueError,
            ["4 6", "seq_len 4 does not divide num_steps 6", "nearest: 2, 3"],
        ),
        ({"seq_len": 0}, good(), ValueError, ["seq_len must be a positive int, received 0"]),
        (
            {"batch_size": 5},
            good(),
            ValueError,
            [
                "5 8",
                "batch_size 5 does not divide the number of chunks",
                "num_envs 4 x 2 chunks of 3 steps",
                "= 8",
                "nearest: 2, 4",
            ],
        ),
        (
            {"batch_size": 2.0},
            good(),
            TypeError,
            ["batch_size must be a positive int, received 2.0"],
        ),
        (
            {"hidden": ("h", "hx")},
            good(),
            KeyError,
            ["hx: SequenceDataset: unknown key 'hx' (in hidden)", "['obs', 'dones', 'h']"],
        ),
        ({"keys": ["obz"]}, good(), AttributeError, ["obz", "unknown key 'obz' (in keys)"]),
        (
            {"dones": "done"},
            good(),
            KeyError,
            ["done: SequenceDataset: unknown key 'done' (in dones)"],
        ),
        (
            {},
            {**good(), "dones": torch.zeros(6, 4, 2)},
            ValueError,
            [
                "dones:",
                "of shape (6, 4) or (6, 4, 1)",
                "received shape (6, 4, 2), dtype torch.float32",
            ],
        ),
        (
            {},
            {**good(), "dones": torch.zeros(6, 4, dtype=torch.complex64)},
            ValueError,
            [
                "dones:",
                "dtype bool, integer or floating point",
                "received shape (6, 4), dtype torch.complex64",
            ],
        ),
        (
            {},
            {**good(), "h": torch.zeros(6, 5, 2, 5)},
            RuntimeError,
            [
                "h: SequenceDataset expected shape (6, 4, ...)",
                "num_envs of 'obs'",
                "received shape (6, 5, 2, 5)",
            ],
        ),
        (
            {},
            {**good(), "obs": torch.zeros(6)},
            ValueError,
            ["obs:", "(num_steps, num_envs, ...)", "received shape (6,)"],
        ),
        (
            {},
            {**good(), "h": torch.zeros(6, 4, 2, 5, device="meta")},
            RuntimeError,
            ["h: every tensor must be on one device", "'obs' is on cpu, 'h' is on meta"],
        ),
        (
            {},
            {**good(), "obs": torch.zeros(6, 4, 3, requires_grad=True)},
            ValueError,
            ["obs:", "requires_grad=True"],
        ),
        (
            {},
            {**good(), "obs": [1, 2]},
            TypeError,
            ["obs: SequenceDataset expected a (num_steps, num_envs, ...) tensor, received list"],
        ),
        (
            {"keys": ["obs", "h"]},
            good(),
            KeyError,
            ["h: SequenceDataset: key 'h' is named twice (in keys and in hidden)"],
        ),
        (
            {},
            {**good(), "resets": torch.zeros(6, 4)},
            KeyError,
            ["resets:", "the name of the mask in every minibatch"],
        ),
        (
            {"generator": np.random.default_rng(0)},
            good(),
            TypeError,
            ["generator must be a torch.Generator or None, received Generator"],
        ),
    ],
)
def test_sequence_dataset_rejects_bad_input_and_changes_nothing(kwargs, storages, cls, parts):
    args = {"seq_len": 3, "batch_size": 4, "hidden": ("h",), **kwargs}
    before = {
        k: v.clone() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
        for k, v in storages.items()
    }
    np_state = np.random.get_state()
    with pytest.raises(cls) as info:
        SequenceDataset(storages, args.pop("seq_len"), args.pop("batch_size"), **args)
    assert isinstance(info.value, rollout_buffers.RolloutBuffersError)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]  # no draw
    for k, v in before.items():
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            assert torch.equal(storages[k], v)


def test_sequence_dataset_rejects_what_is_not_a_buffer_or_mapping():
    with pytest.raises(TypeError, match="expected an ExperienceBuffer or a mapping"):
        SequenceDataset([torch.zeros(2, 2)], 1, 1)


def test_a_generator_on_another_device_is_refused():
    ds_args = (good(), 3, 4)
    with pytest.raises(RuntimeError, match="the generator is on cpu, the tensors on meta"):
        SequenceDataset(
            {k: v.to("meta") for k, v in ds_args[0].items()},
            3,
            4,
            hidden="h",
            generator=torch.Generator(),
        )


# ---------------------------------------------------------------------------------------------
# split_and_pad_trajectories / unpad_trajectories: hand-checked, and against rsl_rl
# ---------------------------------------------------------------------------------------------


def test_split_and_pad_trajectories_docstring_example():
    # rsl_rl's docstring: [[a1, a2, a3, a4 | a5, a6], [b1, b2 | b3, b4, b5 | b6]] (transposed).
    # Its drawing pads to the longest trajectory (4); the function pads to num_steps (6).
    a = [11, 12, 13, 14, 15, 16]
    b = [21, 22, 23, 24, 25, 26]
    x = torch.tensor([a, b]).t()  # (6, 2)
    dones = torch.zeros(6, 2, 1)
    dones[3, 0] = dones[1, 1] = dones[4, 1] = 1
    padded, masks = split_and_pad_trajectories(x, dones)
    expected = [
        [11, 12, 13, 14, 0, 0],
        [15, 16, 0, 0, 0, 0],
        [21, 22, 0, 0, 0, 0],
        [23, 24, 25, 0, 0, 0],
        [26, 0, 0, 0, 0, 0],
    ]
    assert padded.t().tolist() == expected and padded.dtype == x.dtype
    assert masks.t().tolist() == [[v != 0 for v in row] for row in expected]
    assert torch.equal(unpad_trajectories(padded, masks), x)
    assert torch.equal(unpad_trajectories(padded, masks, num_envs=2), x)


def test_every_step_done_or_none_done():
    x = torch.arange(6).reshape(3, 2)
    padded, masks = split_and_pad_trajectories(x, torch.ones(3, 2, dtype=torch.bool))
    assert padded.shape == (3, 6) and masks[0].all() and not masks[1:].any()
    assert padded[0].tolist() == [0, 2, 4, 1, 3, 5]
    padded, masks = split_and_pad_trajectories(x, torch.zeros(3, 2, dtype=torch.bool))
    assert torch.equal(padded, x) and masks.all()


rsl = rsl_rl_peer.load()
needs_rsl_rl = pytest.mark.skipif(rsl is None, reason=f"rsl_rl: {rsl_rl_peer.why_not()}")


def test_the_pinned_rsl_rl_is_the_one_compared_against():
    if rsl is None:
        pytest.skip(rsl_rl_peer.why_not())
    assert rsl.version == rsl_rl_peer.PINNED


def random_dones(shape, p, dtype, g):
    d = torch.rand(shape, generator=g) < p
    if dtype == torch.bool:
        return d
    out = d.to(dtype)
    if dtype.is_floating_point:  # nonzero values other than 1 are dones too
        out = out * torch.where(torch.rand(shape, generator=g) < 0.5, -0.5, 3.0).to(dtype)
    return out


@needs_rsl_rl
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "t,n,shape,p,dones_dtype,dones_1",
    [
        (6, 5, (3,), 0.3, torch.uint8, True),  # rsl_rl's own storage: (T, N, 1) uint8
        (7, 3, (), 0.2, torch.bool, False),
        (5, 4, (2, 3), 0.5, torch.float32, True),
        (1, 3, (2,), 0.5, torch.int64, False),
        (8, 1, (1,), 0.0, torch.float64, False),
        (4, 6, (5,), 1.0, torch.int32, True),
    ],
)
def test_split_and_pad_trajectories_is_bit_identical_to_rsl_rls(
    t, n, shape, p, dones_dtype, dones_1, dtype
):
    g = torch.Generator().manual_seed(t * 31 + n)
    x = with_specials(random_tensor((t, n, *shape), dtype, generator=g))
    dones = random_dones((t, n, 1) if dones_1 else (t, n), p, dones_dtype, g)
    d_before = dones.clone()
    ours, ours_m = split_and_pad_trajectories(x, dones)
    theirs, theirs_m = rsl.split_and_pad_trajectories(x, dones)
    assert_bits_equal(ours, theirs)
    assert_bits_equal(ours_m, theirs_m)
    assert torch.equal(dones, d_before)  # the input is left as it was, as rsl_rl leaves it
    back, theirs_back = (
        unpad_trajectories(ours, ours_m, num_envs=n),
        rsl.unpad_trajectories(theirs, theirs_m),
    )
    assert_bits_equal(back, theirs_back)
    assert back.stride() == theirs_back.stride()
    assert_bits_equal(unpad_trajectories(ours, ours_m), x)


@needs_rsl_rl
def test_split_and_pad_trajectories_of_non_contiguous_input_and_autograd_match_rsl_rls():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, 4, generator=g)
    x = base[:, ::2, ::2]  # (8, 3, 2), strided envs and elements
    dones = torch.rand(8, 3, generator=g) < 0.3
    assert_bits_equal(
        split_and_pad_trajectories(x, dones)[0], rsl.split_and_pad_trajectories(x, dones)[0]
    )
    w = torch.randn(8, 3, 2, generator=g, requires_grad=True)
    ours = split_and_pad_trajectories(w * 2, dones)[0].sum()
    (gw_ours,) = torch.autograd.grad(ours, w)
    (gw_theirs,) = torch.autograd.grad(rsl.split_and_pad_trajectories(w * 2, dones)[0].sum(), w)
    assert torch.equal(gw_ours, gw_theirs)


@needs_rsl_rl
def test_split_and_pad_trajectories_of_a_tensordict_matches_rsl_rls():
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(7)
    td = TensorDict(
        {"policy": torch.randn(6, 4, 3, generator=g), "height": torch.randn(6, 4, 5, generator=g)},
        batch_size=[6, 4],
    )
    dones = (torch.rand(6, 4, 1, generator=g) < 0.3).to(torch.uint8)
    ours, masks = split_and_pad_trajectories(td, dones)
    theirs, theirs_m = rsl.split_and_pad_trajectories(td, dones)
    assert type(ours) is type(theirs) and ours.batch_size == theirs.batch_size
    for k in ("policy", "height"):
        assert_bits_equal(ours[k], theirs[k])
    assert torch.equal(masks, theirs_m)
    back = unpad_trajectories(ours, masks)
    for k in ("policy", "height"):
        assert torch.equal(back[k], rsl.unpad_trajectories(theirs, theirs_m)[k])
    plain, _ = split_and_pad_trajectories(dict(td.items()), dones)
    assert type(plain) is dict and torch.equal(plain["policy"], theirs["policy"])


def test_split_and_pad_trajectories_makes_one_host_read():
    g = torch.Generator().manual_seed(0)
    x, dones = torch.randn(8, 5, 2, generator=g), torch.rand(8, 5, generator=g) < 0.3
    with HostReads() as probe:
        padded, masks = split_and_pad_trajectories(x, dones)
        unpad_trajectories(padded, masks, num_envs=5)
    assert probe.ops == ["_local_scalar_dense"]


@pytest.mark.parametrize(
    "call,cls,parts",
    [
        (
            lambda: split_and_pad_trajectories(torch.zeros(4, 3), torch.zeros(4, 3, 2)),
            ValueError,
            ["dones:", "of shape (4, 3) or (4, 3, 1)", "received shape (4, 3, 2)"],
        ),
        (
            lambda: split_and_pad_trajectories(torch.zeros(4, 2), torch.zeros(4, 3)),
            RuntimeError,
            ["tensor:", "expected shape (4, 3, ...)", "received shape (4, 2)"],
        ),
        (
            lambda: split_and_pad_trajectories(
                {"obs": torch.zeros(4, 3, device="meta")}, torch.zeros(4, 3)
            ),
            RuntimeError,
            ["obs:", "meta", "dones on cpu"],
        ),
        (
            lambda: split_and_pad_trajectories(torch.zeros(4, 3), [0, 1]),
            TypeError,
            ["dones:", "received list"],
        ),
        (
            lambda: unpad_trajectories(torch.zeros(4, 3), torch.ones(4, 3)),
            ValueError,
            ["masks:", "bool", "dtype torch.float32"],
        ),
        (
            lambda: unpad_trajectories(torch.zeros(4, 2), torch.ones(4, 3, dtype=torch.bool)),
            RuntimeError,
            ["trajectories:", "expected shape (4, 3, ...)", "received shape (4, 2)"],
        ),
        (
            lambda: unpad_trajectories(torch.zeros(4, 3), torch.eye(4, 3, dtype=torch.bool)),
            ValueError,
            ["3 valid steps are not a whole number of envs of 4 steps"],
        ),
    ],
)
def test_trajectory_functions_reject_bad_input(call, cls, parts):
    with pytest.raises(cls) as info:
        call()
    assert isinstance(info.value, rollout_buffers.RolloutBuffersError)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


# ---------------------------------------------------------------------------------------------
# TrajectoryDataset: rsl_rl's recurrent minibatches, and shuffled
# ---------------------------------------------------------------------------------------------


def rsl_rollout(t, n, layers, hid, g):
    """One rollout, per step: what rsl_rl's RolloutStorage takes and what our buffer takes."""
    steps = []
    for _ in range(t):
        ha, ca, hc = (torch.randn(layers, n, hid, generator=g) for _ in range(3))
        steps.append(
            {
                "obs": torch.randn(n, 5, generator=g),
                "actions": torch.randn(n, 3, generator=g),
                "rewards": torch.randn(n, generator=g),
                "dones": (torch.rand(n, generator=g) < 0.25).to(torch.uint8),
                "values": torch.randn(n, 1, generator=g),
                "actions_log_prob": torch.randn(n, generator=g),
                "mean": torch.randn(n, 3, generator=g),
                "std": torch.rand(n, 3, generator=g),
                "ha": ha,
                "ca": ca,
                "hc": hc,
            }
        )
    return steps


def fill_rsl_storage(steps, t, n):
    from tensordict import TensorDict

    storage = rsl.RolloutStorage(
        "rl", n, t, TensorDict({"policy": steps[0]["obs"]}, batch_size=[n]), (3,), device="cpu"
    )
    for s in steps:
        tr = rsl.RolloutStorage.Transition()
        tr.observations = TensorDict({"policy": s["obs"]}, batch_size=[n])
        tr.actions, tr.rewards, tr.dones = s["actions"], s["rewards"], s["dones"]
        tr.values, tr.actions_log_prob = s["values"], s["actions_log_prob"]
        tr.distribution_params = (s["mean"], s["std"])
        tr.hidden_states = ((s["ha"], s["ca"]), s["hc"])
        storage.add_transition(tr)
    return storage


def fill_our_buffer(steps, t, n, layers, hid):
    buf = ExperienceBuffer(n, t, device="cpu")
    for key, shape, dtype in [
        ("obs", (5,), torch.float32),
        ("actions", (3,), torch.float32),
        ("values", (1,), torch.float32),
        ("actions_log_prob", (1,), torch.float32),
        ("dones", (1,), torch.uint8),
        ("ha", (layers, hid), torch.float32),
        ("ca", (layers, hid), torch.float32),
        ("hc", (layers, hid), torch.float32),
    ]:
        buf.register_key(key, shape, dtype)
    for i, s in enumerate(steps):
        buf.update_step(
            i,
            {
                "obs": s["obs"],
                "actions": s["actions"],
                "values": s["values"],
                "actions_log_prob": s["actions_log_prob"][:, None],
                "dones": s["dones"][:, None],
                "ha": s["ha"].transpose(0, 1),
                "ca": s["ca"].transpose(0, 1),
                "hc": s["hc"].transpose(0, 1),
            },
        )
    return buf


@needs_rsl_rl
@pytest.mark.parametrize("minibatches", [1, 3])
def test_trajectory_minibatches_are_rsl_rls_recurrent_minibatches(minibatches):
    t, n, layers, hid = 7, 6, 2, 4
    g = torch.Generator().manual_seed(minibatches)
    steps = rsl_rollout(t, n, layers, hid, g)
    storage = fill_rsl_storage(steps, t, n)
    buf = fill_our_buffer(steps, t, n, layers, hid)
    ds = TrajectoryDataset(buf, n // minibatches, padded="obs", hidden=("ha", "ca", "hc"))
    theirs = list(storage.recurrent_mini_batch_generator(minibatches, num_epochs=1))
    assert len(ds) == len(theirs) == minibatches
    for ours, ref in zip(ds, theirs):
        assert_bits_equal(ours["obs"], ref.observations["policy"])
        assert torch.equal(ours["masks"], ref.masks)
        (ha, ca), hc = ref.hidden_states
        assert_bits_equal(ours["ha"].transpose(0, 1), ha)
        assert_bits_equal(ours["ca"].transpose(0, 1), ca)
        assert_bits_equal(ours["hc"].transpose(0, 1), hc)
        assert_bits_equal(ours["actions"], ref.actions)
        assert_bits_equal(ours["values"], ref.values)
        assert_bits_equal(ours["actions_log_prob"], ref.old_actions_log_prob)
        # rsl_rl's network outputs come back through unpad_trajectories: ours gives the same
        assert_bits_equal(
            unpad_trajectories(ours["obs"], ours["masks"], num_envs=n // minibatches),
            rsl.unpad_trajectories(ref.observations["policy"], ref.masks),
        )
    assert ds.num_trajectories == sum(b.masks.shape[1] for b in theirs)


@pytest.mark.parametrize("generator", [None, torch.Generator().manual_seed(4)])
def test_shuffled_trajectory_minibatches_are_those_of_their_envs(generator):
    # Minibatch i of a permutation holds envs perm[i*B:(i+1)*B]: its padded trajectories are
    # those of the sub-rollout of these envs, in that order.
    t, n, b = 5, 8, 4
    g = torch.Generator().manual_seed(11)
    data = {
        "obs": torch.randn(t, n, 3, generator=g),
        "act": torch.randn(t, n, 2, generator=g),
        "dones": torch.rand(t, n, generator=g) < 0.3,
        "h": torch.randn(t, n, 2, 2, generator=g),
    }
    np_state = np.random.get_state()
    try:
        np.random.seed(2)
        if generator is None:
            perm = np.random.permutation(n)
            np.random.seed(2)
        else:
            perm = torch.randperm(n, generator=generator.clone_state()).numpy()
        ds = TrajectoryDataset(data, b, padded="obs", hidden="h", shuffle=True, generator=generator)
    finally:
        np.random.set_state(np_state)
    seen = 0
    for i, batch in enumerate(ds):
        envs = torch.as_tensor(perm[i * b : (i + 1) * b])
        obs, masks = split_and_pad_trajectories(data["obs"][:, envs], data["dones"][:, envs])
        assert torch.equal(batch["obs"], obs) and torch.equal(batch["masks"], masks)
        assert torch.equal(batch["act"], data["act"][:, envs])
        assert torch.equal(batch["dones"], data["dones"][:, envs])
        starts = torch.cat([torch.ones(1, b, dtype=torch.bool), data["dones"][:-1, envs]]).t()
        assert torch.equal(batch["h"], data["h"][:, envs].transpose(0, 1)[starts])
        seen += masks.shape[1]
    assert seen == ds.num_trajectories


def test_trajectory_minibatches_read_no_device_value_on_the_host():
    g = torch.Generator().manual_seed(0)
    data = {"obs": torch.randn(6, 8, 3, generator=g), "dones": torch.rand(6, 8, generator=g) < 0.3}
    ds = TrajectoryDataset(data, 4, padded="obs", shuffle=True)
    with HostReads() as probe:
        for _ in range(2):
            ds.shuffle()
            for _ in ds:
                pass
    assert probe.ops == []


@pytest.mark.parametrize(
    "kwargs,cls,parts",
    [
        (
            {"batch_size": 3},
            ValueError,
            ["3 4: TrajectoryDataset: batch_size 3 does not divide num_envs 4", "nearest: 2, 4"],
        ),
        ({"padded": "obz"}, KeyError, ["obz: TrajectoryDataset: unknown key 'obz' (in padded)"]),
        (
            {"hidden": ["h", "obs"], "padded": "obs"},
            KeyError,
            ["obs:", "named twice (in hidden and in padded)"],
        ),
        (
            {"generator": np.random.default_rng(0)},
            TypeError,
            ["generator must be a CPU torch.Generator or None, received Generator"],
        ),
        ({"dones": None}, TypeError, ["dones must be a key (str), received None"]),
    ],
)
def test_trajectory_dataset_rejects_bad_input(kwargs, cls, parts):
    data = {"obs": torch.zeros(3, 4, 2), "dones": torch.zeros(3, 4), "h": torch.zeros(3, 4, 5)}
    args = {"batch_size": 2, **kwargs}
    with pytest.raises(cls) as info:
        TrajectoryDataset(data, args.pop("batch_size"), **args)
    assert isinstance(info.value, rollout_buffers.RolloutBuffersError)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


# ---------------------------------------------------------------------------------------------
# The README's recurrent quick start, and a GPU check
# ---------------------------------------------------------------------------------------------


def test_readme_recurrent_quick_start_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Recurrent policies", 1)
    assert len(section) == 2, "the README has no 'Recurrent policies' section"
    block = re.search(r"```python\n(.*?)```", section[1], flags=re.S)
    assert block, "the 'Recurrent policies' section has no python block"
    exec(compile(block.group(1), "README.md:recurrent-quick-start", "exec"), {})


@requires_cuda
@pytest.mark.gpu
def test_sequence_minibatches_on_cuda_are_sync_free_and_graph_capturable():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    storages = {k: v.to(dev) for k, v in mixed_storages(24, 64, g).items()}
    ds = SequenceDataset(
        storages, 8, 32, hidden=("h", "c"), generator=torch.Generator(dev).manual_seed(1)
    )
    ds[0]  # warm-up: compiles and caches the launch plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ds.shuffle()
        eager = [ds[i] for i in range(len(ds))]
        ds_np = SequenceDataset(storages, 8, 32, hidden=("h", "c"))
        ds_np.shuffle()
        ds_np[1]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = reference_chunks(
        {k: storages[k].cpu() for k in storages if k not in ("h", "c")},
        storages["dones"].cpu(),
        {k: storages[k].cpu() for k in ("h", "c")},
        ds.chunk_ids.cpu(),
        8,
        32,
        32,
    )
    for k in ref:
        assert_bits_equal(eager[1][k].cpu(), ref[k])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ds[1]
    ds.shuffle()  # in place: the graph reads the new permutation
    graph.replay()
    fresh = ds[1]
    for k in fresh:
        assert_bits_equal(captured[k], fresh[k])
