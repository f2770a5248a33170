"""Packaging: kernels/ ships as rollout_buffers.kernels and never as a bare `kernels`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from conftest import ROOT


def test_kernels_import_as_a_subpackage():
    pytest.importorskip("triton")
    import rollout_buffers.kernels as k

    assert k.__name__ == "rollout_buffers.kernels"
    assert callable(k.step_write) and callable(k.transpose_flatten) and callable(k.permuted_gather)


@pytest.mark.parametrize("cwd", ["repo_root", "elsewhere"])
def test_bare_import_kernels_never_loads_ours(cwd, tmp_path):
    """From anywhere, even the repository root, `import kernels` does not yield our folder."""
    code = (
        "import importlib, sys\n"
        "try:\n"
        "    m = importlib.import_module('kernels')\n"
        "except ImportError as e:\n"
        "    print('refused' if 'rollout_buffers' in str(e) else 'absent')\n"
        "else:\n"
        "    print('OURS' if hasattr(m, 'step_write') else 'other')\n"
    )
    where = ROOT if cwd == "repo_root" else tmp_path
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=where, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out in ("refused", "absent", "other"), out
    if cwd == "repo_root":
        assert out == "refused"


def test_py_typed_and_kernels_are_declared_for_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert (ROOT / "rollout_buffers" / "py.typed").exists()
    assert "py.typed" in config["package-data"]["rollout_buffers"]
    assert config["package-dir"]["rollout_buffers.kernels"] == "kernels"
    assert "rollout_buffers.kernels" in config["packages"]


# Fields bench/workloads.json may add to a workload of shared/workloads.json: they say how the
# benchmarks run it (which keys they keep compact) or describe it, and change none of its sizes.
BENCH_ONLY_FIELDS = {"compact_keys", "_about"}


def workloads_drift(shared: dict, ours: dict) -> list[str]:
    """What ``ours`` (bench/'s copy) changed or dropped of ``shared``: every top-level entry of
    shared must be in ours; a workload (a dict) with every field equal, and only
    BENCH_ONLY_FIELDS added; anything else (the _about text) equal. Ours may add workloads."""
    out = []
    for name, want in shared.items():
        if name not in ours:
            out.append(f"{name}: dropped")
        elif not isinstance(want, dict) or not isinstance(ours[name], dict):
            if ours[name] != want:
                out.append(f"{name}: changed")
        else:
            got = ours[name]
            out += [
                f"{name}.{f}: changed or dropped" for f in want if got.get(f, object()) != want[f]
            ]
            out += [f"{name}.{f}: added (only {sorted(BENCH_ONLY_FIELDS)} may be)"
                    for f in got if f not in want and f not in BENCH_ONLY_FIELDS]  # fmt: skip
    return out


def _shared_workloads():
    # shared/ beside the checkout, or beside the folder of worktrees that holds it
    for shared in (ROOT.parent / "shared", ROOT.parent.parent / "shared"):
        if (shared / "workloads.json").exists():
            return shared / "workloads.json"
    pytest.skip("no shared/workloads.json beside this checkout to compare with")


def test_bench_workloads_copy_keeps_every_shared_workload():
    ours = json.loads((ROOT / "bench" / "workloads.json").read_text())
    assert workloads_drift(json.loads(_shared_workloads().read_text()), ours) == []


def test_bench_workloads_compact_keys_name_float_keys():
    """compact_keys (what the benchmarks keep in bfloat16) names float32 keys of the workload,
    with ``like`` resolved as bench/common.py resolves it."""
    raw = json.loads((ROOT / "bench" / "workloads.json").read_text())

    def resolve(name):
        w = dict(raw[name])
        parent = w.pop("like", None)
        return w if parent is None else {**resolve(parent), **w}

    for name in (n for n in raw if not n.startswith("_")):
        w = resolve(name)
        assert w.get("compact_keys"), f"{name}: no compact_keys (the benchmarks' compact run)"
        for k in w["compact_keys"]:
            assert w["keys"][k]["dtype"] == "float32", (name, k)


def test_workloads_drift_catches_a_changed_or_dropped_workload():
    shared = {
        "_about": "text",
        "a": {"num_envs": 8, "keys": {"obs": {"shape": [3], "dtype": "float32"}}},
        "b": {"like": "a", "num_envs": 4},
    }
    assert workloads_drift(shared, copy.deepcopy(shared)) == []
    added = {**copy.deepcopy(shared), "c": {"num_envs": 2}}
    added["a"] = {**shared["a"], "compact_keys": ["obs"], "_about": "why"}
    assert workloads_drift(shared, added) == []  # new workloads, bench-only fields: fine
    for edit in (
        lambda d: d.pop("b"),  # a workload dropped
        lambda d: d.update(_about="other"),  # the description changed
        lambda d: d["a"].update(num_envs=16),  # a size changed
        lambda d: d["a"]["keys"]["obs"].update(dtype="bfloat16"),  # a key's dtype changed
        lambda d: d["b"].pop("like"),  # a field dropped
        lambda d: d["b"].update(num_steps=3),  # a field added that changes the workload
    ):
        d = copy.deepcopy(shared)
        edit(d)
        assert workloads_drift(shared, d), edit
