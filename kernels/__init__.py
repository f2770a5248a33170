"""Fused Triton kernels for the three hot paths; imported as ``rollout_buffers.kernels``.

Each launcher moves raw bytes for many keys in one launch and knows nothing of buffers or
datasets: :func:`step_write` (a rollout step), :func:`transpose_flatten` (make_dict) and
:func:`permuted_gather` (a minibatch).
"""

from .permuted_gather import permuted_gather
from .step_write import step_write
from .transpose_flatten import transpose_flatten

__all__ = ["step_write", "transpose_flatten", "permuted_gather"]
