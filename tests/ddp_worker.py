"""Run by test_ddp.py as its own program, ``python -m tests.ddp_worker <strategy>`` from the
repository root: Lightning's DDP launcher starts a second process with the same command line.
Asserts on every step that both ranks train the same blocks with the same importance and that
DDP's gradient buckets hold what the step trains (also after an active set given by hand
mid-fit), and at the end that their weights agree and that no DDP wrapper outlives the fit.
Prints the most bytes the buckets held in a step against the most a step trained, and what the
re-wraps cost: their number, seconds and the bytes they broadcast."""

import gc
import json
import sys
import time
import weakref

import torch
from lightning.pytorch import Callback

from grass_lightning import GrassCallback
from grass_lightning.lightning.ddp_buckets import DDPBuckets
from tests.helpers.models import HFModule, quiet_trainer, token_loader

HAND_PICKED_AT = 5  # the step whose active set is given by hand (GrassSchedule.activate)


class RewrapCost:
    """Counts the re-wraps, their seconds, and the bytes DDP broadcast while making them."""

    def __init__(self) -> None:
        self.count, self.seconds, self.bytes, self._inside = 0, 0.0, 0, False
        resize, broadcast = DDPBuckets.resize, torch.distributed._broadcast_coalesced

        def timed(buckets, strategy):
            started, self._inside = time.perf_counter(), True
            try:
                rewrapped = resize(buckets, strategy)
            finally:
                self._inside = False
            if rewrapped:
                self.count, self.seconds = self.count + 1, self.seconds + time.perf_counter() - started
            return rewrapped

        def counted(group, tensors, *args, **kwargs):
            if self._inside:
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return broadcast(group, tensors, *args, **kwargs)

        DDPBuckets.resize, torch.distributed._broadcast_coalesced = timed, counted


def bucket_bytes(strategy) -> int:
    """Bytes in DDP's gradient buckets, as DDP logs them."""
    sizes = strategy.model._get_ddp_logging_data()["bucket_sizes"]
    return sum(int(size) for size in str(sizes).split(","))


class RanksAgree(Callback):
    def __init__(self, grass: GrassCallback) -> None:
        self.grass = grass
        self.host_bytes = 0
        self.bucket_bytes = 0
        self.trained_bytes = 0
        self.wrapper = None  # a weak reference to the last DDP wrapper of the fit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == HAND_PICKED_AT:
            self.grass.schedule.activate([0])  # one block where draws give two: the buckets must follow

    def on_train_end(self, trainer, pl_module):
        self.wrapper = weakref.ref(trainer.strategy.model)  # the wrapper the fit ends with

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grass.schedule.probing:
            trained = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.grad is not None)
            buckets = bucket_bytes(trainer.strategy)
            assert buckets == trained, f"step {trainer.global_step}: buckets hold {buckets} bytes, the step trains {trained}"
            self.trained_bytes = max(self.trained_bytes, trained)
            self.bucket_bytes = max(self.bucket_bytes, buckets)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        schedule = self.grass.schedule
        active = trainer.strategy.all_gather(torch.tensor(schedule.active))
        estimate = trainer.strategy.all_gather(schedule.importance.estimate.nan_to_num(-1).float())
        assert (active == active[0]).all(), f"ranks train different blocks: {active.tolist()}"
        assert torch.equal(estimate[0], estimate[1]), f"ranks disagree on importance: {estimate.tolist()}"
        if schedule.offloader is not None:
            self.host_bytes = max(self.host_bytes, schedule.offloader.host_bytes())


class SplitMicroBatches(HFModule):
    """Four micro-batches of 8 token rows, split evenly over the ranks in order: one process reads
    all four in one step, two read two each."""

    def train_dataloader(self):
        rows = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(3))
        per_rank = 32 // self.trainer.world_size
        mine = rows[self.trainer.global_rank * per_rank:][:per_rank]
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(mine.repeat(2, 1)), batch_size=8)


def probe_readings(devices: int) -> list[float]:
    """Importance after a one-step probe over the 32 rows, by ``devices`` processes."""
    grass = GrassCallback(num_active=2, probe_steps=1, seed=0)
    trainer = quiet_trainer(max_steps=1, devices=devices, accumulate_grad_batches=4 // devices,
                            strategy="ddp_find_unused_parameters_true" if devices > 1 else "auto",
                            use_distributed_sampler=False, callbacks=[grass])
    trainer.fit(SplitMicroBatches("llama"))
    return grass.state_dict()["importance"]["estimate"].tolist()


if __name__ == "__main__" and sys.argv[1:] == ["readings"]:
    readings = probe_readings(devices=2)
    print("readings", json.dumps(readings), flush=True)
    torch.distributed.destroy_process_group()
elif __name__ == "__main__":
    strategy = sys.argv[1] if len(sys.argv) > 1 else "ddp_find_unused_parameters_true"
    grass = GrassCallback(num_active=2, sampling_period=2, refresh_interval=2, probe_steps=2,
                          idle_moments="keep" if strategy.startswith("grass_offload") else "drop")
    agree = RanksAgree(grass)
    cost = RewrapCost()
    trainer = quiet_trainer(max_steps=10, devices=2, strategy=strategy, callbacks=[agree, grass])
    module = HFModule("llama")
    trainer.fit(module, token_loader())
    gc.collect()
    assert agree.wrapper() is None, "a DDP wrapper outlived the fit (its buckets, module and trainer with it)"
    weights = trainer.strategy.all_gather(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(weights[0], weights[1]), "weights differ across ranks"
    if trainer.global_rank == 0:
        print("history", grass.state_dict()["history"])
        print("strategy", type(trainer.strategy).__name__, "moments on host", agree.host_bytes > 0, flush=True)
        every = sum(p.numel() * p.element_size() for p in module.parameters())
        print(f"ddp bucket bytes {agree.bucket_bytes} trained bytes {agree.trained_bytes} parameter bytes {every}", flush=True)
        print(f"rewraps {cost.count} seconds {cost.seconds:.4f} broadcast bytes {cost.bytes}", flush=True)
    # Both ranks leave together: a rank that exits while the other still tears down gloo aborted
    # about one run in six ("terminate called without an active exception").
    trainer.strategy.barrier("exit")
    torch.distributed.destroy_process_group()
