"""make_dict() without the copy (issue 12): the lazy FlatDict against the eager dict, bit for bit.

``make_dict()``/``get_dict()`` return a :class:`rollout_buffers.FlatDict`: a ``dict`` whose
values are produced on first read (all at once, one flatten launch), that ``DictDataset``
gathers straight from the ``(T, N, ...)`` storages, that is copied before the buffer is written
again through its API (copy-on-write) and that refuses a value whose storage was written behind
the API's back. Every test compares with the eager dict (``bench/original.py``'s
``swap_and_flatten01``), on bit patterns, at odd sizes (7 envs, 3 steps) with every dtype of the
contract and multi-dim keys. Copies are counted: on the torch backend by spying
``ops.torch_flatten``, on the triton backend with the ``kernel_calls`` fixture (kernels under
Triton's CPU interpreter here, compiled on a GPU machine).
"""

from __future__ import annotations

import collections
import copy
import gc
import importlib.util
import io
import pickle
import weakref

import numpy as np
import pytest
import torch
from conftest import DTYPES, bits, kernel_device, random_tensor

from bench.original import swap_and_flatten01 as eager_flatten
from rollout_buffers import (
    DictDataset,
    ExperienceBuffer,
    FlatDict,
    RolloutValueError,
    StaleRolloutError,
    flatdict,
    lazy_make_dict,
    ops,
    set_lazy_make_dict,
    use_backend,
)

T, N = 3, 7  # odd sizes: 21 rows
#: One scalar key per dtype of the contract, then multi-dim keys; "wide" has rows of 1608 bytes,
#: which the gather kernel copies in several column blocks.
KEYS = {f"k_{str(dt).removeprefix('torch.')}": ((), dt) for dt in DTYPES} | {
    "obs": ((2, 3), torch.float32),
    "mask": ((5,), torch.bool),
    "act": ((4,), torch.bfloat16),
    "wide": ((3, 67), torch.float64),
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _lazy_mode():
    """Every test starts lazy on the torch backend (whatever ROLLOUT_BUFFERS_LAZY_MAKE_DICT and
    ROLLOUT_BUFFERS_BACKEND say; a triton test says so itself) and leaves both as it found them."""
    before = lazy_make_dict()
    set_lazy_make_dict(True)
    with use_backend("torch"):
        yield
    set_lazy_make_dict(before)


@pytest.fixture
def flattens(monkeypatch):
    """The source lists of every PyTorch flatten (the torch backend's materializations)."""
    calls: list[list[torch.Tensor]] = []
    real = ops.torch_flatten

    def spy(srcs):
        calls.append(list(srcs))
        return real(srcs)

    monkeypatch.setattr(ops, "torch_flatten", spy)
    return calls


def _on(name: str, request) -> tuple[str, list | None]:
    """The device for backend ``name``, and for 'triton' the kernel spy's record."""
    if name == "torch":
        return "cpu", None
    device = kernel_device()
    return device, request.getfixturevalue("kernel_calls")


def _made(name: str, flattens: list, kernel_calls: list | None) -> int:
    """How many flatten launches (materializations) ran so far on backend ``name``."""
    if name == "torch":
        return len(flattens)
    assert not flattens, "the triton backend fell back to PyTorch's flatten"
    return kernel_calls.count("transpose_flatten")


def _data(shape, dtype, generator) -> torch.Tensor:
    """Random data; floats also carry NaN, +-inf, -0.0 and a subnormal (bits must survive)."""
    t = random_tensor(shape, dtype, generator=generator)
    if dtype.is_floating_point:
        flat = t.view(-1)
        tiny = torch.finfo(dtype).smallest_normal / 2
        specials = [float("nan"), float("inf"), float("-inf"), -0.0, tiny]
        flat[: len(specials)] = torch.tensor(specials, dtype=dtype)[: flat.numel()]
    return t


def _rollout(device="cpu", seed=0, keys=None, num_envs=N, num_steps=T) -> ExperienceBuffer:
    buf = ExperienceBuffer(num_envs, num_steps, device=device)
    for key, (shape, dtype) in (keys or KEYS).items():
        buf.register_key(key, shape, dtype)
    _fill(buf, seed)
    return buf


def _fill(buf: ExperienceBuffer, seed: int) -> None:
    """A whole new rollout, written through the API (batch_update_data)."""
    g = torch.Generator().manual_seed(seed)
    for key in buf.keys():
        t = getattr(buf, key)
        buf.batch_update_data(key, _data(t.shape, t.dtype, g).to(t.device))


def _step_data(buf: ExperienceBuffer, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: _data(getattr(buf, k).shape[1:], getattr(buf, k).dtype, g).to(buf.device)
        for k in buf.keys()
    }


def _eager(buf: ExperienceBuffer) -> dict[str, torch.Tensor]:
    """What the original make_dict returned for the buffer as it is now (copies)."""
    return {k: eager_flatten(getattr(buf, k)).clone() for k in buf.keys()}


def _assert_same(actual, expected: dict) -> None:
    """Same keys in the same order, each value of the same dtype, shape, device and bits."""
    assert list(actual) == list(expected)
    for key, want in expected.items():
        got = actual[key]
        assert isinstance(got, torch.Tensor), (key, type(got))
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device), key
        assert torch.equal(bits(got), bits(want)), key


