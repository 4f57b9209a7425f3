"""One fine-tuning run from a composed Hydra config: ``train(cfg) -> (metrics, objects)``.

`assemble` calls the setup steps of :mod:`grass_lightning.app.setup` in order, cheapest first;
`train` then fits and tests, and `_report` writes ``metrics.json`` in the run's output directory,
then the model as a Hugging Face folder, ``model/`` (`grass_lightning.app.export`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from grass_lightning.app.datamodule import SplitsDataModule
from grass_lightning.app.export import export_model
from grass_lightning.app.heatmap import draw as draw_heatmap
from grass_lightning.app.methods import Method
from grass_lightning.app.models import ModelSpec, load_tokenizer, resolve_model_path
from grass_lightning.app.module import FineTuningModule
from grass_lightning.app.setup import (check_config, check_model, check_precision, setup_data, setup_method,
                                       setup_model, setup_optim, setup_task, setup_trainer, trainer_strategy)
from grass_lightning.app.sources import Splits
from grass_lightning.app.tasks import Task
from grass_lightning.core.sharding import full_state_dict
from grass_lightning.lightning.stats import RunStats, peak_memory_mb

log = logging.getLogger(__name__)


@dataclass
class RunObjects:
    """What `assemble` built for one run; `release` frees it (a sweep runs many in one process)."""

    method: Method
    spec: ModelSpec
    data_name: str
    splits: Splits
    tokenizer: object
    task: Task
    module: FineTuningModule
    datamodule: SplitsDataModule
    trainer: Trainer
    stats: RunStats

    def release(self) -> None:
        for name in ("module", "datamodule", "trainer", "task", "tokenizer"):
            setattr(self, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train(cfg: DictConfig) -> tuple[dict, RunObjects]:
    """Fine-tune as configured: assemble, (test,) fit, validate, test. Returns the metrics (also
    written to ``metrics.json``: ``score`` is the test split's headline score, ``val_score`` the
    validation split's, what a sweep chooses on) and the run's objects."""
    started = time.perf_counter()
    run = assemble(cfg)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    scores_before = _scores(trainer.test, module, datamodule, "test/") if cfg.test_before else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    checkpoints = trainer.checkpoint_callback
    if checkpoints is not None and checkpoints.dirpath:  # last.ckpt is the final state, whatever the cadence
        trainer.save_checkpoint(Path(checkpoints.dirpath) / "last.ckpt", weights_only=False)  # a full, resumable one
    # The final weights' validation scores, what a sweep chooses on: a short run may never reach val_check_interval.
    val_scores = _scores(trainer.validate, module, datamodule, "val/") if trainer.limit_val_batches else None
    scores = _scores(trainer.test, module, datamodule, "test/")
    metrics = _metrics(cfg, run, scores, scores_before, val_scores, started)
    test_rows = _from_every_rank(trainer, module.test_rows)
    weights = full_state_dict(module.model) if cfg.export else None  # FSDP2: whole tensors, from every rank
    if trainer.is_global_zero:
        _report(Path(cfg.paths.output_dir), run, metrics, test_rows)
        if cfg.export:
            labels = getattr(run.task, "labels", None) if run.spec.kind == "classification" else None
            folder = export_model(module.model, run.tokenizer, Path(cfg.paths.output_dir) / "model", cfg.export_lora, labels,
                                  cfg.export_dtype, weights)
            log.info(f"fine-tuned model (a transformers folder): {folder}")
    return metrics, run


def assemble(cfg: DictConfig) -> RunObjects:
    """Everything a run needs, from the config. Everything cheap is checked first (run keys,
    method, data, model path and blocks, trainer settings), so a typo fails in a second with a
    message naming the key; only then are weights loaded."""
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    check_config(cfg)
    optim = setup_optim(cfg.optim)
    method = setup_method(cfg.method, cfg.seed)
    strategy = trainer_strategy(cfg.trainer.get("strategy", "auto"), method, cfg.trainer.get("devices", 1),
                                cfg.trainer.get("num_nodes", 1), cfg.trainer.get("precision", "32-true"))  # refused now
    dtype = check_precision(method, cfg.trainer.get("precision", "32-true"))
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    data = setup_data(cfg.data, spec.kind)
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint.")
    model_path = resolve_model_path(spec)
    num_labels = data.num_labels if spec.kind == "classification" else None
    check_model(method, spec, model_path, num_labels, cfg.ckpt_path)
    tokenizer = load_tokenizer(spec, model_path)
    task = setup_task(data, cfg.data, tokenizer)

    seed_everything(cfg.seed, workers=True)
    model = setup_model(spec, method, model_path, num_labels, tokenizer, dtype)
    module = FineTuningModule(model, task, optim, method.wrap_optimizer, blocks=method.blocks)
    datamodule = SplitsDataModule(data.splits, task, cfg.data.batch_size, cfg.data.eval_batch_size, seed=cfg.seed)
    stats = RunStats()
    trainer = setup_trainer(cfg.trainer, method, strategy, cfg.callbacks, cfg.get("logger"), extra=[stats])
    return RunObjects(method, spec, data.name, data.splits, tokenizer, task, module, datamodule, trainer, stats)


def _metrics(cfg: DictConfig, run: RunObjects, scores: dict, scores_before: dict | None, val_scores: dict | None,
             started: float) -> dict:
    """metrics.json's content: scores, what ran, and what it cost."""
    trainer, module, task = run.trainer, run.module, run.task
    # probe steps are optimizer steps to Lightning (global_step) but update nothing; max_steps counts updates
    probe_steps = min(run.method.probe_steps, trainer.global_step)
    checkpoints = trainer.checkpoint_callback
    settings = OmegaConf.to_container(cfg.method, resolve=True)
    return {
        "score": scores[task.score_name],  # the test split's: reported, never chosen on
        "val_score": None if val_scores is None else val_scores[task.score_name],  # the sweep objective
        "score_before": None if scores_before is None else scores_before[task.score_name],
        "score_name": task.score_name,
        "scores": scores,
        "scores_before": scores_before,
        "val_scores": val_scores,
        "method": run.method.name,
        "model": run.spec.name,
        "data": run.data_name,
        "method_settings": {key: value for key, value in settings.items() if key not in ("name", "_target_")},
        "optim_settings": OmegaConf.to_container(cfg.optim, resolve=True),
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "updates": trainer.global_step - probe_steps,
        "probe_steps": probe_steps,
        "nonfinite_steps": module.nonfinite_steps,
        "step_time_s": run.stats.step_time_s(),
        "peak_memory_mb": peak_memory_mb(module.device),
        "trainable_params_max": run.stats.trainable_params_max,
        "total_params": sum(p.numel() for p in module.parameters()),
        "train_examples": len(run.splits.train),
        "test_examples": len(run.splits.test),
        "wall_time_s": time.perf_counter() - started,
        "checkpoint": str(Path(checkpoints.dirpath) / "last.ckpt") if checkpoints is not None else None,
    }


def _report(out_dir: Path, run: RunObjects, metrics: dict, test_rows: list[dict]) -> None:
    """Write metrics.json (and generations.jsonl, importance.png) and say where, with the score."""
    _write_json(out_dir / "metrics.json", metrics)
    name, before, after = metrics["score_name"], metrics["score_before"], metrics["score"]
    updates, probe_steps = metrics["updates"], metrics["probe_steps"]
    log.info(f"\n{metrics['data']} test {name} ({metrics['test_examples']} examples): "
             f"{'' if before is None else f'before {before:.4f} -> '}after {after:.4f}  [{metrics['method']}, "
             f"{metrics['model']}, {updates} updates{f' after {probe_steps} probe steps' if probe_steps else ''}]")
    others = ", ".join(f"{key} {value:.4f}" for key, value in metrics["scores"].items() if key != name)
    log.info(f"metrics: {out_dir / 'metrics.json'}" + (f" (also {others})" if others else ""))
    if test_rows:  # generation: what was generated, so that a score can be read, not only believed
        _write_text(out_dir / "generations.jsonl", "".join(json.dumps(row) + "\n" for row in test_rows))
        log.info(f"test generations: {out_dir / 'generations.jsonl'}")
    csv = next((logger for logger in run.trainer.loggers if isinstance(logger, CSVLogger)), None)
    if run.method.block_callback is not None and csv is not None:
        heatmap = draw_heatmap(Path(csv.log_dir) / "metrics.csv", out_dir / "importance.png")
        if heatmap is not None:
            log.info(f"importance heat-map: {heatmap}")


def _scores(evaluate, module, datamodule, prefix: str) -> dict[str, float]:
    """Every score the task computes in ``trainer.test`` or ``trainer.validate``, by name
    (``test/accuracy`` -> ``accuracy``)."""
    logged = evaluate(module, datamodule=datamodule, verbose=False)[0]
    return {key.removeprefix(prefix): value for key, value in logged.items() if key.startswith(prefix)}


def _from_every_rank(trainer: Trainer, rows: list[dict]) -> list[dict]:
    """Every rank's rows (DDP shards the test split), on every rank."""
    if trainer.world_size == 1:
        return rows
    gathered = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def _write_json(path: Path, payload: dict) -> None:
    _write_text(path, json.dumps(payload, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write then rename: a crash never leaves a half-written or misleading file."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)
