"""FineTuningModule: a Hugging Face model fine-tuned with manual optimization.

One AdamW over all parameters (weight decay on matrices only); the GrassCallback decides which
of them have gradients, and AdamW skips the rest. Manual optimization because Lightning refuses
``accumulate_grad_batches`` and ``gradient_clip_val`` on the Trainer in that mode, so both live
here, with the LR warm-up and schedule (which Lightning does not step in manual mode either).

One optimizer step::

    training_step: loss / accumulate -> manual_backward          (GrassCallback: count pass)
    every `accumulate` batches, if every gradient is finite: opt.step()
        -> on_before_optimizer_step                              (GrassCallback: measure, then
                                                                  this module: clip)
        -> AdamW on parameters with gradients; zero_grad; LR schedule step
    on_train_batch_end                                           (GrassCallback: refresh, draw)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

from grass_lightning.app.tasks import Task
from grass_lightning.core.blocks import find_blocks
from grass_lightning.core.checks import require_choice, require_int, require_number
from grass_lightning.core.sharding import shard_blocks
from grass_lightning.lightning.loss_scaling import loss_scaler

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule, validated before any model is loaded (errors name ``optim.<key>``).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay of matrices (biases and norms get none).
        warmup_steps: optimizer steps of linear warm-up.
        lr_schedule: ``"cosine"``, ``"linear"`` (decay to 0 at ``max_steps``) or ``"constant"``.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: clip the global gradient norm to this (None or 0: no clipping).
        betas: AdamW betas.
        max_nonfinite_steps: stop with an error after this many optimizer steps in a row whose
            loss or gradients were NaN/Inf (each is skipped and not counted, so a run whose every
            loss is NaN would otherwise never reach ``max_steps``).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_nonfinite_steps: int = 20

    def __post_init__(self) -> None:
        try:
            require_number("lr", self.lr, above=0)
            require_number("weight_decay", self.weight_decay, at_least=0)
            require_int("warmup_steps", self.warmup_steps, minimum=0)
            require_choice("lr_schedule", self.lr_schedule, SCHEDULES)
            require_int("accumulate_grad_batches", self.accumulate_grad_batches, minimum=1)
            if self.gradient_clip_val is not None:
                require_number("gradient_clip_val", self.gradient_clip_val, at_least=0)
            require_int("max_nonfinite_steps", self.max_nonfinite_steps, minimum=1)
        except ValueError as error:
            raise ValueError(f"optim.{error}") from None


class FineTuningModule(LightningModule):
    """Fine-tunes ``model`` on ``task`` with AdamW, accumulation, clipping and an LR schedule.

    Args:
        model: a Hugging Face model (put in train mode here: transformers 5 loads in eval mode).
        task: a `grass_lightning.app.tasks.Task`.
        optim: optimizer settings.
        wrap_optimizer: ``(adamw, model) -> optimizer``, for a method that steps AdamW its own way
            (BAdam's ``BlockOptimizer``); see `grass_lightning.app.methods.Method.wrap_optimizer`.
        blocks: the blocks' dotted path from this module (None: found in common Hugging Face
            models). Under `ModelParallelStrategy` (FSDP2) each block is sharded on its own, then
            the rest of the model (:func:`grass_lightning.core.sharding.shard_blocks`).
    """

    def __init__(self, model: nn.Module, task: Task, optim: OptimConfig = OptimConfig(),
                 wrap_optimizer: Callable[[Optimizer, nn.Module], Optimizer] | None = None,
                 blocks: str | None = None) -> None:
        super().__init__()
        self._blocks = blocks
        self.save_hyperparameters({**asdict(optim), "betas": list(optim.betas)})
        self.automatic_optimization = False
        self.model = model.train()
        self.task = task
        self._wrap_optimizer = wrap_optimizer
        self.val_metrics, self.test_metrics = task.metrics().clone(prefix="val/"), task.metrics().clone(prefix="test/")
        self.nonfinite_steps = 0
        self.test_rows: list[dict] = []  # what the task reports per test example (generation: the text)
        self._nonfinite_in_a_row = 0
        self._finite: torch.Tensor | None = None  # all losses of the current step's micro-batches finite
        self._grad_norm: torch.Tensor | None = None  # this step's total gradient norm, for clipping

    @override
    def configure_model(self) -> None:
        # Lightning calls this for every fit, validate and test: shard once
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not isinstance(self.model, FSDPModule):
            shard_blocks(self.model, find_blocks(self, self._blocks).blocks, mesh=self.device_mesh["data_parallel"])

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer, lr_scheduler = self.optimizers(), self.lr_schedulers()
        loss = self.task.loss(self.model, batch)
        self.manual_backward(loss / self.hparams.accumulate_grad_batches)
        finite = loss.detach().isfinite()  # a probe frees block gradients in backward: the loss tells
        self._finite = finite if self._finite is None else self._finite & finite
        last_of_epoch = batch_idx + 1 == self.trainer.num_training_batches
        if (batch_idx + 1) % self.hparams.accumulate_grad_batches == 0 or last_of_epoch:
            finite, self._finite = self._finite, None
            lr = lr_scheduler.get_last_lr()[0]  # what this step runs at (GRASS holds it through the probe)
            if self._gradients_finite(finite):
                optimizer.step()
                lr_scheduler.step()
                self._nonfinite_in_a_row = 0
            else:  # the update is skipped and not counted as a step; GRASS never sees these gradients
                self.nonfinite_steps += 1
                self._nonfinite_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            self.log("train/nonfinite_steps", float(self.nonfinite_steps))
            self.log("train/lr", lr)
            if self._nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self._nonfinite_in_a_row} optimizer steps in a row had a NaN or Inf loss or gradient "
                    f"(optim.max_nonfinite_steps={self.hparams.max_nonfinite_steps}); each was skipped, so the "
                    f"run would never reach trainer.max_steps. Likely causes: no target token left in the "
                    f"batch (data.max_length too small for the prompt and answer), a learning rate too "
                    f"high (optim.lr), or fp16 overflow (use bf16)."
                )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _gradients_finite(self, losses_finite: torch.Tensor) -> bool:
        """False if a loss or a gradient of this step holds NaN/Inf (one device sync per step).
        The gradient norm it takes is kept for clipping. A loss scaler (fp16) does its own
        skipping, and reads scaled infinities as a cue to lower its scale, so it is left to decide."""
        self._grad_norm = None
        if loss_scaler(self.trainer) is not None:
            return True
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self._grad_norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: over every shard
            losses_finite = losses_finite & self._grad_norm.isfinite()
        return bool(losses_finite)

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        # Callbacks' hooks run first: GrassCallback has read the unclipped gradients.
        clip = self.hparams.gradient_clip_val
        if not clip:
            return
        if self._grad_norm is None:  # under a loss scaler: Lightning unscales, then clips
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        else:  # the finiteness check's norm: no second pass over the gradients
            params = [p for p in self.parameters() if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, clip, self._grad_norm)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.task.update(self.val_metrics, self.model, batch)
        self.log_dict(self.val_metrics, prog_bar=True)

    @override
    def on_test_epoch_start(self) -> None:
        self.test_rows = []

    @override
    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_rows.extend(self.task.update(self.test_metrics, self.model, batch) or [])
        self.log_dict(self.test_metrics)

    @override
    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )
        if self._wrap_optimizer is not None:
            optimizer = self._wrap_optimizer(optimizer, self.model)
        factor = functools.partial(lr_factor, warmup=hp.warmup_steps, total=self.trainer.max_steps, kind=hp.lr_schedule)
        return [optimizer], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}]


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak LR at optimizer ``step``: linear warm-up, then the schedule to ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[kind]


GrassModule = FineTuningModule  # its name before it said that it trains every method, not only GRASS