def _pending(d) -> bool:
    """``d`` still holds values not yet made (read without materializing anything)."""
    return type(d) is FlatDict and bool(d._pkeys)


# ---------------------------------------------------------------------------------------------
# the mapping: every read path against the eager dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["make_dict", "get_dict"])
def test_make_dict_and_get_dict_return_a_lazy_dict(method, flattens):
    buf = _rollout()
    d = getattr(buf, method)()
    assert isinstance(d, dict) and isinstance(d, FlatDict)
    assert isinstance(d, collections.abc.MutableMapping)
    # keys, len and `in` need no value: nothing is made
    assert list(d) == list(d.keys()) == list(KEYS) and len(d) == len(KEYS)
    assert "obs" in d and "nope" not in d and list(reversed(d)) == list(reversed(KEYS))
    assert flattens == [] and _pending(d)


def _update(target: dict, d) -> dict:
    target.update(d)
    return target


def _torch_round_trip(d, **load_kwargs):
    f = io.BytesIO()
    torch.save(d, f)
    f.seek(0)
    return torch.load(f, **load_kwargs)


#: Every way of reading the mapping: (how, returns a plain dict copy).
READS = {
    "getitem": (lambda d: {k: d[k] for k in list(d)}, False),
    "get": (lambda d: {k: d.get(k) for k in list(d)}, False),
    "items": (lambda d: dict(list(d.items())), False),
    "values": (lambda d: dict(zip(list(d), list(d.values()))), False),
    "iteration": (lambda d: {k: d[k] for k in d}, False),
    "pop": (lambda d: {k: d.pop(k) for k in list(d)}, False),
    "popitem": (lambda d: dict(reversed([d.popitem() for _ in range(len(d))])), False),
    "setdefault": (lambda d: {k: d.setdefault(k) for k in list(d)}, False),
    "copy()": (lambda d: d.copy(), True),
    # CPython copies a dict's slots without __getitem__ unless the subclass overrides __iter__
    "dict(d)": (dict, True),
    "{**d}": (lambda d: {**d}, True),
    "f(**d)": (lambda d: (lambda **kw: kw)(**d), True),
    "d | {}": (lambda d: d | {}, True),
    "{} | d": (lambda d: {} | d, True),
    "dict.update": (lambda d: _update({}, d), True),
    "OrderedDict(d)": (collections.OrderedDict, False),
    "ChainMap(d)": (lambda d: dict(collections.ChainMap(d)), True),
    "copy.copy": (copy.copy, True),
    "copy.deepcopy": (copy.deepcopy, True),
    "pickle": (lambda d: pickle.loads(pickle.dumps(d)), True),
    "torch.save": (lambda d: _torch_round_trip(d, weights_only=False), True),
    # torch.load's default since PyTorch 2.6: the eager dict loads, so must this one
    "torch.save, weights_only": (lambda d: _torch_round_trip(d, weights_only=True), True),
    # dict subclasses get rebuilt as type(d)(...) (lightning's apply_to_collection,
    # accelerate's send_to_device, default_collate): the eager dict's type builds a dict
    "type(d)(...)": (lambda d: type(d)((k, v) for k, v in d.items()), True),
    "type(d).fromkeys": (lambda d: _update(type(d).fromkeys(list(d)), d), True),
    # torch's pytree (tree_map, torch.func, torch.export) maps a dict's values
    "pytree": (lambda d: torch.utils._pytree.tree_map(lambda x: x, d), True),
}


@pytest.mark.parametrize("how", list(READS))
def test_every_read_path_gives_the_eager_bits_after_one_flatten(how, flattens):
    buf = _rollout()
    want = _eager(buf)
    d = buf.make_dict()
    read, plain = READS[how]
    got = read(d)
    _assert_same(got, want)
    if plain:
        assert type(got) is dict, type(got)
    # the first read made every value at once, in one flatten of every storage
    assert len(flattens) == 1 and len(flattens[0]) == len(KEYS)
    assert not _pending(d) and isinstance(d, FlatDict)
    if len(d):  # (pop and popitem emptied it) what it holds now is the eager values too
        _assert_same(dict(dict.items(d)), want)


