"""GrassCallback: GRASS in any LightningModule, as a thin adapter over `GrassSchedule`.

Example::

    from grass_lightning import GrassCallback

    trainer = Trainer(callbacks=[GrassCallback(num_active=2, sampling_period=50)])
    trainer.fit(model)  # model.configure_optimizers builds AdamW over all parameters

Per optimizer step: ``on_before_backward`` counts backward passes for a probing schedule;
``on_before_optimizer_step`` (gradients complete, accumulated and unscaled) measures
importance; ``on_train_batch_end`` (after the optimizer step) refreshes importance, draws the
next active set and logs. Works under automatic and manual optimization. Under an offloading
strategy (:mod:`grass_lightning.strategy`) it builds the run's moment offloader.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from grass_lightning.blocks import find_blocks
from grass_lightning.config import GrassConfig
from grass_lightning.offload import check_offload
from grass_lightning.schedule import GrassSchedule
from grass_lightning.strategy import OffloadingStrategy

_SHARDING = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)
ACTIVE_SLOT = "active_"  # progress-bar keys active_0, active_1, ...: one per active block


class GrassCallback(Callback):
    """Fine-tune a few transformer blocks at a time, chosen by mean gradient norm (GRASS).

    The module's optimizer must be built over all parameters; the callback freezes and
    unfreezes blocks by ``requires_grad`` from ``on_fit_start`` on. The defaults and the reasons
    for them are in :mod:`grass_lightning.config`.

    Args:
        num_active: blocks trained at once (gamma). Default 2.
        sampling_period: optimizer steps between draws of the active set (T_s). Default 50.
        probe_steps: initial steps that measure every block and update nothing (T_p). Default 10;
            must be 0 with sampler="uniform", which reads no importance.
        refresh_interval: optimizer steps between importance refreshes (T_u). Default 50.
        temperature: softmax temperature over the normalised importance (tau). Default 0.5.
        ema: weight of the newest window in a refresh (alpha), in (0, 1]. Default 0.5.
        sampler: ``"grass"`` (importance), ``"uniform"`` (LISA) or ``"static"`` (probe once,
            never refresh: the paper's ablation). Default ``"grass"``.
        blocks: dotted path from the LightningModule to the ``nn.ModuleList`` of blocks, e.g.
            ``"model.model.layers"``; ``None`` finds them in common Hugging Face models.
        train_embeddings: always train the input embeddings. Default False.
        train_head: always train the final norm and LM/task head. Default True.
        idle_moments: ``"drop"`` frees a leaving block's Adam moments (memory bounded by the
            active set); ``"keep"`` keeps them for its return. Default ``"drop"``.
        seed: seed of the block sampler; ``None`` takes torch's seed at fit start, so
            ``seed_everything`` governs it.
        normalization: ``"max"`` or ``"zscore"`` normalisation of the importance before the
            softmax. Default ``"max"``.

    Raises:
        ValueError: for an argument out of range, at construction; at fit start, for a
            ``blocks`` path that does not resolve, a model without detectable blocks, or
            ``num_active`` above the number of blocks.
        MisconfigurationException: in ``setup``, for DeepSpeed/FSDP/model-parallel strategies,
            for DDP without ``find_unused_parameters=True``, and for a park-mode offloading
            strategy with ``idle_moments="drop"``.
    """

    def __init__(
        self,
        num_active: int = 2,
        sampling_period: int = 50,
        probe_steps: int = 10,
        refresh_interval: int = 50,
        temperature: float = 0.5,
        ema: float = 0.5,
        sampler: str = "grass",
        blocks: str | None = None,
        train_embeddings: bool = False,
        train_head: bool = True,
        idle_moments: str = "drop",
        seed: int | None = None,
        normalization: str = "max",
    ) -> None:
        self.config = GrassConfig(
            num_active=num_active,
            sampling_period=sampling_period,
            probe_steps=probe_steps,
            refresh_interval=refresh_interval,
            temperature=temperature,
            ema=ema,
            sampler=sampler,
            normalization=normalization,
            train_embeddings=train_embeddings,
            train_head=train_head,
            idle_moments=idle_moments,
        )
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise ValueError(f"blocks={blocks!r} must be a dotted module path such as 'model.layers', or None.")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed={seed!r} must be an integer or None.")
        self.blocks = blocks
        self.seed = seed
        self.schedule: GrassSchedule | None = None
        self._saved_state: dict | None = None
        self._stepped = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, _SHARDING):
            raise MisconfigurationException(
                f"GrassCallback does not support {type(strategy).__name__}: it shards parameters and "
                f"optimizer state itself, so single blocks cannot be frozen and their moments released. "
                f"Use strategy='ddp_find_unused_parameters_true' for several GPUs, or a single device."
            )
        if isinstance(strategy, OffloadingStrategy):
            try:
                check_offload(strategy.offload, self.config.idle_moments)
            except ValueError as error:
                raise MisconfigurationException(f"GrassCallback with {type(strategy).__name__}: {error}") from None
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise MisconfigurationException(
                "GrassCallback under DDP needs find_unused_parameters=True: frozen blocks produce no "
                "gradients. Use strategy='ddp_find_unused_parameters_true' or "
                "DDPStrategy(find_unused_parameters=True)."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layout = find_blocks(pl_module, self.blocks)
        seed = self.seed if self.seed is not None else trainer.strategy.broadcast(torch.initial_seed())
        # Probe hooks see gradients before DDP all-reduces them and before AMP unscales them.
        probe_by_hooks = trainer.world_size == 1 and loss_scaler(trainer) is None
        strategy = trainer.strategy
        offload = strategy.offload if isinstance(strategy, OffloadingStrategy) else "none"
        self.schedule = GrassSchedule(layout, trainer.optimizers, self.config, seed, probe_by_hooks, offload)
        if self.schedule.offloader is not None:
            strategy.connect_offloader(self.schedule.offloader)
        if self._saved_state is not None:
            self.schedule.load_state_dict(self._saved_state)
        self.schedule.start()
        rank_zero_info(
            f"GRASS: {len(layout)} blocks at {layout.path!r}, training {self.config.num_active} at a time "
            f"(sampler={self.config.sampler!r}, probe_steps={self.config.probe_steps}, offload={offload!r})."
        )
        if layout.tied() and self.config.train_embeddings != self.config.train_head:
            rank_zero_info(
                "GRASS: the LM head shares its weight with the input embeddings; that weight trains only "
                "when train_embeddings and train_head are both True."
            )
        if self.config.idle_moments == "keep" and offload == "none":
            rank_zero_warn(
                "GrassCallback(idle_moments='keep') keeps the Adam moments of every block visited so far "
                "on the training device: optimizer memory grows toward full fine-tuning. Use "
                "idle_moments='drop' to bound it by the active set, or strategy='grass_offload' to "
                "keep idle blocks' moments in host memory."
            )

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.schedule is not None:
            self.schedule.before_backward()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Fires once per optimizer: measure once per step even with several optimizers.
        if self.schedule is not None and not self._stepped:
            self.schedule.measure()
            self._stepped = True

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.schedule is None or not self._stepped:
            return  # a micro-batch inside gradient accumulation
        self._stepped = False
        self.schedule.end_step()
        self._log(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.schedule is not None:
            self._saved_state = self.schedule.state_dict()
            self.schedule.close()
            self.schedule = None

    @override
    def state_dict(self) -> dict:
        return self.schedule.state_dict() if self.schedule is not None else dict(self._saved_state or {})

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_state = state_dict
        if self.schedule is not None:
            self.schedule.load_state_dict(state_dict)
            self.schedule.start()

    def _log(self, pl_module: LightningModule) -> None:
        schedule = self.schedule
        importance = schedule.importance.estimate
        metrics = {"grass/probing": float(schedule.probing), "grass/nonfinite": schedule.importance.nonfinite.float()}
        for block in range(len(importance)):
            metrics[f"grass/importance/{block:02d}"] = importance[block].item()
            metrics[f"grass/probability/{block:02d}"] = schedule.probabilities[block].item()
            metrics[f"grass/active/{block:02d}"] = float(block in schedule.active and not schedule.probing)
        if schedule.offloader is not None:
            metrics["grass/moments_device_mb"] = schedule.offloader.device_bytes() / 2**20
            metrics["grass/moments_host_mb"] = schedule.offloader.host_bytes() / 2**20
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if not schedule.probing:
            bar = {f"{ACTIVE_SLOT}{slot}": float(block) for slot, block in enumerate(schedule.active)}
            pl_module.log_dict(bar, on_step=True, on_epoch=False, prog_bar=True, logger=False)


def loss_scaler(trainer: Trainer):
    """The trainer's enabled fp16 gradient scaler, or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None
