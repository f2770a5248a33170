"""Property-based tests: every public operation against the original module (bench/original.py).

Random num_envs, num_steps, key shapes, dtypes, source layouts (offset + strided slices,
transposes, expands, broadcasts, a leading size-1 dim), dtype casts, negative steps, dataset
lengths (shorter tensors are indexed modulo) and batch sizes; results compared bit for bit.

The PyTorch path runs under the bounded "ci" hypothesis profile by default; `make fuzz`
(HYPOTHESIS_PROFILE=long) runs many more examples. The Triton kernels run the same properties
at small sizes under Triton's CPU interpreter, skipped when the kernels or triton are missing.
"""

from __future__ import annotations

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch

hypothesis = pytest.importorskip("hypothesis")
from conftest import DTYPES, random_tensor  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bench import original  # noqa: E402
from rollout_buffers import (  # noqa: E402
    DictDataset,
    ExperienceBuffer,
    RolloutValueError,
    swap_and_flatten01,
    use_backend,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-exact equality (shape, dtype and bits: NaN payloads and -0.0 included)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.contiguous(), expected.contiguous()
    if a.dtype in _INT_VIEW:
        a, e = a.view(_INT_VIEW[a.dtype]), e.view(_INT_VIEW[e.dtype])
    assert torch.equal(a, e), f"{what}: values differ"


def assert_new_storage(out: torch.Tensor, src: torch.Tensor) -> None:
    """A flattened result is a new contiguous tensor, not a view of the buffer."""
    assert out.is_contiguous()
    if out.numel() and src.numel():
        assert out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()


def make_values(shape, dtype, src_dtype, gen) -> torch.Tensor:
    """Values of ``shape`` in ``src_dtype``; when casting to ``dtype``, values both represent exactly."""
    if src_dtype == dtype:
        return random_tensor(shape, dtype, generator=gen)
    high = 2 if torch.bool in (src_dtype, dtype) else 100
    return torch.randint(0, high, shape, generator=gen).to(src_dtype)


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values (or, for "expand", values[:1] repeated) in a non-contiguous layout."""
    if values.dim() == 0 or layout == "contiguous":
        return values
    if layout == "expand":
        return values[:1].expand(values.shape)
    if layout == "transpose" and values.dim() >= 2:
        return values.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "permute" and values.dim() >= 3:
        order = list(range(values.dim()))[::-1]
        return values.permute(order).contiguous().permute(order)
    # "slice" (and the fallback): an offset, strided view into a larger poisoned storage
    big = torch.ones((2 * values.shape[0] + 1, *values.shape[1:]), dtype=values.dtype)
    view = big[1::2][: values.shape[0]]
    view.copy_(values)
    return view


LAYOUTS = ["contiguous", "slice", "transpose", "permute", "expand"]
FORMS = ["full", "full", "full", "suffix", "lead1", "scalar"]


@st.composite
def source(draw, shape, dtype, gen_seed):
    """A value to assign into a region of ``shape``/``dtype``: any layout, broadcast form and cast."""
    form = draw(st.sampled_from(FORMS))
    layout = draw(st.sampled_from(LAYOUTS))
    cast = draw(st.integers(0, 3)) == 0
    src_dtype = draw(st.sampled_from(DTYPES)) if cast else dtype
    gen = torch.Generator().manual_seed(gen_seed)
    if form == "scalar":
        value = make_values((), dtype, src_dtype, gen)
        return value.item() if draw(st.booleans()) else value
    if form == "suffix":
        drop = draw(st.integers(1, len(shape)))
        src_shape = tuple(shape)[drop:]
    elif form == "lead1":
        src_shape = (1, *shape)
    else:
        src_shape = tuple(shape)
    return with_layout(make_values(src_shape, dtype, src_dtype, gen), layout)


@st.composite
def key_specs(draw, max_keys, max_dim):
    """Up to ``max_keys`` keys of 0-2 extra dims, now and then one of size 0 (rows of no bytes)."""
    n = draw(st.integers(1, max_keys))
    specs = []
    for k in range(n):
        ndim = draw(st.integers(0, 2))
        shape = [draw(st.integers(1, max_dim)) for _ in range(ndim)]
        if shape and draw(st.integers(0, 7)) == 0:
            shape[draw(st.integers(0, ndim - 1))] = 0
        specs.append((f"key{k}", tuple(shape), draw(st.sampled_from(DTYPES))))
    return specs


# ---------------------------------------------------------------------------------------------
# the properties, parametrized by size so the PyTorch and the Triton paths share them
# ---------------------------------------------------------------------------------------------


def check_swap_and_flatten01(data, max_dim: int) -> None:
    ndim = data.draw(st.integers(2, 4), label="ndim")
    shape = tuple(data.draw(st.integers(1, max_dim), label="dim") for _ in range(ndim))
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    arr = with_layout(
        random_tensor(shape, dtype, generator=torch.Generator().manual_seed(seed)), layout
    )
    before = arr.clone()
    out = swap_and_flatten01(arr)
    assert_same(out, original.swap_and_flatten01(arr), "swap_and_flatten01")
    assert_new_storage(out, arr)
    assert_same(arr, before, "swap_and_flatten01 input")


def check_buffer_program(data, max_envs: int, max_steps: int, max_dim: int, max_ops: int) -> None:
    """A random sequence of writes and reads on ours and on the original, compared after each."""
    num_envs = data.draw(st.integers(1, max_envs), label="num_envs")
    num_steps = data.draw(st.integers(1, max_steps), label="num_steps")
    specs = data.draw(key_specs(4, max_dim), label="keys")
    ours = ExperienceBuffer(num_envs, num_steps, device="cpu")
    ref = original.ExperienceBuffer(num_envs, num_steps, device="cpu")
    for key, shape, dtype in specs:
        ours.register_key(key, shape=shape, dtype=dtype)
        ref.register_key(key, shape=shape, dtype=dtype)
    keys = [k for k, _, _ in specs]
    spec_of = {k: (s, d) for k, s, d in specs}
    written = {k: set() for k in keys}  # the model of store_dict: distinct steps written

    def seed():
        return data.draw(st.integers(0, 2**31 - 1), label="seed")

    def step_arg():
        step = data.draw(st.integers(-num_steps, num_steps - 1), label="step")
        kind = data.draw(st.sampled_from(["int", "int", "numpy", "tensor"]), label="index type")
        converted = {"int": step, "numpy": np.int64(step), "tensor": torch.tensor(step)}[kind]
        return step, converted

    def ref_update(key, step, src):
        if isinstance(src, torch.Tensor):
            ref.update_data(key, step, src)
        else:  # the original's assert reads data.requires_grad: a Python number has none
            getattr(ref, key)[step] = src

    def compare(what):
        for k in keys:
            assert_same(getattr(ours, k), getattr(ref, k), f"{what}: buffer '{k}'")
            assert ours.store_dict[k] == sum(s + 1 for s in written[k]), f"{what}: store_dict '{k}'"

    def expected_flat():
        return {k: original.swap_and_flatten01(getattr(ref, k)) for k in keys}

    ops = data.draw(
        st.lists(
            st.sampled_from(["data", "data", "step", "step", "batch", "get", "make"]),
            max_size=max_ops,
        ),
        label="ops",
    )
    ops.append("make")
    for op in ops:
        if op == "data":
            key = data.draw(st.sampled_from(keys), label="key")
            shape, dtype = spec_of[key]
            step, idx = step_arg()
            src = data.draw(source((num_envs, *shape), dtype, seed()), label="src")
            if data.draw(st.booleans(), label="step="):
                ours.update_data(key, step=idx, data=src)
            else:
                ours.update_data(key, idx, src)
            ref_update(key, step, src)
            written[key].add(step % num_steps)
        elif op == "step":
            chosen = data.draw(
                st.lists(st.sampled_from(keys), min_size=1, unique=True), label="subset"
            )
            step, idx = step_arg()
            tensors = {}
            for key in chosen:
                shape, dtype = spec_of[key]
                tensors[key] = data.draw(source((num_envs, *shape), dtype, seed()), label="src")
            ours.update_step(idx, tensors)
            for key, src in tensors.items():  # the original has no update_step: one key at a time
                ref_update(key, step, src)
                written[key].add(step % num_steps)
        elif op == "batch":
            key = data.draw(st.sampled_from(keys), label="key")
            shape, dtype = spec_of[key]
            src = data.draw(source((num_steps, num_envs, *shape), dtype, seed()), label="src")
            ours.batch_update_data(key, src)
            if isinstance(src, torch.Tensor):
                ref.batch_update_data(key, src)
            else:  # the original's assert reads data.requires_grad: a Python number has none
                getattr(ref, key)[:] = src
            written[key] = set(range(num_steps))
        elif op == "get":
            out, expected = ours.get_dict(), expected_flat()
            assert list(out) == keys
            for k in keys:
                assert_same(out[k], expected[k], f"get_dict '{k}'")
                assert_new_storage(out[k], getattr(ours, k))
        else:  # make
            incomplete = [k for k in keys if len(written[k]) < num_steps]
            if incomplete:
                store_before = dict(ours.store_dict)
                with pytest.raises(RolloutValueError) as info:
                    ours.make_dict()
                assert isinstance(info.value, AssertionError)
                assert str(info.value).startswith(f"Problem with '{incomplete[0]}'")
                assert ours.store_dict == store_before
            else:
                out, expected = ours.make_dict(), expected_flat()
                assert list(out) == keys
                for k in keys:
                    assert_same(out[k], expected[k], f"make_dict '{k}'")
                    assert_new_storage(out[k], getattr(ours, k))
                    written[k] = set()
                check_dataset_on(data, out, expected)
        compare(op)


def check_dataset_on(data, ours_dict, ref_dict) -> None:
    """DictDataset batches with one permutation, ours against the original, every batch."""
    n = max(len(v) for v in ours_dict.values())
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    batch_size = data.draw(st.sampled_from(divisors), label="batch_size")
    perm_kind = data.draw(
        st.sampled_from(["random", "identity", "reversed", "shuffle"]), label="perm"
    )
    seed = data.draw(st.integers(0, 2**31 - 1), label="perm seed")
    inputs_before = {k: v.clone() for k, v in ours_dict.items()}
    if perm_kind == "shuffle":  # our own shuffle, reproducible with a generator
        ds = DictDataset(
            batch_size, ours_dict, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        again = DictDataset(
            batch_size, ours_dict, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        perm = ds.shuffled_to_original
        assert torch.equal(perm, again.shuffled_to_original)
    else:
        perm = {
            "random": torch.randperm(n, generator=torch.Generator().manual_seed(seed)),
            "identity": torch.arange(n),
            "reversed": torch.arange(n - 1, -1, -1),
        }[perm_kind]
        ds = DictDataset(batch_size, ours_dict, shuffle=False)
        assert torch.equal(ds.shuffled_to_original, torch.arange(n))
        ds.shuffled_to_original = perm
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(n))
    ref = original.DictDataset(batch_size, ref_dict, shuffle=False)
    ref.shuffled_to_original = perm.numpy()
    assert len(ds) == ds.num_batches() == len(ref) == n // batch_size
    assert ds.num_tensors == n and ds.batch_size == batch_size
    batches = list(ds)  # iteration ends on IndexError
    assert len(batches) == len(ref)
    for i in range(len(ref)):
        expected = ref[i]
        for got in (batches[i], ds[i], ds[i - len(ref)]):
            assert list(got) == list(expected)
            for k in expected:
                assert_same(got[k], expected[k], f"batch {i} '{k}'")
    for k, v in ours_dict.items():
        assert_same(v, inputs_before[k], f"dataset input '{k}'")


def check_dataset(data, max_batch: int, max_batches: int, max_dim: int) -> None:
    """Tensors of different lengths (shorter ones modulo), any dtype, shape and layout."""
    batch_size = data.draw(st.integers(1, max_batch), label="batch_size")
    n = batch_size * data.draw(st.integers(1, max_batches), label="num_batches")
    specs = data.draw(key_specs(4, max_dim), label="keys")
    tensors = {}
    for j, (key, shape, dtype) in enumerate(specs):
        length = n if j == 0 else data.draw(st.integers(1, n), label="length")
        layout = data.draw(st.sampled_from(LAYOUTS[:-1]), label="layout")  # expand: rows alias
        seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
        values = random_tensor(
            (length, *shape), dtype, generator=torch.Generator().manual_seed(seed)
        )
        tensors[key] = with_layout(values, layout)
    order = data.draw(st.permutations(list(tensors)), label="key order")
    tensors = {k: tensors[k] for k in order}  # the longest is not always first
    check_dataset_on(data, tensors, tensors)


# ---------------------------------------------------------------------------------------------
# PyTorch path
# ---------------------------------------------------------------------------------------------

# An example costs milliseconds on this path: five times the profile's count ("ci": 200).
_TORCH_EXAMPLES = settings.default.max_examples * 5


@settings(max_examples=_TORCH_EXAMPLES)
@given(data=st.data())
def test_swap_and_flatten01_matches_original(data):
    with use_backend("torch"):
        check_swap_and_flatten01(data, max_dim=7)


@settings(max_examples=_TORCH_EXAMPLES)
@given(data=st.data())
def test_buffer_writes_reads_and_make_dict_match_original(data):
    with use_backend("torch"):
        check_buffer_program(data, max_envs=33, max_steps=9, max_dim=5, max_ops=12)


@settings(max_examples=_TORCH_EXAMPLES)
@given(data=st.data())
def test_dataset_batches_match_original_for_any_lengths_and_permutation(data):
    with use_backend("torch"):
        check_dataset(data, max_batch=16, max_batches=8, max_dim=5)


def test_properties_can_fail():
    """The comparison helpers do detect a difference (a test that cannot fail is a defect)."""
    a = torch.tensor([1.0, float("nan")])
    with pytest.raises(AssertionError):
        assert_same(a, torch.tensor([1.0, -float("nan")]))  # same NaN-ness, other sign bit
    with pytest.raises(AssertionError):
        assert_same(a.to(torch.float64), a)
    big = torch.zeros(4, 3)
    with pytest.raises(AssertionError):
        assert_new_storage(big.view(12), big)  # a view is not a copy


# ---------------------------------------------------------------------------------------------
# Triton path under the interpreter (small sizes, few examples)
# ---------------------------------------------------------------------------------------------


def _triton_skip_reason() -> str | None:
    try:
        import rollout_buffers.kernels  # noqa: F401
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton or rollout_buffers.kernels unavailable: {exc!r}"
    from rollout_buffers.backend import interpreter_enabled
    from rollout_buffers.errors import BackendUnavailableError

    if not interpreter_enabled():
        return "TRITON_INTERPRET is not enabled"
    try:
        with use_backend("triton"):
            swap_and_flatten01(torch.zeros(2, 2))
    except BackendUnavailableError as exc:
        return f"the Triton kernels are not available: {exc}"
    return None


_TRITON_EXAMPLES = min(100, max(20, settings.default.max_examples // 2))


@settings(max_examples=_TRITON_EXAMPLES)
@given(data=st.data())
def _triton_properties(data):
    with use_backend("triton"):
        check_swap_and_flatten01(data, max_dim=4)
        check_buffer_program(data, max_envs=6, max_steps=4, max_dim=3, max_ops=4)
        check_dataset(data, max_batch=4, max_batches=3, max_dim=3)


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpreted_kernels")
def test_triton_path_matches_original_at_small_sizes():
    reason = _triton_skip_reason()
    if reason:
        pytest.skip(reason)
    _triton_properties()