def test_read_paths_on_the_triton_backend_flatten_in_one_kernel_launch(request):
    device, kernel_calls = _on("triton", request)
    with use_backend("torch"):
        buf = _rollout(device)
    want = _eager(buf)
    with use_backend("triton"):
        for how in ("dict(d)", "pickle", "getitem"):
            kernel_calls.clear()
            d = buf.get_dict()
            _assert_same(READS[how][0](d), want)
            assert kernel_calls == ["transpose_flatten"], how
            _assert_same(d, want)  # read again: made once, no second launch
            assert kernel_calls == ["transpose_flatten"], how


def test_a_made_mapping_reads_like_a_dict_and_holds_no_buffer(flattens):
    buf = _rollout()
    want = _eager(buf)
    d = buf.make_dict()
    d["obs"]  # one value read: that value alone is made
    assert type(d) is FlatDict and _pending(d) and len(flattens) == 1 and len(flattens[0]) == 1
    for key in d:  # iterated, then read: every value still pending is made at once
        d[key]
    assert len(flattens) == 2 and len(flattens[1]) == len(KEYS) - 1
    assert type(d) is flatdict._Made and isinstance(d, FlatDict) and isinstance(d, dict)
    assert list(vars(d)) == ["_lock"]  # no storages, no buffer: the values and a lock
    _assert_same(dict(d), want)
    _assert_same({**d}, want)
    assert len(flattens) == 2
    ref = weakref.ref(buf)
    del buf
    gc.collect()
    assert ref() is None, "a made mapping keeps its buffer alive"
    _assert_same(d, want)


def test_keys_the_caller_adds_or_replaces_are_plain_values(flattens):
    buf = _rollout()
    want = _eager(buf)
    d = buf.make_dict()
    extra, replaced, later = torch.arange(5), torch.ones(T * N, 2, 3), torch.zeros(3)
    d.update({"extra": extra}, more=later)
    d["obs"] = replaced
    d |= {"ior": extra}
    del d["k_int32"]
    assert flattens == [] and _pending(d)  # none of that read a pending value
    assert d["extra"] is extra and d["more"] is later and d["obs"] is replaced
    assert flattens == []  # reading plain values makes nothing
    assert d.setdefault("sd", later) is later
    assert flattens == []  # nor does a key that is not pending
    list(d.values())
    # one flatten, of exactly the values still pending (not obs, not the deleted key)
    assert len(flattens) == 1
    pending = [k for k in KEYS if k not in ("obs", "k_int32")]
    assert [s.data_ptr() for s in flattens[0]] == [getattr(buf, k).data_ptr() for k in pending]
    del want["k_int32"]
    want["obs"] = replaced
    want |= {"extra": extra, "more": later, "ior": extra, "sd": later}
    _assert_same(d, want)


def test_clearing_or_replacing_every_pending_value_makes_nothing(flattens):
    buf = _rollout()
    d = buf.get_dict()
    d.clear()
    assert d == {} and flattens == []
    d = buf.get_dict()
    for key in KEYS:
        d[key] = torch.zeros(1)
    assert all(v.shape == (1,) for v in d.values()) and flattens == []
    # nothing pending any more: the buffer's next write copies nothing for it
    buf.update_data("obs", 0, torch.ones(N, 2, 3))
    assert flattens == []


def test_equality_and_inequality_match_the_eager_dict():
    """``==`` of dicts compares values; one-element tensors make it a boolean. A pending value
    must never be compared as the placeholder it is before being made."""
    keys = {"a": ((), torch.int32), "b": ((), torch.bool)}  # no NaN: NaN != NaN
    buf = _rollout(keys=keys, num_envs=1, num_steps=1)
    want = _eager(buf)
    other = {"a": want["a"] + 1, "b": want["b"]}
    assert buf.get_dict() == want and want == buf.get_dict()
    assert not (buf.get_dict() != want) and not (want != buf.get_dict())
    assert buf.get_dict() != other and other != buf.get_dict()
    assert buf.get_dict() == buf.get_dict()
    d = buf.get_dict()
    assert d == d
    # one made, the other pending: in both orders
    made, pending = buf.get_dict(), buf.get_dict()
    made.values()
    assert type(made) is flatdict._Made and _pending(pending)
    assert made == pending and pending == made
    assert not (made != pending) and not (pending != made)
    made, pending = buf.get_dict(), buf.get_dict()
    made["a"] = made["a"] + 1
    assert made != pending and pending != made and not (made == pending)


def test_repr_and_str_match_the_eager_dict():
    buf = _rollout()
    want = _eager(buf)
    assert repr(buf.make_dict()) == repr(want)
    assert str(buf.get_dict()) == str(want)
    assert "pending" not in repr(buf.get_dict())


def test_pickle_and_torch_save_give_a_plain_dict(tmp_path):
    buf = _rollout()
    want = _eager(buf)
    for loaded in (
        pickle.loads(pickle.dumps(buf.get_dict(), protocol=2)),
        pickle.loads(pickle.dumps(buf.get_dict(), protocol=pickle.HIGHEST_PROTOCOL)),
        _torch_round_trip(buf.get_dict()),  # torch.load's default: weights_only=True
        _torch_round_trip({"rollout": buf.get_dict()})["rollout"],  # nested
    ):
        assert type(loaded) is dict
        _assert_same(loaded, want)
    path = tmp_path / "rollout.pt"
    torch.save(buf.make_dict(), path)
    _assert_same(torch.load(path), want)


