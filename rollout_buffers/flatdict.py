"""FlatDict: what ``make_dict()`` and ``get_dict()`` return, the flattened rollout without the copy.

A ``dict`` (``isinstance(d, dict)`` holds) of ``{key: swap_and_flatten01(buffer.<key>)}``,
env-major ``(num_envs * num_steps, *shape)``, whose values are produced when first read, into
new tensors bit-identical to the eager copy: reading one value (``d[k]``, ``get``, ``pop``)
makes that value; reading them all (``items()``, ``values()``, ``dict(d)``, ``==``...) or
iterating the mapping first (``for k in d: d[k]``) makes every value still pending, in one
launch. Until then the mapping holds only the buffer's ``(num_steps, num_envs, ...)``
storages, and ``DictDataset`` gathers its minibatches straight from them (env-major row ``r``
is ``storage[r % T, r // T]``), so an epoch that only reads minibatches never materializes
the flattened rollout; one that reads a key or two (AMP's replay buffer) makes those alone.

Every way of reading a value goes through the materialization: ``d[k]``, ``get``, ``items()``,
``values()``, iteration then indexing, ``pop``, ``popitem``, ``setdefault``, ``copy()``,
``dict(d)``, ``{**d}``, ``d | other``, ``==``, ``repr``, pickling and ``torch.save`` (a FlatDict
pickles as a plain dict, which ``torch.load`` with ``weights_only`` accepts once this module is
imported), torch's pytree. ``type(d)(...)`` and ``fromkeys`` build plain dicts, as the eager
dict's type did. Keys the caller adds or replaces are plain values. Values are made in the
inference mode ``make_dict()`` ran in, whenever they are made; a buffer whose storages are
inference tensors (no version counter to watch) gets its values made at once.

Two promises keep the values what the eager copy would have been:

- **Copy-on-write.** Before the buffer is written again through its API (``update_data``,
  ``update_step``, ``batch_update_data``, ``compute_gae``, ``.to()``), every FlatDict it handed
  out that still has pending values and is still referenced somewhere is materialized first. A
  FlatDict nobody refers to any more costs nothing.
- **Writes that bypass the API are caught.** Each pending value remembers its storage's
  version counter (``tensor._version``, bumped by every in-place write) and address (moved by
  ``buffer.obs.data = ...``); reading a value whose storage was written or replaced since
  (``buffer.obs[...] = x``, ``buffer.obs.mul_(2)``) raises :class:`StaleRolloutError` naming
  the key, never returns the new data. A write that does not bump the counter cannot be
  detected: through a raw pointer, DLPack, ``.numpy()``, ``tensor.data``, another process, a
  kernel outside PyTorch, a replayed CUDA graph. Under ``torch.compile`` the compiler moves
  the version counters of the buffers a compiled ``update_step`` writes as it sees fit, so a
  bypassing write to a key just before a compiled ``update_step`` of that same key is not
  caught (one to any other key is).

Values are made once, under a lock: a reader in one thread and the buffer's copy-on-write
before a write in another never race (the write waits for the values being made).

Code that reads a ``dict`` below Python sees the placeholders of values not yet made: unbound
``dict.values(d)`` / ``dict.__getitem__(d, k)``, C extensions, TorchScript (which refuses the
mapping, naming the placeholder). Each placeholder's ``repr`` says so and names the switch
below; reading the mapping first (``d.values()``), ``dict(d)``, or the switch fixes it.

The eager behaviour (a plain dict of copies) comes back with :func:`set_lazy_make_dict` or the
environment variable ``ROLLOUT_BUFFERS_LAZY_MAKE_DICT=0``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import RolloutValueError

__all__ = ["FlatDict", "StaleRolloutError", "lazy_make_dict", "set_lazy_make_dict"]

_ENV = "ROLLOUT_BUFFERS_LAZY_MAKE_DICT"
_lazy = os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off", "")


def lazy_make_dict() -> bool:
    """Whether ``make_dict()``/``get_dict()`` return a lazy :class:`FlatDict` (the default)."""
    return _lazy


def set_lazy_make_dict(lazy: bool) -> None:
    """``False``: ``make_dict()``/``get_dict()`` return a plain dict of flattened copies, as the
    original did (the copy is made at once). ``True`` (default): a :class:`FlatDict`."""
    global _lazy
    _lazy = bool(lazy)


class StaleRolloutError(RolloutValueError, RuntimeError):
    """A pending value of a :class:`FlatDict` whose buffer was written behind the API's back."""


