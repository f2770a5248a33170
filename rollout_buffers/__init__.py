"""rollout_buffers: rollout storage for GPU reinforcement learning.

A drop-in replacement for the data module of NVIDIA's ProtoMotions
(``protomotions.agents.utils.data``): :class:`ExperienceBuffer`, :class:`DictDataset` and
:func:`swap_and_flatten01`, with fused Triton kernels for CUDA tensors and a pure-PyTorch path
everywhere else. See the README for the compatibility promise and the backends.
"""

from ._hostmem import host_pool, set_host_pool
from .backend import get_backend, set_backend, use_backend
from .buffer import ExperienceBuffer, swap_and_flatten01
from .dataset import DictDataset
from .errors import (
    BackendUnavailableError,
    RolloutArgumentTypeError,
    RolloutBuffersError,
    RolloutDeviceError,
    RolloutDimensionError,
    RolloutIndexError,
    RolloutIndexTensorError,
    RolloutIndexTypeError,
    RolloutKeyError,
    RolloutKeyTypeError,
    RolloutLayoutError,
    RolloutNotAMappingError,
    RolloutNotATensorError,
    RolloutOverlapError,
    RolloutShapeError,
    RolloutTypeError,
    RolloutUnknownKeyError,
    RolloutValueError,
    RolloutZeroDivisionError,
)
from .flatdict import FlatDict, StaleRolloutError, lazy_make_dict, set_lazy_make_dict
from .gae import compute_gae
from .sequences import (
    SequenceDataset,
    TrajectoryDataset,
    split_and_pad_trajectories,
    unpad_trajectories,
)

__version__ = "0.1.0"

__all__ = [
    "ExperienceBuffer",
    "DictDataset",
    "FlatDict",
    "StaleRolloutError",
    "lazy_make_dict",
    "set_lazy_make_dict",
    "host_pool",
    "set_host_pool",
    "swap_and_flatten01",
    "compute_gae",
    "SequenceDataset",
    "TrajectoryDataset",
    "split_and_pad_trajectories",
    "unpad_trajectories",
    "get_backend",
    "set_backend",
    "use_backend",
    "BackendUnavailableError",
    "RolloutBuffersError",
    "RolloutIndexError",
    "RolloutKeyError",
    "RolloutTypeError",
    "RolloutValueError",
    "RolloutShapeError",
    "RolloutDeviceError",
    "RolloutOverlapError",
    "RolloutArgumentTypeError",
    "RolloutZeroDivisionError",
    "RolloutDimensionError",
    "RolloutUnknownKeyError",
    "RolloutKeyTypeError",
    "RolloutNotATensorError",
    "RolloutNotAMappingError",
    "RolloutLayoutError",
    "RolloutIndexTypeError",
    "RolloutIndexTensorError",
]
