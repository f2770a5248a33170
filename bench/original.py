"""An eager reproduction of the original ProtoMotions data module, the baseline of bench/ and tests.

It behaves like ``protomotions.agents.utils.data`` as documented in shared/seed/: per-key copies
with ``buffer[index] = data``, a running ``store_dict`` sum, ``transpose(0, 1).reshape`` in
``make_dict``, a NumPy permutation and per-key fancy indexing in ``DictDataset`` (shorter tensors
indexed modulo their length, each key's length recorded when the dataset is built), and bare
``assert`` statements. It is written from that behaviour
for comparison only; it is not part of the library.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def swap_and_flatten01(arr: Tensor | None) -> Tensor | None:
    if arr is None:
        return arr
    s = arr.size()
    return arr.transpose(0, 1).reshape(s[0] * s[1], *s[2:])


class ExperienceBuffer(nn.Module):
    def __init__(self, num_envs: int, num_steps: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.store_dict: dict[str, float] = {}
        self._device = device

    def register_key(self, key: str, shape=(), dtype=torch.float) -> None:
        assert not hasattr(self, key), key
        buf = torch.zeros(
            (self.num_steps, self.num_envs) + tuple(shape), dtype=dtype, device=self._device
        )
        self.register_buffer(key, buf, persistent=False)
        self.store_dict[key] = 0

    def update_data(self, key: str, index: int, data: Tensor) -> None:
        assert not data.requires_grad
        getattr(self, key)[index] = data
        self.store_dict[key] += index + 1

    def total_sum(self) -> float:
        return (self.num_steps + 1) * (self.num_steps / 2)

    def batch_update_data(self, key: str, data: Tensor) -> None:
        assert not data.requires_grad
        getattr(self, key)[:] = data
        self.store_dict[key] = self.total_sum()

    def make_dict(self) -> dict[str, Tensor]:
        data = {k: swap_and_flatten01(v) for k, v in self.named_buffers()}
        for k, v in self.store_dict.items():
            assert v == self.total_sum(), f"Problem with '{k}', {v}, {self.total_sum()}"
            self.store_dict[k] = 0
        return data


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, batch_size: int, tensor_dict: dict[str, Tensor], shuffle: bool = False):
        assert len(tensor_dict) > 0
        self.lengths = {k: len(v) for k, v in tensor_dict.items()}
        self.num_tensors = max(self.lengths.values())
        self.batch_size = batch_size
        assert self.num_tensors % self.batch_size == 0, f"{self.num_tensors} {self.batch_size}"
        self.tensor_dict = tensor_dict
        self.do_shuffle = shuffle
        self.shuffled_to_original = np.arange(self.num_tensors)
        if shuffle:
            self.shuffle()

    def shuffle(self) -> None:
        self.shuffled_to_original = np.random.permutation(self.num_tensors)

    def num_batches(self) -> int:
        return self.num_tensors // self.batch_size

    def __len__(self) -> int:
        return self.num_batches()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        assert index < len(self), f"{index} {len(self)}"
        start = index * self.batch_size
        end = min((index + 1) * self.batch_size, self.num_tensors)
        rows = self.shuffled_to_original[start:end]
        # The current dict, with the lengths of the one the dataset was built from: a key
        # replaced by a longer tensor keeps its old modulo; a key added later is a KeyError.
        return {k: v[rows % self.lengths[k]] for k, v in self.tensor_dict.items()}
