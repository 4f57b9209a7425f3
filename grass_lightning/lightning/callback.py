"""GrassCallback: GRASS in any LightningModule, as a thin adapter over `GrassSchedule`.

Example::

    from grass_lightning import GrassCallback

    trainer = Trainer(callbacks=[GrassCallback(num_active=2, sampling_period=50)])
    trainer.fit(model)  # model.configure_optimizers builds AdamW over all parameters

Per optimizer step: ``on_before_backward`` counts backward passes (gradients are read in
backward, one pass at a time); ``on_before_optimizer_step`` records the step's readings
(summed across DDP ranks, the fp16 loss scale divided out); ``on_train_batch_end`` (after the optimizer step) refreshes
importance, draws the next active set and logs. Works under automatic and manual optimization.
With bf16 weights (``Trainer(precision="bf16-true")``) the trained parameters step through fp32
master weights (:mod:`grass_lightning.core.masters`; ``master_weights=False`` opts out), and the
fp32 state survives Lightning's checkpoint restore, which would otherwise cast it to bf16.
The schedule (and under an offloading strategy, :mod:`grass_lightning.lightning.strategy`, its
moment offloader) lives from ``on_train_start`` to ``on_train_end``. Under DDP the model is
re-wrapped whenever the trainable set changes, so gradient buckets hold only what trains
(:mod:`grass_lightning.lightning.ddp_buckets`). Under FSDP2 (``ModelParallelStrategy`` with
``tensor_parallel_size=1``, each block sharded by ``fully_shard`` in ``configure_model``:
:func:`grass_lightning.core.sharding.shard_blocks`) nothing is re-wrapped: frozen shards get no
gradient. On several processes every draw is checked to give each the same active set.

Probe steps are optimizer steps to Lightning (``global_step`` counts them) but not updates: the
callback extends ``max_steps`` by ``probe_steps`` for the fit, so ``max_steps`` counts updates
as it does for LISA or full fine-tuning (``max_steps=0`` stays 0: no probe). A run bounded by
``max_epochs`` alone is bounded by its step count plus the probe's instead, with the epochs
that takes. The callback holds the LR schedulers where they were during the probe (those
Lightning steps after the batch, such as ``ReduceLROnPlateau``, are undone before the next),
so the first update runs at the schedule's first learning rate (its warm-up intact). When fit
ends or raises, the model gets back its ``requires_grad`` flags, no hooks stay on it, parked
moments return to the optimizer, and the Trainer gets back its ``max_steps`` and ``max_epochs``.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from grass_lightning.core.blocks import BlockLayout, find_blocks
from grass_lightning.core.config import SETTINGS, GrassConfig
from grass_lightning.core.masters import HALF, keep_fp32_state
from grass_lightning.core.offload import check_offload
from grass_lightning.core.schedule import GrassSchedule
from grass_lightning.core.sharding import check_sharding
from grass_lightning.lightning.block_strategies import check_block_strategy
from grass_lightning.lightning.compat import optimizer_unscales_itself
from grass_lightning.lightning.ddp_buckets import DDPBuckets
from grass_lightning.lightning.loss_scaling import loss_scaler
from grass_lightning.lightning.probe_accounting import ProbeAccounting
from grass_lightning.lightning.sharded_resume import load_as_saved
from grass_lightning.lightning.strategy import OffloadingStrategy


class GrassCallback(Callback):
    """Fine-tune a few transformer blocks at a time, chosen by mean gradient norm (GRASS).

    The module's optimizer must be built over all parameters; the callback freezes and
    unfreezes blocks by ``requires_grad`` from ``on_fit_start`` on. The defaults and the reasons
    for them are in :mod:`grass_lightning.core.config`.

    Args:
        config: the GRASS hyper-parameters as a `GrassConfig`; or give its fields as keyword
            arguments (``GrassCallback(num_active=2, sampling_period=50)``), not both.
        blocks: dotted path from the LightningModule to the ``nn.ModuleList`` of blocks, e.g.
            ``"model.model.layers"``; ``None`` finds them in common Hugging Face models.
        seed: seed of the block sampler; ``None`` takes torch's seed at fit start, so
            ``seed_everything`` governs it.
        **settings: `GrassConfig` fields, each documented there with its default.

    Raises:
        ValueError: for an argument out of range, at construction; at fit start, for a
            ``blocks`` path that does not resolve, a model without detectable blocks, or
            ``num_active`` above the number of blocks.
        MisconfigurationException: in ``setup``, for DeepSpeed, FSDP1 and tensor parallelism,
            for DDP without ``find_unused_parameters=True``, and for a park-mode offloading
            strategy with ``idle_moments="drop"``; at fit start, for fp16 loss scaling with an
            optimizer that unscales inside its step (``AdamW(fused=True)``), for float16
            blocks (``precision="16-true"``: no loss scaling; use ``"bf16-true"``), and for
            bf16 shards with master weights under FSDP2 (use ``"bf16-mixed"``).
    """

    def __init__(self, config: GrassConfig | None = None, blocks: str | None = None, seed: int | None = None,
                 **settings) -> None:
        if config is not None and settings:
            raise ValueError(f"GrassCallback got a config and settings {sorted(settings)}: give one or the other.")
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"{unknown[0]}={settings[unknown[0]]!r} is not a GrassCallback setting; "
                             f"the settings are {', '.join(SETTINGS)}.")
        self.config = config if config is not None else GrassConfig(**settings)
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise ValueError(f"blocks={blocks!r} must be a dotted module path such as 'model.layers', or None.")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed={seed!r} must be an integer or None.")
        self.blocks = blocks
        self.seed = seed
        self.schedule: GrassSchedule | None = None  # from train start to train end
        self._layout: BlockLayout | None = None
        self._saved_state: dict | None = None
        self._stepped = False
        self._probe_accounting = ProbeAccounting()
        self._ddp_buckets = DDPBuckets()
        self._keep_fp32: list = []  # load hooks from fit start to train start (see `keep_fp32_state`)
        self._unwrap_load = None  # from fit start to train start under FSDP2 (see `load_as_saved`)
        self.last_step: tuple[bool, list[int]] | None = None  # whether the last step probed, what it trained

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        try:
            check_block_strategy(strategy)
        except ValueError as error:
            raise MisconfigurationException(f"GrassCallback: {error}") from None
        if isinstance(strategy, OffloadingStrategy):
            try:
                check_offload(strategy.offload, self.config.idle_moments)
            except ValueError as error:
                raise MisconfigurationException(f"GrassCallback with {type(strategy).__name__}: {error}") from None
            strategy.offloaded_by = self

    def check_model(self, module: nn.Module) -> BlockLayout:
        """The module's blocks, or the error fit start would raise (``blocks`` not resolving, no
        blocks found, ``num_active`` above their number). A meta-device skeleton will do."""
        layout = find_blocks(module, self.blocks)
        self.config.check_blocks(len(layout), layout.path)
        return layout

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scaler = loss_scaler(trainer)
        if scaler is not None and any(optimizer_unscales_itself(opt) for opt in trainer.optimizers):
            raise MisconfigurationException(
                "GrassCallback with fp16 loss scaling and an optimizer that unscales inside its step "
                "(e.g. AdamW(fused=True)): a probe step drops every block gradient before that step, "
                "which leaves the scaler without an inf check (torch raises). Use fused=False, or "
                "precision='bf16-mixed'."
            )
        self._layout = layout = self.check_model(pl_module)
        dtypes = {p.dtype for block in layout.blocks for p in block.parameters()}
        if torch.float16 in dtypes:
            raise MisconfigurationException(
                "GrassCallback with float16 weights (precision='16-true'): half-precision gradients underflow "
                "without loss scaling, which 16-true does not do. Use precision='bf16-true' (bf16 weights, fp32 "
                "masters for the trained blocks) or '16-mixed' (fp32 weights, loss scaling)."
            )
        try:
            check_sharding([p for block in layout.blocks for p in block.parameters()], _offload_mode(trainer),
                           self.config.master_weights)
        except ValueError as error:
            raise MisconfigurationException(f"GrassCallback: {error}") from None
        half = bool(dtypes & set(HALF))
        if half and self.config.master_weights:  # Lightning restores optimizer state before on_train_start
            self._keep_fp32 = [handle for opt in trainer.optimizers for handle in keep_fp32_state(opt)]
        if isinstance(trainer.strategy, ModelParallelStrategy):  # Lightning may restore optimizer state next
            self._unwrap_load = load_as_saved(trainer.strategy)
        self._probe_accounting.extend(trainer, self.config.probe_steps)
        tied = layout.tied() and self.config.train_embeddings != self.config.train_head
        offload = _offload_mode(trainer)
        rank_zero_info(
            f"GRASS: {len(layout)} blocks at {layout.path!r}, training {self.config.num_active} at a time "
            f"(sampler={self.config.sampler!r}, probe_steps={self.config.probe_steps}, offload={offload!r})."
            + (f" The {self.config.probe_steps} probe steps come before the {trainer.max_steps - self.config.probe_steps} "
               f"updates: training ends at global step {trainer.max_steps}." if self._probe_accounting.extended else "")
            + (" The LM head is the input embedding matrix (tied), so it trains only with train_embeddings=True "
               "and train_head=True." if tied else "")
            + (f" Weights in {_dtype_name(dtypes)}: "
               + ("trained parameters step through fp32 master weights." if self.config.master_weights
                  else "no master weights (master_weights=False), so updates below half an ulp are lost.")
               if half else "")
        )
        if self.config.idle_moments == "keep" and offload == "none":
            rank_zero_warn(
                "GrassCallback(idle_moments='keep') keeps the Adam moments of every block visited so far "
                "on the training device: optimizer memory grows toward full fine-tuning. Use "
                "idle_moments='drop' to bound it by the active set, or strategy='grass_offload' to "
                "keep idle blocks' moments in host memory."
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the schedule once the optimizer holds its restored state (a resumed run), and only
        for a fit that trains: one that resumes a finished run never gets here, so nothing is parked."""
        self._remove_keep_fp32()  # the schedule's masters keep fp32 state through later loads
        self._restore_load()
        seed = self.seed if self.seed is not None else trainer.strategy.broadcast(torch.initial_seed())
        # Gradients are read in backward, per micro-batch: before DDP all-reduces them (the readings
        # are summed across ranks instead) and before AMP unscales them (the scale is divided out).
        across = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        # DDP all-reduces whole buckets, so it needs every gradient; FSDP2 reduce-scatters only the
        # parameters that have one, and the readings are summed across ranks by `across` anyway
        free = (trainer.world_size == 1 or isinstance(trainer.strategy, ModelParallelStrategy)) and loss_scaler(trainer) is None
        self.schedule = GrassSchedule(self._layout, trainer.optimizers, self.config, seed, free_in_backward=free,
                                      across=across,
                                      offload=_offload_mode(trainer))
        if self._saved_state is not None:
            self.schedule.load_state_dict(self._saved_state)
        self.schedule.start()
        self._probe_accounting.start()

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.schedule is not None:
            self.schedule.before_backward()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Fires once per optimizer: measure once per step even with several optimizers.
        if self.schedule is not None and not self._stepped:
            scaler = loss_scaler(trainer)
            self.schedule.measure(scaler.get_scale() if scaler is not None else 1.0)
            self._stepped = True

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        # Before every forward, whatever changed the trainable set since the last (a draw, the probe's
        # end, `GrassSchedule.activate`, a state loaded mid-fit): DDP buckets for what this step trains.
        self._ddp_buckets.resize(trainer.strategy)
        if self.schedule is not None:
            self._probe_accounting.before_batch(trainer, self.schedule.probing)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.schedule is None or not self._stepped:
            return  # a micro-batch inside gradient accumulation
        self._stepped = False
        probing = self.schedule.probing
        trained_blocks = [] if probing else list(self.schedule.active)
        if probing:
            self._probe_accounting.hold(trainer)  # before a checkpoint of this step is written
        self.schedule.end_step()
        self.last_step = (probing, trained_blocks)
        self._log(pl_module, probing, trained_blocks)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._uninstall(trainer)  # before the strategy's teardown moves optimizer state (parked moments come back first)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall(trainer)

    def _uninstall(self, trainer: Trainer) -> None:
        """Leave the model and Trainer as the user had them; keep the schedule's state for `state_dict`."""
        self._remove_keep_fp32()
        self._restore_load()
        self._ddp_buckets.release()
        if self.schedule is not None:
            self._saved_state = self.schedule.state_dict()
            self.schedule.close()
            self.schedule = None
        self._probe_accounting.restore(trainer)

    def _restore_load(self) -> None:
        if self._unwrap_load is not None:
            self._unwrap_load()
            self._unwrap_load = None

    def _remove_keep_fp32(self) -> None:
        for handle in self._keep_fp32:
            handle.remove()
        self._keep_fp32 = []

    @override
    def state_dict(self) -> dict:
        return self.schedule.state_dict() if self.schedule is not None else dict(self._saved_state or {})

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_state = state_dict
        if self.schedule is not None:
            self.schedule.load_state_dict(state_dict)
            self.schedule.start()

    def _log(self, pl_module: LightningModule, probing: bool, trained_blocks: list[int]) -> None:
        """Log the step just taken: whether it probed and which blocks it trained; the importance
        and probabilities as they stand after it (refreshed, ready for the next draw)."""
        schedule = self.schedule
        importance = schedule.importance.estimate
        probabilities = schedule.probabilities
        metrics = {"grass/probing": float(probing), "grass/nonfinite": schedule.importance.nonfinite.float()}
        for block in range(len(importance)):
            metrics[f"grass/importance/{block:02d}"] = importance[block].item()
            metrics[f"grass/probability/{block:02d}"] = probabilities[block].item()
            metrics[f"grass/active/{block:02d}"] = float(block in trained_blocks)
        if schedule.masters:
            metrics["grass/masters_mb"] = sum(m.master_bytes() for m in schedule.masters) / 2**20
        if schedule.offloader is not None:
            metrics["grass/moments_device_mb"] = schedule.offloader.device_bytes() / 2**20
            metrics["grass/moments_host_mb"] = schedule.offloader.host_bytes() / 2**20
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


def _dtype_name(dtypes: set[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def _offload_mode(trainer: Trainer) -> str:
    """The offload mode of the Trainer's strategy: ``"none"`` unless it is an offloading one."""
    return trainer.strategy.offload if isinstance(trainer.strategy, OffloadingStrategy) else "none"
