"""compute_gae: the PyTorch path and the Triton kernel (under Triton's CPU interpreter) against
a float64 sequential reference, in-place outputs, and bad input."""

import pytest
import torch

from rollout_buffers import backend
from rollout_buffers.errors import RolloutTypeError, RolloutValueError
from rollout_buffers.gae import compute_gae

# The Triton cases run on CPU tensors under Triton's interpreter, on any machine.
pytestmark = pytest.mark.usefixtures("interpreted_kernels")

GAMMA, LAM = 0.99, 0.95
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=[
            pytest.mark.interpreter,
            pytest.mark.skipif(not backend.triton_available(), reason="triton not installed"),
        ],
    ),
]


def reference(rewards, values, next_values, dones, gamma=GAMMA, lam=LAM):
    """ProtoMotions' discount_values, step by step in float64, plus returns."""
    v, nv = values.double(), next_values.double()
    r, d = rewards.double(), dones.double()
    if r.dim() < v.dim():
        r = r.unsqueeze(-1)
    if d.dim() < v.dim():
        d = d.unsqueeze(-1)
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[0])
    for t in reversed(range(v.shape[0])):
        not_done = 1.0 - d[t]
        delta = r[t] + gamma * nv[t] - v[t]
        last = delta + gamma * lam * not_done * last
        adv[t] = last
    return adv, adv + v


