"""ExperienceBuffer.compute_gae: reads named keys, writes advantages/returns in place, marks them."""

from __future__ import annotations

import pytest
import torch

from rollout_buffers import ExperienceBuffer, RolloutValueError, compute_gae


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
