"""Launch plans: Triton's compiled launcher called directly gets exactly what Triton's own path
gives it.

Without a GPU the plans never go direct (the interpreter returns no compiled kernel), so these
tests run in a fresh process under a stand-in CUDA driver (tests/stand_in_driver.py): kernels
compile for sm_90 for real, loading and launching are recorded. Each prepared launcher is called
twice with the same inputs: the first call goes through ``kernel[grid](...)`` (Triton binds,
specializes, compiles, launches), the second through the plan. Both must reach the launcher
with the same kernel, grid, stream and arguments (tensors there, their addresses here), and the
second must not enter ``JITFunction.run``. Runs on whichever triton is installed (CI runs it on
the one ``make test`` installs and on 3.6, the GPU machines' version).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("triton")

SCRIPT = r"""
import importlib, sys
import stand_in_driver
launches = stand_in_driver.install()
import torch
import triton
from triton.runtime.jit import JITFunction

K = importlib.import_module("rollout_buffers.kernels")
generic_calls = []
_run = JITFunction.run
def spy(self, *a, **k):
    generic_calls.append(self.__name__ if hasattr(self, "__name__") else str(self))
    return _run(self, *a, **k)
JITFunction.run = spy

def flat(args):
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.append(tuple(x.data_ptr() if isinstance(x, torch.Tensor) else x for x in a))
        else:
            out.append(a.data_ptr() if isinstance(a, torch.Tensor) else a)
    return out

def twice(name, call):
    before = len(launches)
    call()
    n_generic = len(generic_calls)
    call()
    assert len(launches) == before + 2, (name, len(launches) - before)
    first, second = launches[-2], launches[-1]
    assert len(generic_calls) == n_generic, f"{name}: the second call entered JITFunction.run"
    assert (first.kernel, first.grid, first.stream, first.function) == (
        second.kernel, second.grid, second.stream, second.function), name
    assert any(isinstance(a, torch.Tensor) for a in first.args), name  # the generic call
    assert not any(isinstance(a, torch.Tensor) or (isinstance(a, tuple) and any(
        isinstance(x, torch.Tensor) for x in a)) for a in second.args), name  # all ints
    a, b = flat(first.args), flat(second.args)
    return a, b

torch.manual_seed(0)
T, N = 6, 5
dsts = [torch.zeros(T, N, 4), torch.zeros(T, N, dtype=torch.int64),
        torch.zeros(T, N, 7, dtype=torch.uint8), torch.zeros(T, N, 3, dtype=torch.bfloat16)]
srcs = [torch.randn(N, 4), torch.arange(N), torch.zeros(N, 7, dtype=torch.uint8),
        torch.randn(N, 3).bfloat16()]
w = K.step_writer(dsts)
a, b = twice("step_write", lambda: w(3, srcs))
assert a == b, ("step_write", a, b)

# A misaligned source must not replay the aligned plan: Triton specialized on alignment.
odd = torch.randn(N * 4 + 1)[1:].view(N, 4)
n_generic = len(generic_calls)
w(2, [odd] + srcs[1:])
assert len(generic_calls) == n_generic + 1, "a misaligned source replayed the aligned plan"

f = K.flattener(dsts)
outs = []
def flatten():
    outs.append(f())
a, b = twice("transpose_flatten", flatten)
assert a[0] == b[0] and a[1] != b[1] or True  # outputs are new tensors each call
assert a[0] == b[0] and len(a[1]) == len(b[1]) == len(dsts), ("transpose_flatten", a, b)
assert b[1] == tuple(o.data_ptr() for o in outs[-1]), "direct launch got other output pointers"
assert a[2:] == b[2:], ("transpose_flatten", a, b)

flat_srcs = [d.transpose(0, 1).reshape(T * N, *d.shape[2:]) for d in dsts]
perm = torch.randperm(T * N)
for name, g, p in (
    ("gather rows", K.gatherer(flat_srcs + [torch.randn(7, 2)], [K.ROWS] * 5,
                               [T * N] * 4 + [7], T * N, 10), perm),
    ("gather env-major", K.gatherer(dsts, [K.ENV_MAJOR] * 4, [T * N] * 4, T * N, 10), perm),
    ("gather chunks", K.gatherer(dsts, [K.CHUNKS] * 4, [0] * 4, N * 3, 4, seq=2,
                                 first_step=[False, True, False, False]), torch.randperm(N * 3)),
):
    got = []
    a, b = twice(name, lambda: got.append(g(p, 4)))
    assert a[0] == b[0] and a[2:] == b[2:], (name, a, b)
    assert b[1] == tuple(o.data_ptr() for o in got[-1]), name

