"""Fused Triton kernels for the three hot paths; imported as ``rollout_buffers.kernels``.

Each launcher moves raw bytes for many keys in one launch and knows nothing of buffers or
datasets: :func:`step_write` (a rollout step), :func:`transpose_flatten` (make_dict) and
:func:`permuted_gather` (a minibatch).
"""

if __name__ == "kernels":  # imported through the repository root on sys.path
    # `kernels` is Hugging Face's package (transformers probes for it): refuse to stand in.
    raise ImportError(
        "this folder is rollout_buffers' kernels, installed as `rollout_buffers.kernels`; "
        "a bare `import kernels` must not load it (that name belongs to Hugging Face's package)"
    )

from .permuted_gather import permuted_gather  # noqa: E402
from .step_write import step_write  # noqa: E402
from .transpose_flatten import transpose_flatten  # noqa: E402

__all__ = ["step_write", "transpose_flatten", "permuted_gather"]
