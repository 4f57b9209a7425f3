"""The fine-tuning methods compared here, each a class that ``conf/method/<name>.yaml`` names by ``_target_``.

- `Full`: every parameter trains.
- `Lora`: peft LoRA adapters on every linear layer of the blocks; the base stays frozen.
- `BlockMethod`: GrassCallback; ``grass`` samples blocks by importance, ``lisa`` uniformly with
  no probe (LISA's scheme). Block moments can live in host memory: ``offload: park|stream``
  (see :mod:`grass_lightning.core.offload`); the run then trains under an offloading strategy.

A new method is a YAML file plus a `Method` subclass. Everything is validated when the method
is built, before any model is loaded; errors name ``method.<key>`` and the value.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn

from grass_lightning.core.config import SETTINGS
from grass_lightning.core.offload import check_offload
from grass_lightning.lightning.callback import GrassCallback


class Method:
    """What a method adds to a run: callbacks, a wrapper around the model, an offload mode.

    Args:
        name: the label in metrics.json and tables.
        lr: the method's learning rate (read by ``optim.lr``).
        offload: ``"none"``; only block methods keep moments in host memory.
        seed: the run's seed.
    """

    SETTINGS: tuple[str, ...] = ()  # the keys its YAML may set besides name, lr, offload

    def __init__(self, name: str, lr: float, offload: str = "none", seed: int | None = None) -> None:
        if offload != "none":
            raise ValueError(f"offload={offload!r}: only the block methods (lisa, grass) offload; use 'none'.")
        self.name, self.lr, self.offload = name, lr, offload
        self.callbacks: list[Callback] = []

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        """The model as this method trains it."""
        return model


class Full(Method):
    """Every parameter trains."""


class Lora(Method):
    """peft LoRA adapters (rank ``r``, scale ``alpha / r``) on ``target_modules``; the base is frozen."""

    SETTINGS = ("r", "alpha", "dropout", "target_modules")

    def __init__(self, name: str, lr: float, r: int, alpha: float, dropout: float, target_modules: str | list[str],
                 offload: str = "none", seed: int | None = None) -> None:
        super().__init__(name, lr, offload, seed)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r={r!r} must be an integer >= 1.")
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
        self.name, self.lr, self.offload = name, lr, offload
        self.callbacks = [callback]


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
