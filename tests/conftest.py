"""Shared test configuration: the repository root on sys.path (for bench.original), hypothesis
profiles, and the dtypes of the contract."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels can only run in Triton's CPU interpreter, and triton reads
# this variable when a kernel is defined: set it once here, before any test module imports
# rollout_buffers.kernels, so test order cannot change which mode a module gets. On a GPU machine
# it stays unset and the kernels compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ...and import triton and the kernels now, under that setting. Triton decorates its own library
# functions (tl.zeros, tl.sum) when it is first imported, in the mode TRITON_INTERPRET names at
# that moment: a test that switches the interpreter off (monkeypatch.setenv) and happens to be
# the first to import triton would leave every later interpreted kernel in the process broken
# ("Cannot call @triton.jit'd outside of the scope of a kernel"). Importing here makes the mode
# independent of test order.
try:
    import rollout_buffers.kernels  # noqa: F401  (imports triton first)
    import rollout_buffers.kernels.gae  # noqa: F401
    import triton  # noqa: F401
except ImportError:  # no triton here: the kernel tests skip themselves
    pass

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    from hypothesis import HealthCheck, settings

    # "ci": bounded, deterministic; "long": `make fuzz`.
    settings.register_profile(
        "ci",
        max_examples=40,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; tests that need it import it themselves
    pass

#: Every dtype of the contract.
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as an integer tensor (NaN payloads and -0.0 compare exactly)."""
    if t.dtype == torch.bool or t.dtype.is_floating_point:
        return t.contiguous().view(_INT_OF_SIZE[t.element_size()])
    return t


def random_tensor(shape, dtype, device="cpu", generator=None) -> torch.Tensor:
    """Fresh random data of any dtype (bit patterns for floats include no NaN surprises)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool().to(device)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype).to(device)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=generator, dtype=torch.int64).to(dtype).to(device)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def interpreted_kernels():
    """Skip unless the Triton kernels run under Triton's CPU interpreter in this process.

    The mode cannot be switched once triton is imported: ``triton.jit`` fixes it when it
    decorates, and Triton's own library functions (``tl.zeros``, ``tl.sum``) are decorated
    when triton itself is imported. Without CUDA this conftest switches the interpreter on
    before anything imports triton; with CUDA the kernels compile for the device and
    tests/test_gpu.py checks them there.
    """
    pytest.importorskip("triton")
    from rollout_buffers.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip(
            "Triton's interpreter is off (a CUDA machine): tests/test_gpu.py covers the kernels"
        )
    yield


#: The kernel launchers a spy wraps: (module, attribute). The library reaches every kernel
#: through one of these, looked up on the module at call time, so replacing the attribute is
#: seen by every hot path. If the launchers move, change this table, nothing else.
KERNEL_LAUNCHERS = (
    # (module, object, attribute, name recorded): the prepared launchers the library calls
    # (built once, called per step / flatten / minibatch) and the GAE launcher.
    ("rollout_buffers.kernels.step_write", "StepWriter", "__call__", "step_write"),
    ("rollout_buffers.kernels.step_write", "StepWriter", "dense", "step_write"),
    ("rollout_buffers.kernels.transpose_flatten", "Flattener", "__call__", "transpose_flatten"),
    ("rollout_buffers.kernels.permuted_gather", "Gatherer", "__call__", "permuted_gather"),
    ("rollout_buffers.kernels.gae", None, "gae", "gae"),
)


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that records, in order, the name of every kernel launcher called during the test.

    Each launcher of :data:`KERNEL_LAUNCHERS` is wrapped (the real one still runs; a launcher
    called from inside another counts once), so a test can tell whether a call reached the
    Triton kernels or silently fell back to PyTorch. Call ``kernel_calls.clear()`` between the
    operations to check them one at a time. Skips where triton does not import.
    """
    pytest.importorskip("triton")
    calls: list[str] = []
    depth = [0]
    for module_name, owner_name, attr, name in KERNEL_LAUNCHERS:
        module = importlib.import_module(module_name)
        owner = module if owner_name is None else getattr(module, owner_name)
        real = getattr(owner, attr)

        def spy(*args, _real=real, _name=name, **kwargs):
            if not depth[0]:
                calls.append(_name)
            depth[0] += 1
            try:
                return _real(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(owner, attr, spy)
    return calls


def kernel_device() -> str:
    """Where the Triton kernels can run here: CUDA, else CPU under the interpreter (skips
    otherwise)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    from rollout_buffers.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("no CUDA and TRITON_INTERPRET is off")
    return "cpu"
