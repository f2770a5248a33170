"""Run ProtoMotions unchanged on rollout_buffers: one import, or one launcher command.

Once this module is imported, ``protomotions.agents.utils.data`` *is* rollout_buffers' drop-in:
``import protomotions.agents.utils.data`` and ``from protomotions.agents.utils.data import
ExperienceBuffer, DictDataset, swap_and_flatten01`` give this library's classes, wherever
ProtoMotions imports them. Either add one line before anything imports ProtoMotions::

    import rollout_buffers.protomotions  # noqa: F401  (first line of the training script)

or leave every file as it is and launch the script through this module::

    python -m rollout_buffers.protomotions protomotions/train_agent.py +exp=...   # a script
    python -m rollout_buffers.protomotions -m protomotions.train_agent +exp=...   # a module

The switch is a finder on ``sys.meta_path`` for that one module name, so it works whether or
not the ``protomotions`` packages were imported yet (they stay ProtoMotions' own). Names of the
original module other than the three classes and function are read from the original file,
loaded aside under a private name, on first use. If the original module was imported before
the switch, it is replaced in ``sys.modules`` and on its package, with a warning: a name
already bound elsewhere (``from ... import ExperienceBuffer`` run earlier) keeps the original.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import warnings
from types import ModuleType
from typing import Any

from .buffer import ExperienceBuffer, swap_and_flatten01
from .dataset import DictDataset

__all__ = ["MODULE", "install", "uninstall", "installed", "main"]

#: The module this switch replaces.
MODULE = "protomotions.agents.utils.data"
_PARENT = MODULE.rpartition(".")[0]
_NAMES = {
    "ExperienceBuffer": ExperienceBuffer,
    "DictDataset": DictDataset,
    "swap_and_flatten01": swap_and_flatten01,
}
_MARK = "__rollout_buffers__"  # set on the modules this switch makes
_original: ModuleType | None = None  # the original file, loaded aside on demand


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads ``protomotions.agents.utils.data`` as rollout_buffers' module."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != MODULE:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin="rollout_buffers")

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__.update(_NAMES)
        module.__doc__ = (
            "rollout_buffers in place of ProtoMotions' data module (rollout_buffers.protomotions)"
        )
        module.__all__ = list(_NAMES)
        module.__getattr__ = _from_original  # PEP 562: other names of the original module
        setattr(module, _MARK, True)


_FINDER = _Finder()


def _from_original(name: str) -> Any:
    """A name the original module defines and this one does not (read from the original file)."""
    global _original
    if _original is None and not name.startswith("__"):
        parent = sys.modules.get(_PARENT)
        spec = importlib.machinery.PathFinder.find_spec(MODULE, getattr(parent, "__path__", None))
        if spec is not None and spec.origin and spec.loader is not None:
            aside = importlib.util.spec_from_file_location(
                "rollout_buffers._protomotions_original_data", spec.origin
            )
            if aside is not None and aside.loader is not None:
                module = importlib.util.module_from_spec(aside)
                module.__package__ = _PARENT  # its relative imports resolve as before
                aside.loader.exec_module(module)
                _original = module
    if _original is not None and hasattr(_original, name):
        return getattr(_original, name)
    raise AttributeError(f"module {MODULE!r} (rollout_buffers) has no attribute {name!r}")


def installed() -> bool:
    """Whether the switch is on (the finder is on ``sys.meta_path``)."""
    return _FINDER in sys.meta_path


def install() -> None:
    """Make ``protomotions.agents.utils.data`` resolve to rollout_buffers (idempotent).

    Called when this module is imported. If the original module was imported already, it is
    replaced in ``sys.modules`` and on its package, and a warning says that names bound from it
    before (``from protomotions.agents.utils.data import ...``) still refer to the original.
    """
    if not installed():
        sys.meta_path.insert(0, _FINDER)
    current = sys.modules.get(MODULE)
    if current is None or getattr(current, _MARK, False):
        return
    spec = _FINDER.find_spec(MODULE)
    module = importlib.util.module_from_spec(spec)
    _FINDER.exec_module(module)
    sys.modules[MODULE] = module
    parent = sys.modules.get(_PARENT)
    if parent is not None:
        parent.data = module
    warnings.warn(
        f"{MODULE} was imported before rollout_buffers.protomotions: it is replaced now, but "
        f"names already bound from it (from {MODULE} import ExperienceBuffer, ...) still refer "
        "to the original; import rollout_buffers.protomotions first, or launch the script with "
        "python -m rollout_buffers.protomotions",
        RuntimeWarning,
        stacklevel=2,
    )


def uninstall() -> None:
    """Turn the switch off: a later ``import protomotions.agents.utils.data`` gets the original
    (names already bound keep what they were bound to)."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    if getattr(sys.modules.get(MODULE), _MARK, False):
        del sys.modules[MODULE]
        parent = sys.modules.get(_PARENT)
        if getattr(getattr(parent, "data", None), _MARK, False):
            del parent.data


_USAGE = """usage: python -m rollout_buffers.protomotions SCRIPT [ARGS...]
       python -m rollout_buffers.protomotions -m MODULE [ARGS...]

Runs a ProtoMotions script or module unchanged, with protomotions.agents.utils.data replaced
by rollout_buffers (ExperienceBuffer, DictDataset, swap_and_flatten01)."""


def main(argv: list[str] | None = None) -> None:
    """``python -m rollout_buffers.protomotions [-m] TARGET ARGS...``: run TARGET as
    ``python TARGET ARGS...`` (or ``python -m TARGET ARGS...``) would, with the switch on."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print(_USAGE, file=sys.stderr if not args or args[0] == "-m" else sys.stdout)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    install()
    if args[0] == "-m":
        sys.argv = args[1:]  # runpy sets argv[0] to the module's file, as python -m does
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python SCRIPT` sets it
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    # Run through the module imported under its own name (which installs the switch), so that
    # an `import rollout_buffers.protomotions` in the script finds this same switch.
    from rollout_buffers.protomotions import main as _main

    _main()
else:
    install()
