"""A stand-in for Triton's CUDA driver, for tests of the launch path on machines without a GPU.

Kernels compile for real (sm_90, Triton's bundled ptxas); loading a binary and launching a
kernel are recorded, not run. With it installed, ``kernel[grid](...)`` goes through Triton's
whole generic path (binder, specialization, compile, launcher call) on CPU tensors, so a test can
compare what that path hands the launcher with what rollout_buffers' launch plans hand it.

Use it in a fresh process without ``TRITON_INTERPRET`` (kernels must be JIT functions, not
interpreted ones)::

    import stand_in_driver
    launches = stand_in_driver.install()   # before the first kernel launch
    ...                                    # launches: list of Launch records
"""

from __future__ import annotations

import os
from dataclasses import dataclass

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402

STREAM = 0x5EED


@dataclass
class Launch:
    kernel: str
    grid: tuple
    stream: int
    function: int
    args: tuple  # as the launcher received them: tensors, ints, tuples


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        # module, function handle, registers, spills, max threads per block
        return 1, hash(name) & 0xFFFFFFFF, 32, 0, 1024

    def get_device_properties(self, device):
        return {
            "max_shared_mem": 232448,
            "multiprocessor_count": 132,
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": 1980000,
            "mem_clock_rate": 2619000,
            "mem_bus_width": 6144,
        }


class StandInDriver(DriverBase):
    """Triton's driver interface with an sm_90 target and launches recorded, not run."""

    def __init__(self, launches: list):
        self.utils = _Utils()
        self.launches = launches
        records = launches

        class Launcher:
            def __init__(self, src, metadata):
                self.name = src.fn.__name__ if hasattr(src, "fn") else str(src)

            def __call__(self, gx, gy, gz, stream, function, *rest):
                # rest: packed metadata, launch metadata, enter hook, exit hook, *kernel args
                records.append(Launch(self.name, (gx, gy, gz), stream, function, tuple(rest[4:])))

        self.launcher_cls = Launcher

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device):
        return STREAM

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise NotImplementedError

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError

    def clear_cache(self, cache):
        pass


def install() -> list:
    """Make the stand-in Triton's active driver; return the list its launches go to."""
    launches: list = []
    triton.runtime.driver.set_active(StandInDriver(launches))
    return launches
