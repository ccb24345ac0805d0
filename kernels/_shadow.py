"""Give the bare module name `kernels` back to whatever else provides it (see `kernels/__init__.py`)."""

import importlib.machinery
import importlib.util
import os
import sys


def _repository_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def yield_name(name: str) -> None:
    """Replace `sys.modules[name]` (this folder, imported by accident) with the next package of that name
    on `sys.path`, skipping the repository root. The import system returns whatever `sys.modules` holds
    once the module body has run, so `import kernels` then yields the installed package; with none
    installed it raises `ModuleNotFoundError` as it would without this folder."""
    root = _repository_root()
    search = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
