"""One fine-tuning run from a composed Hydra config: ``train(cfg) -> (metrics, objects)``.

`assemble` instantiates what the config names (method, data reader, callbacks, logger) and
builds the model, module, data and Trainer, checking everything cheap first; `train` then
fits and tests, and `_report` writes ``metrics.json`` in the run's output directory, then the
model as a Hugging Face folder, ``model/`` (`grass_lightning.app.export`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from grass_lightning.app.datamodule import SplitsDataModule
from grass_lightning.app.export import EXPORT_LORA, check_export_dtype, export_model
from grass_lightning.app.methods import Method, build_method
from grass_lightning.app.models import (ModelSpec, load_model, load_tokenizer, model_skeleton, resolve_model_path,
                                        weight_dtype)
from grass_lightning.app.module import GrassModule, OptimConfig
from grass_lightning.app.sources import Splits, carve
from grass_lightning.app.tasks import task_class
from grass_lightning.lightning.block_strategies import check_block_strategy
from grass_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from grass_lightning.lightning.stats import RunStats, peak_memory_mb
from grass_lightning.lightning.strategy import offload_strategy
from grass_lightning.tools.heatmap import draw as draw_heatmap

# The app's own console, not users' code (which never imports this module): Lightning warns that
# checkpoints of manually optimized modules hold the state *after* the step, which is what
# resuming at `global_step` needs; torchdata 0.11 and Lightning 2.6 call torch APIs that torch
# deprecated, on every epoch; a JSONL epoch shorter than log_every_n_steps is logged all the same
# (steps count across epochs); peft asks transformers 5 a deprecated question; and Lightning
# advertises a cloud logger on every Trainer.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft 0.x asks transformers 5
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: not any(tip in record.getMessage() for tip in ("litlogger", "litmodels")))
transformers.logging.disable_progress_bar()  # a bar per loaded weight tensor
log = logging.getLogger(__name__)


def _log_through_root() -> None:
    """Lightning's messages through the root logger, to which Hydra sends the console and the run
    directory's train.log: imported before Hydra sets logging up, Lightning keeps console handlers
    of its own and the file stays empty. Nothing changes outside a Hydra run."""
    if not logging.getLogger().hasHandlers():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        own = logging.getLogger(name)
        for handler in list(own.handlers):
            own.removeHandler(handler)
        own.propagate = True


@dataclass
class RunObjects:
    """What `assemble` built for one run; `release` frees it (a sweep runs many in one process)."""

    method: Method
    spec: ModelSpec
    data_name: str
    splits: Splits
    tokenizer: object
    task: object
    module: GrassModule
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
    """Fine-tune as configured: assemble, (test,) fit, test. Returns the metrics (also written to
    ``metrics.json``; ``metrics["score"]`` is what a sweeper optimizes) and the run's objects."""
    started = time.perf_counter()
    _log_through_root()
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
    if trainer.is_global_zero:
        _report(Path(cfg.paths.output_dir), run, metrics, test_rows)
        if cfg.export:
            labels = getattr(run.task, "labels", None) if run.spec.kind == "classification" else None
            folder = export_model(module.model, run.tokenizer, Path(cfg.paths.output_dir) / "model", cfg.export_lora, labels,
                                  cfg.export_dtype)
            log.info(f"fine-tuned model (a transformers folder): {folder}")
    return metrics, run


