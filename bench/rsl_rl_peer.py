"""rsl_rl's own code (the reference for sequence minibatches), loaded where it is installed.

``make setup`` installs ``rsl-rl-lib`` pinned, without its dependencies (it declares torch,
tensorboard, onnx...), and tensordict, which its utilities and rollout storage import. rsl_rl's
``rsl_rl.utils`` package also imports its log writers, which need tensorboard; when that import
fails, the two module files this project compares against (``rsl_rl/utils/utils.py`` and
``rsl_rl/storage/rollout_storage.py``) are loaded directly instead, with ``rsl_rl.utils`` standing
for the first while the second imports: the code that runs is rsl_rl's, unchanged.

    rsl = load()          # None where rsl_rl (or tensordict) is not installed
    rsl.split_and_pad_trajectories, rsl.unpad_trajectories, rsl.RolloutStorage, rsl.version
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType, SimpleNamespace

#: The version make setup installs (the tests say which one they ran against).
PINNED = "5.5.1"

_loaded: SimpleNamespace | None = None
_why_not: str | None = None


def why_not() -> str:
    """Why :func:`load` returned None (for a test's skip reason)."""
    load()
    return _why_not or ""


def load() -> SimpleNamespace | None:
    """rsl_rl's ``split_and_pad_trajectories``, ``unpad_trajectories`` and ``RolloutStorage``."""
    global _loaded, _why_not
    if _loaded is not None or _why_not is not None:
        return _loaded
    try:
        spec = importlib.util.find_spec("rsl_rl")
        importlib.import_module("tensordict")
    except ImportError as exc:
        spec, _why_not = None, f"tensordict does not import: {exc}"
    if spec is None:
        _why_not = _why_not or "rsl_rl is not installed (make setup installs rsl-rl-lib)"
        return None
    try:
        from rsl_rl.storage import RolloutStorage
        from rsl_rl.utils import split_and_pad_trajectories, unpad_trajectories
    except ImportError:  # its log writers' tensorboard: load the two module files directly
        utils, storage = _load_files(Path(spec.submodule_search_locations[0]))
        RolloutStorage = storage.RolloutStorage
        split_and_pad_trajectories = utils.split_and_pad_trajectories
        unpad_trajectories = utils.unpad_trajectories
    _loaded = SimpleNamespace(
        split_and_pad_trajectories=split_and_pad_trajectories,
        unpad_trajectories=unpad_trajectories,
        RolloutStorage=RolloutStorage,
        version=metadata.version("rsl-rl-lib"),
    )
    return _loaded


def _load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_files(root: Path) -> tuple[ModuleType, ModuleType]:
    before = set(sys.modules)
    try:
        utils = _load_file("rsl_rl.utils", root / "utils" / "utils.py")
        storage = _load_file(
            "rsl_rl.storage.rollout_storage", root / "storage" / "rollout_storage.py"
        )
    finally:  # leave sys.modules as it was: nothing else sees the partial rsl_rl.utils
        for name in set(sys.modules) - before:
            if name.startswith("rsl_rl."):
                del sys.modules[name]
    return utils, storage
