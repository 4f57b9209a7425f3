"""The setup steps of a run, torchtune-style: each takes its own config node and either builds
what it names or refuses it with a message naming ``<node>.<key>=<value>``. `assemble` in
:mod:`grass_lightning.app.run` calls them cheapest first, so a typo fails in seconds, before any
weights load; export, bench and study call the same steps.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from grass_lightning.app.export import EXPORT_LORA, check_export_dtype
from grass_lightning.app.methods import Badam, BlockMethod, Full, Lora, Method, build_method
from grass_lightning.app.models import ModelSpec, load_model, model_skeleton, resolve_model_path, weight_dtype
from grass_lightning.app.module import OptimConfig
from grass_lightning.app.sources import Record, Splits, carve
from grass_lightning.app.tasks import task_class
from grass_lightning.core.checks import require_bool, require_int
from grass_lightning.lightning.block_strategies import check_block_strategy
from grass_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from grass_lightning.lightning.strategy import GrassOffloadDDPStrategy, GrassOffloadStrategy


def configure_console() -> None:
    """The app's console, for ``train.py`` and the tools' ``main`` (never on import, never in a
    user's code): Lightning warns that checkpoints of manually optimized modules hold the state
    *after* the step, which is what resuming at `global_step` needs; torchdata 0.11 and Lightning
    2.6 call torch APIs that torch deprecated, on every epoch; a JSONL epoch shorter than
    log_every_n_steps is logged all the same (steps count across epochs); peft asks transformers 5
    a deprecated question; Lightning advertises a cloud logger on every Trainer; transformers draws
    a bar per loaded weight tensor. Under Hydra, Lightning's messages go through the root logger,
    to which Hydra sends the console and the run directory's train.log (imported before Hydra set
    logging up, Lightning keeps console handlers of its own and the file stays empty)."""
    import transformers

    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not any(tip in record.getMessage() for tip in ("litlogger", "litmodels")))
    transformers.logging.disable_progress_bar()
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            own = logging.getLogger(name)
            for handler in list(own.handlers):
                own.removeHandler(handler)
            own.propagate = True


METHOD_DEFAULTS = {"grass_defaults": BlockMethod, "badam_defaults": Badam, "lora_defaults": Lora, "full_defaults": Full}


def register_method_defaults() -> None:
    """Make each method's defaults, its ``Settings`` dataclass fields that have one (and
    ``offload: none``), a Hydra config ``method/<name>_defaults`` that its YAML lists first, so a
    default lives in the dataclass alone and the YAML sets only what differs. Plain nodes, not
    typed ones: the method's own checks name ``method.<key>=<value>``. Call before composing."""
    store = ConfigStore.instance()
    for name, cls in METHOD_DEFAULTS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Settings) if f.default is not dataclasses.MISSING}
        store.store(group="method", name=name, node={"offload": "none", **defaults})


def check_config(cfg: DictConfig) -> None:
    """The run's own keys and the trainer's and data's plain values, before anything is built."""
    check_trainer(cfg.trainer)
    for key in ("test_before", "export"):
        require_bool(key, cfg[key], "true or false")
    if cfg.export_lora not in EXPORT_LORA:
        raise ValueError(f"export_lora={cfg.export_lora!r} is not one of {EXPORT_LORA}.")
    check_export_dtype(cfg.export_dtype)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed={cfg.seed!r} must be an integer.")


def check_objective(cfg: DictConfig) -> None:
    """A sweep chooses on the validation score of the final weights (never the test score), so a
    swept run must have a validation split to return."""
    if cfg.data.val_size in (0, 0.0) or cfg.trainer.get("limit_val_batches", 1) in (0, 0.0):
        key = "data.val_size" if cfg.data.val_size in (0, 0.0) else "trainer.limit_val_batches"
        raise ValueError(f"{key}={OmegaConf.select(cfg, key)!r}: a sweep chooses on the validation score of the final "
                         f"weights, and this run has no validation split to score. Give data.val_size > 0.")


def check_trainer(trainer: DictConfig) -> None:
    steps = trainer.get("max_steps", -1)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trainer.max_steps={steps!r} must be an integer >= 1: runs are counted in optimizer steps.")
    for key in ("accumulate_grad_batches", "gradient_clip_val"):
        if key in trainer:
            raise ValueError(f"trainer.{key}={trainer[key]!r}: set optim.{key} instead (the module optimizes manually).")


def check_data(data: DictConfig) -> None:
    for key in data:
        if OmegaConf.is_missing(data, key):
            raise ValueError(f"data.{key} is not set: give it on the command line (data=jsonl needs data.path=/path/to/file.jsonl).")
    for key in ("batch_size", "eval_batch_size", "max_length"):
        try:
            require_int(key, data[key], minimum=1)
        except ValueError as error:
            raise ValueError(f"data.{error}") from None


def setup_method(method: DictConfig, seed: int) -> Method:
    return build_method(method, seed=seed)