# Dtype conversions in the same launches: a step write of converted and strided sources (bool
# into int64, float32 into bfloat16, a float64 column with an element stride, a slice), and
# bfloat16 / float16 storages served as float32 by the flatten and every gather mode.
cdsts = [torch.zeros(T, N, dtype=torch.int64), torch.zeros(T, N, 8, dtype=torch.bfloat16),
         torch.zeros(T, N, 4), torch.zeros(T, N, 3)]
csrcs = [torch.zeros(N, dtype=torch.bool), torch.randn(N, 8),
         torch.randn(N, 12, dtype=torch.float64)[:, ::3], torch.randn(N, 9)[:, 1:4]]
cw = K.step_writer(cdsts)
a, b = twice("step_write converting", lambda: cw(3, csrcs))
assert a == b, ("step_write converting", a, b)

compact = [torch.randn(T, N, 8).bfloat16(), torch.randn(T, N).half(), torch.zeros(T, N, 3)]
ods = [torch.float32, torch.float32, None]
cf = K.flattener(compact, ods)
outs = []
a, b = twice("transpose_flatten widening", lambda: outs.append(cf()))
assert [o.dtype for o in outs[-1]] == [torch.float32] * 3
assert a[0] == b[0] and a[2:] == b[2:] and b[1] == tuple(o.data_ptr() for o in outs[-1])
flat_compact = [c.transpose(0, 1).reshape(T * N, *c.shape[2:]) for c in compact]
for name, g, p in (
    ("gather rows widening", K.gatherer(flat_compact, [K.ROWS] * 3, [T * N] * 3, T * N, 10,
                                        out_dtypes=ods), perm),
    ("gather env-major widening", K.gatherer(compact, [K.ENV_MAJOR] * 3, [T * N] * 3, T * N, 10,
                                             out_dtypes=ods), perm),
    ("gather chunks widening", K.gatherer(compact, [K.CHUNKS] * 3, [0] * 3, N * 3, 4, seq=2,
                                          first_step=[False, True, False], out_dtypes=ods),
     torch.randperm(N * 3)),
):
    got = []
    a, b = twice(name, lambda: got.append(g(p, 4)))
    assert [o.dtype for o in got[-1]] == [torch.float32] * 3, name
    assert a[0] == b[0] and a[2:] == b[2:], (name, a, b)
    assert b[1] == tuple(o.data_ptr() for o in got[-1]), name
print("OK", triton.__version__, len(launches))
"""


def test_launch_plans_hand_the_launcher_what_tritons_generic_path_hands_it():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


# ---------------------------------------------------------------------------------------------
# A regression guard for host cost that is not a timing: the Python-level calls one hot call
# makes after warm-up, against a budget set from the lean implementation (a per-key helper or a
# per-key re-validation adds ~12 calls and fails it), and Triton's generic launch path never
# entered. The kernel path runs under the stand-in driver (compiled kernels, recorded launches).
# ---------------------------------------------------------------------------------------------

COUNT_SCRIPT = r"""
import json, sys
import stand_in_driver
stand_in_driver.install()
import torch
import rollout_buffers as rb
from rollout_buffers import backend
from triton.runtime.jit import JITFunction

backend.interpreter_enabled = lambda: True  # CPU tensors take the compiled kernels here
STAND_IN = {"active", "get_current_device", "get_current_stream"}  # the stand-in driver's own

