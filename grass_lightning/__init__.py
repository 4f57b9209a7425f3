"""GRASS for PyTorch Lightning: train a few transformer blocks at a time, chosen by importance.

The algorithm, plain PyTorch: `blocks` finds the blocks; `importance` measures them; `probe`
measures all of them cheaply at the start; `sampling` turns importance into an active set;
`active_set` freezes the rest and handles idle Adam moments; `offload` moves block moments
between device and host; `schedule` runs these step by step; `config` holds the
hyper-parameters. Lightning adapters: `callback`, `strategy` (offloading), `progress`.
The app behind `train.py`: `sources` (data), `tasks` (loss and score), `models`, `assets`, `methods`,
`module` (GrassModule), `datamodule`, `checkpoint_io`, `stats`, `run` (train(cfg)), `gather`,
`heatmap`, `bench` (side-by-side costs).
"""

from grass_lightning.blocks import BlockLayout, find_blocks
from grass_lightning.callback import GrassCallback
from grass_lightning.config import GrassConfig
from grass_lightning.module import GrassModule
from grass_lightning.offload import MomentOffloader
from grass_lightning.schedule import GrassSchedule
from grass_lightning.strategy import GrassOffloadDDPStrategy, GrassOffloadStrategy

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
