"""The fine-tuning methods compared here, as one switch: what each adds to a run.

- ``full``: every parameter trains.
- ``lora``: peft LoRA adapters on every linear layer of the blocks; the base stays frozen.
- ``lisa``: GrassCallback with uniform block sampling and no probe (LISA's scheme).
- ``grass``: GrassCallback with importance sampling.

``lisa`` and ``grass`` can keep block moments in host memory: ``offload: park|stream`` (see
:mod:`grass_lightning.core.offload`); the run then trains under an offloading strategy.

Everything is validated when the method is built, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning.pytorch import Callback
from torch import nn

from grass_lightning.core.config import SETTINGS
from grass_lightning.core.offload import check_offload
from grass_lightning.lightning.callback import GrassCallback

METHODS = ("full", "lora", "lisa", "grass")
_LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


@dataclass
class Method:
    name: str
    callbacks: list[Callback] = field(default_factory=list)
    lora: dict | None = None
    offload: str = "none"

    def prepare(self, model: nn.Module, kind: str) -> nn.Module:
        """Wrap ``model`` for the method (LoRA adapters); others train it as it is."""
        if self.lora is None:
            return model
        from peft import LoraConfig, get_peft_model

        task_type = "CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS"
        config = LoraConfig(r=self.lora["r"], lora_alpha=self.lora["alpha"], lora_dropout=self.lora["dropout"],
                            target_modules=self.lora["target_modules"], task_type=task_type)
        return get_peft_model(model, config)


def build_method(config: dict, seed: int) -> Method:
    """A `Method` from the ``method`` config group; errors name ``method.<key>`` and the value."""
    config = dict(config)
    name, offload = config.pop("name", None), config.pop("offload", "none")
    config.pop("lr", None)  # the method's learning rate, read by `optim.lr`
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not one of {METHODS}.")
    if offload != "none" and name not in ("lisa", "grass"):
        raise ValueError(f"method.offload={offload!r}: only the block methods (lisa, grass) offload; use 'none'.")
    if name == "full":
        _no_extra(config, ())
        return Method(name)
    if name == "lora":
        _no_extra(config, _LORA_KEYS)
        if not isinstance(config.get("r"), int) or config["r"] < 1:
            raise ValueError(f"method.r={config.get('r')!r} must be an integer >= 1.")
        return Method(name, lora={key: config[key] for key in _LORA_KEYS})
    _no_extra(config, (*SETTINGS, "blocks"))  # the seed is the run's
    try:
        callback = GrassCallback(seed=seed, **config)
        check_offload(offload, callback.config.idle_moments)
    except ValueError as error:  # its messages start with "<argument>=<value>"
        raise ValueError(f"method.{error}") from None
    return Method(name, callbacks=[callback], offload=offload)


def _no_extra(config: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(config) - set(allowed))
    if extra:
        raise ValueError(f"method.{extra[0]}={config[extra[0]]!r} is not a setting of this method.")
