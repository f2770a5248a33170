"""DictDataset: shuffled minibatches over a dict of tensors, a drop-in for ProtoMotions' class."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import ops
from ._index import as_index
from ._index import positive_int as _positive_int
from ._transfer import host_to_device
from .errors import (
    RolloutArgumentTypeError,
    RolloutDeviceError,
    RolloutIndexError,
    RolloutKeyError,
    RolloutNotAMappingError,
    RolloutTypeError,
    RolloutValueError,
    RolloutZeroDivisionError,
)

__all__ = ["DictDataset"]


class DictDataset(Dataset):
    """Minibatches of a dictionary of tensors, optionally shuffled.

    Tensors may differ in length along dim 0. The longest sets ``num_tensors``, which must be
    divisible by ``batch_size``; a shorter tensor is indexed modulo its length (for example an
    expert-data key shorter than the rollout). As in the original, ``tensor_dict`` is read on
    every batch but each key's length is fixed when the dataset is built: a key replaced later
    by a longer tensor is still indexed modulo its old length, a key added later is a KeyError,
    and one replaced by a shorter tensor is refused (an IndexError: it would be read past its
    end).

    Shuffling draws what the original drew: ``np.random.permutation(num_tensors)`` from NumPy's
    global RNG, so a run seeded as before gets the same minibatches, and torch's global RNG is
    left alone (a ProtoMotions run samples its actions from it). The permutation goes to the
    tensors' device once per shuffle (pinned, non-blocking), not once per minibatch. With
    ``generator=`` it is drawn on the device with ``torch.randperm`` instead: no host work.

    Args:
        batch_size: rows per minibatch; must divide ``num_tensors``.
        tensor_dict: key -> tensor, all on one device.
        shuffle: draw a random permutation now (call :meth:`shuffle` for a new one).
        generator: a ``torch.Generator`` on the tensors' device: shuffles are drawn from it, on
            the device, instead of from NumPy's global RNG.

    Example:
        >>> data = {"obs": obs_tensor, "actions": action_tensor}
        >>> dataset = DictDataset(batch_size=256, tensor_dict=data, shuffle=True)
        >>> for batch in dataset:
        >>>     train_on_batch(batch)
    """

    def __init__(
        self,
        batch_size: int,
        tensor_dict: Mapping[str, Tensor],
        shuffle: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(tensor_dict, Mapping) and not hasattr(tensor_dict, "items"):
            raise RolloutNotAMappingError(
                f"DictDataset: tensor_dict must be a mapping of key -> tensor, received {type(tensor_dict).__name__}"
            )
        device = None
        lengths: dict[Any, int] = {}
        values: list[Tensor] = []
        for key, value in tensor_dict.items():
            if not isinstance(value, Tensor):
                raise RolloutTypeError(
                    f"{key}: DictDataset expected a tensor, received {type(value).__name__}"
                )
            if value.dim() == 0 or value.shape[0] == 0:
                # The original's len() of a 0-dim tensor raised a TypeError; no rows at all it
                # accepted, and failed on the first batch.
                raise (RolloutArgumentTypeError if value.dim() == 0 else RolloutValueError)(
                    f"{key}: DictDataset expected a tensor with at least one row along dim 0, "
                    f"received shape {tuple(value.shape)}"
                )
            if value.requires_grad:
                raise RolloutValueError(
                    f"{key}: DictDataset received a tensor with requires_grad=True; minibatches "
                    f"carry no autograd history: pass tensor.detach()"
                )
            if device is None:
                device, first = value.device, key
            elif value.device != device:
                raise RolloutDeviceError(
                    f"{key}: every tensor must be on one device: '{first}' is on {device}, "
                    f"'{key}' is on {value.device}"
                )
            lengths[key] = value.shape[0]
            values.append(value)
        if not lengths:  # not len(tensor_dict): a TensorDict's len() is its batch size
            raise RolloutValueError(
                "DictDataset: tensor_dict is empty; pass at least one key -> tensor"
            )
        # 0: the original's `num_tensors % batch_size` raised ZeroDivisionError.
        batch_size = _positive_int("DictDataset: batch_size", batch_size, RolloutZeroDivisionError)
        num_tensors = max(lengths.values())
        if num_tensors % batch_size:
            longest = max(lengths, key=lengths.get)
            divisors = [d for d in range(1, num_tensors + 1) if num_tensors % d == 0]
            near = sorted(divisors, key=lambda d: abs(d - batch_size))[:2]
            raise RolloutValueError(
                f"{num_tensors} {batch_size}: batch_size {batch_size} does not divide the number "
                f"of rows {num_tensors} (the length of '{longest}'); choose a batch_size that "
                f"divides it (nearest: {', '.join(map(str, sorted(near)))}), or change "
                f"num_envs * num_steps / num_minibatches"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise RolloutTypeError(
                f"DictDataset: generator must be a torch.Generator or None, received "
                f"{type(generator).__name__}"
            )
        if generator is not None and not _same_device(generator.device, device):
            raise RolloutDeviceError(
                f"DictDataset: the generator is on {generator.device}, the tensors on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
        self.batch_size = batch_size
        self.tensor_dict = tensor_dict
        self.do_shuffle = shuffle
        self.num_tensors = num_tensors
        self.generator = generator
        self._device = device
        self.shuffled_to_original: Tensor = torch.arange(num_tensors, device=device)
        self._perm_checked: Tensor | None = self.shuffled_to_original
        self._wrap = False  # the permutation may hold entries outside [0, num_tensors)
        self._pinned: Tensor | None = None  # the host side of an asynchronous copy in flight
        # Each key's length, fixed now as the original fixed it; and the (key, tensor) objects
        # the last batch read, so that a batch re-validates only when tensor_dict changed.
        self._lengths = lengths
        self._seen_keys: list = list(lengths)
        self._seen_values: list[Tensor] = values
        self._seen_lengths: list[int] = list(lengths.values())
        if shuffle:
            self.shuffle()

    def _adopt_permutation(self, perm: Any) -> Tensor:
        """A permutation assigned to ``shuffled_to_original`` by the caller (the original kept
        a NumPy array there), made what the gather reads: 1-D int64, contiguous, on the data's
        device, ``num_tensors`` long. Checked once per new object, on the host."""
        try:
            perm = torch.as_tensor(perm)
        except Exception as exc:
            raise RolloutTypeError(
                f"shuffled_to_original must be a 1-D integer tensor or array, received "
                f"{type(perm).__name__}: {exc}"
            ) from None
        if perm.dim() != 1 or perm.shape[0] != self.num_tensors or perm.is_floating_point():
            raise RolloutValueError(
                f"shuffled_to_original must be a 1-D integer permutation of length "
                f"{self.num_tensors}, received shape {tuple(perm.shape)}, dtype {perm.dtype}"
            )
        # The original took every entry modulo each key's length, so an entry outside
        # [0, n) wraps. On the host that is known for free; a device tensor is not read
        # (that would synchronize): its batches then take the modulo for every key.
        self._wrap = perm.device.type != "cpu" or (
            perm.numel() > 0 and bool((perm.min() < 0) | (perm.max() >= self.num_tensors))
        )
        perm = perm.to(device=self._device, dtype=torch.int64).contiguous()
        self.shuffled_to_original = self._perm_checked = perm
        return perm

    def shuffle(self) -> None:
        """Draw a new permutation: ``np.random.permutation(num_tensors)``, as the original did,
        or ``torch.randperm`` on the device from ``generator`` when one was given."""
        if self.generator is not None:
            perm = torch.randperm(self.num_tensors, device=self._device, generator=self.generator)
        else:
            perm = self._host_to_device(np.random.permutation(self.num_tensors))
        self.shuffled_to_original = self._perm_checked = perm
        self._wrap = False  # a drawn permutation holds 0..num_tensors-1 only

    def _host_to_device(self, perm: np.ndarray) -> Tensor:
        """A NumPy permutation as an int64 tensor on the data's device, without synchronizing:
        on CUDA through pinned memory with a non-blocking copy, the pinned buffer kept until the
        next shuffle (the copy may still be reading it when this returns)."""
        perm, pinned = host_to_device(perm, self._device)
        if pinned is not None:
            self._pinned = pinned
        return perm

    def num_batches(self) -> int:
        """``num_tensors // batch_size``."""
        return self.num_tensors // self.batch_size

    def __len__(self) -> int:
        return self.num_batches()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Minibatch ``index``: ``{key: tensor[perm[i*B:(i+1)*B] % len(tensor)]}``.

        Negative ``index`` counts from the end; out of range raises ``IndexError`` (which also
        ends ``for batch in dataset``).
        """
        n = self.num_tensors // self.batch_size
        if type(index) is not int:
            index = as_index(index, "batch index")
        if not -n <= index < n:
            raise RolloutIndexError(
                f"{index} {n}: batch index {index} is out of range for {n} batches"
            )
        if index < 0:
            index += n
        perm = self.shuffled_to_original
        if perm is not self._perm_checked:  # assigned from outside since the last batch
            perm = self._adopt_permutation(perm)
        # Read tensor_dict on every call, as the original did: code that edits it in place after
        # building the dataset (re-normalized advantages, say) gets what it wrote.
        td = self.tensor_dict
        keys, srcs = list(td.keys()), list(td.values())
        lengths = self._seen_lengths
        if not (
            len(srcs) == len(self._seen_values)
            and all(map(operator.is_, srcs, self._seen_values))
            and all(map(operator.is_, keys, self._seen_keys))
        ):
            lengths = self._recorded_lengths(keys, srcs)
        start = index * self.batch_size
        outs = ops.gather(srcs, perm, start, self.batch_size, self._wrap, lengths)
        return dict(zip(keys, outs))

    def _recorded_lengths(self, keys: list, srcs: list) -> list[int]:
        """The length each key had when the dataset was built, for the current ``tensor_dict``
        (which changed since the last batch); every key and tensor checked again, once."""
        lengths = [self._recorded_length(key, value) for key, value in zip(keys, srcs)]
        self._seen_keys, self._seen_values, self._seen_lengths = keys, srcs, lengths
        return lengths

    def _recorded_length(self, key: Any, value: Any) -> int:
        length = self._lengths.get(key)
        if length is None:
            raise RolloutKeyError(
                f"{key}: key {key!r} was added to tensor_dict after the dataset was built; "
                f"DictDataset fixes its keys and their lengths when it is built, as the original "
                f"did (keys: {list(self._lengths)}): build a new DictDataset"
            )
        if not isinstance(value, Tensor):
            raise RolloutTypeError(
                f"{key}: DictDataset expected a tensor, received {type(value).__name__}"
            )
        if value.dim() == 0 or value.shape[0] < length:
            rows = "no dim 0" if value.dim() == 0 else f"{value.shape[0]} rows"
            raise RolloutIndexError(
                f"{key}: tensor_dict[{key!r}] now has {rows}, fewer than the {length} it had "
                f"when the dataset was built; its rows are taken modulo {length}, as the "
                f"original did, and would be read past its end: build a new DictDataset"
            )
        if value.device != self._device:
            raise RolloutDeviceError(
                f"{key}: tensor_dict[{key!r}] is now on {value.device}, the dataset's other "
                f"tensors and permutation on {self._device}"
            )
        if value.requires_grad:
            raise RolloutValueError(
                f"{key}: DictDataset received a tensor with requires_grad=True; minibatches "
                f"carry no autograd history: pass tensor.detach()"
            )
        return length

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for i in range(len(self)):
            yield self[i]


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Devices equal, reading a missing index as the current one (``cuda`` vs ``cuda:0``)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
