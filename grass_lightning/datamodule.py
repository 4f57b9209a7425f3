"""Lightning adapter for the carved splits: shuffled training batches, evaluation batches.

Training batches come from torchdata's `StatefulDataLoader`: Lightning saves its position
(sampler order and offset) in checkpoints, so a run resumed mid-epoch continues with the very
batches it would have seen, not a restarted epoch. Fine-tuning runs are often a single epoch.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from grass_lightning.sources import Splits


class SplitsDataModule(LightningDataModule):
    """Serves `Splits` through a task's collate functions.

    Args:
        splits: train/val/test records.
        task: a task from :mod:`grass_lightning.tasks` (tokenises and pads).
        batch_size: training examples per micro-batch.
        eval_batch_size: examples per evaluation batch (a multiple-choice example is one
            sequence per choice).
        seed: seed of the training order.
    """

    def __init__(self, splits: Splits, task, batch_size: int, eval_batch_size: int, seed: int) -> None:
        super().__init__()
        self.splits, self.task = splits, task
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def train_dataloader(self) -> StatefulDataLoader:
        order = torch.Generator().manual_seed(self.seed)
        # Keyword arguments only: Lightning rebuilds the loader with a DistributedSampler under DDP.
        return StatefulDataLoader(dataset=self.splits.train, batch_size=self.batch_size, shuffle=True,
                                  generator=order, collate_fn=self.task.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset=self.splits.val, batch_size=self.eval_batch_size, collate_fn=self.task.collate_eval)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(dataset=self.splits.test, batch_size=self.eval_batch_size, collate_fn=self.task.collate_eval)