def rel_err(x, ref):
    """Largest absolute error relative to the largest reference magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_rollout(T, N, k, dones_dtype=torch.bool, dtype=torch.float32, broadcast=True, seed=0):
    """Random rollout; values (T, N) when k is None else (T, N, k); rewards and dones (T, N)
    when ``broadcast`` (else values' shape)."""
    g = torch.Generator().manual_seed(seed)
    vshape = (T, N) if k is None else (T, N, k)
    rshape = (T, N) if broadcast else vshape
    values = torch.randn(vshape, generator=g).to(dtype)
    next_values = torch.randn(vshape, generator=g).to(dtype)
    rewards = torch.randn(rshape, generator=g).to(dtype)
    dones = torch.rand(rshape, generator=g) < 0.15
    if dones_dtype != torch.bool:
        dones = dones.to(dones_dtype)
    return rewards, values, next_values, dones


def run(name, *args, **kwargs):
    with backend.use_backend(name):
        return compute_gae(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 7, None), (2, 13, 1), (7, 7, 2), (33, 13, 2), (257, 7, 1)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dones_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("T,N,k", SHAPES)
def test_fp32_matches_float64_reference(name, T, N, k, dones_dtype):
    inputs = make_rollout(T, N, k, dones_dtype)
    adv, ret = run(name, *inputs, GAMMA, LAM)
    ref_adv, ref_ret = reference(*inputs)
    assert adv.shape == ret.shape == inputs[1].shape
    assert adv.dtype == ret.dtype == torch.float32
    assert rel_err(adv, ref_adv) <= 1e-6
    assert rel_err(ret, ref_ret) <= 1e-6


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("broadcast", [True, False])
def test_rewards_and_dones_full_or_broadcast_over_value_head(name, broadcast):
    inputs = make_rollout(9, 5, 3, torch.float32, broadcast=broadcast)
    adv, ret = run(name, *inputs, GAMMA, LAM)
    ref_adv, ref_ret = reference(*inputs)
    assert rel_err(adv, ref_adv) <= 1e-6 and rel_err(ret, ref_ret) <= 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_float64_accumulates_in_float64(name):
    inputs = make_rollout(33, 7, 2, dtype=torch.float64)
    adv, ret = run(name, *inputs, GAMMA, LAM)
    ref_adv, ref_ret = reference(*inputs)
    assert adv.dtype == torch.float64
    assert rel_err(adv, ref_adv) <= 1e-12 and rel_err(ret, ref_ret) <= 1e-12


@pytest.mark.interpreter
@pytest.mark.skipif(not backend.triton_available(), reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_kernel_no_worse_than_twice_torch(dtype):
    inputs = make_rollout(33, 13, 2, dtype=dtype)
    ref_adv, ref_ret = reference(*inputs)  # exact on the same (rounded) inputs
    t_adv, t_ret = run("torch", *inputs, GAMMA, LAM)
    k_adv, k_ret = run("triton", *inputs, GAMMA, LAM)
    assert k_adv.dtype == k_ret.dtype == dtype
    # The floor only matters if the torch path were exact (it is not: outputs round to dtype).
    assert rel_err(k_adv, ref_adv) <= 2 * rel_err(t_adv, ref_adv) + 1e-7
    assert rel_err(k_ret, ref_ret) <= 2 * rel_err(t_ret, ref_ret) + 1e-7


@pytest.mark.interpreter
@pytest.mark.skipif(not backend.triton_available(), reason="triton not installed")
@pytest.mark.parametrize("variant", ["walk", "scan"])
@pytest.mark.parametrize("T,N,k", [(1, 7, None), (17, 37, 2), (40, 13, 1)])
def test_kernel_variants_match_reference(variant, T, N, k):
    """Both kernels, called directly; (17, 37, 2) spans three column blocks and two time
    chunks of the scan, the second partial; poisoned outputs reveal unwritten elements."""
    from rollout_buffers.kernels import gae as _k

    r, v, nv, d = make_rollout(T, N, k, torch.int64)
    adv = torch.full_like(v, float("nan"))
    ret = torch.full_like(v, float("nan"))
    _k.gae(r, v, nv, d, adv, ret, GAMMA, LAM, variant=variant)
    ref_adv, ref_ret = reference(r, v, nv, d)
    assert rel_err(adv, ref_adv) <= 1e-6 and rel_err(ret, ref_ret) <= 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_dones_reset_the_recurrence_and_use_one_minus_dones(name):
    """dones = 1 cuts the sum; float dones enter as (1 - dones), as in ProtoMotions."""
    rewards = torch.ones(4, 1)
    values = torch.zeros(4, 1)
    dones = torch.tensor([[0.0], [1.0], [0.5], [0.0]])
    adv, ret = run(name, rewards, values, torch.zeros(4, 1), dones, 1.0, 1.0)
    assert adv.flatten().tolist() == [2.0, 1.0, 1.5, 1.0]
    assert torch.equal(ret, adv)


@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_inputs(name):
    r, v, nv, d = make_rollout(8, 6, 2, torch.float32, broadcast=False)
    # Every input a strided view: one head of a width-2 tensor, or a column-major copy.
    args = (r[..., 0], v[..., 1], nv[..., 1], d[..., 0].t().contiguous().t())
    adv, ret = run(name, *args, GAMMA, LAM)
    ref_adv, ref_ret = reference(*args)
    assert rel_err(adv, ref_adv) <= 1e-6 and rel_err(ret, ref_ret) <= 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_empty_rollout(name):
    r, v, nv, d = make_rollout(0, 5, None)
    adv, ret = run(name, r, v, nv, d, GAMMA, LAM)
    assert adv.shape == ret.shape == (0, 5)


@pytest.mark.parametrize("name", BACKENDS)
def test_no_gradient_and_inputs_unchanged(name):
    r, v, nv, d = make_rollout(5, 7, None)
    v.requires_grad_(True)
    before = [x.detach().clone() for x in (r, v, nv, d)]
    adv, ret = run(name, r, v, nv, d, GAMMA, LAM)
    assert not adv.requires_grad and not ret.requires_grad
    assert all(torch.equal(a, b) for a, b in zip((r, v.detach(), nv, d), before, strict=True))


# ---------------------------------------------------------------------------------------------
# out=
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
def test_out_views_of_buffers_are_written_in_place(name):
    """As ExperienceBuffer.compute_gae will call it: (T, N) buffers viewed as values' shape."""
    r, v, nv, d = make_rollout(7, 13, 1)
    adv_buf = torch.full((7, 13), float("nan"))
    ret_buf = torch.full((7, 13), float("nan"))
    out = (adv_buf.view(v.shape), ret_buf.view(v.shape))
    adv, ret = run(name, r, v, nv, d, GAMMA, LAM, out=out)
    assert adv is out[0] and ret is out[1]
    ref_adv, ref_ret = reference(r, v, nv, d)
    assert rel_err(adv_buf.view(v.shape), ref_adv) <= 1e-6
    assert rel_err(ret_buf.view(v.shape), ref_ret) <= 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_out_slices_and_other_float_dtype(name):
    """Outputs may be contiguous slices of larger storage and of another float dtype."""
    r, v, nv, d = make_rollout(6, 7, None, dtype=torch.bfloat16)
    big = torch.full((3, 6, 7), float("nan"))
    adv, ret = run(name, r, v, nv, d, GAMMA, LAM, out=(big[0], big[2]))
    ref_adv, ref_ret = reference(r, v, nv, d)
    assert adv.dtype == torch.float32 and adv.data_ptr() == big[0].data_ptr()
    assert big[1].isnan().all()  # untouched in between
    assert rel_err(adv, ref_adv) <= 1e-2 and rel_err(ret, ref_ret) <= 1e-2


@pytest.mark.parametrize("name", BACKENDS)
def test_returns_may_overwrite_values(name):
    r, v, nv, d = make_rollout(9, 7, 2)
    ref_adv, ref_ret = reference(r, v, nv, d)
    adv = torch.empty_like(v)
    run(name, r, v, nv, d, GAMMA, LAM, out=(adv, v))
    assert rel_err(adv, ref_adv) <= 1e-6 and rel_err(v, ref_ret) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before anything is written
# ---------------------------------------------------------------------------------------------


def _good():
    return list(make_rollout(4, 3, 2))


@pytest.mark.parametrize(
    "arg,bad,match",
    [
        (0, torch.zeros(4, 2), r"'rewards' has shape \(4, 2\), expected \(4, 3, 2\) or \(4, 3\)"),
        (2, torch.zeros(4, 3), r"'next_values' has shape \(4, 3\), expected \(4, 3, 2\)"),
        (3, torch.zeros(5, 3, dtype=torch.bool), r"'dones' has shape \(5, 3\)"),
        (1, torch.zeros(4, 3, 2, dtype=torch.int64), r"'values' must be .*float.*torch.int64"),
        (1, torch.zeros(4), r"'values' must have shape .*got shape \(4,\)"),
        (0, torch.zeros(4, 3, dtype=torch.int32), r"'rewards' must be .*got dtype torch.int32"),
        (3, torch.zeros(4, 3, dtype=torch.complex64), r"'dones' must be bool, integer"),
        (2, torch.zeros(4, 3, 2, device="meta"), r"'next_values' is on device meta, expected cpu"),
    ],
)
def test_bad_tensors_raise_value_errors(arg, bad, match):
    args = _good()
    args[arg] = bad
    with pytest.raises(RolloutValueError, match=match) as info:
        compute_gae(*args, GAMMA, LAM)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)


def test_bad_types_raise_type_errors():
    r, v, nv, d = _good()
    with pytest.raises(RolloutTypeError, match="'rewards' must be a torch.Tensor, got list"):
        compute_gae([1.0], v, nv, d, GAMMA, LAM)
    with pytest.raises(RolloutTypeError, match="'gamma' must be a Python float, got Tensor"):
        compute_gae(r, v, nv, d, torch.tensor(0.99), LAM)
    with pytest.raises(RolloutTypeError, match="'lam' must be a Python float, got str"):
        compute_gae(r, v, nv, d, GAMMA, "0.95")
    with pytest.raises(RolloutTypeError, match="'out' must be a pair"):
        compute_gae(r, v, nv, d, GAMMA, LAM, out=torch.empty_like(v))


def test_bad_out_raises_and_writes_nothing():
    r, v, nv, d = _good()
    adv = torch.full_like(v, 7.0)
    cases = [
        ((adv, torch.empty(4, 3)), r"'out\[1\]' has shape \(4, 3\), expected \(4, 3, 2\)"),
        ((adv, torch.empty(4, 3, 2, dtype=torch.int32)), r"'out\[1\]' must be float16"),
        ((adv, torch.empty(2, 4, 3).permute(1, 2, 0)), r"'out\[1\]' must be contiguous"),
        ((adv, adv), r"'out\[0\]' and 'out\[1\]' must not share memory"),
    ]
    for out, match in cases:
        with pytest.raises(RolloutValueError, match=match):
            compute_gae(r, v, nv, d, GAMMA, LAM, out=out)
    assert (adv == 7.0).all()
