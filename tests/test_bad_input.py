"""Bad input: every public entry point against every class of bad input that applies to it.

Each bad call must raise the documented class, which subclasses both ``AssertionError`` (what
the original's bare asserts raised) and the natural built-in (``ValueError``, ``KeyError``,
``IndexError``, ``TypeError``), with a message naming the key and what was expected and
received; and it must change nothing: every buffer (cloned before, compared bit for bit
after), ``store_dict`` (copied before, == after) and the step tracking.

Decisions recorded here:
- A step or batch index must be an integer (int, NumPy integer, integer 0-dim CPU tensor).
  ``bool`` is rejected even though it is an ``int`` subclass (``buffer.update_data(k, True,
  x)`` is a bug, not step 1), and so are floats, even integral ones.
- Complex data into a real buffer is a ``ValueError`` (the value cannot be represented);
  data that is not convertible to a tensor at all (a string, ``None``) is a ``TypeError``.
- ``set_backend`` is new (the original had no assert there): a plain ``ValueError``.
- ``DictDataset`` accepts any hashable key, as the original did; only the buffer needs
  string keys (they become module attributes).
NaN and inf are data, not bad input: they pass through every path bit for bit.
"""

from __future__ import annotations

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch

import rollout_buffers  # noqa: E402
from rollout_buffers import (  # noqa: E402
    DictDataset,
    ExperienceBuffer,
    RolloutIndexError,
    RolloutKeyError,
    RolloutTypeError,
    RolloutValueError,
    set_backend,
    swap_and_flatten01,
    use_backend,
)

N, T = 4, 3  # num_envs, num_steps of the fixture buffer
KEYS = {"obs": ((2,), torch.float32), "rew": ((), torch.float32), "done": ((), torch.bool)}

BUILTIN = {
    RolloutValueError: ValueError,
    RolloutKeyError: KeyError,
    RolloutIndexError: IndexError,
    RolloutTypeError: TypeError,
}

OTHER_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _torch_backend():
    with use_backend("torch"):
        yield


def good_row(key: str, seed: int = 0) -> torch.Tensor:
    shape, dtype = KEYS[key]
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (N, *shape), generator=gen).bool()
    return torch.randn((N, *shape), generator=gen).to(dtype)


@pytest.fixture
def buffer() -> ExperienceBuffer:
    """A buffer with steps 0 and 1 of every key written (step 2 not: store_dict is mid-rollout)."""
    buf = ExperienceBuffer(N, T, device="cpu")
    for key, (shape, dtype) in KEYS.items():
        buf.register_key(key, shape=shape, dtype=dtype)
    for step in (0, 1):
        buf.update_step(step, {k: good_row(k, seed=10 * step + i) for i, k in enumerate(KEYS)})
    return buf


def snapshot(buf: ExperienceBuffer):
    return {k: getattr(buf, k).clone() for k in buf.keys()}, dict(buf.store_dict), buf.keys()


def assert_unchanged(buf: ExperienceBuffer, snap) -> None:
    tensors, store, keys = snap
    assert buf.keys() == keys
    assert buf.store_dict == store
    for k, before in tensors.items():
        assert torch.equal(getattr(buf, k), before), f"buffer '{k}' changed by a failed call"


def assert_error(info, cls, parts) -> None:
    err = info.value
    # cls or a subclass that adds the class the original raised for the same call: those are
    # pinned, call by call, by tests/test_compat.py::test_errors_keep_the_class_the_original_raised.
    assert isinstance(err, cls), f"raised {type(err).__name__}, expected {cls.__name__}"
    assert isinstance(err, AssertionError) and isinstance(err, BUILTIN[cls])
    message = str(err)
    for part in parts:
        assert str(part) in message, f"{part!r} not in message {message!r}"


def test_assert_unchanged_detects_a_change(buffer):
    """The state check can fail: a write, or a store_dict change, is seen."""
    snap = snapshot(buffer)
    buffer.update_data("rew", 2, torch.ones(N))
    with pytest.raises(AssertionError):
        assert_unchanged(buffer, snap)
    buffer2_snap = snapshot(buffer)
    buffer.obs[0, 0, 0] += 1  # a write that bypasses the API
    with pytest.raises(AssertionError):
        assert_unchanged(buffer, buffer2_snap)


# ---------------------------------------------------------------------------------------------
# ExperienceBuffer(...)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["num_envs", "num_steps"])
@pytest.mark.parametrize("value", [0, -1, 2.5, 4.0, True, "4", None], ids=repr)
def test_constructor_rejects_non_positive_or_non_int_sizes(name, value):
    kwargs = {"num_envs": 4, "num_steps": 3, "device": "cpu", name: value}
    with pytest.raises(RolloutValueError) as info:
        ExperienceBuffer(**kwargs)
    assert_error(info, RolloutValueError, [name, repr(value)])


