"""Minibatches of sequences for recurrent (LSTM / GRU) policies.

Two layouts, both read from the time-major storages of a rollout (``(num_steps, num_envs,
*shape)``: an :class:`~rollout_buffers.ExperienceBuffer`'s keys, or a mapping of such tensors):

- :class:`SequenceDataset`: every env's rollout cut into chunks of ``seq_len`` steps,
  minibatches of ``batch_size`` chunks, shuffled across (env, chunk). Fixed shapes, no host
  synchronization, one gather launch per minibatch for every key on CUDA (CUDA-graph
  capturable after a warm-up call). A ``resets`` mask says where the recurrent state restarts
  inside a chunk; hidden states stored per step come at each chunk's first step.
- rsl_rl's layout, trajectories cut at dones and padded: :func:`split_and_pad_trajectories`,
  :func:`unpad_trajectories` (bit-identical to rsl_rl's functions of those names) and
  :class:`TrajectoryDataset` (minibatches of envs as rsl_rl's ``recurrent_mini_batch_generator``
  serves them, or shuffled). One host synchronization per rollout (the number of trajectories),
  none per minibatch.

Validation is host-side only and happens when a dataset is built: it never reads device
memory. Every error names the key, what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import _guards, ops
from ._index import as_index
from ._index import positive_int as _positive_int
from ._transfer import host_to_device
from .buffer import ExperienceBuffer
from .errors import (
    RolloutDeviceError,
    RolloutIndexError,
    RolloutKeyError,
    RolloutLayoutError,
    RolloutNotAMappingError,
    RolloutNotATensorError,
    RolloutShapeError,
    RolloutTypeError,
    RolloutUnknownKeyError,
    RolloutValueError,
)

__all__ = [
    "SequenceDataset",
    "TrajectoryDataset",
    "split_and_pad_trajectories",
    "unpad_trajectories",
]

#: The output key of the restart mask (SequenceDataset) and of the validity mask
#: (TrajectoryDataset); a storage key of that name is refused.
RESETS, MASKS = "resets", "masks"


# ---------------------------------------------------------------------------------------------
# Validation shared by both datasets (host-side only)
# ---------------------------------------------------------------------------------------------


def _storages(source: Any, where: str) -> dict[str, Tensor]:
    """key -> ``(T, N, *shape)`` tensor: an ExperienceBuffer's storages, or a mapping's values."""
    if isinstance(source, ExperienceBuffer):
        return {key: getattr(source, key) for key in source.keys()}
    if not isinstance(source, Mapping) and not hasattr(source, "items"):
        raise RolloutNotAMappingError(
            f"{where}: expected an ExperienceBuffer or a mapping of key -> (num_steps, num_envs, "
            f"...) tensor, received {type(source).__name__}"
        )
    return dict(source.items())


def _served(source: Any) -> dict[str, torch.dtype]:
    """key -> the dtype a compact key of an ExperienceBuffer is served in (its storage, what
    the dataset reads, is narrower); empty for a mapping of tensors (served as they are)."""
    return dict(source._served) if isinstance(source, ExperienceBuffer) else {}


def _names(value: Any, what: str, where: str) -> list[str]:
    """A key or a sequence of keys, as a list."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(k, str) for k in value):
        raise RolloutTypeError(
            f"{where}: {what} must be a key or a sequence of keys (str), received {value!r}"
        )
    return list(value)


def _select(
    storages: dict[str, Tensor],
    keys: Any,
    dones: str | None,
    hidden: Any,
    extra: Sequence[tuple[str, Any]],
    reserved: str,
    where: str,
) -> tuple[list[str], list[str], list[list[str]]]:
    """The data keys (default: every key not named elsewhere), the hidden keys and the ``extra``
    groups, each checked to exist, not to repeat and not to be named ``reserved``."""
    hidden = _names(hidden, "hidden", where)
    groups = [_names(v, name, where) for name, v in extra]
    named = {k for g in (hidden, *groups) for k in g}
    keys = [k for k in storages if k not in named] if keys is None else _names(keys, "keys", where)
    available = list(storages)
    for what, names in (
        ("keys", keys),
        ("hidden", hidden),
        *((name, g) for (name, _), g in zip(extra, groups)),
        ("dones", [] if dones is None else [dones]),
    ):
        for k in names:
            if k not in storages:
                raise RolloutUnknownKeyError(
                    f"{k}: {where}: unknown key '{k}' (in {what}); available keys: {available}"
                )
    seen: dict[str, str] = {}
    for what, names in (("keys", keys), ("hidden", hidden), *zip((n for n, _ in extra), groups)):
        for k in names:
            if k == reserved:
                raise RolloutKeyError(
                    f"{k}: {where}: '{k}' is the name of the mask in every minibatch; rename "
                    f"that key or leave it out of {what}"
                )
            if k in seen:
                raise RolloutKeyError(
                    f"{k}: {where}: key '{k}' is named twice (in {seen[k]} and in {what}); each "
                    f"key is served once, under its own name"
                )
            seen[k] = what
    if not keys and not hidden and not any(groups) and dones is None:
        raise RolloutValueError(f"{where}: no keys to serve")
    return keys, hidden, groups


