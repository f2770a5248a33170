"""Host cost of one SequenceDataset minibatch on the CUDA path, measured without a GPU.

Runs the project's host-cost instrument, ``shared/tools/host_launch.py`` (not part of this
repository: found beside the checkout, or given with ``--tool``), in its fake mode: a stand-in
libcuda under Triton's real launcher and stand-in CUDA tensors, so that the library's CUDA code
path runs unmodified and only the driver's own time is estimated. Rows: a trivial Triton launch,
the tool's own ``DictDataset`` minibatch of 12 keys, and ``SequenceDataset[i]`` of the
locomotion keys plus an LSTM state (4 keys of (2, 256)) and the resets mask, at ``seq_len`` 8
and 24. Prints a table; exit status 2 when the instrument is missing or cannot run here.

    python bench/host_sequences.py [--tool PATH] [--rounds 15]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = {"h_a": (2, 256), "c_a": (2, 256), "h_c": (2, 256), "c_c": (2, 256)}


def load_tool(path: Path):
    spec = importlib.util.spec_from_file_location("host_launch", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["host_launch"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tool", default=str(ROOT.parent / "shared" / "tools" / "host_launch.py"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block-us", type=float, default=2000.0)
    args = ap.parse_args()
    tool = Path(args.tool)
    if not tool.is_file():
        print(f"host_sequences: no host-cost instrument at {tool}; nothing measured")
        return 2
    H = load_tool(tool)
    import torch

    H.ENV.mode = "fake"
    try:
        H.install_fake_cuda()
    except H.FakeModeError as exc:
        print(f"host_sequences: fake mode cannot run: {exc}")
        return 2
    torch.set_num_threads(1)
    rb = H.import_library(ROOT)
    notes = []
    from rollout_buffers.kernels import _common

    if getattr(_common, "_CUDA", ()) is None:
        # The kernels read torch._C's device calls when they are imported; a CPU-only torch has
        # no _cuda_exchangeDevice, and the instrument stands in for torch.cuda's wrappers only.
        _common._CUDA = (torch._C._cuda_getDevice, abs, torch._C._cuda_getCurrentRawStream)
        notes.append("kernels/_common._CUDA stood in for here (the instrument predates it)")

    def sequence_case(seq: int):
        sc = H.PublicScenario(rb, 12)
        with H.setup_context():
            for k, s in HIDDEN.items():
                sc.buf.register_key(k, s)
            for step in sc.sets:
                step.update(
                    {
                        k: H.device_tensor((sc.num_envs, *s), torch.float32)
                        for k, s in HIDDEN.items()
                    }
                )
        sc.fill()
        chunks = sc.num_envs * H.NUM_STEPS // seq
        with H.setup_context():
            ds = rb.SequenceDataset(sc.buf, seq, chunks // H.NUM_MINIBATCHES, hidden=list(HIDDEN))
            ds[0]

        def fn(i):
            b = ds[i & 3]
            for key in b:
                b[key]

        return H._project_case(fn, keep=(sc, ds))

    specs = {
        "trivial launch: kernel[(1,)](x)": H.public_trivial,
        "DictDataset dataset[i] + read values, K=12": functools.partial(H.public_minibatch, rb, 12),
        "SequenceDataset[i] seq_len=8, 12 keys + resets + 4 states": functools.partial(
            sequence_case, 8
        ),
        "SequenceDataset[i] seq_len=24, 12 keys + resets + 4 states": functools.partial(
            sequence_case, 24
        ),
    }
    bench = H.Bench(args.rounds, args.block_us)
    est = H.Estimator(
        SimpleNamespace(driver_launch_us=2.0, driver_pointer_us=0.15, eager_enqueue_us=2.5)
    )
    cases, counts, failures = H.build_cases(specs)
    try:
        H.calibrate_emulation(bench, est)
    except Exception as exc:  # the views' rows then overstate
        notes.append(f"emulation calibration failed: {exc}")
    res = H.run_public(bench, cases, failures)
    ests = H.estimates_for(res, counts, est)
    print(f"host cost per call, fake CUDA (locomotion: {H.NUM_ENVS} envs x {H.NUM_STEPS} steps, "
          f"{H.NUM_MINIBATCHES} minibatches)")  # fmt: skip
    H.print_public(res, counts, ests, failures)
    for n in notes:
        print(f"note: {n}")
    return 0 if not failures else 2


if __name__ == "__main__":
    sys.exit(main())