@pytest.mark.parametrize("device", ["bogus", "cuda:x", 3.5], ids=repr)
def test_constructor_rejects_an_invalid_device(device):
    with pytest.raises(RolloutValueError) as info:
        ExperienceBuffer(4, 3, device=device)
    assert_error(info, RolloutValueError, ["device", repr(device)])


# ---------------------------------------------------------------------------------------------
# register_key
# ---------------------------------------------------------------------------------------------

REGISTER_CASES = [
    pytest.param(3, (), torch.float, RolloutKeyError, ["3", "str"], id="non-string-key-int"),
    pytest.param(None, (), torch.float, RolloutKeyError, ["None", "str"], id="non-string-key-none"),
    pytest.param(
        b"x", (), torch.float, RolloutKeyError, ["b'x'", "bytes"], id="non-string-key-bytes"
    ),
    pytest.param(
        "obs", (2,), torch.float, RolloutKeyError, ["obs", "already registered"], id="duplicate-key"
    ),
    pytest.param(
        "rew",
        (),
        torch.float,
        RolloutKeyError,
        ["rew", "already registered"],
        id="duplicate-key-same-spec",
    ),
    pytest.param(
        "training",
        (),
        torch.float,
        RolloutKeyError,
        ["training", "clashes"],
        id="clash-module-attribute",
    ),
    pytest.param(
        "to", (), torch.float, RolloutKeyError, ["'to'", "clashes"], id="clash-module-method"
    ),
    pytest.param(
        "num_envs",
        (),
        torch.float,
        RolloutKeyError,
        ["num_envs", "clashes"],
        id="clash-buffer-attribute",
    ),
    pytest.param(
        "store_dict",
        (),
        torch.float,
        RolloutKeyError,
        ["store_dict", "clashes"],
        id="clash-store-dict",
    ),
    pytest.param(
        "update_data",
        (),
        torch.float,
        RolloutKeyError,
        ["update_data", "clashes"],
        id="clash-buffer-method",
    ),
    pytest.param("", (), torch.float, RolloutKeyError, ["''"], id="empty-key"),
    pytest.param("a.b", (), torch.float, RolloutKeyError, ["a.b", "'.'"], id="dotted-key"),
    pytest.param("x", (-1,), torch.float, RolloutValueError, ["x", "(-1,)"], id="negative-shape"),
    pytest.param(
        "x", (2, -3), torch.float, RolloutValueError, ["x", "(2, -3)"], id="negative-shape-inner"
    ),
    pytest.param("x", -2, torch.float, RolloutValueError, ["x", "(-2,)"], id="negative-int-shape"),
    pytest.param("x", (2.0,), torch.float, RolloutValueError, ["x", "(2.0,)"], id="float-shape"),
    pytest.param("x", (True,), torch.float, RolloutValueError, ["x", "(True,)"], id="bool-shape"),
    pytest.param("x", "ab", torch.float, RolloutValueError, ["x", "'ab'"], id="string-shape"),
    pytest.param("x", None, torch.float, RolloutValueError, ["x", "None"], id="none-shape"),
    pytest.param(
        "x", (), "float32", RolloutTypeError, ["x", "'float32'", "torch.dtype"], id="string-dtype"
    ),
    pytest.param("x", (), 3, RolloutTypeError, ["x", "3", "torch.dtype"], id="int-dtype"),
    # torch.empty(0, dtype=None) is float32: None must not slip through as "the default"
    pytest.param("x", (), None, RolloutTypeError, ["x", "None", "torch.dtype"], id="none-dtype"),
]


@pytest.mark.parametrize("key, shape, dtype, cls, parts", REGISTER_CASES)
def test_register_key_rejects_bad_key_shape_or_dtype_and_registers_nothing(
    buffer, key, shape, dtype, cls, parts
):
    snap = snapshot(buffer)
    attr_before = getattr(buffer, key, "absent") if isinstance(key, str) and key else "absent"
    with pytest.raises(cls) as info:
        buffer.register_key(key, shape=shape, dtype=dtype)
    assert_error(info, cls, parts)
    assert_unchanged(buffer, snap)
    if isinstance(key, str) and key:
        attr = getattr(buffer, key, "absent")
        assert attr is attr_before if isinstance(attr, torch.Tensor) else attr == attr_before
    assert "x" not in buffer._buffers and "x" not in buffer.store_dict