class _Pending:
    """What a FlatDict holds for a value not yet made (seen only by code reading the dict below
    Python: unbound ``dict`` methods, TorchScript, C extensions)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return (
            "<pending: a make_dict() value not made yet, seen by code that reads the dict "
            "below Python (unbound dict methods, TorchScript); read the mapping first "
            "(d.values(), dict(d)) or call rollout_buffers.set_lazy_make_dict(False)>"
        )


PENDING = _Pending()
_MISSING = object()


def _storage_id(t: Tensor) -> int | None:
    """The identity of ``t``'s storage (its StorageImpl), or None where it has none to read."""
    try:
        return t.untyped_storage()._cdata
    except RuntimeError:  # a wrapper without storage (host-cost stand-ins)
        return None


def _seen(t: Tensor) -> tuple[int, int]:
    """What a pending value's storage holds, as far as can be told without reading it: its
    version counter (bumped by every in-place write) and its address (moved by ``.data =``)."""
    return t._version, t.data_ptr()


class FlatDict(dict):
    """The flattened rollout of ``make_dict()``/``get_dict()``: a dict whose values are made
    when first read (see the module docstring).

    Built by :class:`~rollout_buffers.ExperienceBuffer`; not meant to be constructed directly.
    Once every value is made it behaves (and reads at the speed of) a plain dict.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # type(d)(...) builds a plain dict, as the eager dict's type did: code that rebuilds a
        # mapping as its own type (lightning's apply_to_collection, accelerate's send_to_device,
        # default_collate, dict.fromkeys) gets a dict of what it passed, not a TypeError. Only
        # the buffer builds a FlatDict, with four or five arguments (a dict takes at most one).
        if len(args) < 2 and "flatten_all" not in kwargs:
            return dict(*args, **kwargs)
        return dict.__new__(cls)

    def __init__(
        self,
        keys: Sequence[str],
        storages: Sequence[Tensor],
        flatten_all: Callable[[], list[Tensor]],
        flatten: Callable[[list[Tensor], list], list[Tensor]],
        release: Callable[[FlatDict], None] | None = None,
        served: dict | None = None,
        storage_ids: Sequence[int | None] | None = None,
        seen: list | None = None,
    ) -> None:
        # Values are made in the inference mode make_dict() ran in, whenever they are made (a
        # copy-on-write inside torch.inference_mode() must not give inference tensors that
        # autograd refuses to save, where the eager copies were normal tensors).
        self._inference = torch.is_inference_mode_enabled()
        try:  # what the storages hold now: _seen of each (given when the caller just read it)
            versions = seen if seen is not None else [(t._version, t.data_ptr()) for t in storages]
        except RuntimeError:
            # Inference tensors (a buffer built under torch.inference_mode()) keep no version
            # counter: a write behind the API's back could not be caught. Made now, eagerly.
            dict.__init__(self, zip(keys, flatten_all()))
            self.__dict__.clear()
            self.__class__ = _Made
            return
        dict.__init__(self, dict.fromkeys(keys, PENDING))
        # The pending values: their keys, (T, N, ...) storages and those storages' versions
        # when handed out (in-place writes bump a tensor's version).
        self._pkeys = list(keys)
        self._pstorages = list(storages)
        self._pversions = versions
        # Each pending storage's identity (not its address): torch may move a storage's bytes
        # (share_memory_) and keep it the same storage, which .data = does not.
        if storage_ids is None:
            storage_ids = [_storage_id(st) for st in storages]
        self._keys, self._storage_ids = keys, storage_ids  # (zipped when a storage moved)
        self._flatten_all = flatten_all  # prepared for exactly the storages above, all pending
        self._nall = len(self._pkeys)
        self._flatten = flatten  # flatten(storages, out_dtypes): some of them, in one launch
        self._release = release
        # key -> the dtype a compact key's value is served in (its storage is narrower).
        self._served = served or {}
        # Bumped whenever what a value is made of changes (materialized, set, deleted): a
        # DictDataset compares it to know whether its prepared gather still applies.
        self._state = 0
        self._bulk = False  # iterated: the next single read makes every value (see _ready)
        # Held while values are made or forgotten: a reader in one thread and the buffer's
        # copy-on-write before a write in another make them once, and the write waits.
        self._lock = threading.RLock()

    # -- what DictDataset reads without materializing ----------------------------------------

    def _sources(self) -> list[tuple[Any, Any, int, Any]]:
        """``(key, tensor, rows, pending)`` in order: the ``(T, N, ...)`` storage of a pending
        value (``T * N`` rows; ``pending`` is then the dtype the value is served in), else the
        value itself (its length along dim 0, 0 for no tensor or a 0-dim one; ``pending`` is
        ``False``). Raises :class:`StaleRolloutError` for a stale pending value."""
        self._check_fresh()
        pend = dict(zip(self._pkeys, self._pstorages))
        served = self._served
        out = []
        for k, v in dict.items(self):
            s = pend.get(k)
            if s is not None:
                out.append((k, s, s.shape[0] * s.shape[1], served.get(k, s.dtype)))
            else:
                out.append((k, v, v.shape[0] if isinstance(v, Tensor) and v.dim() else 0, False))
        return out

    def _check_fresh(self) -> None:
        """Raise :class:`StaleRolloutError` if a pending value was written behind the API's
        back; a few attribute reads when none was (a dataset calls it for every minibatch)."""
        if [(t._version, t.data_ptr()) for t in self._pstorages] != self._pversions:  # _seen
            self._check_versions()

    def _accept_versions(self, storages: Sequence[Tensor]) -> None:
        """Take what ``storages`` hold now as what the API left there (see Lender.settle)."""
        ptrs = {t.data_ptr() for t in storages}
        for i, st in enumerate(self._pstorages):
            if st.data_ptr() in ptrs:
                self._pversions[i] = _seen(st)

    def _storage_id_of(self, key: Any) -> int | None:
        """The identity of ``key``'s storage when the mapping was handed out."""
        return dict(zip(self._keys, self._storage_ids)).get(key, -1)

    def _stale(self) -> list[str]:
        """The pending keys whose storage was written or replaced behind the API's back. A
        storage whose bytes torch moved without changing them (``share_memory_()``, a tensor
        sent to another process: the same storage, at a new address, at the same version) is
        not: its new address is taken, and ``_state`` bumped (a prepared gather holds the old)."""
        out = []
        for i, (k, st, v) in enumerate(zip(self._pkeys, self._pstorages, self._pversions)):
            now = _seen(st)
            if now == v:
                continue
            if now[0] == v[0] and _storage_id(st) == self._storage_id_of(k):
                self._pversions[i] = now
                self._state += 1
                continue
            out.append(k)
        return out

    def _check_versions(self, keys: Sequence[str] | None = None) -> None:
        """Raise :class:`StaleRolloutError` if a pending value (of ``keys``, default all) was
        written behind the API's back."""
        for key in self._stale():
            if keys is None or key in keys:
                raise StaleRolloutError(
                    f"{key}: the rollout of '{key}' was written after this mapping was handed "
                    f"out, bypassing ExperienceBuffer's API (buffer.{key}[...] = ..., or an "
                    f"in-place op on buffer.{key}); its flattened value would not be what "
                    f"make_dict() returned. Read the values before writing the buffer that way, "
                    f"write through update_data/update_step/batch_update_data (which copy "
                    f"unread values first), or call rollout_buffers.set_lazy_make_dict(False)"
                )

    # -- materialization -----------------------------------------------------------------------

    def materialize(self, keys: Sequence[Any] | None = None) -> None:
        """Flatten pending values now, in one launch: every one (``keys`` None), or those of
        ``keys`` (a no-op for values already made).

        A value whose storage was written behind the API's back is left pending: reading it
        raises :class:`StaleRolloutError`; the others are made as usual.
        """
        if type(self) is not FlatDict:  # every value made already (maybe by another thread)
            return
        with self._lock:
            if type(self) is FlatDict and self._pkeys:
                self._materialize(keys)

    def _materialize(self, keys: Sequence[Any] | None) -> None:
        pk = self._pkeys
        storages = self._pstorages
        if keys is None and [(t._version, t.data_ptr()) for t in storages] == self._pversions:
            if len(pk) == self._nall:
                outs = self._flatten_in_mode(self._flatten_all)
            else:
                outs = self._flatten_in_mode(self._flatten, storages, self._out_dtypes(pk))
            dict.update(self, zip(pk, outs))
            self._pkeys, self._pstorages, self._pversions = [], [], []
        else:
            stale = set(self._stale())
            wanted = set(pk) if keys is None else {k for k in keys if k in pk}
            make = [i for i, k in enumerate(pk) if k in wanted and k not in stale]
            if not make:
                return
            outs = self._flatten_in_mode(
                self._flatten, [storages[i] for i in make], self._out_dtypes([pk[i] for i in make])
            )
            dict.update(self, zip([pk[i] for i in make], outs))
            keep = [i for i in range(len(pk)) if i not in set(make)]
            self._pkeys = [pk[i] for i in keep]
            self._pstorages = [storages[i] for i in keep]
            self._pversions = [self._pversions[i] for i in keep]
        self._state += 1
        if keys is None or not self._pkeys:
            if self._release is not None:
                self._release(self)  # nothing left to copy before the buffer is written
        if not self._pkeys:
            # Every value made: from now on a plain dict (C-speed reads), still a FlatDict for
            # isinstance, holding no reference to the buffer any more (the lock stays: a
            # reader in another thread may be about to take it, then finds nothing to do).
            lock = self._lock
            self.__dict__.clear()
            self._lock = lock
            self.__class__ = _Made

    def _out_dtypes(self, keys: Sequence[Any]) -> list:
        """The dtype each of ``keys``' values is served in (``None``: its storage's own)."""
        served = self._served
        return [served.get(k) for k in keys]

    def _flatten_in_mode(self, fn: Callable[..., list[Tensor]], *args: Any) -> list[Tensor]:
        """``fn(*args)`` (a flatten) in the inference mode make_dict() ran in."""
        if torch.is_inference_mode_enabled() == self._inference:
            return fn(*args)
        with torch.inference_mode(self._inference):
            return fn(*args)

    def _ready(self, keys: Sequence[Any] | None = None) -> None:
        """Make the values a read needs, then refuse a read of a stale one.

        ``keys``: a read of those values only (``d[k]``, ``get``, ``pop``, ``setdefault``):
        they alone are made, unless the mapping was iterated (``for k in d``, ``keys()``,
        ``dict(d)``...), a sign that every value will be read: then all at once, in one
        launch. ``None``: a read of every value (``items()``, ``values()``, ``==``...).
        """
        self.materialize(keys if keys is not None and not self._bulk else None)
        if type(self) is FlatDict and self._pkeys:
            self._check_versions(keys)

    def _forget(self, key: Any) -> None:
        with self._lock:
            self._forget_locked(key)

    def _forget_locked(self, key: Any) -> None:
        if key in self._pkeys:
            i = self._pkeys.index(key)
            del self._pkeys[i], self._pstorages[i], self._pversions[i]
            if not self._pkeys and self._release is not None:
                self._release(self)
        self._state += 1

    # -- reads: every one materializes first ---------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        if self._pkeys:
            self._ready((key,))
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        if self._pkeys:
            self._ready((key,))
        return dict.get(self, key, default)

    def values(self):  # type: ignore[override]
        if self._pkeys:
            self._ready()
        return dict.values(self)

    def items(self):  # type: ignore[override]
        if self._pkeys:
            self._ready()
        return dict.items(self)

    def __iter__(self) -> Iterator:
        # Overridden so that dict(d), {**d} and d | other take the path that reads values
        # through __getitem__, not CPython's raw copy of the slots; and a mapping iterated is
        # about to be read whole: its next read makes every value in one launch.
        self._bulk = True
        return dict.__iter__(self)

    def keys(self):  # type: ignore[override]
        self._bulk = True  # dict(d), {**d}, f(**d) call keys() and then read every value
        return dict.keys(self)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        if self._pkeys:
            self._ready((key,))
        if type(self) is FlatDict:
            self._state += 1
        if default is _MISSING:
            return dict.pop(self, key)
        return dict.pop(self, key, default)

    def popitem(self) -> tuple:
        if self._pkeys:
            self._ready()
        if type(self) is FlatDict:
            self._state += 1
        return dict.popitem(self)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if self._pkeys:
            self._ready((key,))
        if type(self) is FlatDict:
            self._state += 1
        return dict.setdefault(self, key, default)

    def copy(self) -> dict:
        """A plain dict of the (materialized) values."""
        if self._pkeys:
            self._ready()
        return dict(dict.items(self))

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> dict:
        import copy

        return copy.deepcopy(self.copy(), memo)

    def __reduce__(self):  # pickle, torch.save: a plain dict of the values
        return (dict, (self.copy(),))

    def __eq__(self, other: object) -> bool:
        if self._pkeys:
            self._ready()
        if type(other) is FlatDict and other._pkeys:
            other._ready()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        out = self.copy()
        out.update(other)
        return out

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        out = dict(other)
        out.update(self.copy())
        return out

    def __repr__(self) -> str:
        if self._pkeys:
            self._ready()
        return dict.__repr__(self)

    # -- writes: the caller's values are plain ---------------------------------------------------

    def __setitem__(self, key: Any, value: Any) -> None:
        self._forget(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        dict.__delitem__(self, key)
        self._forget(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __ior__(self, other: Any) -> FlatDict:
        self.update(other)
        return self

    def clear(self) -> None:
        with self._lock:
            dict.clear(self)
            if self._pkeys:
                self._pkeys, self._pstorages, self._pversions = [], [], []
                if self._release is not None:
                    self._release(self)
            self._state += 1


class _Made(FlatDict):
    """A FlatDict whose every value is made: dict's own methods, at C speed (assigning dict's
    slot wrappers makes CPython call them directly, with no Python frame)."""

    # What a reader that raced the last materialization (another thread) may still look at.
    _pkeys = _pstorages = _pversions = ()
    _lock = contextlib.nullcontext()  # made at once (inference tensors): nothing to guard
    _bulk = False
    _state = -1
    __getitem__ = dict.__getitem__
    get = dict.get
    values = dict.values
    items = dict.items
    keys = dict.keys
    __iter__ = dict.__iter__
    pop = dict.pop
    popitem = dict.popitem
    setdefault = dict.setdefault
    __repr__ = dict.__repr__
    __setitem__ = dict.__setitem__
    __delitem__ = dict.__delitem__
    update = dict.update
    __ior__ = dict.__ior__
    clear = dict.clear

    def copy(self) -> dict:
        return dict(dict.items(self))

    __copy__ = copy

    def __reduce__(self):
        return (dict, (dict(dict.items(self)),))

    def __or__(self, other: Any) -> Any:
        return dict.__or__(self, other)

    def __ror__(self, other: Any) -> Any:
        return dict.__ror__(self, other)

    # Not dict's own: that would compare a pending FlatDict's placeholders (and Python asks
    # this subclass first, whichever side it is on).
    def __eq__(self, other: object) -> bool:
        if type(other) is FlatDict and other._pkeys:
            other._ready()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        if type(other) is FlatDict and other._pkeys:
            other._ready()
        return dict.__ne__(self, other)


def _register_with_torch() -> None:
    """Make the FlatDict what torch's own machinery expects of the eager dict.

    - ``torch.load`` (``weights_only=True``, its default since PyTorch 2.6) refuses any global
      it does not know. A dict subclass cannot pickle as a plain dict's opcodes: a FlatDict
      pickles as a call of ``builtins.dict``, which is allowed here (it is as safe as the
      ``OrderedDict`` torch allows). A process that has not imported rollout_buffers needs
      ``torch.serialization.add_safe_globals([dict])``, or the mapping saved as ``dict(d)``.
    - torch's pytree (``tree_map``, ``torch.func``, ``torch.export``) looks node types up
      exactly: an unregistered dict subclass would be one leaf, not a dict of values.
    """
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:
        add_safe_globals([dict])
    try:
        from torch.utils import _pytree
    except ImportError:  # pragma: no cover
        return

    def flatten(d: dict) -> tuple[list, list]:
        values = list(d.values())  # makes them
        return values, list(d)

    def unflatten(values: Any, context: list) -> dict:
        return dict(zip(context, values))

    def flatten_with_keys(d: dict) -> tuple[list, list]:
        values, context = flatten(d)
        return [(_pytree.MappingKey(k), v) for k, v in zip(context, values)], context

    for cls in (FlatDict, _Made):
        try:
            _pytree.register_pytree_node(
                cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys
            )
        except (ValueError, TypeError, AttributeError):  # registered already, or another API
            pass


_register_with_torch()


class Lender:
    """The FlatDicts a buffer handed out that still hold pending values (weakly: one that
    nobody refers to is forgotten, and nothing is copied for it)."""

    __slots__ = ("refs", "__weakref__")

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def lend(self, d: FlatDict) -> None:
        self.refs.append(weakref.ref(d, self._drop_ref))

    def _drop_ref(self, ref: weakref.ref) -> None:
        try:
            self.refs.remove(ref)
        except ValueError:
            pass

    def release(self, d: FlatDict) -> None:
        self.refs = [r for r in self.refs if r() is not None and r() is not d]

    def settle(self, compiled_write: Sequence[Tensor] = ()) -> None:
        """Materialize every outstanding FlatDict (before the storages are written); a value
        already stale stays pending and raises when read.

        ``compiled_write``: the storages a compiled ``update_step`` is about to write. A
        compiler moves the version counters of the tensors its graph mutates as it sees fit
        (AOTAutograd bumps them before the graph runs, inductor's copy-back again after), so
        those counters cannot tell a write behind the API's back from the compiler's own
        bookkeeping: the values of those storages are made from what they hold now. Every
        other storage keeps its check.
        """
        for ref in list(self.refs):
            d = ref()
            if d is not None and type(d) is FlatDict:
                if compiled_write:
                    d._accept_versions(compiled_write)
                d.materialize()
        self.refs = []
