"""The fine-tuned model as a Hugging Face folder (config.json, safetensors, tokenizer files), which
``transformers``, vLLM and lm-eval load.

Every ``train.py`` run writes ``model/`` in its run directory at the end (``export=false`` skips
it); ``grass-export`` writes one from any checkpoint (:mod:`grass_lightning.app.export_checkpoint`).
A LoRA model is written merged into its base (a plain model) by default; ``export_lora=adapter``
writes the peft adapter alone. Weights are written in the dtype the run held them in (bf16 under
``trainer.precision=bf16-true``); ``export_dtype=float32`` widens them.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

EXPORT_LORA = ("merged", "adapter")
EXPORT_DTYPES = (None, "float32")


def export_model(model: nn.Module, tokenizer, out_dir: str | Path, lora: str = "merged",
                 labels: tuple[str, ...] | None = None, dtype: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (a Hugging Face model, or a peft one) and ``tokenizer`` to ``out_dir``.

    A peft model is merged into a copy of its base (``lora="merged"``; the trained module keeps
    its adapters) or saved as its adapter (``"adapter"``). A classifier's ``labels`` become its
    ``id2label``. Weights are written in the dtype the model holds (bf16 after a ``bf16-true``
    run), or in ``dtype="float32"``. ``state_dict`` replaces the model's own weights (the whole
    tensors of an FSDP2-sharded model: :func:`grass_lightning.core.sharding.full_state_dict`).
    Written to a temporary folder beside ``out_dir`` and renamed over it, so a crash never leaves
    a half-written folder under the real name.
    """
    check_export_dtype(dtype)
    if lora not in EXPORT_LORA:
        raise ValueError(f"export_lora={lora!r} is not one of {EXPORT_LORA}.")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and lora == "merged":
        model = copy.deepcopy(model).merge_and_unload()
    if labels is not None and hasattr(model, "config"):
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        if dtype is None:
            model.save_pretrained(staging, state_dict=state_dict)
        else:  # a widened copy of each tensor; the model itself stays as it is
            wide = getattr(torch, dtype)
            weights = state_dict if state_dict is not None else model.state_dict()
            model.save_pretrained(staging, state_dict={k: v.to(wide) for k, v in weights.items()})
            config = copy.deepcopy(model.config)
            config.dtype = wide  # save_pretrained wrote the dtype the model holds
            config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def check_export_dtype(dtype: str | None) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype={dtype!r} is not one of {EXPORT_DTYPES}: null writes the dtype the run held.")