def count(fn):
    calls = []
    def prof(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename not in (stand_in_driver.__file__, "<string>"):
            if code.co_name not in STAND_IN:
                calls.append(code.co_name)
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls  # the lambda that makes the call is in "<string>": not counted

SHAPES = [(5,), (5,), (3,), (3,), (3,), (), (1,), (1,), (), (), (), ()]  # 12 keys

def make(n=8, t=4):
    b = rb.ExperienceBuffer(n, t, device="cpu")
    for i, s in enumerate(SHAPES):
        b.register_key(f"k{i}", s, torch.int64 if i == 9 else torch.float32)
    step = {f"k{i}": torch.zeros(n, *s, dtype=torch.int64 if i == 9 else torch.float32)
            for i, s in enumerate(SHAPES)}
    return b, step

out = {}
for name in sys.argv[1:]:
    rb.set_backend(name)
    b, step = make()
    for t in range(4):  # warm-up: plans built, kernels compiled
        b.update_step(t, step)
        b.update_data("k0", t, step["k0"])
    b2, _ = make()
    for t in range(4):
        b2.update_step(t, step)
    ds = rb.DictDataset(8, b2.make_dict(), shuffle=True)  # lazy: gathers from the storage
    ds[0], ds[1]
    # The sources real training code hands over: views (columns and slices of one wide
    # tensor, a .flatten()), an expanded row (stride 0), a cast (bool into the int64 key).
    wide = torch.zeros(8, 40)
    views, cols = {}, 0
    for i, s in enumerate(SHAPES):
        w = s[0] if s else 1
        v = wide[:, cols : cols + w]
        views[f"k{i}"] = v if s else v.flatten() if i % 2 else v[:, 0]
        cols += w
    views["k9"] = torch.zeros(8, dtype=torch.bool)  # cast: bool into int64
    views["k1"] = torch.zeros(1, 5).expand(8, 5)  # expanded
    for t in range(4):  # warm-up of these layouts
        b.update_step(t, views)
        b.update_data("k0", t, views["k0"])
        b.update_data("k9", t, views["k9"])
        b.update_data("k1", t, views["k1"])
    generic = []
    real_run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: generic.append(self) or real_run(self, *a, **k)
    out[name] = {
        "update_step": count(lambda: b.update_step(1, step)),
        "update_data": count(lambda: b.update_data("k0", 2, step["k0"])),
        "dataset[i]": count(lambda: ds[1]),
        "update_step of views": count(lambda: b.update_step(1, views)),
        "update_data of a view": count(lambda: b.update_data("k0", 2, views["k0"])),
        "update_data of a cast": count(lambda: b.update_data("k9", 2, views["k9"])),
        "update_data of an expanded row": count(lambda: b.update_data("k1", 2, views["k1"])),
    }
    JITFunction.run = real_run
    out[name]["generic launches"] = len(generic)
print(json.dumps(out))
"""

# Python-level calls per call after warm-up (the lean implementation's count + a small margin).
BUDGETS = {
    # update_step: update_step, the Dynamo check, the writer, plan.direct, the hook check;
    # update_data: update_data, the key's writer, plan.direct, the hook check;
    # dataset[i]: __getitem__, the version check of the lazy values, the gatherer, its two list
    # comprehensions, plan.direct, the hook check. One call of margin each.
    # Views, expanded and cast sources (issue 17): the writer's layout lookup adds its two
    # list comprehensions (addresses; dtype, strides, alignment, sign flag per source).
    "triton": {
        "update_step": 6,
        "update_data": 5,
        "dataset[i]": 8,
        "update_step of views": 9,
        "update_data of a view": 8,
        "update_data of a cast": 8,
        "update_data of an expanded row": 8,
    },
    # PyTorch path: update_step, the Dynamo check and writer.dense; update_data alone (a copy_
    # into a step view, which reads strides, casts and broadcasts itself); __getitem__, the
    # version check, the gather and its list comprehension (the minibatch's index slices).
    "torch": {
        "update_step": 4,
        "update_data": 2,
        "dataset[i]": 6,
        "update_step of views": 4,
        "update_data of a view": 2,
        "update_data of a cast": 2,
        "update_data of an expanded row": 2,
    },
}


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_hot_calls_stay_within_their_python_call_budget(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", COUNT_SCRIPT, name], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])[name]
    assert got.pop("generic launches") == 0, "Triton's generic launch path ran after warm-up"
    for call, budget in BUDGETS[name].items():
        assert len(got[call]) <= budget, (call, len(got[call]), budget, got[call])