# ---------------------------------------------------------------------------------------------
# Bad data, shared by update_data, update_step and batch_update_data
# ---------------------------------------------------------------------------------------------


def _bad_data(shape, dtype):
    """name -> (bad value for a region of ``shape``, class, message parts beyond the key)."""
    wrong_rows = (shape[0] + 1, *shape[1:])
    wrong_last = (*shape[:-1], shape[-1] + 1) if len(shape) > 1 else (shape[0] + 2,)
    extra = (2, *shape)
    return {
        "wrong-shape-rows": (
            torch.zeros(wrong_rows, dtype=dtype),
            RolloutValueError,
            [tuple(shape), wrong_rows],
        ),
        "wrong-shape-last": (
            torch.zeros(wrong_last, dtype=dtype),
            RolloutValueError,
            [tuple(shape), wrong_last],
        ),
        "extra-dim": (torch.zeros(extra, dtype=dtype), RolloutValueError, [tuple(shape), extra]),
        "string": ("abc", RolloutTypeError, [tuple(shape), "str"]),
        "none": (None, RolloutTypeError, [tuple(shape), "NoneType"]),
        "object": (object(), RolloutTypeError, [tuple(shape), "object"]),
        "string-array": (np.array(["a", "b"]), RolloutTypeError, [tuple(shape), "ndarray"]),
        "complex": (
            torch.zeros(shape, dtype=torch.complex64),
            RolloutValueError,
            ["complex64", dtype],
        ),
        "sparse": (
            torch.zeros(shape, dtype=dtype).to_sparse(),
            RolloutTypeError,
            ["sparse", "dense"],
        ),
        "requires-grad": (
            torch.zeros(shape, requires_grad=True),
            RolloutValueError,
            ["requires_grad"],
        ),
        **{
            f"device-{dev}": (
                torch.zeros(shape, dtype=dtype, device=dev),
                RolloutValueError,
                ["cpu", dev],
            )
            for dev in OTHER_DEVICES
        },
        **{
            f"device-{dev}-scalar": (
                torch.zeros((), dtype=dtype, device=dev),
                RolloutValueError,
                ["cpu", dev],
            )
            for dev in OTHER_DEVICES
        },
    }


BAD_DATA_NAMES = list(_bad_data((N, 2), torch.float32))


def bad_data(key: str, name: str, full: bool = False):
    shape, dtype = KEYS[key]
    region = (T, N, *shape) if full else (N, *shape)
    value, cls, parts = _bad_data(region, dtype)[name]
    if name == "complex" and dtype == torch.bool:
        parts = ["complex64", "torch.bool"]
    return value, cls, [key, *parts]


# ---------------------------------------------------------------------------------------------
# update_data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_DATA_NAMES)
@pytest.mark.parametrize("key", list(KEYS))
def test_update_data_rejects_bad_data_and_writes_nothing(buffer, key, name):
    value, cls, parts = bad_data(key, name)
    snap = snapshot(buffer)
    for step in (2, 0):  # an unwritten step and a written one
        with pytest.raises(cls) as info:
            buffer.update_data(key, step, value)
        assert_error(info, cls, parts)
        assert_unchanged(buffer, snap)


@pytest.mark.parametrize("key", [3, None, "nope", "Obs", "training"], ids=repr)
def test_update_data_rejects_an_unknown_or_non_string_key(buffer, key):
    snap = snapshot(buffer)
    with pytest.raises(RolloutKeyError) as info:
        buffer.update_data(key, 0, good_row("obs"))
    assert_error(info, RolloutKeyError, [repr(key) if not isinstance(key, str) else key])
    if isinstance(key, str):
        assert "obs" in str(info.value)  # names the registered keys
    assert_unchanged(buffer, snap)


@pytest.mark.parametrize("index", [T, T + 7, -T - 1, 2**40], ids=repr)
def test_update_data_rejects_a_step_out_of_range(buffer, index):
    snap = snapshot(buffer)
    with pytest.raises(RolloutIndexError) as info:
        buffer.update_data("obs", index, good_row("obs"))
    assert_error(info, RolloutIndexError, ["obs", str(index), f"num_steps={T}"])
    assert_unchanged(buffer, snap)


NON_INTEGER_INDICES = [
    pytest.param(1.0, id="float-integral"),
    pytest.param(0.5, id="float"),
    pytest.param(True, id="bool-true"),
    pytest.param(False, id="bool-false"),
    pytest.param(np.bool_(True), id="numpy-bool"),
    pytest.param("1", id="string"),
    pytest.param(slice(0, 1), id="slice"),
    pytest.param([0], id="list"),
    pytest.param(torch.tensor(1.0), id="float-tensor"),
    pytest.param(torch.tensor([0, 1]), id="multi-element-tensor"),
    pytest.param(torch.tensor(0, device="meta"), id="meta-tensor"),
]