def assemble(cfg: DictConfig) -> RunObjects:
    """Everything a run needs, from the config. Everything cheap is checked first (method, data,
    model path, trainer settings), so a typo fails in a second with a message naming the key;
    only then are weights loaded."""
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    _check_trainer(cfg.trainer)
    for key in ("test_before", "export"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key}={cfg[key]!r} must be true or false.")
    if cfg.export_lora not in EXPORT_LORA:
        raise ValueError(f"export_lora={cfg.export_lora!r} is not one of {EXPORT_LORA}.")
    check_export_dtype(cfg.export_dtype)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed={cfg.seed!r} must be an integer.")
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    method = build_method(cfg.method, seed=cfg.seed)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["strategy"] = trainer_strategy(trainer_kwargs.get("strategy", "auto"), method)
    dtype = weight_dtype(trainer_kwargs.get("precision", "32-true"))
    if dtype == torch.float16 and method.callbacks:
        raise ValueError(f"trainer.precision='16-true' with method={method.name}: float16 gradients underflow without "
                         f"loss scaling, which 16-true does not do. Use trainer.precision=bf16-true (bf16 weights, "
                         f"fp32 masters for the trained blocks) or 16-mixed.")
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    for key in cfg.data:
        if OmegaConf.is_missing(cfg.data, key):
            raise ValueError(f"data.{key} is not set: give it on the command line (data=jsonl needs data.path=/path/to/file.jsonl).")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("batch_size", "eval_batch_size", "max_length"):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1:
            raise ValueError(f"data.{key}={data[key]!r} must be an integer >= 1.")
    records = _read_records(cfg.data.records)
    splits = carve(records, data["val_size"], data["test_size"], data["split_seed"], data["source"])
    task_type = task_class(spec.kind, records)
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint file.")
    if cfg.ckpt_path is not None and not method.resumable:
        raise ValueError(f"ckpt_path={cfg.ckpt_path!r}: method={method.name} cannot resume a run ({method.resumable_why}).")
    model_path = resolve_model_path(spec)
    num_labels = len(records[0].choices) if spec.kind == "classification" else None
    _check_model(method, spec, model_path, num_labels, cfg.ckpt_path)

    tokenizer = load_tokenizer(spec, model_path)  # the task checks it (a chat template for chat data) before weights load
    try:
        task = task_type(tokenizer, data["max_length"], records, max_new_tokens=data["max_new_tokens"])
    except ValueError as error:
        raise ValueError(f"data.path={data.get('path')!r}: {error}" if data["source"] == "jsonl" else str(error)) from None

    seed_everything(cfg.seed, workers=True)
    model, _ = load_model(spec, model_path, num_labels=num_labels, tokenizer=tokenizer, dtype=dtype)
    module = GrassModule(method.prepare(model, spec.kind), task, optim, method.wrap_optimizer)
    datamodule = SplitsDataModule(splits, task, data["batch_size"], data["eval_batch_size"], seed=cfg.seed)
    stats = RunStats()
    configured = [instantiate(c) for c in cfg.callbacks.values() if c is not None]  # `callbacks.<name>: null` drops one
    if not trainer_kwargs.get("enable_progress_bar", True):  # a bar in callbacks would make Lightning refuse
        configured = [c for c in configured if not isinstance(c, ProgressBar)]
    logger = _loggers(cfg.get("logger"))
    trainer = Trainer(**trainer_kwargs, callbacks=[*method.callbacks, *configured, stats], logger=logger,
                      plugins=[AtomicCheckpointIO()])
    data_name = Path(data["path"]).stem if data["source"] == "jsonl" else data["source"]  # two JSONL files: two names
    return RunObjects(method, spec, data_name, splits, tokenizer, task, module, datamodule, trainer, stats)


def _read_records(reader: DictConfig) -> list:
    """The examples, from the reader that ``data.records`` names; its own error (naming the file,
    the line, the key) is raised as it is, not wrapped in Hydra's."""
    try:
        return instantiate(reader, _convert_="all")
    except InstantiationException as error:
        if error.__cause__ is None:
            raise
        raise error.__cause__ from None


def _loggers(node: DictConfig | None):
    """``logger``: one logger (a ``_target_``), several by name (``logger=tensorboard``: CSV and
    TensorBoard), or none."""
    if not node:
        return False
    if "_target_" in node:
        return instantiate(node)
    return [instantiate(c) for c in node.values() if c is not None]


