"""Run by test_fsdp.py as its own program, ``python -m tests.fsdp_worker <mode> <out.pt>`` from the
repository root: Lightning's launcher starts a second process with the same command line. GRASS
under FSDP2 (`ModelParallelStrategy`, each block ``fully_shard``-ed) on two CPU ranks (gloo).

``train``: probe steps and several draws; on every step both ranks train the same blocks and the
frozen ones hold neither a gradient nor optimizer state. Writes the full weights and the
callback's state for the test to compare with one process on the same micro-batches.
``resume``: the same run stopped after 4 updates, saved, resumed to the end, against an
uninterrupted one; writes both.

Each rank reads its own half of every step's rows: rank r gets rows 8k+4r .. 8k+4r+3 in step k,
the rows one process reads as two accumulated micro-batches of 4 (`reference_loader`)."""

import sys

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from grass_lightning import GrassCallback
from tests.helpers.models import VOCAB, ShardedHFModule, quiet_trainer

SETTINGS = dict(num_active=2, sampling_period=2, refresh_interval=2, probe_steps=2, seed=0)
UPDATES = 8  # after the 2 probe steps, with a draw every 2
STEPS = UPDATES + SETTINGS["probe_steps"]
STOP = 4  # the interrupted run saves after this many updates
CLIP = 0.05  # small enough to clip most steps


def rows(steps: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (8 * steps, 12), generator=torch.Generator().manual_seed(3))


def rank_loader(rank: int, steps: int = STEPS):
    mine = rows(steps).view(-1, 2, 4, 12)[:, rank].reshape(-1, 12)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(mine), batch_size=4)


def reference_loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows(STEPS)), batch_size=4)


class FrozenStayEmpty(Callback):
    """Asserts on every update that each rank trains the same blocks and that a frozen block's
    parameters have no gradient and no optimizer state; and after every probe backward that no
    block holds a gradient (freed as read, so FSDP2 reduce-scatters none)."""

    def __init__(self, grass: GrassCallback) -> None:
        self.grass = grass
        self.checked = 0

    def on_after_backward(self, trainer, pl_module):
        if self.grass.schedule.probing:
            held = [p for block in self.grass._layout.blocks for p in block.parameters() if p.grad is not None]
            assert not held, f"step {trainer.global_step}: the probe left {len(held)} block gradients"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        schedule = self.grass.schedule
        if schedule.probing:
            return
        active = trainer.strategy.all_gather(torch.tensor(schedule.active))
        assert (active == active[0]).all(), f"ranks train different blocks: {active.tolist()}"
        for index, block in enumerate(self.grass._layout.blocks):
            for name, p in block.named_parameters():
                trained = index in schedule.active
                assert (p.grad is not None) == trained, f"step {trainer.global_step}: block {index} {name} grad"
                if not trained:
                    assert p not in optimizer.state, f"step {trainer.global_step}: frozen block {index} has moments"
        self.checked += 1


def fit(updates: int, ckpt_path=None, save_to=None, epoch: int = STEPS):
    """One fit of ``updates`` updates on both ranks, ``epoch`` steps an epoch; the full weights
    (rank 0) and the callback's state."""
    grass = GrassCallback(**SETTINGS)
    frozen = FrozenStayEmpty(grass)
    trainer = quiet_trainer(max_steps=updates, max_epochs=-1, devices=2, gradient_clip_val=CLIP, use_distributed_sampler=False,
                            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                            callbacks=[grass, frozen])
    module = ShardedHFModule("llama")
    trainer.fit(module, rank_loader(trainer.global_rank, epoch), ckpt_path=ckpt_path)
    assert frozen.checked == updates - (0 if ckpt_path is None else STOP), frozen.checked
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return trainer, weights, grass.state_dict()


def refusals() -> list[str]:
    """What GRASS refuses on sharded blocks, on one process: bf16 shards with master weights (at
    fit start) and moment offloading (the schedule)."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from grass_lightning import GrassConfig, GrassSchedule

    messages = []
    trainer = quiet_trainer(max_steps=1, precision="bf16-true", callbacks=[GrassCallback(**SETTINGS)],
                            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    module = ShardedHFModule("llama")
    try:
        trainer.fit(module, rank_loader(0))
    except MisconfigurationException as error:
        messages.append(str(error))
    optimizer = torch.optim.AdamW(module.parameters())
    layout = GrassCallback(**SETTINGS).check_model(module)
    try:
        GrassSchedule(layout, [optimizer], GrassConfig(num_active=2, idle_moments="keep"), seed=0, offload="park")
    except ValueError as error:
        messages.append(str(error))
    return messages


if __name__ == "__main__" and sys.argv[1] == "refusals":
    print("\n".join(refusals()))
elif __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        trainer, weights, state = fit(UPDATES)
        result = {"weights": weights, "grass": state}
    else:
        # One batch per epoch: a fit that ends at max_steps leaves its epoch open, and the resumed fit
        # restarts that epoch's DataLoader (Lightning cannot resume a plain one mid-epoch).
        _, whole, whole_state = fit(UPDATES, epoch=1)
        checkpoint = out + ".ckpt"
        fit(STOP, save_to=checkpoint, epoch=1)
        trainer, resumed, resumed_state = fit(UPDATES, ckpt_path=checkpoint, epoch=1)
        result = {"whole": whole, "whole_grass": whole_state, "resumed": resumed, "resumed_grass": resumed_state}
    if trainer.global_rank == 0:
        torch.save(result, out)
    trainer.strategy.barrier("exit")
    torch.distributed.destroy_process_group()