def test_tensordict_of_a_flatdict():
    tensordict = pytest.importorskip("tensordict")
    buf = _rollout()
    want = _eager(buf)
    td = tensordict.TensorDict(buf.make_dict(), batch_size=[T * N])
    _assert_same({k: td[k] for k in want}, want)


def test_pytree_maps_a_flatdict_like_a_dict():
    from torch.utils import _pytree

    buf = _rollout()
    want = _eager(buf)
    leaves, spec = _pytree.tree_flatten(buf.get_dict())
    assert len(leaves) == len(KEYS)
    _assert_same(spec.unflatten(leaves), want)
    doubled = _pytree.tree_map(lambda x: torch.cat([x, x]), buf.make_dict())
    assert type(doubled) is dict and doubled["obs"].shape == (2 * T * N, 2, 3)


# ---------------------------------------------------------------------------------------------
# the eager switch
# ---------------------------------------------------------------------------------------------


def test_eager_switch_gives_a_plain_dict_of_copies(flattens):
    buf = _rollout()
    want = _eager(buf)
    set_lazy_make_dict(False)
    assert lazy_make_dict() is False
    for d in (buf.get_dict(), buf.make_dict()):
        assert type(d) is dict
        _assert_same(d, want)
    assert len(flattens) == 2  # made at once, one flatten per call
    buf.obs.mul_(2)  # a write behind the API's back: copies do not care
    _assert_same(d, want)
    set_lazy_make_dict(True)
    assert type(buf.get_dict()) is FlatDict


