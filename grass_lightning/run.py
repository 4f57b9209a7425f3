"""One fine-tuning run from a composed Hydra config: ``train(cfg) -> score``.

Order matters for the user: everything cheap is checked first (method, data files, model
path, trainer settings), so a typo fails in a second with a message naming the key; only then
are weights loaded. The run evaluates the held-out test split before and after training and
writes ``metrics.json`` in its output directory.
"""

from __future__ import annotations

import gc
import json
import os
import time
import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from grass_lightning.checkpoint_io import AtomicCheckpointIO
from grass_lightning.datamodule import SplitsDataModule
from grass_lightning.heatmap import draw as draw_heatmap
from grass_lightning.methods import build_method
from grass_lightning.models import ModelSpec, load_model, resolve_model_path
from grass_lightning.module import GrassModule, OptimConfig
from grass_lightning.sources import BUILTIN, carve, read_jsonl
from grass_lightning.stats import RunStats, peak_memory_mb
from grass_lightning.strategy import offload_strategy
from grass_lightning.tasks import task_class

# Lightning warns that checkpoints of manually optimized modules hold the state *after* the
# step; that is what resuming at `global_step` needs. torchdata 0.11 calls a torch API that
# torch deprecated, on every epoch.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def load_records(data: dict) -> list:
    """The records named by the ``data`` config group (built-in set or ``jsonl`` file)."""
    source = data["source"]
    if source == "jsonl":
        if not data.get("path"):
            raise ValueError("data.path is empty: data=jsonl needs data.path=/path/to/file.jsonl.")
        return read_jsonl(data["path"], data.get("labels"))
    if source not in BUILTIN:
        raise ValueError(f"data.source={source!r} is not one of {sorted(BUILTIN) + ['jsonl']}.")
    return BUILTIN[source]()


def train(cfg: DictConfig) -> float:
    """Fine-tune as configured; returns the held-out score after training (for sweepers)."""
    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_trainer(cfg.trainer)
    if not isinstance(cfg.test_before, bool):
        raise ValueError(f"test_before={cfg.test_before!r} must be true or false.")
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True), seed=cfg.seed)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if method.offload != "none":
        trainer_kwargs["strategy"] = offload_strategy(trainer_kwargs.get("strategy", "auto"), method.offload)
    elif method.callbacks:
        _check_block_strategy(trainer_kwargs.get("strategy", "auto"))
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    data = OmegaConf.to_container(cfg.data, resolve=True)
    records = load_records(data)
    splits = carve(records, data["val_size"], data["test_size"], data["split_seed"], data["source"])
    task_type = task_class(spec.kind, records)
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file.")
    model_path = resolve_model_path(spec)

    seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(spec, model_path, num_labels=len(records[0].choices) if spec.kind == "classification" else None)
    task = task_type(tokenizer, data["max_length"], records, max_new_tokens=data["max_new_tokens"])
    model = method.prepare(model, spec.kind)
    module = GrassModule(model, task, optim)
    datamodule = SplitsDataModule(splits, task, data["batch_size"], data["eval_batch_size"], seed=cfg.seed)
    stats = RunStats()
    configured = [instantiate(c) for c in cfg.callbacks.values() if c is not None]  # `callbacks.<name>: null` drops one
    if not trainer_kwargs.get("enable_progress_bar", True):  # a bar in callbacks would make Lightning refuse
        configured = [c for c in configured if not isinstance(c, ProgressBar)]
    callbacks = [*method.callbacks, *configured, stats]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = Trainer(**trainer_kwargs, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()])

    scores_before = _test_scores(trainer, module, datamodule) if cfg.test_before else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    checkpoints = trainer.checkpoint_callback
    if checkpoints is not None and checkpoints.dirpath:  # last.ckpt is the final state, whatever the cadence
        trainer.save_checkpoint(Path(checkpoints.dirpath) / "last.ckpt")
    scores = _test_scores(trainer, module, datamodule)
    after = scores[task.score_name]
    before = None if scores_before is None else scores_before[task.score_name]
    # probe steps are optimizer steps to Lightning (global_step) but update nothing; max_steps counts updates
    probe_steps = min(sum(c.config.probe_steps for c in method.callbacks), trainer.global_step)

    metrics = {
        "score": after,
        "score_before": before,
        "score_name": task.score_name,
        "scores": scores,
        "scores_before": scores_before,
        "method": method.name,
        "model": spec.name,
        "data": data["source"],
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "updates": trainer.global_step - probe_steps,
        "probe_steps": probe_steps,
        "nonfinite_steps": module.nonfinite_steps,
        "step_time_s": stats.step_time_s(),
        "peak_memory_mb": peak_memory_mb(module.device),
        "trainable_params_max": stats.trainable_params_max,
        "total_params": sum(p.numel() for p in module.parameters()),
        "train_examples": len(splits.train),
        "test_examples": len(splits.test),
        "wall_time_s": time.perf_counter() - started,
        "checkpoint": str(Path(checkpoints.dirpath) / "last.ckpt") if checkpoints is not None else None,
    }
    if trainer.is_global_zero:
        _write_json(out_dir / "metrics.json", metrics)
        print(f"\n{data['source']} test {task.score_name} ({len(splits.test)} examples): "
              f"{'' if before is None else f'before {before:.4f} -> '}after {after:.4f}  [{method.name}, {spec.name}, "
              f"{trainer.global_step - probe_steps} updates{f' after {probe_steps} probe steps' if probe_steps else ''}]")
        others = ", ".join(f"{name} {value:.4f}" for name, value in scores.items() if name != task.score_name)
        print(f"metrics: {out_dir / 'metrics.json'}" + (f" (also {others})" if others else ""))
        if method.callbacks and isinstance(trainer.logger, CSVLogger):
            heatmap = draw_heatmap(Path(trainer.logger.log_dir) / "metrics.csv", out_dir / "importance.png")
            if heatmap is not None:
                print(f"importance heat-map: {heatmap}")
    del trainer, module, model, datamodule
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return after


def _check_trainer(trainer: DictConfig) -> None:
    steps = trainer.get("max_steps", -1)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trainer.max_steps={steps!r} must be an integer >= 1: runs are counted in optimizer steps.")
    for key in ("accumulate_grad_batches", "gradient_clip_val"):
        if key in trainer:
            raise ValueError(f"trainer.{key}={trainer[key]!r}: set optim.{key} instead (GrassModule optimizes manually).")


def _check_block_strategy(strategy) -> None:
    """What GrassCallback's setup would refuse, said before any weights are loaded."""
    if not isinstance(strategy, str):
        return
    if strategy.startswith(("fsdp", "deepspeed")):
        raise ValueError(f"trainer.strategy={strategy!r}: sharded strategies own the optimizer state, so GRASS and "
                         f"LISA cannot freeze blocks and release their moments; use trainer=ddp.")
    if strategy.startswith("ddp") and not strategy.endswith("find_unused_parameters_true"):
        raise ValueError(f"trainer.strategy={strategy!r}: frozen blocks produce no gradients; use trainer=ddp "
                         f"(strategy ddp_find_unused_parameters_true).")


def _test_scores(trainer: Trainer, module, datamodule) -> dict[str, float]:
    """Every score the task computes on the test split, by name (``test/accuracy`` -> ``accuracy``)."""
    logged = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {key.removeprefix("test/"): value for key, value in logged.items() if key.startswith("test/")}


def _write_json(path: Path, payload: dict) -> None:
    """Write then rename: a crash never leaves a half-written or misleading metrics.json."""
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(staging, path)
