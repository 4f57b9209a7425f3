"""The fine-tuning methods compared here, each a class that ``conf/method/<name>.yaml`` names by ``_target_``.

- `Full`: every parameter trains.
- `Lora`: peft LoRA adapters on every linear layer of the blocks; the base stays frozen.
- `BlockMethod`: GrassCallback; ``grass`` samples blocks by importance, ``lisa`` is LISA as
  published (uniform, embeddings and head trained, moments kept), and ``grass`` with
  ``sampler=uniform`` is LISA's choice with GRASS's other settings, labelled ``grass-uniform``.
  Block moments can live in host memory: ``offload: park|stream`` (see
  :mod:`grass_lightning.core.offload`); the run then trains under an offloading strategy.
- `Badam`: BAdam (Luo et al. 2024), the ``badam`` package's own ``BlockOptimizer`` around the
  module's AdamW (``pip install "grass-lightning[peers]"``).

A method is a `Method` subclass whose ``Settings`` dataclass holds what its YAML may set besides
``name``, ``lr`` and ``offload``, plus a YAML file. Everything is validated when the method is
built, before any model is loaded; errors name ``method.<key>`` and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from grass_lightning.core.blocks import BlockLayout, find_blocks
from grass_lightning.core.checks import require_bool, require_choice, require_int
from grass_lightning.core.config import GrassConfig
from grass_lightning.core.offload import OFFLOAD_MODES, check_offload
from grass_lightning.lightning.callback import GrassCallback

BADAM_SWITCH_MODES = ("random", "ascending", "descending")  # BAdam's orders ("fixed" never switches)


@dataclass(frozen=True)
class NoSettings:
    """A method with nothing to set but its name, learning rate and offload mode."""


class Method:
    """What a method adds to a run; `build_method` makes one from ``conf/method/<name>.yaml``.

    Args:
        name: the label in metrics.json and tables.
        lr: the method's learning rate (read by ``optim.lr``).
        offload: ``"none"``, or where block moments wait (``OFFLOAD``: the block methods').
        seed: the run's seed.
        **settings: the fields of the subclass's ``Settings`` dataclass.
    """

    Settings: type = NoSettings
    OFFLOAD: tuple[str, ...] = ("none",)
    resumable = True  # whether a checkpoint holds all its state (ckpt_path)
    resumable_why = ""
    shardable = True  # whether it runs under FSDP2 (trainer=fsdp)
    shardable_why = ""

    def __init__(self, name: str, lr: float, offload: str = "none", seed: int | None = None, **settings) -> None:
        if offload not in self.OFFLOAD:
            raise ValueError(f"offload={offload!r}: only the block methods (lisa, grass) offload; use 'none'."
                             if self.OFFLOAD == ("none",) else f"offload={offload!r} is not one of "
                             f"{', '.join(map(repr, self.OFFLOAD))}.")
        self.name, self.lr, self.offload, self.seed = name, lr, offload, seed
        self.settings = self.Settings(**settings)

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Settings))

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        """The model as this method trains it."""
        return model

    def wrap_optimizer(self, optimizer: Optimizer, model: nn.Module) -> Optimizer:
        """The optimizer as this method steps it (the module's ``configure_optimizers`` calls this)."""
        return optimizer

    @property
    def block_callback(self) -> GrassCallback | None:
        """The GrassCallback that trains blocks a few at a time, if this method has one."""
        return None

    @property
    def blocks(self) -> str | None:
        """The blocks' dotted path from the LightningModule, if set (None: found in common Hugging
        Face models); FSDP2 shards each block."""
        return None

    @property
    def callbacks(self) -> list[Callback]:
        return [self.block_callback] if self.block_callback is not None else []

    @property
    def probe_steps(self) -> int:
        """Optimizer steps that update nothing, before the updates (``max_steps`` counts updates)."""
        return self.block_callback.config.probe_steps if self.block_callback is not None else 0

    def describe(self) -> str:
        """Its settings in a few words, for a table."""
        return "every parameter"

    def bf16_weights(self) -> str:
        """How it trains bf16 weights (``precision=bf16-true``), for a table."""
        return "bf16 weights, pure bf16"

    def force_lowest_block(self, trainer: Trainer) -> None:
        """Make the next step train the lowest block (the deepest backward), by the method's own
        switch; a method that trains every block in every step has nothing to do."""

    def stepping_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """The optimizer whose state and parameter groups hold what the step updates (the bench
        counts its bytes): the one `wrap_optimizer` returned, unless that wraps another."""
        return optimizer


class Full(Method):
    """Every parameter trains."""


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: str | list[str]

    def __post_init__(self) -> None:
        require_int("r", self.r, minimum=1)


class Lora(Method):
    """peft LoRA adapters (rank ``r``, scale ``alpha / r``) on ``target_modules``; the base is frozen."""

    Settings = LoraSettings
    shardable = False
    shardable_why = "peft adapters under FSDP2 are not tested here"

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        s = self.settings
        config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                            task_type="CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS")
        return get_peft_model(model, config)

    def describe(self) -> str:
        return f"r={self.settings.r}, alpha {self.settings.alpha}, {self.settings.target_modules}"


@dataclass(frozen=True)
class BlockSettings(GrassConfig):
    """`GrassConfig`'s fields, and where the blocks are (None: found in common Hugging Face models)."""

    blocks: str | None = None


_IDLE = {"drop": "dropped", "keep": "kept"}


class BlockMethod(Method):
    """A few blocks at a time (`GrassCallback`)."""

    Settings = BlockSettings
    OFFLOAD = ("none", *OFFLOAD_MODES)

    def __init__(self, name: str, lr: float, offload: str = "none", seed: int | None = None, **settings) -> None:
        super().__init__(name, lr, offload, seed, **settings)
        config = GrassConfig(**{f.name: getattr(self.settings, f.name) for f in dataclasses.fields(GrassConfig)})
        check_offload(offload, config.idle_moments)
        self._callback = GrassCallback(config=config, blocks=self.settings.blocks, seed=seed)
        if name == "grass" and config.sampler != "grass":
            self.name = f"grass-{config.sampler}"  # tables say which

    @property
    def block_callback(self) -> GrassCallback:
        return self._callback

    @property
    def blocks(self) -> str | None:
        return self.settings.blocks

    def describe(self) -> str:
        c = self._callback.config
        trained = [part for part, on in (("embeddings", c.train_embeddings), ("head", c.train_head)) if on]
        return (f"γ={c.num_active}, period {c.sampling_period}, sampler {c.sampler}, {c.probe_steps} probe steps, "
                f"{' + '.join(trained) or 'nothing else'} trained, idle moments {_IDLE[c.idle_moments]}, "
                f"recompute {c.recompute}" + (f", offload {self.offload}" if self.offload != "none" else ""))

    def bf16_weights(self) -> str:
        masters = self._callback.config.master_weights
        return "bf16 weights" + (", fp32 masters of trained params" if masters else ", no masters (pure bf16)")

    def force_lowest_block(self, trainer: Trainer) -> None:
        schedule = self._callback.schedule
        if schedule is not None and not schedule.probing and 0 not in schedule.active:
            schedule.activate([0, *sorted(schedule.active)[1:]])


@dataclass(frozen=True)
class BadamSettings:
    switch_block_every: int
    switch_mode: str
    include_embedding: bool = False
    include_lm_head: bool = False
    blocks: str | None = None

    def __post_init__(self) -> None:
        require_int("switch_block_every", self.switch_block_every, minimum=1)
        require_choice("switch_mode", self.switch_mode, BADAM_SWITCH_MODES)
        require_bool("include_embedding", self.include_embedding)
        require_bool("include_lm_head", self.include_lm_head)


class Badam(Method):
    """BAdam: one block at a time, switched every ``switch_block_every`` steps in ``switch_mode``
    order, its Adam moments dropped at each switch; by the ``badam`` package's ``BlockOptimizer``.

    The blocks are the model's transformer blocks (what BAdam infers for Llama-style models,
    found here for any model `find_blocks` knows); ``include_embedding``/``include_lm_head`` add
    those as blocks of their own, as in BAdam. A classifier's new head trains in every step
    (BAdam's ``active_modules``). A BAdam run cannot resume from a checkpoint.
    """

    Settings = BadamSettings
    resumable = False
    resumable_why = "BAdam's BlockOptimizer keeps its block order and step count outside its state_dict"
    shardable = False
    shardable_why = "BAdam's BlockOptimizer (the badam package) rebuilds its optimizer over each block and is not tested on sharded parameters"

    def __init__(self, name: str, lr: float, offload: str = "none", seed: int | None = None, **settings) -> None:
        super().__init__(name, lr, offload, seed, **settings)
        try:
            import badam  # noqa: F401
        except ImportError:
            raise ValueError("_target_=Badam needs the badam package: pip install \"grass-lightning[peers]\" "
                             "(or pip install badam).") from None

    def wrap_optimizer(self, optimizer: Optimizer, model: nn.Module) -> Optimizer:
        from badam import BlockOptimizer

        class ClosureFirst(BlockOptimizer):
            """BAdam moves gradients into its fp32 copies before its base optimizer runs the
            closure, where Lightning calls ``on_before_optimizer_step``: clipping and callbacks
            would find no gradient. Torch's optimizers run the closure first; so does this."""

            def step(self, closure=None):
                if closure is not None:
                    with torch.enable_grad():
                        closure()
                return super().step()

        s = self.settings
        layout = find_blocks(model, s.blocks)
        prefixes = [[f"{layout.path}.{i}."] for i in range(len(layout))]
        outside = [n for n, _ in model.named_parameters() if not n.startswith(f"{layout.path}.")]
        task_head = _task_head(model, layout)
        if s.include_embedding:
            prefixes.append([n for n in outside if "embed" in n])
        rest = [n for n in outside if "embed" not in n and n not in task_head]
        if s.include_lm_head and rest:
            prefixes.append(rest)
        # BAdam builds its groups as {"weight_decay": wd, **base.defaults}: the defaults win, and AdamW's
        # default is 0.01. Its examples pass weight_decay to AdamW itself; so do we, the configured one.
        optimizer.defaults["weight_decay"] = optimizer.param_groups[0]["weight_decay"]
        # its random order comes from torch's global generator, seeded with the run
        return ClosureFirst(optimizer, list(model.named_parameters()), block_prefix_list=prefixes,
                            switch_block_every=s.switch_block_every, switch_mode=s.switch_mode,
                            active_modules=task_head, verbose=0)

    def describe(self) -> str:
        s = self.settings
        return (f"1 block, switched every {s.switch_block_every} steps, {s.switch_mode} order, moments "
                f"dropped at a switch, embeddings {'trained as a block' if s.include_embedding else 'frozen'}, "
                f"head {'trained as a block' if s.include_lm_head else 'frozen'}")

    def bf16_weights(self) -> str:
        return "bf16 weights, fp32 copy of the active block (BAdam's)"

    def stepping_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer.base_optimizer  # AdamW over BAdam's fp32 copies of the active block

    def force_lowest_block(self, trainer: Trainer) -> None:
        optimizer = trainer.optimizers[0]
        first = optimizer.block_prefix_list[0]  # switch to its first block, as its own switch does
        if optimizer.active_param_prefixs[:1] != first[:1]:
            optimizer.current_block_idx = 0
            optimizer.switch_trainable_params(verbose=0)


def _task_head(model: nn.Module, layout: BlockLayout) -> list[str]:
    """The parameters of a classifier's head (pooler, classifier or score, final norm), which BAdam
    trains in every step (its ``active_modules``): the head starts random and a block-at-a-time
    schedule would leave it so. A language model's head is pretrained: none."""
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is None or get_output() is not None:
        return []
    head = set(map(id, layout.head)) - set(map(id, layout.embeddings))
    return [n for n, p in model.named_parameters() if id(p) in head]


def build_method(config: DictConfig | dict, seed: int) -> Method:
    """The `Method` that a ``method`` config names by ``_target_``; errors name ``method.<key>``."""
    from hydra.utils import get_class

    config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    target = config.pop("_target_", None)
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except ImportError:
        cls = None
    if cls is None or not issubclass(cls, Method):
        raise ValueError(f"method._target_={target!r} is not a Method class, e.g. grass_lightning.app.methods.BlockMethod.")
    extra = sorted(set(config) - {"name", "lr", "offload", *cls.setting_names()})
    if extra:
        raise ValueError(f"method.{extra[0]}={config[extra[0]]!r} is not a setting of this method.")
    try:
        return cls(**config, seed=seed)
    except ValueError as error:  # messages start with "<argument>=<value>"
        raise ValueError(f"method.{error}") from None
    except TypeError as error:  # a required setting missing from the YAML
        raise ValueError(f"method: {error}") from None