def _check_storages(storages: dict[str, Tensor], names: Sequence[str], where: str):
    """Every named storage a dense ``(T, N, *shape)`` tensor, all sharing ``T``, ``N`` and the
    device. Returns ``(T, N, device)``."""
    t = n = device = first = None
    for k in names:
        v = storages[k]
        if not isinstance(v, Tensor):
            raise RolloutNotATensorError(
                f"{k}: {where} expected a (num_steps, num_envs, ...) tensor, received "
                f"{type(v).__name__}"
            )
        if v.layout != torch.strided:
            raise RolloutLayoutError(
                f"{k}: {where} expected a dense tensor, received layout {v.layout}"
            )
        if v.requires_grad:
            raise RolloutValueError(
                f"{k}: {where} received a tensor with requires_grad=True; minibatches carry no "
                f"autograd history: pass tensor.detach()"
            )
        if v.dim() < 2:
            raise RolloutShapeError(
                f"{k}: {where} expected a (num_steps, num_envs, ...) tensor, received shape "
                f"{tuple(v.shape)}"
            )
        if first is None:
            t, n, device, first = v.shape[0], v.shape[1], v.device, k
            continue
        if tuple(v.shape[:2]) != (t, n):
            raise RolloutShapeError(
                f"{k}: {where} expected shape ({t}, {n}, ...) (num_steps, num_envs of "
                f"'{first}'), received shape {tuple(v.shape)}"
            )
        if v.device != device:
            raise RolloutDeviceError(
                f"{k}: every tensor must be on one device: '{first}' is on {device}, '{k}' is on "
                f"{v.device}"
            )
    if t == 0 or n == 0:
        raise RolloutShapeError(f"{first}: {where} received an empty rollout of shape ({t}, {n})")
    return t, n, device


def _check_dones(v: Tensor, key: str, t: int, n: int, where: str) -> Tensor:
    """The dones storage as a ``(T, N)`` view: shape ``(T, N)`` or ``(T, N, 1)``, dtype bool,
    integer or floating point (nonzero is done)."""
    if tuple(v.shape) not in ((t, n), (t, n, 1)) or v.dtype.is_complex:
        raise RolloutValueError(
            f"{key}: {where} expected the dones key '{key}' of shape ({t}, {n}) or ({t}, {n}, 1) "
            f"and dtype bool, integer or floating point (nonzero = done), received shape "
            f"{tuple(v.shape)}, dtype {v.dtype}"
        )
    return v.reshape(t, n) if v.dim() == 3 else v


