"""Thin Lightning adapters over `grass_lightning.core`.

`callback` (GrassCallback: the schedule in any LightningModule), `strategy` (offloading
strategies), `progress` (a bar that shows the active blocks), `checkpoint_io` (atomic
checkpoints), `sharded_resume` (resuming FSDP2's distributed checkpoints), `stats` (step time
and memory of a run), `loss_scaling` and `block_strategies` (what the callback checks about the
Trainer).
"""
