"""RunStats: what a run cost — median step time, peak memory, most parameters trained at once.

Parameters trained in a step are those holding a gradient when the optimizer steps, so GRASS's
probe (which measures every block and updates nothing) counts as training none.

Peak memory is CUDA's peak allocated on a GPU and the process's peak resident set (VmHWM) on
CPU. Both are reset when training starts, so each member of a Hydra multirun (one process)
reports its own peak. On CPU that peak still includes what the process holds before training
(interpreter, libraries, data, the model), and a multirun's later jobs start from what earlier
ones left mapped; compare methods in separate processes for exact figures.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from grass_lightning.lightning.callback import GrassCallback


class RunStats(Callback):
    """Times optimizer steps (all micro-batches of one step) and counts the parameters they train.

    It must come after GrassCallback in the Trainer's callbacks, whose probe frees gradients in
    the same hook; `setup` refuses the other order.

    Args:
        warmup_steps: leading steps left out of the median (allocation, lazy state creation).
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.trainable_params_max = 0
        self._start: float | None = None
        self._step = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        later = trainer.callbacks[trainer.callbacks.index(self) + 1:]
        if any(isinstance(callback, GrassCallback) for callback in later):
            raise MisconfigurationException(
                "RunStats comes before GrassCallback in Trainer(callbacks=...): it would count the probe's "
                "gradients (measured, then dropped) as trained parameters. Put RunStats after GrassCallback."
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reset_peak_memory(pl_module.device)
        self._step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        trained = sum(p.numel() for p in pl_module.parameters() if p.grad is not None)
        self.trainable_params_max = max(self.trainable_params_max, trained)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > self._step:  # an optimizer step ended with this batch
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.step_times.append(time.perf_counter() - self._start)
            self._step, self._start = trainer.global_step, None

    def step_time_s(self) -> float | None:
        timed = self.step_times[self.warmup_steps:] or self.step_times
        return statistics.median(timed) if timed else None


def reset_peak_memory(device: torch.device, release_cache: bool = True) -> None:
    """Start a fresh peak; on CPU first hand memory freed by earlier jobs back to the OS.
    ``release_cache=False`` keeps CUDA's cached blocks (per-step peaks: no re-allocation)."""
    gc.collect()
    if device.type == "cuda":
        if release_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _malloc_trim()
        clear_refs = Path("/proc/self/clear_refs")
        if clear_refs.exists():
            try:
                clear_refs.write_text("5")  # Linux: reset VmHWM to the current RSS
            except OSError:
                pass


def _malloc_trim() -> None:
    # glibc keeps freed heap memory mapped; without trimming, a sequential multirun's earlier
    # jobs would inflate every later job's resident set.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocated bytes, or the process's peak resident set on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mb(device: torch.device) -> float | None:
    """CUDA's allocated bytes, or the process's resident set on CPU (Linux), in MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def _proc_status_mb(key: str) -> float | None:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return None