def _check_generator(generator: Any, device: torch.device, where: str) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise RolloutTypeError(
            f"{where}: generator must be a torch.Generator or None, received "
            f"{type(generator).__name__}"
        )
    g = generator.device
    same = g.type == device.type and (
        g.type != "cuda"
        or (torch.cuda.current_device() if g.index is None else g.index)
        == (torch.cuda.current_device() if device.index is None else device.index)
    )
    if not same:
        raise RolloutDeviceError(
            f"{where}: the generator is on {generator.device}, the tensors on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _divides(where: str, what: str, value: int, total: int, of: str) -> None:
    if total % value:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        near = sorted(sorted(divisors, key=lambda d: abs(d - value))[:2])
        raise RolloutValueError(
            f"{value} {total}: {where}: {what} {value} does not divide {of} {total}; choose a "
            f"{what} that divides it (nearest: {', '.join(map(str, near))})"
        )


def _batch_index(index: Any, n: int) -> int:
    if type(index) is not int:
        index = as_index(index, "batch index")
    if not -n <= index < n:
        raise RolloutIndexError(f"{index} {n}: batch index {index} is out of range for {n} batches")
    return index + n if index < 0 else index


# ---------------------------------------------------------------------------------------------
# Fixed-length chunks
# ---------------------------------------------------------------------------------------------


class SequenceDataset(Dataset):
    """Minibatches of fixed-length sequences of a rollout, for recurrent policies.

    Each env's rollout of ``num_steps`` steps is cut into ``num_steps // seq_len`` chunks of
    ``seq_len`` consecutive steps; chunk id ``c`` is env ``c // nc``, chunk ``c % nc``
    (``nc = num_steps // seq_len``). A minibatch is ``batch_size`` chunk ids of a permutation of
    all ``num_envs * nc`` of them, and holds:

    - every data key as ``(seq_len, batch_size, *shape)`` (time first, as ``nn.LSTM`` /
      ``nn.GRU`` take it): ``batch[key][s, b] = storage[chunk_start + s, env]``;
    - ``"resets"`` ``(seq_len, batch_size)`` bool, when ``dones`` names a key: true at step
      ``s`` when the env was done at the step before (``dones[chunk_start + s - 1] != 0``), i.e.
      where the recurrent state must restart from zero; always false at ``s = 0``, whose state
      is the stored one;
    - every hidden key as ``(batch_size, *shape)``: its value at the chunk's first step. Store
      the state each step *starts* from (already zeroed after a done), one key per tensor: an
      LSTM's ``h`` and ``c`` of shape ``(num_layers, hidden)`` each (``nn.LSTM`` wants
      ``(num_layers, batch, hidden)``: ``batch["h"].transpose(0, 1)``), a GRU's ``h``.

    Shuffling follows :class:`~rollout_buffers.DictDataset`'s rules: by default the permutation
    is ``np.random.permutation(num_chunks)`` from NumPy's global RNG (torch's global RNG is left
    alone), sent to the device once per shuffle through pinned memory, non-blocking; with
    ``generator=`` (a ``torch.Generator`` on the tensors' device) it is ``torch.randperm`` on the
    device. Unshuffled, chunk ids run in order (env 0's chunks first).

    No copy is made: the dataset keeps the storages it was given (``buffer.<key>``, as they are
    when it is built) and gathers every minibatch straight from them, so a minibatch sees what
    the storages hold when it is read. ``resets`` is derived from the dones storage when the
    dataset is built and at every :meth:`shuffle` or :meth:`refresh`: after writing a new
    rollout into the same buffer, a new epoch's ``shuffle()`` (or ``refresh()``) brings it up to
    date. After ``buffer.to(...)`` build a new dataset (the old one still reads the old
    storages).

    No host synchronization anywhere: ``shuffle()``, ``refresh()`` and ``dataset[i]`` only
    enqueue device work. On CUDA a minibatch is one launch of the gather kernel for every key,
    the mask and the hidden states together; the permutation and the mask are updated in place,
    so a CUDA graph captured around ``dataset[i]`` (after one warm-up call) stays valid across
    shuffles.

    Args:
        source: an :class:`~rollout_buffers.ExperienceBuffer`, or a mapping of key ->
            ``(num_steps, num_envs, *shape)`` tensor (any strides), all on one device.
        seq_len: steps per chunk; must divide ``num_steps``.
        batch_size: chunks per minibatch; must divide ``num_envs * num_steps // seq_len``.
        keys: the data keys to serve; default: every key not named in ``hidden``.
        dones: the key whose nonzero entries end an episode (shape ``(num_steps, num_envs)`` or
            ``(num_steps, num_envs, 1)``, dtype bool, integer or float); ``None``: no
            ``"resets"`` in the minibatches.
        hidden: the keys of recurrent states stored per step, served at each chunk's first step.
        shuffle: draw a permutation now (call :meth:`shuffle` for a new one each epoch).
        generator: a ``torch.Generator`` on the tensors' device to draw permutations from.

    Example:
        >>> dataset = SequenceDataset(buffer, seq_len=8, batch_size=256, hidden=("h", "c"))
        >>> for epoch in range(num_epochs):
        >>>     dataset.shuffle()
        >>>     for batch in dataset:
        >>>         h0 = batch["h"].transpose(0, 1), batch["c"].transpose(0, 1)
        >>>         loss = ppo_loss(policy, batch["obs"], batch["resets"], h0, batch)
    """

    def __init__(
        self,
        source: Any,
        seq_len: int,
        batch_size: int,
        *,
        keys: Sequence[str] | None = None,
        dones: str | None = "dones",
        hidden: Sequence[str] | str = (),
        shuffle: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        where = "SequenceDataset"
        storages = _storages(source, where)
        keys, hidden, _ = _select(storages, keys, dones, hidden, (), RESETS, where)
        used = [*keys, *hidden, *([] if dones is None else [dones])]
        t, n, device = _check_storages(storages, used, where)
        dones_view = None if dones is None else _check_dones(storages[dones], dones, t, n, where)
        seq_len = _positive_int(f"{where}: seq_len", seq_len)
        batch_size = _positive_int(f"{where}: batch_size", batch_size)
        _divides(where, "seq_len", seq_len, t, "num_steps")
        nc = t // seq_len
        _divides(
            where,
            "batch_size",
            batch_size,
            n * nc,
            f"the number of chunks (num_envs {n} x {nc} chunks of {seq_len} steps) =",
        )
        _check_generator(generator, device, where)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_steps, self.num_envs, self.num_chunks = t, n, n * nc
        self.keys, self.hidden, self.dones = keys, hidden, dones
        self.do_shuffle, self.generator = shuffle, generator
        self.device = device
        self._dones = dones_view
        # The restart mask, a (T, N) bool storage gathered with the other keys; the first step
        # of every chunk stays false (its state is the stored one).
        self._resets = (
            None if dones is None else torch.zeros((t, n), dtype=torch.bool, device=device)
        )
        seq_names = keys + ([] if dones is None else [RESETS])
        self._srcs = [storages[k] for k in keys]
        self._srcs += [] if dones is None else [self._resets]
        self._srcs += [storages[k] for k in hidden]
        self._first = [False] * len(seq_names) + [True] * len(hidden)
        self._seq_names, self._num_seq = seq_names, len(seq_names)
        self._ids = torch.arange(self.num_chunks, device=device)
        self._ids_seen = _guards.contents(self._ids)
        served = _served(source)
        out_dtypes = [served.get(k) for k in keys] + ([] if dones is None else [None])
        out_dtypes += [served.get(k) for k in hidden]
        self._gather = ops.ChunkGather(
            self._srcs, self._first, batch_size, seq_len,
            out_dtypes if any(d is not None for d in out_dtypes) else None,
        )  # fmt: skip
        self._pinned: Tensor | None = None  # the host side of a permutation copy in flight
        self.refresh(shuffle=shuffle)

    @property
    def chunk_ids(self) -> Tensor:
        """The current permutation of chunk ids (1-D int64 on the device, updated in place).
        You may edit it in place; an id outside ``[0, num_chunks)`` reads the last chunk, on
        every backend (no gather ever reads outside the storages)."""
        return self._ids

    def _check_ids(self) -> None:
        """``chunk_ids`` changed since it was last checked (an edit, ``.data =``, ``resize_``):
        refuse what the gather cannot read (its layout; its entries are bounded there)."""
        ids = self._ids
        if (
            ids.dim() != 1
            or ids.shape[0] != self.num_chunks
            or ids.dtype != torch.int64
            or ids.device != self.device
            or not ids.is_contiguous()
        ):
            raise RolloutValueError(
                f"SequenceDataset: chunk_ids must stay a contiguous 1-D int64 tensor of "
                f"{self.num_chunks} chunk ids on {self.device}; it now has shape "
                f"{tuple(ids.shape)}, dtype {ids.dtype}, device {ids.device}"
            )
        self._ids_seen = _guards.contents(ids)

    def refresh(self, shuffle: bool = False) -> None:
        """Derive ``resets`` from the dones storage again (after a new rollout was written into
        it); with ``shuffle=True`` also draw a new permutation (what :meth:`shuffle` does)."""
        if self._resets is not None:
            nc, seq, n = self.num_chunks // self.num_envs, self.seq_len, self.num_envs
            r = self._resets.view(nc, seq, n)
            torch.ne(self._dones.reshape(nc, seq, n)[:, :-1], 0, out=r[:, 1:])
        if shuffle:
            self._draw()

    def shuffle(self) -> None:
        """Draw a new permutation of the chunks (NumPy's global RNG, or ``generator``), and
        derive ``resets`` from the dones storage again."""
        self.refresh(shuffle=True)

    def _draw(self) -> None:
        if self.generator is not None:
            torch.randperm(
                self.num_chunks, generator=self.generator, device=self.device, out=self._ids
            )
        else:
            _, pinned = host_to_device(
                np.random.permutation(self.num_chunks), self.device, out=self._ids
            )
            if pinned is not None:
                self._pinned = pinned

    def num_batches(self) -> int:
        """``num_chunks // batch_size``."""
        return self.num_chunks // self.batch_size

    def __len__(self) -> int:
        return self.num_chunks // self.batch_size

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Minibatch ``index`` (negative counts from the end; past the end: ``IndexError``)."""
        index = _batch_index(index, self.num_chunks // self.batch_size)
        ids = self._ids
        try:  # _guards.contents, inlined: the ids as this dataset last checked them?
            seen = ids.data_ptr(), ids._version, ids.shape, ids.stride()
        except RuntimeError:  # an inference tensor: checked every time
            seen = None
        if seen is None or seen != self._ids_seen:
            self._check_ids()
        outs = self._gather(ids, index * self.batch_size)
        m = self._num_seq
        batch = dict(zip(self._seq_names, outs[:m]))
        for key, out in zip(self.hidden, outs[m:]):
            batch[key] = out[0]
        return batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------------------------
# Trajectories cut at dones (rsl_rl's layout)
# ---------------------------------------------------------------------------------------------


def _ends(dones: Tensor) -> Tensor:
    """``(T, N)`` bool: a trajectory ends here (nonzero dones, and every env's last step)."""
    d = dones != 0
    d[-1] = True
    return d


def _layout(ends: Tensor, num_traj: int) -> tuple[Tensor, Tensor]:
    """The start (an env-major row ``env * T + t``) and length of every trajectory, in
    env-major order, from the ``(T, N)`` end flags; device ops only (``num_traj`` is known)."""
    flat = ends.t().reshape(-1)
    done_rows = torch.searchsorted(
        torch.cumsum(flat, 0),
        torch.arange(1, num_traj + 1, device=ends.device),
    )  # the row of the j-th end: the first row whose running count of ends reaches j + 1
    starts = torch.zeros_like(done_rows)
    starts[1:] = done_rows[:-1] + 1
    return starts, done_rows - starts + 1


def _pad_index(starts: Tensor, lengths: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(step, env, masks)``, each ``(T, num_traj)``: padded cell ``(p, j)`` reads
    ``storage[step, env]`` (trajectory ``j``'s ``p``-th step; its first step where ``p`` is
    past its end, then zeroed), and ``masks[p, j] = p < lengths[j]``."""
    p = torch.arange(t, device=starts.device)[:, None]
    masks = lengths > p
    rows = torch.where(masks, starts + p, starts)
    env = torch.div(rows, t, rounding_mode="floor")
    return rows - env * t, env, masks


def _pad(x: Tensor, step: Tensor, env: Tensor, pad: Tensor) -> Tensor:
    out = x[step, env]
    return out.masked_fill_(pad.view(*pad.shape, *(1,) * (x.dim() - 2)), 0)


def _rebuild(like: Any, values: dict, batch_size: list[int], device: Any) -> Any:
    """``values`` in a container of ``like``'s kind: a TensorDict (what rsl_rl returns for a
    TensorDict) or a plain dict."""
    if hasattr(like, "batch_size") and not isinstance(like, dict):
        return type(like)(values, batch_size=batch_size, device=device)
    return values


def _check_pair(tensors: dict, dones: Tensor, where: str) -> tuple[int, int]:
    if not isinstance(dones, Tensor):
        raise RolloutNotATensorError(
            f"dones: {where} expected a tensor, received {type(dones).__name__}"
        )
    if dones.dim() < 2:
        raise RolloutShapeError(
            f"dones: {where} expected dones of shape (num_steps, num_envs) or (num_steps, "
            f"num_envs, 1), received shape {tuple(dones.shape)}"
        )
    t, n = dones.shape[:2]
    _check_dones(dones, "dones", t, n, where)
    if t == 0 or n == 0:
        raise RolloutShapeError(f"dones: {where} received an empty rollout of shape ({t}, {n})")
    for key, v in tensors.items():
        if not isinstance(v, Tensor):
            raise RolloutNotATensorError(
                f"{key}: {where} expected a tensor, received {type(v).__name__}"
            )
        if v.dim() < 2 or tuple(v.shape[:2]) != (t, n):
            raise RolloutShapeError(
                f"{key}: {where} expected shape ({t}, {n}, ...) (num_steps, num_envs of dones), "
                f"received shape {tuple(v.shape)}"
            )
        if v.device != dones.device:
            raise RolloutDeviceError(
                f"{key}: {where}: the tensor is on {v.device}, dones on {dones.device}"
            )
    return t, n


def split_and_pad_trajectories(tensor: Any, dones: Tensor) -> tuple[Any, Tensor]:
    """Trajectories cut at dones, padded with zeros: rsl_rl's function of that name, bit for bit.

    ``tensor`` is ``(T, N, *shape)`` (time-major), or a mapping / TensorDict of such tensors.
    An env's trajectory ends at every step whose ``dones`` entry is nonzero and at its last
    step. The trajectories are ordered env by env (env 0's first), each padded with zeros to
    ``T`` steps (rsl_rl pads to ``num_steps``, not to the longest trajectory)::

        Input (transposed): [[a1, a2, a3, a4 | a5, a6],
                             [b1, b2 | b3, b4, b5 | b6]]
        Output (transposed, T = 6):      masks (transposed):
                            [[a1, a2, a3, a4, 0, 0],   [[T, T, T, T, F, F],
                             [a5, a6, 0, 0, 0, 0],      [T, T, F, F, F, F],
                             [b1, b2, 0, 0, 0, 0],      [T, T, F, F, F, F],
                             [b3, b4, b5, 0, 0, 0],     [T, T, T, F, F, F],
                             [b6, 0, 0, 0, 0, 0]]       [T, F, F, F, F, F]]

    Args:
        tensor: ``(T, N, *shape)``, any dtype, or a mapping / TensorDict of them.
        dones: ``(T, N)`` or ``(T, N, 1)``, bool, integer or float; nonzero = done.

    Returns:
        ``(padded, masks)``: ``padded`` ``(T, num_traj, *shape)`` of ``tensor``'s dtype (a dict
        of them for a mapping, a TensorDict with batch size ``[T, num_traj]`` for a TensorDict);
        ``masks`` ``(T, num_traj)`` bool, true on the valid steps.

    One host synchronization (the number of trajectories, which sets the output's shape), where
    rsl_rl's makes several (``nonzero``, ``tolist``) and one copy per trajectory; the rest is a
    few device ops plus one gather per tensor. Autograd flows through as in rsl_rl.
    """
    where = "split_and_pad_trajectories"
    is_map = not isinstance(tensor, Tensor)
    if is_map and not hasattr(tensor, "items"):
        raise RolloutNotAMappingError(
            f"{where}: expected a tensor or a mapping of tensors, received {type(tensor).__name__}"
        )
    tensors = dict(tensor.items()) if is_map else {"tensor": tensor}
    t, _ = _check_pair(tensors, dones, where)
    ends = _ends(_check_dones(dones, "dones", t, dones.shape[1], where))
    num_traj = int(ends.sum())  # the one host synchronization
    starts, lengths = _layout(ends, num_traj)
    step, env, masks = _pad_index(starts, lengths, t)
    pad = ~masks
    out = {k: _pad(v, step, env, pad) for k, v in tensors.items()}
    if not is_map:
        return out["tensor"], masks
    return _rebuild(tensor, out, [t, num_traj], getattr(tensor, "device", None)), masks


def unpad_trajectories(trajectories: Any, masks: Tensor, num_envs: int | None = None) -> Any:
    """The inverse of :func:`split_and_pad_trajectories`: rsl_rl's function of that name.

    Returns the valid steps as ``(T, num_envs, *shape)`` (a transposed view of an env-major
    tensor, as rsl_rl returns it); a mapping / TensorDict gives the same kind back.

    Args:
        trajectories: ``(T, num_traj, *shape)``, or a mapping / TensorDict of them.
        masks: ``(T, num_traj)`` bool, as returned with them.
        num_envs: the number of envs they came from (``masks.sum() == T * num_envs``). Given,
            no host synchronization; ``None``: read from ``masks`` (one synchronization).
    """
    where = "unpad_trajectories"
    if not isinstance(masks, Tensor) or masks.dim() != 2 or masks.dtype != torch.bool:
        raise RolloutValueError(
            f"masks: {where} expected a (num_steps, num_traj) bool tensor, received "
            + (
                f"shape {tuple(masks.shape)}, dtype {masks.dtype}"
                if isinstance(masks, Tensor)
                else type(masks).__name__
            )
        )
    t, j = masks.shape
    is_map = not isinstance(trajectories, Tensor)
    tensors = dict(trajectories.items()) if is_map else {"trajectories": trajectories}
    for key, v in tensors.items():
        if not isinstance(v, Tensor) or v.dim() < 2 or tuple(v.shape[:2]) != (t, j):
            got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise RolloutShapeError(
                f"{key}: {where} expected shape ({t}, {j}, ...) (that of masks), received {got}"
            )
        if v.device != masks.device:
            raise RolloutDeviceError(f"{key}: {where}: on {v.device}, masks on {masks.device}")
    if num_envs is None:
        valid = int(masks.sum())  # the one host synchronization
        if valid % t:
            raise RolloutValueError(
                f"masks: {where}: {valid} valid steps are not a whole number of envs of {t} steps"
            )
        num_envs = valid // t
    num_envs = _positive_int(f"{where}: num_envs", num_envs)
    # The k-th valid cell in trajectory-major order, for k < num_envs * T.
    flat = masks.t().reshape(-1)
    cell = torch.searchsorted(
        torch.cumsum(flat, 0), torch.arange(1, num_envs * t + 1, device=masks.device)
    ).clamp_(max=t * j - 1)  # never a read outside the tensors (num_envs too large)
    traj = torch.div(cell, t, rounding_mode="floor")
    step = cell - traj * t
    out = {
        k: v[step, traj].view(num_envs, t, *v.shape[2:]).transpose(0, 1) for k, v in tensors.items()
    }
    if not is_map:
        return out["trajectories"]
    return _rebuild(trajectories, out, [t, num_envs], getattr(trajectories, "device", None))


class TrajectoryDataset(Dataset):
    """Minibatches of envs with their trajectories cut at dones: rsl_rl's recurrent layout.

    What rsl_rl's ``RolloutStorage.recurrent_mini_batch_generator`` yields per minibatch, from
    the same rollout: minibatch ``i`` holds envs ``[i * batch_size, (i + 1) * batch_size)``
    (shuffled: ``batch_size`` envs of a permutation) and

    - every key of ``padded`` (the network inputs, rsl_rl's observations) as the envs'
      trajectories, ``(num_steps, num_traj_i, *shape)``, padded with zeros as
      :func:`split_and_pad_trajectories` pads them;
    - ``"masks"`` ``(num_steps, num_traj_i)`` bool, true on the valid steps;
    - every key of ``hidden`` at each trajectory's first step, ``(num_traj_i, *shape)`` (rsl_rl
      gives ``(num_layers, num_traj_i, hidden)``: ``batch["h"].transpose(0, 1)``);
    - every other key as ``(num_steps, batch_size, *shape)``, the envs' columns (unpadded: use
      :func:`unpad_trajectories` on the network's output, as rsl_rl does).

    ``num_traj_i`` varies between minibatches. The trajectory layout, the padded keys, the
    masks and the hidden states at the trajectory starts are computed once, when the dataset
    is built and at :meth:`refresh` (after a new rollout was written into the storages), with
    one host synchronization (each env's number of trajectories); serving a minibatch never
    synchronizes. In order, a minibatch is made of views (of the padded tensors and of the
    storages, as rsl_rl's); shuffled, of gathers.

    Shuffling draws a permutation of the envs from NumPy's global RNG
    (``np.random.permutation(num_envs)``), or from ``generator``, which must be a CPU
    ``torch.Generator``: the number of trajectories of each minibatch must be known on the host
    to shape it, so the permutation is drawn there (and sent to the device once per shuffle,
    pinned and non-blocking).

    Args:
        source: an :class:`~rollout_buffers.ExperienceBuffer` or a mapping of key ->
            ``(num_steps, num_envs, *shape)`` tensor, all on one device.
        batch_size: envs per minibatch; must divide ``num_envs``.
        padded: the keys served as padded trajectories.
        keys: the keys served as env columns; default: every key not named elsewhere.
        dones: the key whose nonzero entries end a trajectory (``(num_steps, num_envs)`` or
            ``(num_steps, num_envs, 1)``, bool, integer or float).
        hidden: the keys of recurrent states stored per step (the state each step starts from).
        shuffle: serve shuffled envs (a permutation drawn now; :meth:`shuffle` draws another).
        generator: a CPU ``torch.Generator`` to draw the permutations from.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        padded: Sequence[str] | str = (),
        keys: Sequence[str] | None = None,
        dones: str = "dones",
        hidden: Sequence[str] | str = (),
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        where = "TrajectoryDataset"
        storages = _storages(source, where)
        if not isinstance(dones, str):
            raise RolloutTypeError(f"{where}: dones must be a key (str), received {dones!r}")
        keys, hidden, (padded,) = _select(
            storages, keys, dones, hidden, (("padded", padded),), MASKS, where
        )
        t, n, device = _check_storages(storages, [*keys, *hidden, *padded, dones], where)
        self._dones = _check_dones(storages[dones], dones, t, n, where)
        batch_size = _positive_int(f"{where}: batch_size", batch_size)
        _divides(where, "batch_size", batch_size, n, "num_envs")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise RolloutTypeError(
                f"{where}: generator must be a CPU torch.Generator or None, received "
                f"{type(generator).__name__}"
            )
        if generator is not None and generator.device.type != "cpu":
            raise RolloutDeviceError(
                f"{where}: generator must be a CPU torch.Generator or None, received one on "
                f"{generator.device}: the number of trajectories of each minibatch sets its "
                f"shape and must be known on the host, so the env permutation is drawn there"
            )
        self.batch_size, self.num_steps, self.num_envs = batch_size, t, n
        self.keys, self.padded, self.hidden, self.dones = keys, padded, hidden, dones
        self.do_shuffle, self.generator, self.device = shuffle, generator, device
        self._storages = storages
        self._served = _served(source)  # compact keys: widened when served
        self._pinned: list[Tensor] = []
        self.refresh()

    def refresh(self) -> None:
        """Cut the trajectories again from the storages as they are now (one host
        synchronization), and draw a new permutation when shuffled."""
        t = self.num_steps
        ends = _ends(self._dones)
        counts = ends.sum(0).cpu().numpy()  # the one host synchronization per rollout
        self.num_trajectories = num_traj = int(counts.sum())
        self._counts = counts
        self._offsets = np.concatenate(([0], np.cumsum(counts)))  # env e: [off[e], off[e+1])
        starts, lengths = _layout(ends, num_traj)
        step, env, masks = _pad_index(starts, lengths, t)
        pad = ~masks
        self._masks = masks
        self._padded = {
            k: self._wide(k, _pad(self._storages[k], step, env, pad)) for k in self.padded
        }
        s0 = starts % t
        e0 = torch.div(starts, t, rounding_mode="floor")
        self._starts = {k: self._wide(k, self._storages[k][s0, e0]) for k in self.hidden}
        self._perm = None
        if self.do_shuffle:
            self.shuffle()

    def _wide(self, key: str, x: Tensor) -> Tensor:
        """``x`` in the dtype ``key`` is served in (a compact key's storage is narrower)."""
        served = self._served.get(key)
        return x if served is None else x.to(served)

    def shuffle(self) -> None:
        """Serve the envs in a new random order (NumPy's global RNG, or ``generator``)."""
        n, b = self.num_envs, self.batch_size
        if self.generator is not None:
            perm = torch.randperm(n, generator=self.generator).numpy()
        else:
            perm = np.random.permutation(n)
        counts = self._counts[perm]
        first = np.cumsum(counts) - counts  # where each env's trajectories go in the order
        traj = np.repeat(self._offsets[perm] - first, counts) + np.arange(counts.sum())
        self._bounds = np.concatenate(([0], np.cumsum(counts.reshape(-1, b).sum(1))))
        envs, p1 = host_to_device(perm, self.device)
        traj, p2 = host_to_device(traj, self.device)
        self._pinned = [p for p in (p1, p2) if p is not None]
        self._perm, self._traj = envs, traj
        self.do_shuffle = True

    def num_batches(self) -> int:
        """``num_envs // batch_size``."""
        return self.num_envs // self.batch_size

    def __len__(self) -> int:
        return self.num_envs // self.batch_size

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Minibatch ``index`` (negative counts from the end; past the end: ``IndexError``)."""
        index = _batch_index(index, self.num_envs // self.batch_size)
        b = self.batch_size
        if self._perm is None:  # in order: views, as rsl_rl's
            a, z = int(self._offsets[index * b]), int(self._offsets[(index + 1) * b])
            batch = {k: v[:, a:z] for k, v in self._padded.items()}
            batch[MASKS] = self._masks[:, a:z]
            batch.update((k, v[a:z]) for k, v in self._starts.items())
            batch.update(
                (k, self._wide(k, self._storages[k][:, index * b : (index + 1) * b]))
                for k in self.keys
            )
            return batch
        a, z = int(self._bounds[index]), int(self._bounds[index + 1])
        traj = self._traj[a:z]
        envs = self._perm[index * b : (index + 1) * b]
        batch = {k: v.index_select(1, traj) for k, v in self._padded.items()}
        batch[MASKS] = self._masks.index_select(1, traj)
        batch.update((k, v.index_select(0, traj)) for k, v in self._starts.items())
        batch.update((k, self._wide(k, self._storages[k].index_select(1, envs))) for k in self.keys)
        return batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for i in range(len(self)):
            yield self[i]
