"""Generalized advantage estimation (GAE) over a time-major rollout.

:func:`compute_gae` validates (host-side only: it never reads device memory) and dispatches:
the Triton kernel in ``rollout_buffers.kernels.gae`` (one launch) when
:func:`rollout_buffers.backend.use_triton` says so, else :func:`torch_gae`, the PyTorch
implementation that is also the reference the kernel tests compare against.

The recurrence is that of ProtoMotions' ``discount_values``::

    not_done = 1 - dones[t]
    delta    = rewards[t] + gamma * next_values[t] - values[t]
    adv[t]   = delta + gamma * lam * not_done * adv[t + 1]        (adv[T] = 0)
    ret[t]   = adv[t] + values[t]
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backend
from .errors import RolloutTypeError, RolloutValueError

__all__ = ["compute_gae", "torch_gae"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# PyTorch implementation (CPU path and reference)
# ---------------------------------------------------------------------------------------------


def _acc_dtype(values: Tensor) -> torch.dtype:
    return torch.float64 if values.dtype == torch.float64 else torch.float32


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@torch.no_grad()
def torch_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    dones: Tensor,
    gamma: float,
    lam: float,
    adv: Tensor,
    ret: Tensor,
) -> None:
    """Write GAE advantages into ``adv`` and returns into ``ret`` (arguments as in
    :func:`compute_gae`, already validated). Accumulates in fp32 (fp64 for fp64 values).

    Everything that does not depend on the recurrence (delta, the per-step coefficient) is
    computed for the whole rollout in a few vectorized ops; only one ``addcmul`` per step is
    sequential, written straight into ``adv`` when it has the accumulation dtype. No gradient:
    GAE targets are constants for the PPO loss.
    """
    acc = _acc_dtype(values)
    if rewards.dim() < values.dim():  # (T, N) broadcast over a value head of width k
        rewards = rewards.unsqueeze(-1)
    if dones.dim() < values.dim():
        dones = dones.unsqueeze(-1)
    v = values.to(acc)
    delta = torch.add(rewards.to(acc), next_values.to(acc), alpha=gamma).sub_(v)
    coef = torch.rsub(dones.to(acc), 1).mul_(gamma * lam)
    # Callers may write the outputs over an input (e.g. returns over values). delta and coef
    # are fresh tensors, so only `values` is read after this point: stage adv in a temporary
    # when it shares storage with values.
    direct = adv.dtype == acc and not _shares_storage(adv, values)
    acc_adv = adv if direct else torch.empty_like(delta)
    last = torch.zeros_like(delta[0])
    for t in range(values.shape[0] - 1, -1, -1):
        last = torch.addcmul(delta[t], coef[t], last, out=acc_adv[t])
    if ret.dtype == acc:
        torch.add(acc_adv, v, out=ret)
    else:
        ret.copy_(acc_adv + v)
    if not direct:
        adv.copy_(acc_adv)


# ---------------------------------------------------------------------------------------------
# Validation (host-side: shapes, dtypes, devices; never the data)
# ---------------------------------------------------------------------------------------------


def _shape(x: Sequence[int]) -> str:
    return str(tuple(x))


def _check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise RolloutTypeError(
            f"compute_gae: '{name}' must be a torch.Tensor, got {type(x).__name__}"
        )
    return x


def _check_values(values: Tensor) -> None:
    if values.dim() not in (2, 3):
        raise RolloutValueError(
            f"compute_gae: 'values' must have shape (num_steps, num_envs) or "
            f"(num_steps, num_envs, k), got shape {_shape(values.shape)}"
        )
    if values.dtype not in _FLOAT_DTYPES:
        raise RolloutValueError(
            f"compute_gae: 'values' must be floating point (float16, bfloat16, float32, "
            f"float64), got dtype {values.dtype}"
        )


def _check_like(name: str, x: Tensor, values: Tensor, broadcast: bool, float_only: bool) -> None:
    """``x`` on values' device with values' shape (or (T, N) when ``broadcast``) and a float
    (``float_only``) or bool / integer / float dtype."""
    if x.device != values.device:
        raise RolloutValueError(
            f"compute_gae: '{name}' is on device {x.device}, expected {values.device} (the "
            "device of 'values')"
        )
    shapes = [tuple(values.shape)]
    if broadcast and values.dim() == 3:
        shapes.append(tuple(values.shape[:2]))
    if tuple(x.shape) not in shapes:
        expected = " or ".join(_shape(s) for s in shapes)
        raise RolloutValueError(
            f"compute_gae: '{name}' has shape {_shape(x.shape)}, expected {expected} (from "
            f"'values' of shape {_shape(values.shape)})"
        )
    if x.dtype in _FLOAT_DTYPES:
        return
    if not float_only and not (x.is_floating_point() or x.is_complex()):
        return  # bool or integer
    kinds = "float16, bfloat16, float32 or float64"
    kinds = kinds if float_only else "bool, integer, " + kinds
    raise RolloutValueError(f"compute_gae: '{name}' must be {kinds}, got dtype {x.dtype}")


def _check_factor(name: str, x: object) -> float:
    # A tensor would need a device read (float(x)) on CUDA: ask for a Python number instead.
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise RolloutTypeError(
            f"compute_gae: '{name}' must be a Python float, got {type(x).__name__}"
        )
    return float(x)


def _check_out(out: object, values: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise RolloutTypeError(
            "compute_gae: 'out' must be a pair (advantages, returns) of tensors, got "
            f"{type(out).__name__}"
        )
    adv, ret = (_check_tensor(f"out[{i}]", x) for i, x in enumerate(out))
    for name, x in (("out[0]", adv), ("out[1]", ret)):
        _check_like(name, x, values, broadcast=False, float_only=True)
        if not x.is_contiguous():
            raise RolloutValueError(
                f"compute_gae: '{name}' must be contiguous (got strides {tuple(x.stride())} for "
                f"shape {_shape(x.shape)}); pass a contiguous tensor or a view of one, e.g. "
                "buffer.view(values.shape)"
            )
    if _overlap(adv, ret):
        raise RolloutValueError("compute_gae: 'out[0]' and 'out[1]' must not share memory")
    return adv, ret


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two contiguous tensors' byte ranges intersect (metadata only)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    dones: Tensor,
    gamma: float,
    lam: float,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and returns of a time-major rollout, in one pass.

    Same results as ProtoMotions' ``discount_values`` (``adv[t] = delta[t] + gamma * lam *
    (1 - dones[t]) * adv[t + 1]`` with ``delta[t] = rewards[t] + gamma * next_values[t] -
    values[t]``) plus ``returns = advantages + values``. Accumulates in fp32 whatever the
    storage dtype (fp64 when ``values`` is fp64). On CUDA (backend ``auto`` or ``triton``) this
    is a single kernel launch with no host synchronization. No gradient flows through it.

    Args:
        rewards: ``(num_steps, num_envs)`` or ``values``' shape; floating point.
        values: ``(num_steps, num_envs)`` or ``(num_steps, num_envs, k)``; float16, bfloat16,
            float32 or float64.
        next_values: ``values``' shape; floating point.
        dones: like ``rewards``; bool, integer or floating point (``not_done = 1 - dones``).
        gamma: discount factor, a Python float.
        lam: GAE lambda (ProtoMotions' ``tau``), a Python float.
        out: optional ``(advantages, returns)`` to write in place: contiguous floating-point
            tensors (or views of contiguous buffers, e.g. ``buffer.view(values.shape)``) with
            ``values``' shape and device, not sharing memory with each other. Results are
            cast to their dtype.

    Returns:
        ``(advantages, returns)``: ``out`` when given, else new tensors with ``values``' shape,
        dtype and device.

    Raises:
        RolloutTypeError: an argument is not a tensor, ``gamma`` / ``lam`` are not numbers, or
            ``out`` is not a pair.
        RolloutValueError: a shape, dtype or device does not match, or an ``out`` tensor is
            not contiguous.

    Examples:
        >>> adv, ret = compute_gae(rewards, values, next_values, dones, 0.99, 0.95)
    """
    tensors = dict(rewards=rewards, values=values, next_values=next_values, dones=dones)
    for name, x in tensors.items():
        _check_tensor(name, x)
    _check_values(values)
    _check_like("rewards", rewards, values, broadcast=True, float_only=True)
    _check_like("next_values", next_values, values, broadcast=False, float_only=True)
    _check_like("dones", dones, values, broadcast=True, float_only=False)
    gamma, lam = _check_factor("gamma", gamma), _check_factor("lam", lam)
    if out is None:
        adv = torch.empty(values.shape, dtype=values.dtype, device=values.device)
        ret = torch.empty_like(adv)
    else:
        adv, ret = _check_out(out, values)
    if values.numel() == 0:
        return adv, ret
    if backend.use_triton(values.device):
        from .kernels import gae as _k  # lazy: importing triton costs ~1 s, CPU users skip it

        # The kernel reads and writes each column in one backward pass: an output written over
        # an input it reads at another step (say ret over values while next_values is a
        # shifted view of it) would be read after it was overwritten. Copy such inputs first.
        r, v, nv, d = (
            x.clone() if _shares_storage(x, adv) or _shares_storage(x, ret) else x
            for x in (rewards, values, next_values, dones)
        )
        _k.gae(r, v, nv, d, adv, ret, gamma, lam)
    else:
        torch_gae(rewards, values, next_values, dones, gamma, lam, adv, ret)
    return adv, ret
