"""ExperienceBuffer: per-step rollout storage, a drop-in for ProtoMotions' class of that name."""

from __future__ import annotations

import bisect
import itertools
import operator
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _guards, backend, ops
from . import flatdict as _flat
from ._index import as_index
from ._index import int_or_none as _int
from ._index import positive_int as _positive_int
from ._overlap import check_sources
from .errors import (
    RolloutArgumentTypeError,
    RolloutDeviceError,
    RolloutDimensionError,
    RolloutIndexError,
    RolloutKeyError,
    RolloutKeyTypeError,
    RolloutLayoutError,
    RolloutNotAMappingError,
    RolloutNotATensorError,
    RolloutShapeError,
    RolloutTypeError,
    RolloutUnknownKeyError,
    RolloutValueError,
)

__all__ = ["ExperienceBuffer", "swap_and_flatten01"]


def swap_and_flatten01(arr: Tensor | None) -> Tensor | None:
    """Swap and flatten the first two dimensions of a tensor.

    ``(S0, S1, *rest) -> (S1 * S0, *rest)``: equal to
    ``arr.transpose(0, 1).reshape(S0 * S1, *rest)``, always a new contiguous tensor (row
    ``j * S0 + i`` is ``arr[i, j]``). For a buffer shaped ``(num_steps, num_envs, ...)`` the result
    is env-major. Any dtype, any trailing shape, non-contiguous inputs.

    Args:
        arr: a tensor with at least 2 dimensions, or ``None``.

    Returns:
        The flattened copy, or ``None`` when ``arr`` is ``None``.

    Raises:
        RolloutDimensionError: ``arr`` has fewer than 2 dimensions (also an IndexError, as the
            original's ``transpose`` raised).
        RolloutNotATensorError: ``arr`` is not a tensor (also an AttributeError).
    """
    if arr is None:
        return None
    if not isinstance(arr, Tensor):
        raise RolloutNotATensorError(
            f"swap_and_flatten01: expected a tensor, received {type(arr).__name__}"
        )
    if arr.dim() < 2:
        raise RolloutDimensionError(
            f"swap_and_flatten01: expected a tensor with at least 2 dimensions "
            f"(num_steps, num_envs, ...), received shape {tuple(arr.shape)}"
        )
    if arr.requires_grad:
        # Keep autograd working as in the original (a copy that records its history): the
        # kernels move bytes and would drop it.
        return ops.torch_flatten([arr])[0]
    return ops.flatten([arr])[0]


class _Spec:
    """What one key's writes are validated against, cached so a write costs a few compares.

    ``tensor`` is the buffer this spec was built from, with its address, dtype and shape then:
    when the module's buffer is no longer that object (``.to()``, ``.half()``, reassignment) or
    no longer has that address, dtype or shape (``buffer.<key>.data = ...``, ``resize_``), the
    spec is rebuilt from what is there now.
    """

    __slots__ = ("tensor", "ptr", "shape", "row_shape", "dtype", "device", "lo", "hi", "written",
                 "all_written", "steps", "writer")  # fmt: skip

    def __init__(self, tensor: Tensor, written: bytearray, owned: bool = False) -> None:
        self.tensor = tensor
        self.ptr = tensor.data_ptr()
        self.shape = tensor.shape
        self.row_shape = tensor.shape[1:]  # (num_envs, *shape): what one step holds
        self.dtype = tensor.dtype
        self.device = tensor.device
        # The key's whole storage, [lo, hi): a source starting outside shares no memory with
        # it (see _guards.Footprint). ``owned``: a tensor register_key just allocated, which
        # is its whole storage (no need to ask the storage, which costs a few microseconds).
        if owned:
            self.lo = self.ptr
            self.hi = self.ptr + tensor.numel() * tensor.element_size()
        else:
            self.lo, self.hi = _guards.storage_range(tensor)
        self.written = written  # written[step] == 1 once the step was written since the reset
        self.all_written = b"\x01" * len(written)
        self.steps: tuple[Tensor, ...] | None = None  # see make_steps
        self.writer = None  # backend 'triton': the key's step writer

    def make_steps(self) -> tuple[Tensor, ...]:
        """One view per step, made at the first write (not at registration, which stays as
        cheap as the original's): update_data writes ``steps[t].copy_(x)``, one operator where
        ``tensor[t] = x`` is two (select, then copy_), each a dispatch on the host."""
        self.steps = ops.step_views(self.tensor)
        return self.steps


class _StepPlan:
    """update_step's prepared write of one tuple of keys: the destinations and their addresses,
    what a source must be to take the fast path (the row's shape, the device, no memory shared
    with any destination), the backend's writer for each backend it ran under, and the step
    bookkeeping. Valid while the module's buffers of those keys are at the same addresses, of
    the same dtypes (update_step checks both on every call: ~2 µs for 12 keys; a shape change
    at the same address and dtype, which only ``resize_`` to fewer bytes or ``.data =`` a
    reshaped view of the same memory makes, is seen by update_data and the slow path, which
    rebuild the plan)."""

    __slots__ = ("keys", "dsts", "ptrs", "looks", "dtype_list", "shapes", "dtypes", "device",
                 "footprint", "writers", "marks")  # fmt: skip

    def __init__(self, keys: tuple, specs: Sequence[_Spec]) -> None:
        self.keys = keys
        self.dsts = tuple(s.tensor for s in specs)
        self.ptrs = [s.ptr for s in specs]
        self.looks = [(s.dtype, s.shape) for s in specs]
        self.dtype_list = [s.dtype for s in specs]
        self.shapes = tuple(s.row_shape for s in specs)
        self.dtypes = tuple(s.dtype for s in specs)
        self.device = specs[0].device
        self.footprint = _guards.Footprint(self.dsts)
        self.writers: dict[str, Any] = {}  # backend name -> the writer it picks here
        self.marks = tuple((k, s.written) for k, s in zip(keys, specs))

    def writer(self):
        w = self.writers.get(backend._backend)
        if w is None:
            w = self.writers[backend._backend] = ops.step_writer(self.dsts)
        return w


