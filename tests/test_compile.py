"""torch.compile(fullgraph=True) can trace a rollout step that calls ``update_step``.

Under compilation the step write goes through the ``rollout_buffers::update_step`` custom op
(opaque to the compiler, mutating the buffers, marking the steps); eager calls keep the direct path.
"""

import pytest
import torch

from rollout_buffers import ExperienceBuffer


def _buffer():
    buf = ExperienceBuffer(num_envs=5, num_steps=3, device="cpu")
    buf.register_key("obs", shape=(4,))
    buf.register_key("rewards")
    buf.register_key("dones", dtype=torch.bool)
    return buf


def _policy_step(buf, index, obs, w):
    actions = torch.tanh(obs @ w)
    rewards = actions.sum(-1)
    buf.update_step(index, {"obs": obs, "rewards": rewards, "dones": rewards > 0})
    return actions


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_update_step_compiles_with_fullgraph(compiler):
    torch._dynamo.reset()
    buf, ref = _buffer(), _buffer()
    step = torch.compile(_policy_step, fullgraph=True, backend=compiler)
    w = torch.randn(4, 4)
    for index in range(3):
        obs = torch.randn(5, 4)
        out = step(buf, index, obs, w)
        assert torch.equal(out, _policy_step(ref, index, obs, w))
    for key in ("obs", "rewards", "dones"):
        assert torch.equal(getattr(buf, key), getattr(ref, key)), key
    assert buf.store_dict == ref.store_dict
    assert buf.make_dict().keys() == ref.make_dict().keys()


def test_compiled_update_step_tracks_steps_per_buffer():
    """The step bookkeeping runs when the compiled code runs, on the buffer it was given."""
    torch._dynamo.reset()
    step = torch.compile(_policy_step, fullgraph=True, backend="aot_eager")
    w = torch.randn(4, 4)
    first, second = _buffer(), _buffer()
    for index in range(3):
        step(first, index, torch.randn(5, 4), w)
    step(second, 1, torch.randn(5, 4), w)
    assert first.store_dict == {"obs": 6, "rewards": 6, "dones": 6}
    assert second.store_dict == {"obs": 2, "rewards": 2, "dones": 2}
    first.make_dict()
    with pytest.raises(ValueError, match="Problem with"):
        second.make_dict()


def test_update_step_custom_op_is_registered_with_mutation():
    op = torch.ops.rollout_buffers.update_step.default
    assert op._schema.arguments[0].alias_info is not None  # dsts is mutated
    buf = _buffer()
    srcs = [torch.ones(5, 4), torch.full((5,), 2.0)]
    settled = torch.ops.rollout_buffers.settle([buf.obs, buf.rewards], buf._token)
    torch.ops.rollout_buffers.update_step(
        [buf.obs, buf.rewards], 1, srcs, buf._token, "obs\0rewards", settled
    )
    assert torch.equal(buf.obs[1], srcs[0]) and torch.equal(buf.rewards[1], srcs[1])
    assert not buf.obs[0].any() and not buf.obs[2].any()
    assert buf.store_dict == {"obs": 2, "rewards": 2, "dones": 0}