@pytest.mark.parametrize("index", NON_INTEGER_INDICES)
def test_update_data_rejects_a_step_that_is_not_an_integer(buffer, index):
    snap = snapshot(buffer)
    with pytest.raises(RolloutTypeError) as info:
        buffer.update_data("obs", index, good_row("obs"))
    assert_error(info, RolloutTypeError, ["obs", "integer", type(index).__name__])
    assert_unchanged(buffer, snap)


def test_update_data_rejects_a_missing_step_and_both_index_and_step(buffer):
    snap = snapshot(buffer)
    with pytest.raises(RolloutTypeError) as info:
        buffer.update_data("obs", data=good_row("obs"))
    assert_error(info, RolloutTypeError, ["obs", "None"])
    with pytest.raises(RolloutTypeError) as info:
        buffer.update_data("obs", 2, good_row("obs"), step=2)
    assert_error(info, RolloutTypeError, ["obs", "step="])
    assert_unchanged(buffer, snap)


# ---------------------------------------------------------------------------------------------
# update_step: one bad key among good ones leaves everything unchanged
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 2], ids=["bad-first", "bad-middle", "bad-last"])
@pytest.mark.parametrize("name", BAD_DATA_NAMES)
def test_update_step_with_one_bad_key_among_good_ones_writes_nothing(buffer, name, position):
    bad_key = list(KEYS)[position]
    value, cls, parts = bad_data(bad_key, name)
    tensors = {k: (value if k == bad_key else good_row(k, seed=99)) for k in KEYS}
    snap = snapshot(buffer)
    for step in (2, 0):
        with pytest.raises(cls) as info:
            buffer.update_step(step, tensors)
        assert_error(info, cls, parts)
        assert_unchanged(buffer, snap)


@pytest.mark.parametrize("position", [0, 1, 3])
@pytest.mark.parametrize("key", [3, "nope"], ids=repr)
def test_update_step_with_an_unknown_key_among_good_ones_writes_nothing(buffer, key, position):
    items = [(k, good_row(k, seed=5)) for k in KEYS]
    items.insert(position, (key, good_row("rew")))
    snap = snapshot(buffer)
    with pytest.raises(RolloutKeyError) as info:
        buffer.update_step(2, dict(items))
    assert_error(info, RolloutKeyError, [str(key)])
    assert_unchanged(buffer, snap)


@pytest.mark.parametrize(
    "index, cls",
    [(T, RolloutIndexError), (-T - 1, RolloutIndexError)]
    + [(p.values[0], RolloutTypeError) for p in NON_INTEGER_INDICES],
    ids=repr,
)
def test_update_step_rejects_a_bad_step(buffer, index, cls):
    snap = snapshot(buffer)
    with pytest.raises(cls) as info:
        buffer.update_step(index, {k: good_row(k) for k in KEYS})
    assert_error(info, cls, ["update_step"])
    assert_unchanged(buffer, snap)


@pytest.mark.parametrize(
    "tensors, cls, parts",
    [
        ({}, RolloutValueError, ["empty"]),
        ([("obs", torch.zeros(N, 2))], RolloutTypeError, ["mapping", "list"]),
        (torch.zeros(N, 2), RolloutTypeError, ["mapping", "Tensor"]),
        (None, RolloutTypeError, ["mapping", "NoneType"]),
    ],
    ids=["empty-dict", "list-of-pairs", "tensor", "none"],
)
def test_update_step_rejects_an_empty_or_non_mapping_argument(buffer, tensors, cls, parts):
    snap = snapshot(buffer)
    with pytest.raises(cls) as info:
        buffer.update_step(2, tensors)
    assert_error(info, cls, ["update_step", *parts])
    assert_unchanged(buffer, snap)


# ---------------------------------------------------------------------------------------------
# batch_update_data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_DATA_NAMES)
@pytest.mark.parametrize("key", list(KEYS))
def test_batch_update_data_rejects_bad_data_and_writes_nothing(buffer, key, name):
    value, cls, parts = bad_data(key, name, full=True)
    snap = snapshot(buffer)
    with pytest.raises(cls) as info:
        buffer.batch_update_data(key, value)
    assert_error(info, cls, parts)
    assert_unchanged(buffer, snap)


