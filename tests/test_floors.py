"""The declared lower bounds are the tested ones: CI installs exactly them (``.ci/floors.py``)."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a working environment may hold newer versions; CI holds the floors")
def test_ci_runs_on_the_declared_floors():
    """transformers>=4.45 was declared while everything ran on 5.x: per-layer checkpointing came in
    4.52 and dropping the KV cache under it in 4.53, so an older install replayed cache updates."""
    pins = subprocess.run([sys.executable, str(ROOT / ".ci" / "floors.py")], capture_output=True, text=True,
                          check=True).stdout.split()
    assert pins and "transformers==5.25" in pins
    for pin in pins:
        name, floor = pin.split("==")
        assert Version(Version(version(name)).public) == Version(floor), f"{pin} declared, {version(name)} installed"