def setup_optim(optim: DictConfig) -> OptimConfig:
    return OptimConfig(**OmegaConf.to_container(optim, resolve=True))


def check_precision(method: Method, precision) -> torch.dtype | None:
    """The weights' dtype for ``trainer.precision``; float16 weights are refused for block methods."""
    dtype = weight_dtype(precision)
    if dtype == torch.float16 and method.block_callback is not None:
        raise ValueError(f"trainer.precision='16-true' with method={method.name}: float16 gradients underflow without "
                         f"loss scaling, which 16-true does not do. Use trainer.precision=bf16-true (bf16 weights, "
                         f"fp32 masters for the trained blocks) or 16-mixed.")
    return dtype


def read_records(reader: DictConfig) -> list[Record]:
    """The examples, from the reader that ``data.records`` names; its own error (naming the file,
    the line, the key) is raised as it is, not wrapped in Hydra's."""
    try:
        return instantiate(reader, _convert_="all")
    except InstantiationException as error:
        if error.__cause__ is None:
            raise
        raise error.__cause__ from None


@dataclass
class DataSetup:
    """The examples, their splits, the task class that fits them and the model, and the data's name."""

    records: list[Record]
    splits: Splits
    task_class: type
    name: str

    @property
    def num_labels(self) -> int:
        return len(self.records[0].choices)


def setup_data(data: DictConfig, kind: str) -> DataSetup:
    """Read and split the examples; the task class for a model of ``kind`` (no tokenizer yet)."""
    check_data(data)
    records = read_records(data.records)
    splits = carve(records, data.val_size, data.test_size, data.split_seed, data.source)
    name = Path(data.path).stem if data.source == "jsonl" else data.source  # two JSONL files: two names
    return DataSetup(records, splits, task_class(kind, records), name)


def setup_task(setup: DataSetup, data: DictConfig, tokenizer):
    """The task over the tokenizer, which it checks (a chat template for chat data) before weights load."""
    try:
        return setup.task_class(tokenizer, data.max_length, setup.records, max_new_tokens=data.max_new_tokens)
    except ValueError as error:
        raise ValueError(f"data.path={data.get('path')!r}: {error}" if data.source == "jsonl" else str(error)) from None


def check_model(method: Method, spec: ModelSpec, path: str | None, num_labels: int | None,
                ckpt_path: str | None = None) -> None:
    """What loading the weights or starting fit would refuse about the model, found on its
    meta-device skeleton: ``method.blocks`` and ``method.num_active`` against its blocks, and a
    ``ckpt_path`` written for another model."""
    if ckpt_path is not None and not method.resumable:
        raise ValueError(f"ckpt_path={ckpt_path!r}: method={method.name} cannot resume a run ({method.resumable_why}).")
    module = nn.ModuleDict({"model": method.prepare(model_skeleton(spec, path, num_labels), spec.kind)})  # as the module
    if method.block_callback is not None:
        try:
            method.block_callback.check_model(module)
        except ValueError as error:  # "blocks=..." / "num_active=..." become the config's keys
            raise ValueError(f"method.{error}" if str(error).startswith(("blocks=", "num_active=")) else str(error)) from None
    if ckpt_path is not None:
        check_checkpoint(ckpt_path, {key: tuple(t.shape) for key, t in module.state_dict().items()})


def check_checkpoint(path: str, shapes: dict[str, tuple]) -> None:
    """Refuse a ckpt_path that is no Lightning checkpoint of this model (only shapes are read: a
    file is memory-mapped, a distributed checkpoint's folder gives its metadata); the callers have
    checked that it exists."""
    saved = _distributed_shapes(path) if Path(path).is_dir() else _file_shapes(path)
    differ = [key for key, shape in shapes.items() if key not in saved or saved[key] != shape]
    if differ:
        key = differ[0]
        found = f"shape {list(saved[key])}" if key in saved else "no such weight"
        raise ValueError(
            f"ckpt_path={path!r} was written for another model or method: {len(differ)} of this model's "
            f"{len(shapes)} weights are missing from it or differ in shape (e.g. {key!r}: shape "
            f"{list(shapes[key])} here, {found} there). Resume with the model and method of the run that "
            f"wrote it (its .hydra/config.yaml)."
        )


def _file_shapes(path: str) -> dict[str, tuple]:
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises several types for a file that is no checkpoint
        raise ValueError(f"ckpt_path={path!r} is not a checkpoint that train.py wrote ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}).") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= set(checkpoint):
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint: it has no state_dict and global_step.")
    return {key: tuple(t.shape) for key, t in checkpoint["state_dict"].items()}


def _distributed_shapes(path: str) -> dict[str, tuple]:
    """A distributed checkpoint (trainer=fsdp): torch's metadata and Lightning's ``meta.pt``."""
    try:
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as error:
        raise ValueError(f"ckpt_path={path!r} is a folder but no distributed checkpoint that train.py wrote "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]}).") from None
    if not (Path(path) / "meta.pt").is_file():
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint: it has no meta.pt.")
    return {key.removeprefix("state_dict."): tuple(value.size) for key, value in metadata.items()
            if key.startswith("state_dict.")}


