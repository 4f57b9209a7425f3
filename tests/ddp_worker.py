"""Run by test_ddp.py as its own program, ``python -m tests.ddp_worker <strategy>`` from the
repository root: Lightning's DDP launcher starts a second process with the same command line. Asserts on every step that both ranks train the same blocks with the same
importance, and at the end that their weights agree. Prints the most bytes DDP's gradient
buckets held in a training step against the most a step trained."""

import sys

import torch
from lightning.pytorch import Callback

from grass_lightning import GrassCallback
from tests.helpers.models import HFModule, quiet_trainer, token_loader


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

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grass.schedule.probing:
            trained = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.grad is not None)
            self.trained_bytes = max(self.trained_bytes, trained)
            self.bucket_bytes = max(self.bucket_bytes, bucket_bytes(trainer.strategy))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        schedule = self.grass.schedule
        active = trainer.strategy.all_gather(torch.tensor(schedule.active))
        estimate = trainer.strategy.all_gather(schedule.importance.estimate.nan_to_num(-1).float())
        assert (active == active[0]).all(), f"ranks train different blocks: {active.tolist()}"
        assert torch.equal(estimate[0], estimate[1]), f"ranks disagree on importance: {estimate.tolist()}"
        if schedule.offloader is not None:
            self.host_bytes = max(self.host_bytes, schedule.offloader.host_bytes())


if __name__ == "__main__":
    strategy = sys.argv[1] if len(sys.argv) > 1 else "ddp_find_unused_parameters_true"
    grass = GrassCallback(num_active=2, sampling_period=2, refresh_interval=2, probe_steps=2,
                          idle_moments="keep" if strategy.startswith("grass_offload") else "drop")
    agree = RanksAgree(grass)
    trainer = quiet_trainer(max_steps=10, devices=2, strategy=strategy, callbacks=[grass, agree])
    module = HFModule("llama")
    trainer.fit(module, token_loader())
    weights = trainer.strategy.all_gather(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(weights[0], weights[1]), "weights differ across ranks"
    if trainer.global_rank == 0:
        print("history", grass.state_dict()["history"])
        print("strategy", type(trainer.strategy).__name__, "moments on host", agree.host_bytes > 0, flush=True)
        every = sum(p.numel() * p.element_size() for p in module.parameters())
        print(f"ddp bucket bytes {agree.bucket_bytes} trained bytes {agree.trained_bytes} parameter bytes {every}", flush=True)
    # Both ranks leave together: a rank that exits while the other still tears down gloo aborted
    # about one run in six ("terminate called without an active exception").
    trainer.strategy.barrier("exit")
    torch.distributed.destroy_process_group()
