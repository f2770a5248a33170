"""ExperienceBuffer.compute_gae: reads named keys, writes advantages/returns in place, marks them."""

from __future__ import annotations

import pytest
import torch

from rollout_buffers import ExperienceBuffer, RolloutValueError, backend, compute_gae


def _filled_buffer(T=5, N=7):
    buf = ExperienceBuffer(N, T, device="cpu")
    for key, shape, dtype in [
        ("rewards", (), torch.float32),
        ("value", (1,), torch.float32),
        ("next_value", (1,), torch.float32),
        ("dones", (), torch.int64),
        ("advantages", (), torch.float32),
        ("returns", (), torch.float32),
    ]:
        buf.register_key(key, shape, dtype)
    g = torch.Generator().manual_seed(0)
    for t in range(T):
        buf.update_step(
            t,
            {
                "rewards": torch.randn(N, generator=g),
                "value": torch.randn(N, 1, generator=g),
                "next_value": torch.randn(N, 1, generator=g),
                "dones": torch.randint(0, 2, (N,), generator=g),
            },
        )
    return buf


def test_buffer_compute_gae_writes_keys_and_marks_them_complete():
    buf = _filled_buffer()
    adv, ret = compute_gae(buf.rewards, buf.value, buf.next_value, buf.dones, 0.99, 0.95)
    buf.compute_gae(0.99, 0.95)
    assert torch.equal(buf.advantages, adv.view(buf.advantages.shape))
    assert torch.equal(buf.returns, ret.view(buf.returns.shape))
    assert buf.store_dict["advantages"] == buf.total_sum() == buf.store_dict["returns"]
    data = buf.make_dict()  # every key complete: no error
    assert data["advantages"].shape == (7 * 5,)


def test_buffer_compute_gae_rejects_output_key_of_other_width():
    buf = _filled_buffer()
    buf.register_key("wide_adv", (2,))
    before = buf.wide_adv.clone()
    with pytest.raises(RolloutValueError, match="wide_adv"):
        buf.compute_gae(0.99, 0.95, advantages="wide_adv")
    assert torch.equal(buf.wide_adv, before) and buf.store_dict["wide_adv"] == 0


BACKENDS = [
    "torch",
    pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.skipif(
        not backend.triton_available(), reason="triton not installed")]),
]  # fmt: skip


def _float64_loop(rewards, values, next_values, dones, gamma, lam):
    """discount_values step by step in float64; rewards and dones broadcast over the heads."""
    r, d = rewards.double().unsqueeze(-1), dones.double().unsqueeze(-1)
    v, nv = values.double(), next_values.double()
    adv, last = torch.zeros_like(v), torch.zeros_like(v[0])
    for t in reversed(range(v.shape[0])):
        last = r[t] + gamma * nv[t] - v[t] + gamma * lam * (1.0 - d[t]) * last
        adv[t] = last
    return adv, adv + v


@pytest.mark.parametrize("name", BACKENDS)
def test_buffer_compute_gae_over_several_value_heads(name, request):
    """Keys shaped (k,) with k > 1 (one value head per reward term): every head follows the
    recursion with the shared rewards and dones."""
    if name == "triton":
        request.getfixturevalue("interpreted_kernels")  # CPU tensors: the interpreter only
    T, N, k = 6, 5, 3
    g = torch.Generator().manual_seed(1)
    rewards, dones = torch.randn(T, N, generator=g), torch.rand(T, N, generator=g) < 0.3
    values, next_values = torch.randn(T, N, k, generator=g), torch.randn(T, N, k, generator=g)
    buf = ExperienceBuffer(N, T, device="cpu")
    buf.register_key("rewards")
    buf.register_key("dones", dtype=torch.bool)
    for key in ("value", "next_value", "advantages", "returns"):
        buf.register_key(key, (k,))
    for key, data in (("rewards", rewards), ("dones", dones)):
        buf.batch_update_data(key, data)
    for key, data in (("value", values), ("next_value", next_values)):
        buf.batch_update_data(key, data)
    with backend.use_backend(name):
        buf.compute_gae(0.99, 0.95)
    ref_adv, ref_ret = _float64_loop(rewards, values, next_values, dones, 0.99, 0.95)
    assert buf.advantages.shape == buf.returns.shape == (T, N, k)
    torch.testing.assert_close(buf.advantages.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buf.returns.double(), ref_ret, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref_adv[..., 0], ref_adv[..., 1])  # the heads really differ
    assert buf.make_dict()["advantages"].shape == (N * T, k)