@pytest.mark.parametrize(
    "value, lazy",
    [(None, True), ("1", True), ("true", True), ("0", False), ("false", False), (" Off ", False),
     ("no", False)],
)  # fmt: skip
def test_eager_switch_environment_variable_is_read_at_import(value, lazy, monkeypatch):
    """``ROLLOUT_BUFFERS_LAZY_MAKE_DICT`` decides the default when the module is imported: a
    fresh copy of the module, imported with the variable set, says what it read."""
    if value is None:
        monkeypatch.delenv("ROLLOUT_BUFFERS_LAZY_MAKE_DICT", raising=False)
    else:
        monkeypatch.setenv("ROLLOUT_BUFFERS_LAZY_MAKE_DICT", value)
    spec = importlib.util.spec_from_file_location(
        "rollout_buffers._flatdict_env_probe", flatdict.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.lazy_make_dict() is lazy


# ---------------------------------------------------------------------------------------------
# DictDataset over a lazy mapping
# ---------------------------------------------------------------------------------------------


def _amp_extras(device, seed=1) -> dict[str, torch.Tensor]:
    """Keys a ProtoMotions agent adds before building its dataset: expert observations of
    another length than the rollout (one shorter, one longer: the longest sets num_tensors),
    and a plain replacement of a rollout key (normalized advantages)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "expert_obs": _data((N, 4), torch.float32, g).to(device),  # 7 rows: modulo 7
        "expert_flags": _data((2 * T * N, 3), torch.bool, g).to(device),  # 42: num_tensors
        "k_float32": _data((T * N,), torch.float32, g).to(device),  # replaces a pending key
    }


def _expected_batches(ds: DictDataset, eager: dict) -> list[dict]:
    """The original's minibatches of ``eager`` for the dataset's permutation."""
    perm = torch.as_tensor(ds.shuffled_to_original).cpu()
    b = ds.batch_size
    out = []
    for i in range(len(ds)):
        idx = perm[i * b : (i + 1) * b]
        out.append({k: v[(idx % v.shape[0]).to(v.device)] for k, v in eager.items()})
    return out


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_dataset_over_a_lazy_mapping_gathers_the_eager_minibatches(
    name, shuffle, request, flattens
):
    device, kernel_calls = _on(name, request)
    with use_backend("torch"):
        buf = _rollout(device)
    eager = _eager(buf) | _amp_extras(device)
    with use_backend(name):
        d = buf.make_dict()
        d.update(_amp_extras(device))
        np.random.seed(3)
        ds = DictDataset(14, d, shuffle=shuffle)
        np.random.seed(3)
        want = _expected_batches(DictDataset(14, eager, shuffle=shuffle), eager)
        perm = np.random.RandomState(3).permutation(42) if shuffle else np.arange(42)
        assert len(ds) == 3
        assert torch.equal(torch.as_tensor(ds.shuffled_to_original).cpu(), torch.as_tensor(perm))
        if kernel_calls is not None:
            kernel_calls.clear()
        for i, batch in enumerate(ds):
            _assert_same(batch, want[i])
        # one gather launch per minibatch, every key in it, and nothing flattened
        if name == "triton":
            assert kernel_calls == ["permuted_gather"] * len(ds)
        assert _made(name, flattens, kernel_calls) == 0 and _pending(d)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_dataset_with_an_assigned_permutation_wraps_as_the_eager_one(name, request, flattens):
    """A permutation the caller assigns may hold entries outside [0, n): every key takes them
    modulo its length (Python's modulo), lazy keys included."""
    device, kernel_calls = _on(name, request)
    keys = {"obs": ((2, 3), torch.float32), "k": ((), torch.int64), "m": ((), torch.bool)}
    with use_backend("torch"):
        buf = _rollout(device, keys=keys)
    extra = {"expert": torch.arange(10, device=device)}
    eager = _eager(buf) | extra
    perm = np.array(
        [-1, 22, -43, 5, 20, 41, 0, 63, -22, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    )
    with use_backend(name):
        d = buf.get_dict()
        d.update(extra)
        ds = DictDataset(21, d)
        ds.shuffled_to_original = perm
        want = _expected_batches(ds, eager)
        _assert_same(ds[0], want[0])
        assert _made(name, flattens, kernel_calls) == 0 and _pending(d)


def test_dataset_follows_its_mapping_when_values_are_made_or_replaced(flattens):
    buf = _rollout()
    eager = _eager(buf)
    d = buf.make_dict()
    ds = DictDataset(7, d, shuffle=True)
    want = _expected_batches(ds, eager)
    _assert_same(ds[0], want[0])
    d["obs"]  # the caller reads: every value is made, the dataset reads the made values
    assert len(flattens) == 1
    _assert_same(ds[1], want[1])
    _fill(buf, seed=9)  # a new rollout: the made values are not the buffer
    _assert_same(ds[2], want[2])
    d["obs"] = eager["obs"] + 1  # the original reads tensor_dict at every batch: so does this
    eager["obs"] = eager["obs"] + 1
    _assert_same(ds[0], _expected_batches(ds, eager)[0])


def test_dataset_alive_across_a_write_keeps_the_first_rollouts_minibatches(flattens):
    """Copy-on-write with a DictDataset holding the mapping: the write copies it first."""
    buf = _rollout()
    eager = _eager(buf)
    d = buf.make_dict()
    ds = DictDataset(21, d, shuffle=True)
    want = _expected_batches(ds, eager)
    _assert_same(ds[0], want[0])
    assert flattens == []
    buf.update_step(0, _step_data(buf, seed=5))
    assert len(flattens) == 1 and not _pending(d)
    del d
    _assert_same(ds[0], want[0])


# ---------------------------------------------------------------------------------------------
# copy-on-write
# ---------------------------------------------------------------------------------------------

GAE_KEYS = {
    "rewards": ((), torch.float32),
    "value": ((), torch.float32),
    "next_value": ((), torch.float32),
    "dones": ((), torch.bool),
    "advantages": ((), torch.float32),
    "returns": ((), torch.float32),
    "obs": ((2, 3), torch.bfloat16),
}


def _api_write(buf: ExperienceBuffer, how: str, seed: int) -> None:
    """Write the buffer through the API, one way."""
    data = _step_data(buf, seed)
    if how == "update_data":
        buf.update_data("obs", 1, data["obs"])
    elif how == "update_data(step=)":
        buf.update_data("obs", step=2, data=data["obs"])
    elif how == "update_step":
        buf.update_step(0, data)
    elif how == "update_step(one key)":
        buf.update_step(2, {"obs": data["obs"]})
    elif how == "batch_update_data":
        buf.batch_update_data("rewards", torch.full((T, N), float(seed), device=buf.device))
    elif how == "compute_gae":
        buf.compute_gae(0.99, 0.95)
    elif how == ".to(float64)":
        buf.to(torch.float64)
    elif how == ".double()":
        buf.double()
    else:
        raise AssertionError(how)


WRITES = [
    "update_data",
    "update_data(step=)",
    "update_step",
    "update_step(one key)",
    "batch_update_data",
    "compute_gae",
    ".to(float64)",
    ".double()",
]


@pytest.mark.parametrize("how", WRITES)
def test_a_write_through_the_api_copies_a_kept_mapping_first(how, flattens):
    buf = _rollout(keys=GAE_KEYS)
    buf.update_step(0, _step_data(buf, seed=1))  # the update_step fast path is prepared
    want = _eager(buf)
    d = buf.make_dict()
    _api_write(buf, how, seed=2)
    assert len(flattens) == 1 and len(flattens[0]) == len(GAE_KEYS) and not _pending(d)
    _api_write(buf, "update_step", seed=3)
    _api_write(buf, "update_data", seed=4)
    assert len(flattens) == 1  # copied once, not at every write
    _assert_same(d, want)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # GAE of inf - inf (interpreter)
@pytest.mark.parametrize("how", ["update_data", "update_step", "batch_update_data", "compute_gae"])
def test_a_write_on_the_triton_backend_copies_a_kept_mapping_in_one_launch(how, request):
    device, kernel_calls = _on("triton", request)
    with use_backend("torch"):
        buf = _rollout(device, keys=GAE_KEYS)
    want = _eager(buf)
    with use_backend("triton"):
        d = buf.make_dict()
        kernel_calls.clear()
        _api_write(buf, how, seed=2)
        # the copy first, in one launch, then the write (batch_update_data: PyTorch's copy_)
        assert kernel_calls[0] == "transpose_flatten"
        assert kernel_calls.count("transpose_flatten") == 1
    _assert_same(d, want)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_a_dropped_mapping_costs_no_copy(name, request, flattens):
    """The usual case: the mapping and its dataset lived inside one optimize step. Nothing
    refers to them any more when the next rollout writes: nothing is copied."""
    device, kernel_calls = _on(name, request)
    keys = {"obs": ((2, 3), torch.float32), "rewards": ((), torch.float32)}
    with use_backend("torch"):
        buf = _rollout(device, keys=keys)
    with use_backend(name):
        d = buf.make_dict()
        d["expert"] = torch.zeros(7, device=device)
        ds = DictDataset(T * N, d, shuffle=True)
        for _ in ds:
            pass
        refs = weakref.ref(d), weakref.ref(ds)
        del d, ds, _
        gc.collect()
        assert [r() for r in refs] == [None, None]
        if kernel_calls is not None:
            kernel_calls.clear()
        for t in range(T):  # the next rollout, through every API write
            buf.update_step(t, _step_data(buf, seed=t))
        buf.update_data("obs", 0, _step_data(buf, seed=9)["obs"])
        buf.batch_update_data("rewards", torch.zeros(T, N, device=device))
        buf.to(torch.float64)
        assert _made(name, flattens, kernel_calls) == 0


def test_a_mapping_dropped_unread_right_after_make_dict_costs_no_copy(flattens):
    buf = _rollout()
    buf.make_dict()  # ProtoMotions' "clear the experience buffer" call
    gc.collect()
    for t in range(T):
        buf.update_step(t, _step_data(buf, seed=t))
    assert flattens == []


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_amp_replay_keeps_what_the_eager_dict_gave_across_the_next_rollout(name, request, flattens):
    """ProtoMotions' AMP agent keeps make_dict values in a replay buffer across rollouts.
    Kept as values (read at once) or as the unread mapping, they must be the first rollout's."""
    device, kernel_calls = _on(name, request)
    keys = {"amp_obs": ((3, 2), torch.float32), "k": ((), torch.bfloat16)}
    with use_backend("torch"):
        buf = _rollout(device, keys=keys)
        first = _eager(buf)
        with use_backend(name):
            d1 = buf.make_dict()
            replay = {"amp_obs": d1["amp_obs"]}  # read now: made now, the eager copy
            d2 = buf.get_dict()  # kept unread
            made = _made(name, flattens, kernel_calls)
            for t in range(T):  # the next rollout: d1's unread value and d2 are copied at
                buf.update_step(t, _step_data(buf, seed=10 + t))  # its first write, once each
            assert _made(name, flattens, kernel_calls) == made + 2
            second = _eager(buf)
            d3 = buf.make_dict()
            _assert_same(replay, {"amp_obs": first["amp_obs"]})
            _assert_same(d1, first)
            _assert_same(d2, first)
            _assert_same(d3, second)


def test_to_while_a_mapping_is_outstanding_keeps_its_dtypes_and_bits(flattens):
    buf = _rollout()
    want = _eager(buf)
    d = buf.make_dict()
    buf.to(torch.float64)  # every floating key cast
    assert buf.obs.dtype == torch.float64 and len(flattens) == 1
    _assert_same(d, want)
    cast = buf.get_dict()
    assert cast["k_float16"].dtype == torch.float64
    _assert_same(cast, {k: v.double() if v.is_floating_point() else v for k, v in want.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moving_to_another_device_while_a_mapping_is_outstanding(flattens):
    buf = _rollout("cpu")
    want = _eager(buf)
    d = buf.make_dict()
    buf.to("cuda")
    _assert_same(d, want)


def test_get_dict_then_make_dict(flattens):
    buf = _rollout()
    want = _eager(buf)
    g = buf.get_dict()
    m = buf.make_dict()  # get_dict reset nothing: make_dict's check passes
    assert _pending(g) and _pending(m) and flattens == []
    _assert_same(g, want)
    assert len(flattens) == 1 and _pending(m)  # each mapping makes its own values
    with pytest.raises(RolloutValueError, match="Problem with"):
        buf.make_dict()  # make_dict did reset the tracking
    buf.update_data("k_bool", 0, torch.zeros(N, dtype=torch.bool))  # copies m first
    assert len(flattens) == 2 and not _pending(m)
    _assert_same(m, want)
    _assert_same(g, want)


# ---------------------------------------------------------------------------------------------
# writes that bypass the API
# ---------------------------------------------------------------------------------------------


def _no_grad_mul(t):
    with torch.no_grad():
        t.mul_(2)


BYPASSES = {
    "setitem": lambda t: t.__setitem__(1, 0),
    "in-place op": lambda t: t.add_(1),
    "through a view": lambda t: t[0, 2].fill_(7),
    "copy_": lambda t: t.copy_(torch.zeros_like(t)),
    "out=": lambda t: torch.mul(t, 3, out=t),
    "under no_grad": _no_grad_mul,
    "same bits (x * 1)": lambda t: t.mul_(1),  # the version counter, never the data
}


def _assert_stale(info, key: str) -> None:
    err = info.value
    assert isinstance(err, StaleRolloutError)
    assert isinstance(err, RolloutValueError) and isinstance(err, RuntimeError)
    msg = str(err)
    assert f"'{key}'" in msg and "set_lazy_make_dict(False)" in msg
    assert "Read the values" in msg and f"buffer.{key}" in msg


@pytest.mark.parametrize("bypass", list(BYPASSES))
def test_a_write_bypassing_the_api_is_caught_not_served(bypass, flattens):
    buf = _rollout()
    want = _eager(buf)
    d = buf.make_dict()
    BYPASSES[bypass](buf.obs)
    with pytest.raises(StaleRolloutError) as info:
        d["obs"]
    _assert_stale(info, "obs")
    assert flattens == []  # a read of one value makes that value alone: here nothing
    for key in d:  # iterated: the first read makes every fresh value (one flatten, not obs)
        if key != "obs":
            assert torch.equal(bits(d[key]), bits(want[key])), key
    assert len(flattens) == 1 and len(flattens[0]) == len(KEYS) - 1
    with pytest.raises(StaleRolloutError):
        d.get("obs")  # still refused, on every later read


STALE_READS = {
    "getitem": lambda d: d["obs"],
    "get": lambda d: d.get("obs"),
    "items": lambda d: list(d.items()),
    "values": lambda d: list(d.values()),
    "pop": lambda d: d.pop("obs"),
    "popitem": lambda d: d.popitem(),
    "setdefault": lambda d: d.setdefault("obs"),
    "dict(d)": dict,
    "{**d}": lambda d: {**d},
    "copy": lambda d: d.copy(),
    "d | {}": lambda d: d | {},
    "==": lambda d: d == {},
    "repr": repr,
    "pickle": pickle.dumps,
    "DictDataset(d)": lambda d: DictDataset(7, d),
}


@pytest.mark.parametrize("how", list(STALE_READS))
def test_every_read_of_a_stale_value_raises(how):
    buf = _rollout(keys={"obs": ((2, 3), torch.float32), "rewards": ((), torch.float32)})
    d = buf.make_dict()
    buf.obs[0] = 1.0
    with pytest.raises(StaleRolloutError) as info:
        STALE_READS[how](d)
    _assert_stale(info, "obs")


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_a_dataset_refuses_a_minibatch_of_a_value_written_behind_the_apis_back(
    name, request, flattens
):
    device, kernel_calls = _on(name, request)
    keys = {"obs": ((2, 3), torch.float32), "rewards": ((), torch.float32)}
    with use_backend("torch"):
        buf = _rollout(device, keys=keys)
    with use_backend(name):
        d = buf.make_dict()
        ds = DictDataset(7, d, shuffle=True)
        buf.rewards.neg_()
        if kernel_calls is not None:
            kernel_calls.clear()
        for i in (0, -1):
            with pytest.raises(StaleRolloutError) as info:
                ds[i]
            _assert_stale(info, "rewards")
        assert not kernel_calls and _made(name, flattens, kernel_calls) == 0  # nothing read


def test_copy_on_write_leaves_a_stale_value_pending_and_makes_the_others(flattens):
    buf = _rollout()
    want = _eager(buf)
    d = buf.make_dict()
    buf.wide.zero_()  # behind the API's back
    buf.update_data("obs", 0, torch.zeros(N, 2, 3))  # through it: copies d first
    assert len(flattens) == 1 and len(flattens[0]) == len(KEYS) - 1
    for key in KEYS:
        if key != "wide":
            assert torch.equal(bits(d[key]), bits(want[key])), key
    with pytest.raises(StaleRolloutError) as info:
        d["wide"]
    _assert_stale(info, "wide")
    # the caller may replace the stale value; then the mapping reads in full
    d["wide"] = want["wide"]
    _assert_same(d, want)
    assert len(flattens) == 1


def test_a_write_through_tensor_data_is_not_detected_as_the_readme_says():
    """``tensor.data`` shares the storage but not the version counter: such a write (like one
    through a raw pointer, DLPack or another process) cannot be seen, as the README says."""
    buf = _rollout(keys={"obs": ((2, 3), torch.float32)})
    d = buf.make_dict()
    buf.obs.data.fill_(5.0)
    assert torch.equal(d["obs"], torch.full((T * N, 2, 3), 5.0))


# ---------------------------------------------------------------------------------------------
# inference mode
# ---------------------------------------------------------------------------------------------


def test_values_made_under_inference_mode_are_normal_tensors():
    """The eager copies were made when make_dict ran, outside inference mode: normal tensors
    that autograd can save. Made later, inside inference mode (a copy-on-write when the next
    rollout writes, a read), they must still be normal tensors."""
    keys = {"obs": ((6,), torch.float32), "rewards": ((), torch.float32)}
    buf = _rollout(keys=keys)
    want = _eager(buf)
    kept, read = buf.make_dict(), buf.get_dict()
    with torch.inference_mode():
        buf.update_step(0, _step_data(buf, seed=4))  # copies `kept`
        read["obs"]
    for d in (kept, read):
        _assert_same(d, want)
        assert not any(v.is_inference() for v in d.values())
        layer = torch.nn.Linear(6, 1)
        layer(d["obs"]).sum().backward()  # "Inference tensors cannot be saved for backward"
        assert layer.weight.grad is not None


def test_make_dict_of_a_buffer_built_under_inference_mode():
    """Inference tensors carry no version counter: the mapping cannot watch them, and must
    still give the eager values (the original's make_dict worked there)."""
    with torch.inference_mode():
        buf = _rollout(keys={"obs": ((2, 3), torch.float32), "k": ((), torch.int64)})
        want = _eager(buf)
        d = buf.make_dict()
        _assert_same(d, want)
        d2 = buf.get_dict()
    ds = DictDataset(7, d2, shuffle=True)
    _assert_same(ds[1], _expected_batches(ds, want)[1])


@pytest.mark.parametrize(
    "name, lazy",
    [
        ("torch", False),
        ("torch", True),
        ("triton", True),
    ],
    ids=["torch-eager dict", "torch-lazy mapping", "triton-lazy mapping"],
)
def test_a_dataset_built_and_read_inside_inference_mode(name, lazy, request, flattens):
    """A dataset built and read inside torch.inference_mode() (its permutation is then an
    inference tensor) gathers what it gathers outside."""
    device, kernel_calls = _on(name, request)
    keys = {"obs": ((2, 3), torch.float32), "k": ((), torch.int64)}
    with use_backend("torch"):
        buf = _rollout(device, keys=keys)
    want = _eager(buf)
    with use_backend(name):
        d = buf.make_dict() if lazy else _eager(buf)
        with torch.inference_mode():
            ds = DictDataset(7, d, shuffle=True)
            for i, batch in enumerate(ds):
                _assert_same(batch, _expected_batches(ds, want)[i])
        if name == "triton":
            assert kernel_calls.count("permuted_gather") == len(ds)
        assert _made(name, flattens, kernel_calls) == 0 and (_pending(d) or not lazy)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def test_a_compiled_update_step_copies_a_kept_mapping_first():
    torch._dynamo.reset()
    buf = _rollout(keys={"obs": ((4,), torch.float32)})
    want = _eager(buf)

    def step(buf, index, obs):
        buf.update_step(index, {"obs": obs})

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    d = buf.make_dict()
    compiled(buf, 0, torch.randn(N, 4))
    _assert_same(d, want)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_reading_one_value_makes_it_alone_and_a_dataset_gathers_the_rest(name, request, flattens):
    """AMP reads a key or two of make_dict's mapping (its replay buffer) before building the
    dataset: those values are made, one launch each; the rest stays unflattened and the
    dataset gathers it from the buffer's storage, minibatches bit-identical to the eager ones."""
    device, kernel_calls = _on(name, request)
    with use_backend("torch"):
        buf = _rollout(device)
        want = _eager(buf)
    with use_backend(name):
        d = buf.make_dict()
        replay = d["obs"]
        assert _made(name, flattens, kernel_calls) == 1 and _pending(d)
        if name == "torch":
            assert len(flattens[0]) == 1  # obs alone
        assert torch.equal(bits(replay), bits(want["obs"]))
        ds = DictDataset(7, d, shuffle=True, generator=torch.Generator(device).manual_seed(1))
        got = [ds[i] for i in range(len(ds))]
        assert _made(name, flattens, kernel_calls) == 1  # the epoch made nothing more
        if name == "triton":
            assert kernel_calls.count("permuted_gather") == len(ds)
        for i, batch in enumerate(got):
            rows = ds.shuffled_to_original[i * 7 : (i + 1) * 7]
            for key in KEYS:
                assert torch.equal(bits(batch[key]), bits(want[key][rows])), (i, key)
