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

A new method is a YAML file plus a `Method` subclass. Everything is validated when the method
is built, before any model is loaded; errors name ``method.<key>`` and the value.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer

from grass_lightning.core.blocks import find_blocks
from grass_lightning.core.config import SETTINGS, require_choice, require_int
from grass_lightning.core.offload import check_offload
from grass_lightning.lightning.callback import GrassCallback

BADAM_SWITCH_MODES = ("random", "ascending", "descending")  # BAdam's orders ("fixed" never switches)


class Method:
    """What a method adds to a run: callbacks, a wrapper around the model, an offload mode.

    Args:
        name: the label in metrics.json and tables.
        lr: the method's learning rate (read by ``optim.lr``).
        offload: ``"none"``; only block methods keep moments in host memory.
        seed: the run's seed.
    """

    SETTINGS: tuple[str, ...] = ()  # the keys its YAML may set besides name, lr, offload
    resumable = True  # whether a checkpoint holds all its state (ckpt_path)
    resumable_why = ""

    def __init__(self, name: str, lr: float, offload: str = "none", seed: int | None = None) -> None:
        if offload != "none":
            raise ValueError(f"offload={offload!r}: only the block methods (lisa, grass) offload; use 'none'.")
        self.name, self.lr, self.offload = name, lr, offload
        self.callbacks: list[Callback] = []

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        """The model as this method trains it."""
        return model

    def wrap_optimizer(self, optimizer: Optimizer, model: nn.Module) -> Optimizer:
        """The optimizer as this method steps it (`GrassModule.configure_optimizers` calls this)."""
        return optimizer


class Full(Method):
    """Every parameter trains."""


class Lora(Method):
    """peft LoRA adapters (rank ``r``, scale ``alpha / r``) on ``target_modules``; the base is frozen."""

    SETTINGS = ("r", "alpha", "dropout", "target_modules")

    def __init__(self, name: str, lr: float, r: int, alpha: float, dropout: float, target_modules: str | list[str],
                 offload: str = "none", seed: int | None = None) -> None:
        super().__init__(name, lr, offload, seed)
        require_int("r", r, minimum=1)
        self.lora = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        task_type = "CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS"
        return get_peft_model(model, LoraConfig(**self.lora, task_type=task_type))


class BlockMethod(Method):
    """A few blocks at a time (`GrassCallback`); ``settings`` are `GrassConfig` fields."""

    SETTINGS = (*SETTINGS, "blocks")

    def __init__(self, name: str, lr: float, offload: str = "none", seed: int | None = None,
                 blocks: str | None = None, **settings) -> None:
        callback = GrassCallback(blocks=blocks, seed=seed, **settings)
        check_offload(offload, callback.config.idle_moments)
        sampler = callback.config.sampler
        self.name = f"grass-{sampler}" if name == "grass" and sampler != "grass" else name  # tables say which
        self.lr, self.offload = lr, offload
        self.callbacks = [callback]


class Badam(Method):
    """BAdam: one block at a time, switched every ``switch_block_every`` steps in ``switch_mode``
    order, its Adam moments dropped at each switch; by the ``badam`` package's ``BlockOptimizer``.

    The blocks are the model's transformer blocks (what BAdam infers for Llama-style models,
    found here for any model `find_blocks` knows); ``include_embedding``/``include_lm_head`` add
    those as blocks of their own, as in BAdam. A classifier's new head trains in every step
    (BAdam's ``active_modules``). A BAdam run cannot resume from a checkpoint.
    """

    SETTINGS = ("switch_block_every", "switch_mode", "include_embedding", "include_lm_head", "blocks")
    resumable = False
    resumable_why = "BAdam's BlockOptimizer keeps its block order and step count outside its state_dict"

    def __init__(self, name: str, lr: float, switch_block_every: int, switch_mode: str,
                 include_embedding: bool = False, include_lm_head: bool = False, blocks: str | None = None,
                 offload: str = "none", seed: int | None = None) -> None:
        super().__init__(name, lr, offload, seed)
        require_int("switch_block_every", switch_block_every, minimum=1)
        require_choice("switch_mode", switch_mode, BADAM_SWITCH_MODES)
        try:
            import badam  # noqa: F401
        except ImportError:
            raise ValueError("_target_=Badam needs the badam package: pip install \"grass-lightning[peers]\" "
                             "(or pip install badam).") from None
        self.switch_block_every, self.switch_mode = switch_block_every, switch_mode
        self.include_embedding, self.include_lm_head, self.blocks = include_embedding, include_lm_head, blocks

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

        layout = find_blocks(model, self.blocks)
        prefixes = [[f"{layout.path}.{i}."] for i in range(len(layout))]
        outside = [n for n, _ in model.named_parameters() if not n.startswith(f"{layout.path}.")]
        task_head = _task_head(model, layout)
        if self.include_embedding:
            prefixes.append([n for n in outside if "embed" in n])
        rest = [n for n in outside if "embed" not in n and n not in task_head]
        if self.include_lm_head and rest:
            prefixes.append(rest)
        # BAdam builds its groups as {"weight_decay": wd, **base.defaults}: the defaults win, and AdamW's
        # default is 0.01. Its examples pass weight_decay to AdamW itself; so do we, the configured one.
        optimizer.defaults["weight_decay"] = optimizer.param_groups[0]["weight_decay"]
        # its random order comes from torch's global generator, seeded with the run
        return ClosureFirst(optimizer, list(model.named_parameters()), block_prefix_list=prefixes,
                            switch_block_every=self.switch_block_every, switch_mode=self.switch_mode,
                            active_modules=task_head, verbose=0)


def _task_head(model: nn.Module, layout) -> list[str]:
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
    extra = sorted(set(config) - {"name", "lr", "offload", *cls.SETTINGS})
    if extra:
        raise ValueError(f"method.{extra[0]}={config[extra[0]]!r} is not a setting of this method.")
    try:
        return cls(**config, seed=seed)
    except ValueError as error:  # messages start with "<argument>=<value>"
        raise ValueError(f"method.{error}") from None
