"""DictDataset: shuffled minibatches over a dict of tensors, a drop-in for ProtoMotions' class."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import _guards, backend, ops
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
from .flatdict import FlatDict

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
        if not (
            isinstance(tensor_dict, dict)  # a C check; Mapping's is an ABC's, ~10x slower
            or isinstance(tensor_dict, Mapping)
            or hasattr(tensor_dict, "items")
        ):
            raise RolloutNotAMappingError(
                f"DictDataset: tensor_dict must be a mapping of key -> tensor, received {type(tensor_dict).__name__}"
            )
        device = None
        lengths: dict[Any, int] = {}
        # One pass, as cheap as the original's {key: len(value)}: a FlatDict's pending values
        # are their (T, N, ...) storages (T * N rows), refused if written behind its back.
        flat = type(tensor_dict) is FlatDict
        for item in tensor_dict._sources() if flat else tensor_dict.items():
            key, value = item[0], item[1]
            if type(value) is not Tensor and not isinstance(value, Tensor):
                raise RolloutTypeError(
                    f"{key}: DictDataset expected a tensor, received {type(value).__name__}"
                )
            dim = value.dim()
            rows = item[2] if flat else value.shape[0] if dim else 0
            if rows == 0 or dim == 0:
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
            lengths[key] = rows
        if not lengths:  # not len(tensor_dict): a TensorDict's len() is its batch size
            raise RolloutValueError(
                "DictDataset: tensor_dict is empty; pass at least one key -> tensor"
            )
        # 0: the original's `num_tensors % batch_size` raised ZeroDivisionError.
        if type(batch_size) is not int or batch_size <= 0:
            batch_size = _positive_int(
                "DictDataset: batch_size", batch_size, RolloutZeroDivisionError
            )
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
        self._wrap = False  # the permutation may hold entries outside [0, num_tensors)
        self._pinned: Tensor | None = None  # the host side of an asynchronous copy in flight
        if shuffle:
            self.shuffle()
        else:
            self._use_permutation(
                torch.from_numpy(np.arange(num_tensors, dtype=np.int64))  # 1 us, torch's: 8
                if device.type == "cpu"
                else torch.arange(num_tensors, device=device)
            )
        # Each key's length, fixed now as the original fixed it; and the gather prepared for
        # the tensor_dict the last batch read (its keys and tensors, or a FlatDict's state),
        # so that a batch re-validates and re-prepares only when tensor_dict changed. The
        # first batch prepares it (the tensors were validated just above).
        self._lengths = lengths
        self._plan: _Plan | None = None

    def _adopt_permutation(self, perm: Any) -> Tensor:
        """A permutation the caller assigned to ``shuffled_to_original`` (the original kept a
        NumPy array there) or changed in place, made what the gather reads: 1-D int64,
        contiguous, on the data's device, ``num_tensors`` long. Checked on the host, once per
        change."""
        given = perm
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
        if isinstance(given, Tensor):
            dev = perm.to(device=self._device, dtype=torch.int64).contiguous()
            self._perm_seen, self._perm_held = _guards.contents(given), given
        else:  # an array, as the original kept: read (copied) at every batch, as the original
            # read it: an edit through NumPy moves no version counter
            dev = perm.to(device=self._device, dtype=torch.int64, copy=True)
            self._perm_seen = self._perm_held = None
        self._perm = dev
        return dev

    def _use_permutation(self, perm: Tensor) -> None:
        """Make ``perm`` (1-D int64 on the data's device, entries in ``[0, num_tensors)``) the
        permutation, as ``shuffled_to_original`` and as what the gather reads."""
        self.shuffled_to_original = self._perm = perm
        # What it holds now (address, version, layout): an assignment, an in-place edit,
        # `.data =` or `copy_` since then changes it. It is kept, so that its address cannot
        # come back with another permutation while this stamp stands for it.
        self._perm_seen, self._perm_held = _guards.contents(perm), perm
        self._wrap = False  # a drawn permutation holds 0..num_tensors-1 only

    def shuffle(self) -> None:
        """Draw a new permutation: ``np.random.permutation(num_tensors)``, as the original did,
        or ``torch.randperm`` on the device from ``generator`` when one was given."""
        if self.generator is not None:
            perm = torch.randperm(self.num_tensors, device=self._device, generator=self.generator)
        else:
            perm = self._host_to_device(np.random.permutation(self.num_tensors))
        self._use_permutation(perm)

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
        try:  # _guards.contents, inlined (no Python call per minibatch)
            seen = perm.data_ptr(), perm._version, perm.shape, perm.stride()
        except (AttributeError, RuntimeError):  # an array (the original kept NumPy's), or an
            seen = None  # inference tensor (no version counter): checked every time
        if seen is None or seen != self._perm_seen:  # assigned, or changed since checked
            perm = self._adopt_permutation(perm)
        else:
            perm = self._perm  # what the gather reads: the same tensor, or its int64 copy
        # Read tensor_dict on every call, as the original did: code that edits it in place after
        # building the dataset (re-normalized advantages, say) gets what it wrote. The prepared
        # gather is reused while tensor_dict holds the same keys and tensors, each still at the
        # address, version and layout it was prepared for (a gather may read a copy of a source
        # whose rows are not dense, or a descriptor table holding its address).
        td = self.tensor_dict
        plan = self._plan
        if type(td) is FlatDict:
            # Under the mapping's lock: the buffer's copy-on-write before a write (another
            # thread) takes it too, so the storages cannot change between the check and the
            # gather that reads them.
            with td._lock:
                if type(td) is FlatDict:
                    if td._pkeys:  # a pending value written behind the API's back: refuse
                        td._check_fresh()  # (one torch moved, share_memory_: bumps _state)
                    if plan is None or plan.source is not td or plan.state != td._state:
                        plan = self._prepare(td)
                    elif plan.plain and plan.stamps != _stamps(plan.plain):
                        plan = self._prepare(td)
                    gather = plan.gathers.get((backend._backend, self._wrap))
                    if gather is None:
                        gather = plan.ready(self)
                    outs = gather(perm, index * self.batch_size)
                    return dict(zip(plan.keys, outs))
            plan = self._prepare(td)  # every value made meanwhile: a plain mapping now
        else:
            keys = tuple(td)
            values = list(td.values())
            if (
                plan is None
                or plan.keys != keys
                or len(values) != len(plan.values)
                or not all(map(operator.is_, values, plan.values))
                or plan.stamps != _stamps(values)
            ):
                plan = self._prepare(td)
        gather = plan.gathers.get((backend._backend, self._wrap))
        if gather is None:
            gather = plan.ready(self)
        outs = gather(perm, index * self.batch_size)
        return dict(zip(plan.keys, outs))

    def _prepare(self, td: Any) -> _Plan:
        """Validate the current ``tensor_dict`` against the recorded lengths and prepare its
        gather: plain tensors by rows, a FlatDict's pending values straight from the buffer's
        ``(T, N, ...)`` storages (no flattened copy), all in one launch on CUDA."""
        keys, srcs, modes, lengths, served = [], [], [], [], []
        for key, value, rows, pending in _sources(td):
            length = self._recorded_length(key, value, rows)
            keys.append(key)
            srcs.append(value)
            modes.append(ops.ENV_MAJOR if pending is not False else ops.ROWS)
            lengths.append(length)
            # A compact key's storage is served in its key's dtype, widened in the gather.
            served.append(None if pending is False or pending == value.dtype else pending)
        out_dtypes = served if any(d is not None for d in served) else None
        plan = self._plan = _Plan(tuple(keys), srcs, modes, lengths, td, out_dtypes)
        return plan

    def _recorded_length(self, key: Any, value: Any, rows: int) -> int:
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
        if value.dim() == 0 or rows < length:
            rows = "no dim 0" if value.dim() == 0 else f"{rows} rows"
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


class _Plan:
    """What a dataset prepared for one state of its ``tensor_dict``: the keys and sources it
    validated, and their gather for each backend and permutation kind it ran under (built at
    the first batch that needs it)."""

    __slots__ = ("keys", "values", "modes", "lengths", "out_dtypes", "source", "state", "plain",
                 "stamps", "gathers")  # fmt: skip

    def __init__(
        self, keys: tuple, values: list, modes: list, lengths: list, source: Any, out_dtypes=None
    ):
        self.keys, self.values, self.modes, self.lengths = keys, values, modes, lengths
        self.out_dtypes = out_dtypes  # per source: the dtype it is served in (None: its own)
        self.source = source
        self.state = source._state if type(source) is FlatDict else None
        # The sources a FlatDict does not watch itself (all but its pending storages), and what
        # each held when prepared (see _stamps).
        self.plain = [v for v, m in zip(values, modes) if m == ops.ROWS]
        self.stamps = _stamps(self.plain if type(source) is FlatDict else values)
        self.gathers: dict[tuple, Any] = {}  # (backend name, wrap) -> gather

    def ready(self, ds: DictDataset):
        g = ops.gatherer(
            self.values, self.modes, self.lengths, ds.num_tensors, ds.batch_size, ds._wrap,
            self.out_dtypes,
        )  # fmt: skip
        self.gathers[(backend._backend, ds._wrap)] = g
        return g


def _stamps(values: list) -> list:
    """:func:`_guards.contents` of every tensor (inlined: this runs for every minibatch)."""
    try:
        return [(v.data_ptr(), v._version, v.shape, v.stride()) for v in values]
    except RuntimeError:  # an inference tensor: no version counter
        return [_guards.contents(v) for v in values]


def _sources(td: Any) -> list[tuple[Any, Any, int, Any]]:
    """``(key, tensor, rows, pending)`` of a tensor_dict, without materializing a FlatDict: its
    pending values are their ``(T, N, ...)`` storages, of ``T * N`` rows (``pending``: the
    dtype the value is served in; ``False`` for a plain tensor)."""
    if type(td) is FlatDict:
        return td._sources()
    out = []
    for key, value in td.items():
        rows = value.shape[0] if isinstance(value, Tensor) and value.dim() else 0
        out.append((key, value, rows, False))
    return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Devices equal, reading a missing index as the current one (``cuda`` vs ``cuda:0``)."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