@pytest.mark.parametrize("key", [3, "nope"], ids=repr)
def test_batch_update_data_rejects_an_unknown_key(buffer, key):
    snap = snapshot(buffer)
    with pytest.raises(RolloutKeyError) as info:
        buffer.batch_update_data(key, torch.zeros(T, N))
    assert_error(info, RolloutKeyError, [str(key)])
    assert_unchanged(buffer, snap)


# ---------------------------------------------------------------------------------------------
# A key that is not a string, hashable or not, on every entry point that takes a key
# ---------------------------------------------------------------------------------------------


class _Pairs:
    """A TensorDict-like argument (``items()``, no hashing of its keys): what update_step takes
    beyond dicts, and the only way an unhashable key reaches it."""

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def items(self):
        return iter(self._pairs)


NON_STRING_KEYS = [3, None, b"obs", ["obs"], {"obs": 1}]


@pytest.mark.parametrize("key", NON_STRING_KEYS, ids=repr)
@pytest.mark.parametrize(
    "call",
    [
        lambda buf, key: buf.register_key(key),
        lambda buf, key: buf.update_data(key, 0, good_row("obs")),
        lambda buf, key: buf.update_step(0, _Pairs([("rew", good_row("rew")), (key, 0.0)])),
        lambda buf, key: buf.batch_update_data(key, torch.zeros(T, N, 2)),
    ],
    ids=["register_key", "update_data", "update_step", "batch_update_data"],
)
def test_a_non_string_key_gets_our_key_error_saying_keys_are_strings(buffer, call, key):
    # Unhashable keys (a list, a dict) included: a dict lookup would raise a bare TypeError.
    snap = snapshot(buffer)
    with pytest.raises(RolloutKeyError) as info:
        call(buffer, key)
    message = str(info.value)
    for part in (repr(key), "keys are strings", f"received {type(key).__name__}"):
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(info.value, AssertionError) and isinstance(info.value, KeyError)
    assert_unchanged(buffer, snap)


# ---------------------------------------------------------------------------------------------
# make_dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written, shown, count",
    [
        ([], "steps [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, ...]", "(17 of 17)"),
        ([0], "steps [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]", "(16 of 17)"),
        ([0, 16], "steps [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]", "(15 of 17)"),
    ],
    ids=["17-missing", "16-missing", "15-missing"],
)
def test_make_dict_lists_at_most_16_missing_steps_then_their_count(written, shown, count):
    buf = ExperienceBuffer(2, 17, device="cpu")
    buf.register_key("obs")
    for step in written:
        buf.update_data("obs", step, torch.ones(2))
    with pytest.raises(RolloutValueError) as info:
        buf.make_dict()
    message = str(info.value)
    assert message.startswith("Problem with 'obs'")
    assert f"{shown} {count}" in message, message


def test_make_dict_with_missing_steps_names_key_and_steps_and_resets_nothing(buffer):
    snap = snapshot(buffer)
    with pytest.raises(RolloutValueError) as info:
        buffer.make_dict()
    assert_error(info, RolloutValueError, ["[2]", f"1 of {T}"])
    assert str(info.value).startswith("Problem with 'obs'")  # the original's prefix
    assert_unchanged(buffer, snap)
    # the tracking was not reset: writing the one missing step completes the rollout
    buffer.update_step(2, {k: good_row(k, seed=3) for k in KEYS})
    out = buffer.make_dict()
    assert set(out) == set(KEYS) and all(v == 0 for v in buffer.store_dict.values())


def test_make_dict_names_the_first_incomplete_key_after_complete_ones(buffer):
    buffer.update_data("obs", 2, good_row("obs"))
    with pytest.raises(RolloutValueError) as info:
        buffer.make_dict()
    assert str(info.value).startswith("Problem with 'rew'")


# ---------------------------------------------------------------------------------------------
# swap_and_flatten01
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr, cls, parts",
    [
        (torch.arange(3.0), RolloutValueError, ["2 dimensions", "(3,)"]),
        (torch.tensor(1.0), RolloutValueError, ["2 dimensions", "()"]),
        ([[1, 2], [3, 4]], RolloutTypeError, ["tensor", "list"]),
        (np.zeros((2, 2)), RolloutTypeError, ["tensor", "ndarray"]),
        ("ab", RolloutTypeError, ["tensor", "str"]),
    ],
    ids=["1-d", "0-d", "list", "numpy", "string"],
)
def test_swap_and_flatten01_rejects_fewer_than_two_dims_or_non_tensors(arr, cls, parts):
    before = arr.clone() if isinstance(arr, torch.Tensor) else None
    with pytest.raises(cls) as info:
        swap_and_flatten01(arr)
    assert_error(info, cls, parts)
    if before is not None:
        assert torch.equal(arr, before)