def trainer_strategy(strategy, method: Method):
    """``trainer.strategy`` as the method needs it: an offloading strategy in its place when the
    method offloads; for a block method, refused where GrassCallback's setup would refuse it."""
    if method.offload != "none":
        return offload_strategy(strategy, method.offload)
    if method.callbacks:
        try:
            check_block_strategy(strategy)
        except ValueError as error:
            raise ValueError(f"trainer.strategy={strategy!r}: {error}") from None
    return strategy


def _metrics(cfg: DictConfig, run: RunObjects, scores: dict, scores_before: dict | None, val_scores: dict | None,
             started: float) -> dict:
    """metrics.json's content: scores, what ran, and what it cost."""
    trainer, module, task = run.trainer, run.module, run.task
    # probe steps are optimizer steps to Lightning (global_step) but update nothing; max_steps counts updates
    probe_steps = min(sum(c.config.probe_steps for c in run.method.callbacks), trainer.global_step)
    checkpoints = trainer.checkpoint_callback
    settings = OmegaConf.to_container(cfg.method, resolve=True)
    return {
        "score": scores[task.score_name],
        "score_before": None if scores_before is None else scores_before[task.score_name],
        "score_name": task.score_name,
        "scores": scores,
        "scores_before": scores_before,
        "val_scores": val_scores,
        "method": run.method.name,
        "model": run.spec.name,
        "data": run.data_name,
        "method_settings": {key: value for key, value in settings.items() if key not in ("name", "_target_")},
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
    if run.method.callbacks and csv is not None:
        heatmap = draw_heatmap(Path(csv.log_dir) / "metrics.csv", out_dir / "importance.png")
        if heatmap is not None:
            log.info(f"importance heat-map: {heatmap}")


def _check_trainer(trainer: DictConfig) -> None:
    steps = trainer.get("max_steps", -1)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trainer.max_steps={steps!r} must be an integer >= 1: runs are counted in optimizer steps.")
    for key in ("accumulate_grad_batches", "gradient_clip_val"):
        if key in trainer:
            raise ValueError(f"trainer.{key}={trainer[key]!r}: set optim.{key} instead (GrassModule optimizes manually).")


def _check_model(method, spec: ModelSpec, path: str | None, num_labels: int | None, ckpt_path: str | None) -> None:
    """What loading the weights or starting fit would refuse about the model, found on its
    meta-device skeleton: ``method.blocks`` and ``method.num_active`` against its blocks, and a
    ``ckpt_path`` written for another model."""
    module = nn.ModuleDict({"model": method.prepare(model_skeleton(spec, path, num_labels), spec.kind)})  # as GrassModule
    for callback in method.callbacks:
        try:
            callback.check_model(module)
        except ValueError as error:  # "blocks=..." / "num_active=..." become the config's keys
            raise ValueError(f"method.{error}" if str(error).startswith(("blocks=", "num_active=")) else str(error)) from None
    if ckpt_path is not None:
        _check_checkpoint(ckpt_path, {key: tuple(t.shape) for key, t in module.state_dict().items()})


def _check_checkpoint(path: str, shapes: dict[str, tuple]) -> None:
    """Refuse a ckpt_path that is no Lightning checkpoint of this model (it is memory-mapped, not read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises several types for a file that is no checkpoint
        raise ValueError(f"ckpt_path={path!r} is not a checkpoint that train.py wrote ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}).") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= set(checkpoint):
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint: it has no state_dict and global_step.")
    saved = checkpoint["state_dict"]
    differ = [key for key, shape in shapes.items() if key not in saved or tuple(saved[key].shape) != shape]
    if differ:
        key = differ[0]
        found = f"shape {list(saved[key].shape)}" if key in saved else "no such weight"
        raise ValueError(
            f"ckpt_path={path!r} was written for another model or method: {len(differ)} of this model's "
            f"{len(shapes)} weights are missing from it or differ in shape (e.g. {key!r}: shape "
            f"{list(shapes[key])} here, {found} there). Resume with the model and method of the run that "
            f"wrote it (its .hydra/config.yaml)."
        )


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
