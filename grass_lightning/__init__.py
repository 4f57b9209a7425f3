"""GRASS for PyTorch Lightning: train a few transformer blocks at a time, chosen by importance.

Layers, each importing only the ones below it (enforced by import-linter: pyproject.toml,
``tests/test_layers.py``), with no import cycle inside a layer:

- `grass_lightning.core`: the algorithm in plain PyTorch (blocks, importance, probe, sampling,
  active set, schedule, config and its checks, offload, recompute, masters);
- `grass_lightning.lightning`: Lightning adapters (GrassCallback, the probe's step accounting,
  DDP buckets, offloading strategies, progress bar, checkpoint I/O); Lightning's private API
  only in ``lightning/compat.py``;
- `grass_lightning.app`: the Hydra app behind ``train.py``: setup steps (``app/setup.py``), the
  methods (``app/methods.py``: one `Method` class each, with a ``Settings`` dataclass), the
  module (`FineTuningModule`), tasks (a `Task` protocol), data, models, export and the heat-map;
- `grass_lightning.tools`: bench, plan (will it fit?), gather and study.

Commands (``[project.scripts]``): ``grass-bench``, ``grass-export``, ``grass-gather``,
``grass-heatmap``, ``grass-plan``, ``grass-study``; each also runs as ``python -m grass_lightning.<layer>.<tool>``.
"""

from grass_lightning.app.module import FineTuningModule, GrassModule
from grass_lightning.core.blocks import BlockLayout, find_blocks
from grass_lightning.core.config import GrassConfig
from grass_lightning.core.offload import MomentOffloader
from grass_lightning.core.schedule import GrassSchedule
from grass_lightning.core.sharding import shard_blocks
from grass_lightning.lightning.callback import GrassCallback
from grass_lightning.lightning.strategy import GrassOffloadDDPStrategy, GrassOffloadStrategy

__all__ = [
    "BlockLayout",
    "FineTuningModule",
    "GrassCallback",
    "GrassConfig",
    "GrassModule",
    "GrassOffloadDDPStrategy",
    "GrassOffloadStrategy",
    "GrassSchedule",
    "MomentOffloader",
    "find_blocks",
    "shard_blocks",
]
__version__ = "0.1.0"