# ---------------------------------------------------------------------------------------------
# DictDataset(...)
# ---------------------------------------------------------------------------------------------


def _data():
    return {"obs": torch.randn(12, 3), "act": torch.arange(12), "short": torch.randn(5)}


DATASET_CASES = [
    pytest.param(lambda: (2, {}), RolloutValueError, ["empty"], id="empty-dict"),
    pytest.param(
        lambda: (2, [("obs", torch.zeros(4))]),
        RolloutTypeError,
        ["mapping", "list"],
        id="list-of-pairs",
    ),
    pytest.param(
        lambda: (2, torch.zeros(4)), RolloutTypeError, ["mapping", "Tensor"], id="tensor-not-dict"
    ),
    pytest.param(
        lambda: (2, {**_data(), "bad": [1, 2]}), RolloutTypeError, ["bad", "list"], id="list-value"
    ),
    pytest.param(
        lambda: (2, {**_data(), "bad": np.zeros(12)}),
        RolloutTypeError,
        ["bad", "ndarray"],
        id="numpy-value",
    ),
    pytest.param(
        lambda: (2, {**_data(), "bad": torch.tensor(1.0)}),
        RolloutValueError,
        ["bad", "()"],
        id="0-dim-value",
    ),
    pytest.param(
        lambda: (2, {**_data(), "bad": torch.zeros(0, 3)}),
        RolloutValueError,
        ["bad", "(0, 3)"],
        id="zero-rows",
    ),
    pytest.param(
        lambda: (2, {**_data(), "bad": torch.zeros(12, requires_grad=True)}),
        RolloutValueError,
        ["bad", "requires_grad"],
        id="requires-grad",
    ),
    *[
        pytest.param(
            lambda dev=dev: (2, {**_data(), "bad": torch.zeros(12, device=dev)}),
            RolloutValueError,
            ["bad", "cpu", dev, "obs"],
            id=f"mixed-devices-{dev}",
        )
        for dev in OTHER_DEVICES
    ],
    *[
        pytest.param(
            lambda bs=bs: (bs, _data()),
            RolloutValueError,
            ["batch_size", repr(bs)],
            id=f"batch-size-{bs!r}",
        )
        for bs in (0, -2, -12, 2.0, True, "2", None)
    ],
    pytest.param(
        lambda: (5, _data()),
        RolloutValueError,
        ["12 5", "divide", "obs"],
        id="batch-size-not-dividing",
    ),
    pytest.param(
        lambda: (24, _data()), RolloutValueError, ["24", "12"], id="batch-size-larger-than-data"
    ),
    # The hint names the two divisors of 12 nearest to the batch size, in increasing order.
    pytest.param(
        lambda: (5, _data()),
        RolloutValueError,
        ["12 5", "the length of 'obs'", "(nearest: 4, 6)"],
        id="nearest-divisors-either-side",
    ),
    pytest.param(
        lambda: (10, _data()),
        RolloutValueError,
        ["12 10", "(nearest: 6, 12)"],
        id="nearest-divisors-in-order",
    ),
    pytest.param(
        lambda: (7, {"a": torch.zeros(9), "b": torch.zeros(16)}),
        RolloutValueError,
        ["16 7", "the length of 'b'", "(nearest: 4, 8)"],
        id="nearest-divisors-longest-key-last",
    ),
]


@pytest.mark.parametrize("make, cls, parts", DATASET_CASES)
def test_dataset_constructor_rejects_bad_input_and_leaves_the_tensors_alone(make, cls, parts):
    batch_size, tensor_dict = make()
    before = (
        {
            k: v.clone()
            for k, v in tensor_dict.items()
            if isinstance(v, torch.Tensor) and v.device.type == "cpu"
        }
        if isinstance(tensor_dict, dict)
        else {}
    )
    with pytest.raises(cls) as info:
        DictDataset(batch_size, tensor_dict)
    assert_error(info, cls, parts)
    for k, v in before.items():
        assert torch.equal(tensor_dict[k], v)


@pytest.mark.parametrize(
    "generator, cls, parts",
    [
        (3, RolloutTypeError, ["generator", "int"]),
        (np.random.default_rng(0), RolloutTypeError, ["generator", "Generator"]),
    ],
    ids=["int", "numpy-generator"],
)
def test_dataset_constructor_rejects_a_generator_that_is_not_a_torch_generator(
    generator, cls, parts
):
    with pytest.raises(cls) as info:
        DictDataset(2, _data(), shuffle=True, generator=generator)
    assert_error(info, cls, parts)


