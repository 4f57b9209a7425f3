"""Print the declared lower bounds of pyproject.toml (dependencies and every extra) as pins,
``name==floor``, for ``pip install -r``: CI installs them first, so the floors are the tested versions."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for requirement in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
    found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)(,.*)?", requirement)
    if found is None:
        raise SystemExit(f"{requirement!r} in pyproject.toml has no lower bound (>=): declare the tested floor.")
    print(f"{found[1]}=={found[2]}")
