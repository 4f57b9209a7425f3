"""GRASS for PyTorch Lightning: train a few transformer blocks at a time, chosen by importance.

Layers, each depending only on the ones before it:

- `grass_lightning.core`: the algorithm in plain PyTorch (blocks, importance, probe, sampling,
  active set, schedule, config, offload);
- `grass_lightning.lightning`: Lightning adapters (GrassCallback, offloading strategies,
  progress bar, checkpoint I/O);
- `grass_lightning.app`: the Hydra app behind ``train.py`` (module, data, tasks, models, methods);
- `grass_lightning.tools`: bench, gather, heatmap, study (``python -m grass_lightning.<tool>``).
"""

from grass_lightning.app.module import GrassModule
from grass_lightning.core.blocks import BlockLayout, find_blocks
from grass_lightning.core.config import GrassConfig
from grass_lightning.core.offload import MomentOffloader
from grass_lightning.core.schedule import GrassSchedule
from grass_lightning.lightning.callback import GrassCallback
from grass_lightning.lightning.strategy import GrassOffloadDDPStrategy, GrassOffloadStrategy

__all__ = [
    "BlockLayout",
    "GrassCallback",
    "GrassConfig",
    "GrassModule",
    "GrassOffloadDDPStrategy",
    "GrassOffloadStrategy",
    "GrassSchedule",
    "MomentOffloader",
    "find_blocks",
]
__version__ = "0.1.0"