def test_dataset_constructor_rejects_a_generator_on_another_device():
    with pytest.raises(RolloutValueError) as info:  # CPU generator, meta tensors
        DictDataset(2, {"obs": torch.zeros(4, device="meta")}, generator=torch.Generator())
    assert_error(info, RolloutValueError, ["generator", "cpu", "meta"])
    if torch.cuda.is_available():
        with pytest.raises(RolloutValueError) as info:
            DictDataset(2, _data(), generator=torch.Generator(device="cuda"))
        assert_error(info, RolloutValueError, ["generator", "cuda", "cpu"])


@pytest.mark.parametrize(
    "value", ["abc", None, object(), ["a"], {"a": 1}], ids=["str", "none", "object", "list", "dict"]
)
def test_an_unconvertible_permutation_assigned_to_the_dataset_gets_our_type_error(value):
    ds = DictDataset(2, _data())
    ds.shuffled_to_original = value
    with pytest.raises(RolloutTypeError) as info:
        ds[0]
    message = str(info.value)
    for part in ("shuffled_to_original", "1-D integer", type(value).__name__):
        assert part in message, f"{part!r} not in {message!r}"
    ds.shuffled_to_original = torch.arange(12)  # a good one afterwards works
    assert torch.equal(ds[1]["act"], torch.tensor([2, 3]))


def test_dataset_accepts_any_hashable_key_like_the_original():
    ds = DictDataset(2, {0: torch.arange(4), ("a", 1): torch.arange(4) * 2})
    batch = ds[1]
    assert torch.equal(batch[0], torch.tensor([2, 3])) and torch.equal(
        batch[("a", 1)], torch.tensor([4, 6])
    )


# ---------------------------------------------------------------------------------------------
# dataset[i]
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [6, 7, 100, -7, -100], ids=repr)
def test_dataset_index_out_of_range_raises_index_error(index):
    ds = DictDataset(2, _data(), shuffle=True, generator=torch.Generator().manual_seed(0))
    perm = ds.shuffled_to_original.clone()
    with pytest.raises(RolloutIndexError) as info:
        ds[index]
    assert_error(info, RolloutIndexError, [str(index), "6 batches"])
    assert torch.equal(ds.shuffled_to_original, perm)
    assert len(list(ds)) == 6  # iteration stops on the IndexError at index 6


@pytest.mark.parametrize("index", NON_INTEGER_INDICES + [pytest.param(None, id="none")])
def test_dataset_index_that_is_not_an_integer_raises_type_error(index):
    ds = DictDataset(2, _data())
    with pytest.raises(RolloutTypeError) as info:
        ds[index]
    assert_error(info, RolloutTypeError, ["integer", type(index).__name__])


# ---------------------------------------------------------------------------------------------
# set_backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuda", "", "tritonn", None, 3], ids=repr)
def test_set_backend_rejects_an_unknown_name_and_keeps_the_backend(name):
    before = rollout_buffers.get_backend()
    with pytest.raises(ValueError) as info:
        set_backend(name)
    assert repr(name) in str(info.value) and "auto, triton, torch" in str(info.value)
    assert rollout_buffers.get_backend() == before
    with pytest.raises(ValueError), use_backend(name):
        pass
    assert rollout_buffers.get_backend() == before


# ---------------------------------------------------------------------------------------------
# Validation never reads device memory: the whole API runs on 'meta' tensors (no storage)
# ---------------------------------------------------------------------------------------------


def test_validation_reads_no_device_memory_on_meta_tensors():
    buf = ExperienceBuffer(N, T, device="meta")
    for key, (shape, dtype) in KEYS.items():
        buf.register_key(key, shape=shape, dtype=dtype)
    rows = {k: torch.empty((N, *s), dtype=d, device="meta") for k, (s, d) in KEYS.items()}
    buf.update_data("obs", 0, rows["obs"])
    buf.update_data("rew", 0, torch.tensor(1.0))  # a CPU scalar broadcasts, as in PyTorch
    for step in range(T):
        buf.update_step(step, rows)
    with pytest.raises(RolloutValueError):
        buf.update_step(0, {**rows, "obs": torch.empty(N, 3, device="meta")})
    out = buf.make_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (N * T, *s) for k, (s, _) in KEYS.items()
    }
    batch = DictDataset(T, out)[N - 1]
    assert tuple(batch["obs"].shape) == (T, 2)


# ---------------------------------------------------------------------------------------------
# NaN and inf are data: bit-exact round trip through every path
# ---------------------------------------------------------------------------------------------

