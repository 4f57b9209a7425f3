"""Lightning adapter for the carved splits: shuffled training batches, evaluation batches.

Training batches come from torchdata's `StatefulDataLoader` over an `EpochShuffle` sampler:
Lightning saves their position (epoch and offset) in checkpoints, so a run resumed mid-epoch
continues with the very batches it would have seen, in this epoch and the next ones, not a
restarted epoch. Fine-tuning runs are often a single epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from grass_lightning.app.sources import Splits


class SplitsDataModule(LightningDataModule):
    """Serves `Splits` through a task's collate functions.

    Args:
        splits: train/val/test records.
        task: a task from :mod:`grass_lightning.app.tasks` (tokenises and pads).
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
        # Keyword arguments only: Lightning rebuilds the loader with a DistributedSampler under DDP.
        return StatefulDataLoader(dataset=self.splits.train, batch_size=self.batch_size,
                                  sampler=EpochShuffle(len(self.splits.train), self.seed), collate_fn=self.task.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset=self.splits.val, batch_size=self.eval_batch_size, collate_fn=self.task.collate_eval)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(dataset=self.splits.test, batch_size=self.eval_batch_size, collate_fn=self.task.collate_eval)


class EpochShuffle(Sampler[int]):
    """A fresh order every pass that is a function of (seed, epoch) alone, so a resumed run needs
    only the epoch and the position in it (its state) to see the very batches an uninterrupted
    run sees. torchdata 0.11's own stateful random sampler resumes the interrupted epoch right but
    shuffles the epochs after it differently from an uninterrupted run.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.yielded = -1, 0  # the first pass is epoch 0
        self._resume_at: int | None = None

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self._resume_at is None:
            self.epoch, start = self.epoch + 1, 0
        else:
            start, self._resume_at = self._resume_at, None
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        self.yielded = start
        for index in order[start:].tolist():
            self.yielded += 1
            yield index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_at = int(state["epoch"]), int(state["yielded"])