_STRIDED = torch.strided
_is = operator.is_
# (a method call, not Tensor.data_ptr: host-cost stand-in tensors carry their own data_ptr)
_data_ptr = operator.methodcaller("data_ptr")
_bisect = bisect.bisect_right
_looks = operator.attrgetter("dtype", "shape")
_dtype = operator.attrgetter("dtype")
# True while Dynamo traces (it folds the call to a constant), False when run: one Python call.
_dynamo_compiling = torch.compiler.is_dynamo_compiling


class ExperienceBuffer(nn.Module):
    """Buffer for storing rollout experience from parallel environments.

    Every key is a buffer of shape ``(num_steps, num_envs, *shape)`` registered on the module
    with ``persistent=False`` (moved by ``.to()``, not saved in ``state_dict``) and reachable as
    an attribute (``buffer.rewards``). Steps are written one at a time (``update_data``,
    ``update_step``) or all at once (``batch_update_data``); ``make_dict`` checks that every step
    of every key was written and returns the rollout flattened env-major.

    Args:
        num_envs: number of parallel environments.
        num_steps: number of steps per rollout.
        device: where the buffers live; ``None`` means ``cuda`` when available, else ``cpu``.

    Attributes:
        store_dict: key -> sum of ``step + 1`` over the distinct steps written since
            registration or the last ``make_dict`` (``total_sum()`` once all are written).

    Example:
        >>> buffer = ExperienceBuffer(num_envs=1024, num_steps=16)
        >>> buffer.register_key("obs", shape=(128,))
        >>> buffer.update_data("obs", step=0, data=observations)
        >>> data_dict = buffer.get_dict()
    """

    def __init__(self, num_envs: int, num_steps: int, device: torch.device | str | None = None):
        super().__init__()
        num_envs = _positive_int("num_envs", num_envs)
        num_steps = _positive_int("num_steps", num_steps)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            # The original failed in torch.zeros with the same class: RuntimeError for a bad
            # name, TypeError for an object that is no device at all.
            cls = RolloutDeviceError if isinstance(exc, RuntimeError) else RolloutArgumentTypeError
            raise cls(
                f"device: expected a torch.device or a device string, received {device!r}: {exc}"
            ) from None
        if device.type == "cuda" and device.index is None:
            # Pin the current GPU now: keys registered after a torch.cuda.set_device() must
            # land next to the earlier ones, or one fused launch would span two devices.
            device = torch.device("cuda", torch.cuda.current_device())
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.store_dict: dict[str, int | float] = {}
        self._device = device
        self._specs: dict[str, _Spec] = {}
        # Compact keys: key -> the dtype served (the storage, buffer.<key>, is narrower).
        self._served: dict[str, torch.dtype] = {}
        # update_step's prepared writes, by the tuple of keys a call writes (see _StepPlan).
        self._step_plans: dict[tuple, _StepPlan] = {}
        # The FlatDicts make_dict/get_dict handed out that still hold unread values: copied
        # before the storages are written again (copy-on-write).
        self._lender = _flat.Lender()
        # get_dict's prepared flatten: (keys, storages, {backend name: flattener}).
        self._dict_plan: tuple | None = None
        self._register_token()

    def _register_token(self) -> None:
        # Names this buffer to the compiled update_step operator. A fresh one for every object,
        # copies included (see __setstate__), so steps are never marked on the wrong buffer.
        self._token = next(_TOKENS)
        _LIVE_BUFFERS[self._token] = self

    def __getstate__(self) -> dict:
        # Prepared launches and lent mappings belong to this object and its storages: a copy
        # (deepcopy, pickle, torch.save) starts without them.
        state = super().__getstate__()
        state = dict(state)
        for name in ("_step_plans", "_lender", "_dict_plan"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy, pickle, torch.load
        super().__setstate__(state)
        self._step_plans = {}
        self._lender = _flat.Lender()
        self._dict_plan = None
        self._register_token()

    # -- state ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device the buffers live on (follows ``.to()``)."""
        return self._device

    def keys(self) -> list[str]:
        """The registered keys, in registration order."""
        return list(self._specs)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # .to() / .cuda() / .cpu() go through here: follow the move so that keys registered
        # afterwards land next to the others. Specs rebuild lazily (see _spec). A FlatDict
        # handed out before sees the rollout as it was: its unread values are copied first.
        if self._lender.refs:
            self._lender.settle()
        self._step_plans.clear()
        self._dict_plan = None
        out = super()._apply(fn, *args, **kwargs)
        self._device = fn(torch.empty(0, device=self._device)).device
        return out

    def _spec(self, key: Any) -> _Spec:
        spec = self._specs.get(key) if isinstance(key, str) else None
        if spec is None:
            self._raise_unknown_key(key)
        if key not in self._buffers:
            raise RolloutUnknownKeyError(
                f"{key}: the buffer of '{key}' was deleted from the module (del buffer.{key}); "
                f"register the key again in a new ExperienceBuffer"
            )
        tensor = self._buffers[key]
        if tensor is not spec.tensor or (
            # (Dynamo cannot trace an address; the compiled write runs this again, for real)
            not _dynamo_compiling()
            and (
                tensor.data_ptr() != spec.ptr
                or tensor.dtype is not spec.dtype
                or tensor.shape != spec.shape
            )
        ):
            # moved, cast, reassigned or given new data (.data =, resize_) since it was built
            if (
                tensor is None
                or tensor.shape[:2] != (self.num_steps, self.num_envs)
                or not tensor.is_contiguous()
            ):
                raise RolloutValueError(
                    f"{key}: the buffer of '{key}' was replaced by "
                    + (
                        "None"
                        if tensor is None
                        else f"a tensor of shape {tuple(tensor.shape)} "
                        f"({'contiguous' if tensor.is_contiguous() else 'non-contiguous'})"
                    )
                    + f"; expected a contiguous ({self.num_steps}, {self.num_envs}, ...) tensor"
                )
            spec = self._specs[key] = _Spec(tensor, spec.written)
        return spec

    def _raise_unknown_key(self, key: Any) -> None:
        if not isinstance(key, str):
            raise RolloutKeyTypeError(f"{key!r}: keys are strings, received {type(key).__name__}")
        raise RolloutUnknownKeyError(
            f"{key}: unknown key '{key}'; registered keys: {sorted(self._specs) or 'none'} "
            f"(call register_key('{key}', shape=..., dtype=...) first)"
        )

    # -- registration ----------------------------------------------------------------------------

    def register_key(
        self,
        key: str,
        shape: Sequence[int] | int = (),
        dtype: torch.dtype = torch.float,
        *,
        storage: torch.dtype | None = None,
    ) -> None:
        """Allocate a zeroed buffer ``(num_steps, num_envs, *shape)`` of ``dtype`` for ``key``.

        ``storage`` (compact storage, opt-in): keep a floating-point key in a narrower dtype,
        ``torch.bfloat16`` or ``torch.float16``, and serve it in ``dtype``. ``buffer.<key>`` is
        then the storage itself, of that narrower dtype. A write stores what PyTorch's cast to
        the storage dtype gives (``x.to(storage)``: round to nearest even, float16 overflow to
        ``inf`` as torch gives it); everything that serves values (``make_dict()`` /
        ``get_dict()`` values, ``DictDataset``, ``SequenceDataset`` and ``TrajectoryDataset``
        minibatches) serves ``x.to(storage).to(dtype)``, widened inside the same launch on
        CUDA. ``compute_gae`` reads it in float32. ``swap_and_flatten01(buffer.<key>)`` keeps
        the storage dtype (it is given a tensor, not a key).

        Raises:
            RolloutKeyError: ``key`` is not a string (RolloutKeyTypeError, also a TypeError), is
                already registered, or clashes with an attribute of the module.
            RolloutValueError: ``shape`` has a negative size (RolloutShapeError, also a
                RuntimeError) or a non-integer one (RolloutArgumentTypeError, also a TypeError).
            RolloutTypeError: ``dtype`` is not a ``torch.dtype``.
            RolloutValueError: ``storage`` is not a floating dtype narrower than ``dtype``.
        """
        if not isinstance(key, str):
            raise RolloutKeyTypeError(f"{key!r}: keys are strings, received {type(key).__name__}")
        if key in self._specs:
            raise RolloutKeyError(f"{key}: key '{key}' is already registered")
        if not key or "." in key:
            raise RolloutKeyError(
                f"{key}: a key must be a non-empty string without '.', received {key!r}"
            )
        if (
            key in self.__dict__
            or key in self._parameters
            or key in self._buffers
            or key in self._modules
            or hasattr(type(self), key)
        ):  # hasattr(self, key), without nn.Module.__getattr__'s exception for a new name
            raise RolloutKeyError(
                f"{key}: '{key}' clashes with an existing attribute of ExperienceBuffer; choose another name"
            )
        if not (type(shape) is tuple and all(type(d) is int and d >= 0 for d in shape)):
            shape = _normalize_shape(key, shape)
        if not isinstance(dtype, torch.dtype):
            dtype = _normalize_dtype(key, dtype)
        if storage is not None:
            storage = _compact_storage(key, dtype, storage)
        tensor = torch.zeros(
            (self.num_steps, self.num_envs, *shape),
            dtype=dtype if storage is None else storage,
            device=self._device,
        )
        self.register_buffer(key, tensor, persistent=False)
        if storage is not None:
            self._served[key] = dtype
        self._specs[key] = _Spec(tensor, bytearray(self.num_steps), owned=True)
        self.store_dict[key] = 0

    # -- writes ------------------------------------------------------------------------------------

    def total_sum(self) -> float:
        """``(num_steps + 1) * num_steps / 2``: ``store_dict[key]`` once every step is written."""
        return (self.num_steps + 1) * (self.num_steps / 2)

    def update_data(
        self, key: str, index: int | None = None, data: Any = None, *, step: int | None = None
    ) -> None:
        """Write ``data`` at one step of ``key``: ``buffer.<key>[index] = data``.

        Broadcasting and dtype casting follow PyTorch assignment. The step may be given as
        ``index`` (positional, as in the original) or ``step=`` (as in its documented example).

        Raises:
            RolloutKeyError: unknown key (RolloutUnknownKeyError, also an AttributeError, as the
                original's ``getattr`` raised), or not a string (RolloutKeyTypeError).
            RolloutIndexError: step out of range. RolloutTypeError: step not an integer.
            RolloutValueError: data of a shape that does not broadcast to
                ``(num_envs, *shape)`` (RolloutShapeError, also a RuntimeError, as torch
                raised), on another device (RolloutDeviceError), overlapping its destination
                (RolloutOverlapError), or with ``requires_grad``.
        """
        if _dynamo_compiling():  # one opaque operator for the compiler (see update_step)
            if step is not None:
                index = self._step_index(key, index, step)
            return self._update_step_slow(index, {key: data}, "update_data")
        # The hot path of a rollout loop. The common case (a known key, an in-range int step, a
        # tensor of the key's row shape or one it broadcasts to, on its device, of its dtype or
        # one PyTorch casts; any strides: views, slices, columns, expanded) costs a few
        # compares. The one check a source could fail silently, sharing memory with the
        # destination, is proven from addresses (see _guards.Footprint). Anything else takes
        # the slow path that validates in full and explains.
        spec = self._specs.get(key) if type(key) is str else None
        if (
            spec is None
            or self._buffers.get(key) is not spec.tensor
            or spec.tensor.data_ptr() != spec.ptr
            or spec.tensor.dtype is not spec.dtype
            or spec.tensor.shape != spec.shape
        ):
            spec = self._spec(key)
        if step is not None or type(index) is not int or not 0 <= index < self.num_steps:
            index = self._step_index(key, index, step)
        if self._lender.refs:
            self._lender.settle()
        if (
            type(data) is Tensor
            and data.device == spec.device
            and not data.requires_grad
            and data.layout is _STRIDED
            and not spec.lo <= data.data_ptr() < spec.hi  # shares no memory with the key
            and (data.dtype is spec.dtype or not data.is_complex())
        ):
            if backend._backend != "triton":
                # A single key: PyTorch's own copy costs the host least, on every device. It
                # reads any strides, casts, applies lazy sign flags and broadcasts as assignment
                # does (but for leading size-1 dims, which it refuses before writing anything:
                # the slow path takes those, and explains a shape that does not fit).
                steps = spec.steps
                if steps is None:
                    steps = spec.make_steps()
                try:
                    steps[index].copy_(data)
                except RuntimeError:
                    self._update_data_slow(key, spec, index, data)
            elif data.shape == spec.row_shape:  # the step-write kernel, as requested
                w = spec.writer
                if w is None:
                    w = spec.writer = ops.step_writer((spec.tensor,))
                w(index, (data,))  # it reads any strides and converts the dtype in the kernel
            else:
                self._update_data_slow(key, spec, index, data)
        else:
            self._update_data_slow(key, spec, index, data)
        if not spec.written[index]:
            spec.written[index] = 1
            self.store_dict[key] += index + 1

    def _update_data_slow(self, key: str, spec: _Spec, index: int, data: Any) -> None:
        """update_data of anything the fast path did not take: validate in full and explain,
        refuse an overlap, then PyTorch's assignment (or the step-write kernel, when the
        backend is ``triton``)."""
        data = self._check_data(key, spec, data, spec.row_shape, "update_data")
        if spec.lo <= data.data_ptr() < spec.hi:  # may share memory: look at the bytes
            check_sources((key,), (spec.tensor,), index, (data,), "update_data")
        if backend._backend != "triton":
            # PyTorch's assignment, whose broadcasting rules (leading 1s dropped, one element
            # filled) are what update_data promises.
            spec.tensor[index] = data
            return
        w = spec.writer
        if w is None:
            w = spec.writer = ops.step_writer((spec.tensor,))
        if data.shape != spec.row_shape or data.device != spec.device:
            data = ops.as_source(spec.tensor, data)
        w(index, (data,))

    def update_step(self, index: int, tensors: Mapping[str, Any]) -> None:
        """Write every ``(key, tensor)`` of ``tensors`` at step ``index``, in one fused launch on CUDA.

        Each key follows the rules of :meth:`update_data`. Everything is validated before
        anything is written: one bad key leaves the whole buffer unchanged.

        Args:
            index: the step to write, ``0 <= index < num_steps`` (negative counts from the end).
            tensors: a mapping (dict or TensorDict) from registered keys to data.
        """
        # The hot path: a dict of the keys of an earlier call replays that call's prepared
        # write (see _StepPlan) after a few compares per key. A source takes it when it has its
        # key's row shape and device, a dtype PyTorch casts to the key's, any strides (views,
        # slices, columns, expanded), and starts outside every destination's storage (so it
        # shares no memory with any: see _guards.Footprint). Anything else takes
        # _update_step_slow, which validates in full, converts and explains. Under
        # torch.compile the write is one opaque operator (see _update_step_slow).
        if _dynamo_compiling():
            return self._update_step_slow(index, tensors)
        plan = self._step_plans.get(tuple(tensors)) if type(tensors) is dict else None
        writer = plan.writers.get(backend._backend) if plan is not None else None
        if writer is not None and not self._lender.refs:
            try:  # the module's buffers are at the plan's addresses, of its dtypes (a buffer
                # reassigned, given new data, or a view of another dtype, is not)
                cur = list(map(self._buffers.__getitem__, plan.keys))
                if plan.ptrs != list(map(_data_ptr, cur)) or plan.dtype_list != list(
                    map(_dtype, cur)
                ):
                    writer = None
            except (KeyError, AttributeError):  # a buffer deleted, or set to None
                writer = None
        if writer is not None and not self._lender.refs:
            if type(index) is not int or not 0 <= index < self.num_steps:
                index = self._step_index("update_step", index, None)
            srcs = list(tensors.values())
            dev, footprint = plan.device, plan.footprint
            lo, hi, starts, ends = footprint.lo, footprint.hi, footprint.starts, footprint.ends
            ptrs = []  # the sources' addresses, read once (the writer takes them too)
            dense = True  # all contiguous, of the keys' dtypes, with no lazy sign flag
            try:  # a source with no storage (sparse) fails data_ptr(): the slow path explains
                for data, shape, dtype in zip(srcs, plan.shapes, plan.dtypes):
                    if not (
                        type(data) is Tensor
                        and data.shape == shape
                        and data.device == dev
                        and not data.requires_grad
                    ):
                        break
                    if data.dtype is not dtype:
                        if data.is_complex():
                            break
                        dense = False
                    # Shares no memory with any destination: Footprint.excludes, inlined (no
                    # Python call per key). Outside the destinations' span: one compare.
                    p = data.data_ptr()
                    if lo <= p < hi:
                        i = _bisect(starts, p)
                        if i and p < ends[i - 1]:
                            break
                    if dense and not (data.is_contiguous() and not data.is_neg()):
                        dense = False
                    ptrs.append(p)
            except RuntimeError:
                ptrs = ()
            if len(ptrs) == len(srcs):
                if not writer.exact:  # PyTorch's copy_ per key: any strides, casts, flags
                    writer.dense(index, srcs)
                elif dense:  # the Triton writer's one prepared plan
                    writer.dense(index, srcs, ptrs)
                else:  # the Triton writer: any strides and dtypes, one launch
                    writer(index, srcs, ptrs)
                store = self.store_dict
                for key, written in plan.marks:
                    if not written[index]:
                        written[index] = 1
                        store[key] += index + 1
                return
        self._update_step_slow(index, tensors)

    def _update_step_slow(self, index: Any, tensors: Any, where: str = "update_step") -> None:
        if not hasattr(tensors, "items"):
            raise RolloutNotAMappingError(
                f"update_step: tensors must be a mapping of key -> tensor, received {type(tensors).__name__}"
            )
        if type(index) is not int or not 0 <= index < self.num_steps:
            index = self._step_index("update_step", index, None)
        keys, specs, dsts, srcs = [], [], [], []
        for key, data in tensors.items():
            spec = self._spec(key)
            if not (
                type(data) is Tensor
                and data.shape == spec.row_shape
                and data.dtype is spec.dtype
                and data.device == spec.device
                and not data.requires_grad
                and data.layout is _STRIDED
            ):
                data = self._check_data(key, spec, data, spec.row_shape, where)
            keys.append(key)
            specs.append(spec)
            dsts.append(spec.tensor)
            srcs.append(data)
        if not keys:  # not len(tensors): a TensorDict's len() is its batch size
            raise RolloutValueError(
                "update_step: tensors is empty; pass at least one key -> tensor"
            )
        if _dynamo_compiling():
            # Two opaque operators for the compiler. The first copies what lent mappings still
            # hold unread (copy-on-write) while the storages are untouched; the write depends
            # on its result, so it runs after. The second writes and does the step bookkeeping,
            # which must run when the compiled code runs (Dynamo cannot trace bytearray writes).
            settled = _settle_op(dsts, self._token)
            _update_step_op(dsts, index, srcs, self._token, "\0".join(keys), settled)
            return
        if self._lender.refs:
            self._lender.settle()
        sequential = False
        footprint = _guards.Footprint(dsts)
        if not all(map(footprint.excludes, srcs)):
            # Refuses a source overlapping its own destination; one overlapping another key's
            # would race in one launch: then key by key, as PyTorch's loop does.
            sequential = check_sources(keys, dsts, index, srcs, "update_step")
        if sequential:
            ops.torch_write_step(dsts, index, srcs)
        else:
            plan = self._step_plan(tuple(keys), specs) if len(set(keys)) == len(keys) else None
            if plan is None:
                ops.write_step(dsts, index, srcs)
            else:
                writer = plan.writer()
                if writer.exact:
                    srcs = [ops.as_source(d, x) for d, x in zip(dsts, srcs)]
                writer(index, srcs)
        store = self.store_dict
        for key, spec in zip(keys, specs):
            if not spec.written[index]:
                spec.written[index] = 1
                store[key] += index + 1

    def _step_plan(self, keys: tuple, specs: list) -> _StepPlan:
        """The prepared write of ``keys`` (built once per tuple of keys)."""
        plan = self._step_plans.get(keys)
        if (
            plan is None
            or plan.ptrs != [s.ptr for s in specs]
            or plan.looks != [(s.dtype, s.shape) for s in specs]
            or any(p is not s.tensor for p, s in zip(plan.dsts, specs))
        ):
            if len(self._step_plans) >= 64:
                self._step_plans.clear()
            plan = self._step_plans[keys] = _StepPlan(keys, specs)
        return plan

    def batch_update_data(self, key: str, data: Any) -> None:
        """Write the whole ``(num_steps, num_envs, *shape)`` buffer of ``key`` and mark every step written."""
        if _dynamo_compiling():  # one opaque operator for the compiler (see update_step)
            spec = self._spec(key)
            data = self._check_data(key, spec, data, spec.tensor.shape, "batch_update_data")
            settled = _settle_op([spec.tensor], self._token)
            _update_step_op([spec.tensor], -1, [data], self._token, key, settled)
            return
        spec = self._specs.get(key) if type(key) is str else None
        if (
            spec is None
            or self._buffers.get(key) is not spec.tensor
            or spec.tensor.data_ptr() != spec.ptr
            or spec.tensor.dtype is not spec.dtype
            or spec.tensor.shape != spec.shape
        ):
            spec = self._spec(key)
        if not (
            type(data) is Tensor
            and data.shape == spec.tensor.shape
            and data.dtype is spec.dtype
            and data.device == spec.device
            and not data.requires_grad
            and data.layout is _STRIDED
        ):
            data = self._check_data(key, spec, data, spec.tensor.shape, "batch_update_data")
        if spec.lo <= data.data_ptr() < spec.hi:  # see update_data
            check_sources((key,), (spec.tensor,), None, (data,), "batch_update_data")
        if self._lender.refs:
            self._lender.settle()
        spec.tensor.copy_(data)
        spec.written[:] = spec.all_written
        self.store_dict[key] = self.total_sum()

    def compute_gae(
        self,
        gamma: float,
        lam: float,
        *,
        rewards: str = "rewards",
        values: str = "value",
        next_values: str = "next_value",
        dones: str = "dones",
        advantages: str = "advantages",
        returns: str = "returns",
    ) -> None:
        """Generalized advantage estimation from named keys, written into two keys in place.

        Reads the whole rollout of ``rewards``, ``values``, ``next_values`` and ``dones`` and
        writes ``advantages`` and ``returns = advantages + values`` (see
        :func:`rollout_buffers.compute_gae` for the recursion), then marks every step of those
        two keys written, as :meth:`batch_update_data` does. The output keys must hold as many
        elements per step as ``values`` (a ``()``-shaped key takes a ``(1,)``-shaped value).
        One launch on CUDA.
        """
        from .gae import compute_gae

        names = (rewards, values, next_values, dones, advantages, returns)
        r, v, nv, d, adv, ret = (self._spec(k).tensor for k in names)
        served = [self._served.get(k) for k in names]
        vdt = served[1] or v.dtype
        if self._lender.refs:
            self._lender.settle()
        for key, out, sdt in ((advantages, adv, served[4]), (returns, ret, served[5])):
            if out.shape[2:].numel() != v.shape[2:].numel() or (sdt or out.dtype) != vdt:
                raise RolloutValueError(
                    f"{key}: compute_gae writes values' per-step shape {tuple(v.shape[2:])} and "
                    f"dtype {vdt} ('{values}'); '{key}' has shape {tuple(out.shape[2:])}, "
                    f"dtype {sdt or out.dtype}"
                )
        if not any(served):
            compute_gae(r, v, nv, d, gamma, lam, out=(adv.view(v.shape), ret.view(v.shape)))
        else:
            # Compact keys are read in the dtype they are served in (float32) and the results
            # stored as their storage keeps them.
            r, v, nv, d = (t if s is None else t.to(s) for t, s in zip((r, v, nv, d), served))
            a, g = compute_gae(r, v, nv, d, gamma, lam)
            adv.view(v.shape).copy_(a)
            ret.view(v.shape).copy_(g)
        for key in (advantages, returns):
            self._specs[key].written[:] = b"\x01" * self.num_steps
            self.store_dict[key] = self.total_sum()

    def _step_index(self, key: str, index: Any, step: Any) -> int:
        if step is not None:
            if index is not None:
                raise RolloutTypeError(
                    f"{key}: pass the step either as index or as step=, not both"
                )
            index = step
        if type(index) is not int:
            index = as_index(index, f"{key}: the step index")
        t = self.num_steps
        if not -t <= index < t:
            raise RolloutIndexError(
                f"{key}: step index {index} is out of range for num_steps={t} (expected 0 <= index < {t})"
            )
        return index + t if index < 0 else index

    def _check_data(
        self, key: str, spec: _Spec, data: Any, shape: torch.Size, where: str
    ) -> Tensor:
        """The slow path: validate anything that is not already an exact match; return a tensor."""
        expected = f"shape {tuple(shape)}, dtype {spec.dtype}, device {spec.device}"
        if not isinstance(data, Tensor):
            try:
                # On the host first: a Python number stays a 0-dim CPU tensor, which every
                # path writes into a device buffer without a host-to-device copy. A Python
                # float is a double (complex: two): kept in 64 bits, so that the one cast is
                # the one PyTorch's assignment makes (0.1 into a float64 key stays 0.1, into
                # a float16 key it is rounded once). ints and bools already are int64 / bool.
                # (on the CPU, whatever default device a context sets, as assignment takes it)
                dtype = _PY_SCALAR_DTYPES.get(type(data))
                data = (
                    torch.as_tensor(data, device="cpu")
                    if dtype is None
                    else torch.tensor(data, dtype=dtype, device="cpu")
                )
                if data.dim() and data.device != spec.device:
                    data = data.to(spec.device)
            except Exception as exc:
                raise RolloutNotATensorError(
                    f"{key}: {where} expected a tensor ({expected}), received "
                    f"{type(data).__name__} that cannot be converted: {exc}"
                ) from None
        if data.layout != torch.strided:  # copy_ would fail after other keys were written
            raise RolloutLayoutError(
                f"{key}: {where} expected a dense tensor ({expected}), received layout "
                f"{data.layout}: pass data.to_dense()"
            )
        if data.requires_grad:
            raise RolloutValueError(
                f"{key}: {where} received data with requires_grad=True; the buffer stores no "
                f"autograd history: pass data.detach()"
            )
        if data.device != spec.device and not (data.dim() == 0 and data.device.type == "cpu"):
            raise RolloutDeviceError(
                f"{key}: {where} expected data on device {spec.device}, received {data.device}"
            )
        lead = data.dim() - len(shape)
        if lead > 0 and all(s == 1 for s in data.shape[:lead]):
            data = data.reshape(data.shape[lead:])  # PyTorch assignment drops leading size-1 dims
        try:
            broadcast = torch.broadcast_shapes(data.shape, shape) == shape
        except RuntimeError:
            broadcast = False
        if not broadcast:
            raise RolloutShapeError(
                f"{key}: {where} expected data of {expected} (or broadcastable to it), "
                f"received shape {tuple(data.shape)}"
            )
        if data.is_complex() and not spec.dtype.is_complex:
            raise RolloutValueError(
                f"{key}: {where} cannot cast complex data ({data.dtype}) to {spec.dtype}"
            )
        return data

    def _mark_steps(self, keys: Sequence[str], index: int) -> None:
        """Mark step ``index`` of ``keys`` written, or every step when ``index`` is -1 (the
        compiled writes' bookkeeping)."""
        for key in keys:
            spec = self._spec(key)
            if index < 0:
                spec.written[:] = spec.all_written
                self.store_dict[key] = self.total_sum()
            elif not spec.written[index]:
                spec.written[index] = 1
                self.store_dict[key] += index + 1

    # -- reads ------------------------------------------------------------------------------------

    def make_dict(self) -> dict[str, Tensor]:
        """Check every step of every key was written, reset the tracking, return the flat rollout.

        Returns:
            ``{key: swap_and_flatten01(buffer)}``: each ``(num_envs * num_steps, *shape)``,
            env-major (row ``env * num_steps + step``). A :class:`~rollout_buffers.FlatDict`:
            a ``dict`` whose values are made when first read (all at once, in one launch),
            bit-identical to the eager copies, and which a ``DictDataset`` reads straight from
            the buffer without making them. Writing the buffer again through its API first
            copies whatever is unread (copy-on-write). ``set_lazy_make_dict(False)`` returns
            the eager copies in a plain dict instead.

        Raises:
            RolloutValueError: a key has missing steps; the message starts with
                ``Problem with '<key>'`` and names the steps. Nothing is reset then.
        """
        total = self.total_sum()
        for key, spec in self._specs.items():
            if not all(spec.written):
                missing = [s for s, w in enumerate(spec.written) if not w]
                shown = ", ".join(map(str, missing[:16])) + (", ..." if len(missing) > 16 else "")
                raise RolloutValueError(
                    f"Problem with '{key}', {self.store_dict[key]}, {total}: steps [{shown}] "
                    f"({len(missing)} of {self.num_steps}) were not written since the last "
                    f"make_dict; write them with update_data/update_step or batch_update_data"
                )
        data = self.get_dict()
        for key, spec in self._specs.items():
            spec.written[:] = bytes(self.num_steps)
            self.store_dict[key] = 0
        return data

    def get_dict(self) -> dict[str, Tensor]:
        """The flattened rollout like :meth:`make_dict`, without the check and without a reset."""
        plan = self._dict_plan
        seen = None
        if plan is not None and len(plan[0]) == len(self._specs):
            try:  # the module's buffers, as they are now: at the plan's addresses and looks?
                cur = list(map(self._buffers.__getitem__, plan[0]))
                seen = [(t._version, t.data_ptr()) for t in cur]  # the FlatDict keeps these
                if [p for _, p in seen] != plan[2] or plan[3] != list(map(_looks, cur)):
                    seen = None  # given new data, another dtype or shape, or reassigned
            except (KeyError, AttributeError, RuntimeError):  # deleted; None; no version
                seen = None
        if seen is None:
            keys = tuple(self._specs)
            if not keys:
                return {}
            storages = tuple(self._spec(k).tensor for k in keys)
            ids = [_flat._storage_id(t) for t in storages]  # what a FlatDict tells moves by
            ptrs, looks = list(map(_data_ptr, storages)), list(map(_looks, storages))
            plan = self._dict_plan = (keys, storages, ptrs, looks, {}, ids)
        keys, storages, _, _, flatteners, ids = plan
        served = self._served
        flatten_all = flatteners.get(backend._backend)
        if flatten_all is None:  # a backend that cannot run here says so now
            out_dtypes = [served.get(k) for k in keys] if served else None
            flatten_all = flatteners[backend._backend] = ops.flattener(storages, out_dtypes)
        if not _flat.lazy_make_dict():
            return dict(zip(keys, flatten_all()))
        d = _flat.FlatDict(
            keys, storages, flatten_all, self._flatten, self._lender.release, served, ids, seen,
        )  # fmt: skip
        self._lender.lend(d)
        return d

    def _flatten(self, storages: list[Tensor], out_dtypes: list | None = None) -> list[Tensor]:
        """swap_and_flatten01 of some of this buffer's storages, in one launch (``out_dtypes``:
        the dtype each is served in, ``None`` for its own)."""
        if out_dtypes is not None and all(d is None for d in out_dtypes):
            out_dtypes = None
        return ops.flattener(storages, out_dtypes)()

    @property
    def key_nbytes(self) -> dict[str, int]:
        """Bytes each key's storage holds (a compact key: in its storage dtype)."""
        return {
            k: 0 if t is None else t.numel() * t.element_size()
            for k, t in ((k, self._buffers.get(k)) for k in self._specs)
        }

    @property
    def nbytes(self) -> int:
        """Bytes all the keys' storages hold: the rollout's memory."""
        return sum(self.key_nbytes.values())

    def extra_repr(self) -> str:
        # The module's buffers, not the cached specs: those rebuild lazily after .to()/.half().
        def one(k: str, t: Tensor | None) -> str:
            if t is None:
                return f"{k}: None"
            served = self._served.get(k)
            kept = f" stored as {t.dtype}" if served is not None else ""
            size = _size(t.numel() * t.element_size())
            return f"{k}: {tuple(t.shape[2:])} {served or t.dtype}{kept}, {size}"

        keys = ", ".join(one(k, self._buffers.get(k)) for k in self._specs)
        return (
            f"num_envs={self.num_envs}, num_steps={self.num_steps}, device={self._device}, "
            f"keys=[{keys}], nbytes={_size(self.nbytes)}"
        )


#: Python scalars whose default tensor dtype (float32, complex64) would round them before the
#: cast to the key's dtype: a float is written as PyTorch's assignment writes it, from a double.
_PY_SCALAR_DTYPES = {float: torch.float64, complex: torch.complex128}


# torch.compile(fullgraph=True) of a step that calls update_step: the write is one opaque
# operator that mutates the buffers and, when the compiled code runs, marks the steps on the
# buffer named by its token. Eager calls skip it: the dispatcher costs 20-70 us per call, more
# than the kernel itself.
_LIVE_BUFFERS: weakref.WeakValueDictionary[int, ExperienceBuffer] = weakref.WeakValueDictionary()
_TOKENS = itertools.count(1)


@torch.library.custom_op("rollout_buffers::settle", mutates_args=())
def _settle_op(dsts: list[Tensor], token: int) -> Tensor:
    """Copy-on-write before a compiled update_step: make what the buffer's lent mappings still
    hold unread, from the storages as they are before this step's write (whatever the compiler
    does with the write: clone it, re-inplace it, copy it back). Returns an empty tensor that
    the write takes as an input, which orders the write after this."""
    buffer = _LIVE_BUFFERS.get(token)
    if buffer is not None and buffer._lender.refs:
        buffer._lender.settle(compiled_write=dsts)
    return dsts[0].new_empty(0)


@_settle_op.register_fake
def _(dsts: list[Tensor], token: int) -> Tensor:
    return dsts[0].new_empty(0)


@torch.library.custom_op("rollout_buffers::update_step", mutates_args=("dsts",))
def _update_step_op(
    dsts: list[Tensor], index: int, srcs: list[Tensor], token: int, keys: str, settled: Tensor
) -> None:
    """The compiled write of update_step / update_data (step ``index``) or batch_update_data
    (``index`` -1: the whole buffers); ``settled``: the result of :func:`_settle_op`."""
    buffer = _LIVE_BUFFERS.get(token)
    names = keys.split("\0")
    # The eager path's overlap check, here where the tensors are real (see update_step).
    if index < 0:
        check_sources(names, dsts, None, srcs, "batch_update_data")
        for dst, src in zip(dsts, srcs):
            dst.copy_(src)
    elif check_sources(names, dsts, index, srcs, "update_step"):
        ops.torch_write_step(dsts, index, srcs)
    else:
        ops.write_step(dsts, index, srcs)
    if buffer is not None:
        buffer._mark_steps(names, index)


@_update_step_op.register_fake
def _(
    dsts: list[Tensor], index: int, srcs: list[Tensor], token: int, keys: str, settled: Tensor
) -> None:
    return None


def _size(n: int) -> str:
    """A byte count for people: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


#: Storage dtypes a compact key may take, and the served dtypes they may stand for.
_COMPACT = (torch.bfloat16, torch.float16)


def _compact_storage(key: str, dtype: torch.dtype, storage: Any) -> torch.dtype:
    if not isinstance(storage, torch.dtype):
        raise RolloutTypeError(
            f"{key}: storage must be a torch.dtype ({', '.join(map(str, _COMPACT))}) or None, "
            f"received {storage!r}"
        )
    if storage not in _COMPACT or not dtype.is_floating_point or dtype.itemsize <= 2:
        raise RolloutValueError(
            f"{key}: compact storage keeps a float32 or float64 key in "
            f"{' or '.join(map(str, _COMPACT))}; received dtype={dtype}, storage={storage}"
        )
    return storage


def _normalize_shape(key: str, shape: Any) -> tuple[int, ...]:
    # The classes say what the original raised: torch.zeros refuses a negative size with a
    # RuntimeError, and a size that is no int (or a shape that is no tuple) with a TypeError.
    scalar = _int(shape) is not None
    if scalar:
        shape = (shape,)
    try:
        dims = tuple(_int(d) for d in shape)
    except TypeError:
        raise RolloutArgumentTypeError(
            f"{key}: shape must be a tuple of ints, received {shape!r}"
        ) from None
    if any(d is None or d < 0 for d in dims):
        cls = RolloutArgumentTypeError if scalar or None in dims else RolloutShapeError
        raise cls(f"{key}: shape must be a tuple of non-negative ints, received {shape!r}")
    return dims


def _normalize_dtype(key: str, dtype: Any) -> torch.dtype:
    """A torch.dtype, or what torch itself accepts as one (``float``, ``bool``, ``int``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        if dtype is None or isinstance(dtype, str):
            raise TypeError
        return torch.empty(0, dtype=dtype).dtype
    except TypeError:
        raise RolloutTypeError(
            f"{key}: dtype must be a torch.dtype (or a Python type torch maps to one), "
            f"received {dtype!r}"
        ) from None