_SPECIAL_BITS = {
    # qNaN, -qNaN, sNaN, NaN with payload, +inf, -inf, -0.0, smallest subnormal, max
    torch.float16: (
        torch.int16,
        [0x7E00, 0xFE00, 0x7C01, 0x7E55, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x7BFF],
    ),
    torch.bfloat16: (
        torch.int16,
        [0x7FC0, 0xFFC0, 0x7F81, 0x7FC5, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x7F7F],
    ),
    torch.float32: (
        torch.int32,
        [
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0x7FC12345,
            0x7F800000,
            0xFF800000,
            0x80000000,
            1,
            0x7F7FFFFF,
        ],
    ),
    torch.float64: (
        torch.int64,
        [
            0x7FF8000000000000,
            0xFFF8000000000000,
            0x7FF0000000000001,
            0x7FF8000000012345,
            0x7FF0000000000000,
            0xFFF0000000000000,
            0x8000000000000000,
            1,
            0x7FEFFFFFFFFFFFFF,
        ],
    ),
}


def _special(dtype: torch.dtype, shape) -> torch.Tensor:
    int_dtype, patterns = _SPECIAL_BITS[dtype]
    bits = 8 * torch.finfo(dtype).bits // 8
    signed = [p - (1 << bits) if p >= 1 << (bits - 1) else p for p in patterns]
    numel = int(np.prod(shape))
    flat = torch.tensor([signed[i % len(signed)] for i in range(numel)], dtype=int_dtype)
    return flat.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_SPECIAL_BITS[t.dtype][0])


def _skip_without_triton_kernels() -> None:
    from rollout_buffers.errors import BackendUnavailableError

    try:
        with use_backend("triton"):
            swap_and_flatten01(torch.zeros(2, 2))
    except (ImportError, BackendUnavailableError) as exc:
        pytest.skip(f"the Triton kernels cannot run here: {exc}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", list(_SPECIAL_BITS), ids=str)
def test_nan_and_inf_pass_through_every_path_bit_for_bit(dtype, backend):
    if backend == "triton":
        _skip_without_triton_kernels()
    with use_backend(backend):
        _nan_round_trip(dtype)


def _nan_round_trip(dtype):
    n, t = 9, 2  # 9 envs: every special value in every column position
    buf = ExperienceBuffer(n, t, device="cpu")
    buf.register_key("a", shape=(2,), dtype=dtype)
    buf.register_key("b", dtype=dtype)
    buf.register_key("c", shape=(3,), dtype=dtype)
    a0, a1 = _special(dtype, (n, 2)), _special(dtype, (n, 2)).flip(0)
    b0, b1 = _special(dtype, (n,)), _special(dtype, (n,)).roll(3)
    c = _special(dtype, (t, n, 3))
    assert torch.isnan(a0).any() and torch.isinf(a0).any()  # the fixture has what it claims
    buf.update_data("a", 0, a0)
    buf.update_step(1, {"a": a1, "b": b1})
    buf.update_data("b", step=0, data=b0)
    buf.batch_update_data("c", c)
    assert torch.equal(_bits(buf.a), _bits(torch.stack([a0, a1])))
    assert torch.equal(_bits(buf.b), _bits(torch.stack([b0, b1])))
    assert torch.equal(_bits(buf.c), _bits(c))
    expected = {
        k: getattr(buf, k).transpose(0, 1).reshape(n * t, *getattr(buf, k).shape[2:]) for k in "abc"
    }
    for out in (buf.get_dict(), buf.make_dict()):
        for k in "abc":
            assert torch.equal(_bits(out[k]), _bits(expected[k])), k
    perm = torch.randperm(n * t, generator=torch.Generator().manual_seed(1))
    ds = DictDataset(t, out)
    ds.shuffled_to_original = perm
    for i in range(len(ds)):
        for k, v in ds[i].items():
            assert torch.equal(_bits(v), _bits(expected[k][perm[i * t : (i + 1) * t]])), (i, k)


def test_step_index_as_a_cuda_tensor_is_refused_without_reading_it():
    """Reading a device tensor would synchronize the host; the index must be a host integer."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (a meta tensor stands in below)")
    buf = ExperienceBuffer(3, 2, device="cuda")
    buf.register_key("obs")
    with pytest.raises(RolloutTypeError, match="cuda"):
        buf.update_data("obs", torch.tensor(0, device="cuda"), torch.zeros(3, device="cuda"))


def test_step_index_as_a_non_cpu_tensor_names_its_device():
    buf = ExperienceBuffer(3, 2, device="cpu")
    buf.register_key("obs")
    with pytest.raises(RolloutTypeError, match="meta"):
        buf.update_data("obs", torch.tensor(0, device="meta"), torch.zeros(3))
    assert buf.store_dict["obs"] == 0
