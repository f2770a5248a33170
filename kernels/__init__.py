"""Fused Triton kernels for the three hot paths; imported as ``rollout_buffers.kernels``.

Each launcher moves raw bytes for many keys in one launch and knows nothing of buffers or
datasets: :func:`step_write` (a rollout step), :func:`transpose_flatten` (make_dict) and
:func:`permuted_gather` (a minibatch). Each also comes prepared (:class:`StepWriter`,
:class:`Flattener`, :class:`Gatherer`): built once for fixed sources or destinations, then
called per step / flatten / minibatch through a cached launch plan (Triton's compiled
launcher called directly; see ``_common.LaunchPlan``).

Dtypes: the step write converts each source to its destination's dtype in the same launch,
and the flatten and the gather serve each source in an output dtype of the caller's choice
(``out_dtypes``: a bfloat16 storage served as float32), wherever :func:`converts` says the
kernels match ``dst.copy_(src)`` bit for bit (see ``_convert.py`` for what and how).
"""

if __name__ == "kernels":  # imported through the repository root on sys.path
    # `kernels` is Hugging Face's package (transformers probes for it): refuse to stand in.
    raise ImportError(
        "this folder is rollout_buffers' kernels, installed as `rollout_buffers.kernels`; "
        "a bare `import kernels` must not load it (that name belongs to Hugging Face's package)"
    )

from ._convert import converts  # noqa: E402
from .permuted_gather import (  # noqa: E402
    CHUNKS,
    ENV_MAJOR,
    ROWS,
    Gatherer,
    gatherer,
    permuted_gather,
)
from .step_write import StepWriter, step_write, step_writer  # noqa: E402
from .transpose_flatten import Flattener, flattener, transpose_flatten  # noqa: E402

__all__ = [
    "converts",
    "step_write",
    "transpose_flatten",
    "permuted_gather",
    "StepWriter",
    "Flattener",
    "Gatherer",
    "step_writer",
    "flattener",
    "gatherer",
    "ROWS",
    "ENV_MAJOR",
    "CHUNKS",
]