def setup_model(spec: ModelSpec, method: Method, path: str | None = None, num_labels: int | None = None,
                tokenizer=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the weights (the expensive step) and prepare the model as ``method`` trains it."""
    model, _ = load_model(spec, path if path is not None else resolve_model_path(spec), num_labels=num_labels,
                          tokenizer=tokenizer, dtype=dtype)
    return method.prepare(model, spec.kind)


FSDP2 = "fsdp2"  # trainer.strategy: Lightning's ModelParallelStrategy over every device, data parallel only


def trainer_strategy(strategy, method: Method, devices=1, num_nodes: int = 1, precision="32-true"):
    """``trainer.strategy`` as the method needs it: an offloading strategy in its place when the
    method offloads; ``fsdp2`` (``trainer=fsdp``) as `ModelParallelStrategy` sharding over all
    ``devices`` x ``num_nodes`` processes; for a block method, refused where GrassCallback would
    refuse it."""
    if strategy == FSDP2:
        return _fsdp2(method, devices, num_nodes, precision)
    if method.offload != "none":
        if strategy in ("auto", "single_device"):
            return GrassOffloadStrategy(offload=method.offload)
        if strategy in ("ddp", "ddp_find_unused_parameters_true"):
            return GrassOffloadDDPStrategy(offload=method.offload)
        raise ValueError(
            f"trainer.strategy={strategy!r} cannot be combined with method.offload={method.offload!r}: offloading "
            f"works with trainer.strategy=auto (one device) or ddp_find_unused_parameters_true (trainer=ddp).")
    if method.block_callback is not None:
        try:
            check_block_strategy(strategy)
        except ValueError as error:
            raise ValueError(f"trainer.strategy={strategy!r}: {error} In train.py: trainer=ddp or trainer=fsdp.") from None
    return strategy


def _fsdp2(method: Method, devices, num_nodes: int, precision) -> ModelParallelStrategy:
    if not method.shardable:
        raise ValueError(f"trainer.strategy={FSDP2!r} with method={method.name}: {method.shardable_why}. Use trainer=ddp.")
    if method.offload != "none":
        raise ValueError(f"trainer.strategy={FSDP2!r} with method.offload={method.offload!r}: under FSDP2 each rank "
                         f"holds only its shard of the moments already. Use method.offload=none, or trainer=ddp.")
    callback = method.block_callback
    if weight_dtype(precision) in (torch.bfloat16, torch.float16) and callback is not None and callback.config.master_weights:
        raise ValueError(f"trainer.precision={precision!r} with trainer.strategy={FSDP2!r}: fp32 master weights of "
                         f"sharded blocks are not supported yet. Use trainer.precision=bf16-mixed (FSDP2 keeps fp32 "
                         f"shards, 4/N bytes per weight on each of N processes) or method.master_weights=false.")
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"trainer.devices={devices!r}: trainer.strategy={FSDP2!r} needs a number of devices, "
                         f"to shard over devices x num_nodes processes.")
    return ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)


def setup_trainer(trainer: DictConfig, method: Method, strategy, callbacks: DictConfig | None,
                  logger: DictConfig | None, extra: list[Callback] = ()) -> Trainer:
    """The Trainer: ``strategy`` (from `trainer_strategy`), the method's callbacks, the configured
    ones (``callbacks.<name>: null`` drops one), ``extra``, the configured loggers, and atomic
    checkpoint writes."""
    kwargs = OmegaConf.to_container(trainer, resolve=True)
    kwargs["strategy"] = strategy
    configured = [instantiate(c) for c in (callbacks or {}).values() if c is not None]
    if not kwargs.get("enable_progress_bar", True):  # a bar in callbacks would make Lightning refuse
        configured = [c for c in configured if not isinstance(c, ProgressBar)]
    # ModelParallelStrategy writes distributed checkpoints (a folder of shards) by itself
    plugins = [] if isinstance(strategy, ModelParallelStrategy) else [AtomicCheckpointIO()]
    return Trainer(**kwargs, callbacks=[*method.callbacks, *configured, *extra], logger=_loggers(logger),
                   plugins=plugins)


def _loggers(node: DictConfig | None):
    """``logger``: one logger (a ``_target_``), several by name (``logger=tensorboard``: CSV and
    TensorBoard), or none."""
    if not node:
        return False
    if "_target_" in node:
        return instantiate(node)
    return [instantiate(c) for c in node.values() if c is not None]


__all__ = ["DataSetup", "register_method_defaults", "check_checkpoint", "check_config", "check_objective", "check_data", "check_model",
           "check_precision", "check_trainer", "configure_console", "read_records", "setup_data", "setup_method",
           "setup_model", "setup_optim", "setup_task", "setup_trainer", "trainer_strategy", "FSDP2"]
