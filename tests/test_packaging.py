"""Packaging: kernels/ ships as rollout_buffers.kernels and never as a bare `kernels`."""

from __future__ import annotations

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


def test_bench_workloads_copy_matches_shared():
    shared = ROOT.parent / "shared" / "workloads.json"
    if not shared.exists():
        pytest.skip("no shared/workloads.json beside this checkout to compare with")
    import json

    ours = json.loads((ROOT / "bench" / "workloads.json").read_text())
    assert ours == json.loads(shared.read_text())
