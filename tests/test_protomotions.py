"""Switching a ProtoMotions run: ``rollout_buffers.protomotions`` stands in for
``protomotions.agents.utils.data`` (issue 10, point 8).

Each test runs Python in a subprocess next to a fake ``protomotions`` package made under
``tmp_path``, whose ``agents/utils/data.py`` is bench/original.py (the original's behaviour) plus
one extra name. The same training-loop script, unchanged, runs on the original (no switch), with
``import rollout_buffers.protomotions`` first, and under ``python -m rollout_buffers.protomotions``;
a seeded run must give the same minibatches and leave both global RNGs alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

#: A ProtoMotions-style loop on the data module: what a seeded run computes.
TRAIN = """
import json, sys
import numpy as np
import torch
from protomotions.agents.utils.data import DictDataset, ExperienceBuffer, swap_and_flatten01
import protomotions.agents.utils as utils
import protomotions.agents.utils.data as data_module

torch.manual_seed(0)
np.random.seed(0)
buffer = ExperienceBuffer(8, 4, "cpu")  # ProtoMotions passes (num_envs, num_steps, device)
buffer.register_key("obs", shape=(3,))
buffer.register_key("rewards")
buffer.register_key("actions", shape=(2,))
batches = []
for rollout in range(2):
    for step in range(4):
        buffer.update_data("obs", step, torch.randn(8, 3))
        buffer.update_data("rewards", step, torch.rand(8))
        buffer.update_data("actions", step, torch.randn(8, 2))
    dataset = DictDataset(8, buffer.make_dict(), shuffle=True)
    for epoch in range(2):
        for i in range(len(dataset)):
            batches.append({k: v.tolist() for k, v in dataset[i].items()})
        dataset.shuffle()
print(json.dumps({
    "classes": [c.__module__ for c in (ExperienceBuffer, DictDataset, swap_and_flatten01)],
    "extra": getattr(data_module, "EXTRA", None),
    "same_module": utils.data is data_module is sys.modules["protomotions.agents.utils.data"],
    "batches": batches,
    "torch_next": torch.rand(3).tolist(),
    "numpy_next": np.random.random(3).tolist(),
    "argv": sys.argv,
    "name": __name__,
}))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fake ProtoMotions checkout, tmp_path/project: protomotions/agents/utils/data.py and
    train.py (importable from the script's folder only, as `python train.py` finds it)."""
    root = tmp_path / "project"
    utils = root / "protomotions" / "agents" / "utils"
    utils.mkdir(parents=True)
    for package in (utils, utils.parent, utils.parent.parent):
        (package / "__init__.py").write_text("")
    original = (ROOT / "bench" / "original.py").read_text()
    (utils / "data.py").write_text(original + '\nEXTRA = "a name only the original defines"\n')
    (root / "train.py").write_text(TRAIN)
    return root


def run(cwd: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # rollout_buffers from this checkout
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


OURS = ["rollout_buffers.buffer", "rollout_buffers.dataset", "rollout_buffers.buffer"]
THEIRS = ["protomotions.agents.utils.data"] * 3


def test_the_switch_runs_an_unchanged_script_on_rollout_buffers_with_the_same_results(project):
    elsewhere = project.parent  # the script's folder is not the working directory
    original = run(elsewhere, "project/train.py", "a", "--b=1")
    switched = run(
        project, "-c", "import rollout_buffers.protomotions; exec(open('train.py').read())"
    )
    launched = run(
        elsewhere, "-m", "rollout_buffers.protomotions", "project/train.py", "a", "--b=1"
    )
    assert original["classes"] == THEIRS
    assert switched["classes"] == launched["classes"] == OURS
    for result in (original, switched, launched):
        assert result["extra"] == "a name only the original defines"  # read from the original
        assert result["same_module"] is True
    for result in (switched, launched):  # same seeds: same minibatches, same RNG states after
        assert result["batches"] == original["batches"]
        assert result["torch_next"] == original["torch_next"]
        assert result["numpy_next"] == original["numpy_next"]
    assert launched["argv"] == original["argv"] == ["project/train.py", "a", "--b=1"]
    assert launched["name"] == original["name"] == "__main__"


def test_the_launcher_runs_a_module_with_its_arguments(project):
    (project / "protomotions" / "train_agent.py").write_text(TRAIN)
    result = run(
        project, "-m", "rollout_buffers.protomotions", "-m", "protomotions.train_agent", "x"
    )
    assert result["classes"] == OURS and result["name"] == "__main__"
    assert result["argv"][0].endswith("train_agent.py") and result["argv"][1:] == ["x"]


def test_switching_after_the_original_was_imported_replaces_it_and_warns(project):
    code = """
import json, warnings
from protomotions.agents.utils.data import DictDataset as bound_before
import protomotions.agents.utils as utils
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import rollout_buffers.protomotions as switch
import protomotions.agents.utils.data as now
from protomotions.agents.utils.data import DictDataset
import sys
parent = utils.data is sys.modules["protomotions.agents.utils.data"] and utils.data.DictDataset is DictDataset
switch.uninstall()
import importlib
import protomotions.agents.utils.data as after
print(json.dumps({
    "warned": [str(w.message) for w in caught],
    "now": DictDataset.__module__, "parent": parent,
    "bound_before": bound_before.__module__,
    "after_uninstall": after.DictDataset.__module__,
}))
"""
    result = run(project, "-c", code)
    assert len(result["warned"]) == 1 and "names already bound" in result["warned"][0]
    assert result["now"] == "rollout_buffers.dataset" and result["parent"] is True
    assert result["bound_before"] == "protomotions.agents.utils.data"  # as the warning says
    assert result["after_uninstall"] == "protomotions.agents.utils.data"


def test_the_launcher_without_a_target_prints_its_usage():
    out = subprocess.run(
        [sys.executable, "-m", "rollout_buffers.protomotions"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "usage: python -m rollout_buffers.protomotions" in out.stderr
