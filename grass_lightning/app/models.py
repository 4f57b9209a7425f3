"""Which model to fine-tune: a Hugging Face folder or hub id, a model shipped inside a Python
package (MiniLM as safetensors, SmolLM2 as GGUF), or a tiny random-initialised one for tests.

`resolve_model_path` does the cheap part (finding or converting files) and `load_model` the
expensive one, so a bad path fails before any weights are read.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from grass_lightning.app.assets import package_dir

KINDS = ("causal_lm", "classification")
SOURCES = ("pretrained", "package", "gguf", "random")


@dataclass
class ModelSpec:
    """What to load. ``path``: folder or hub id (``pretrained``), folder inside ``package``
    (``package``), file inside ``package`` (``gguf``); ``config``: Hugging Face config fields of a
    random model (``random``); ``gradient_checkpointing``: recompute each block's activations in
    backward instead of keeping them (transformers 5 names it activation checkpointing; non-reentrant)."""

    name: str
    kind: str
    source: str = "pretrained"
    path: str = ""
    package: str = ""
    config: dict = field(default_factory=dict)
    cache_dir: str = "~/.cache/grass_lightning"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"model.gradient_checkpointing={self.gradient_checkpointing!r} must be true or false.")
        if self.kind not in KINDS:
            raise ValueError(f"model.kind={self.kind!r} is not one of {KINDS}.")
        if self.source not in SOURCES:
            raise ValueError(f"model.source={self.source!r} is not one of {SOURCES}.")
        if self.source == "random" and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (e.g. llama, bert) for model.source='random'.")
        if self.source != "random" and not self.path:
            raise ValueError(f"model.path is empty for model.source={self.source!r}.")


def resolve_model_path(spec: ModelSpec) -> str | None:
    """The folder or hub id to load from; converts a GGUF file once into a cached folder.

    Raises:
        FileNotFoundError: for a missing local folder, package or file, naming the key.
    """
    if spec.source == "random":
        return None
    if spec.source == "pretrained":
        local = Path(spec.path).expanduser()
        if local.is_dir():
            return str(local)
        if spec.path.startswith((".", "/", "~")):  # a path, not a hub id such as "org/name"
            raise FileNotFoundError(f"model.path={spec.path!r}: no such folder.")
        return spec.path
    root = package_dir(spec.package, "model.package")
    if spec.source == "package":
        folder = root / spec.path
        if not folder.is_dir():
            raise FileNotFoundError(f"model.path={spec.path!r}: no such folder in package {spec.package!r}.")
        return str(folder)
    gguf = root / spec.path
    if not gguf.is_file():
        raise FileNotFoundError(f"model.path={spec.path!r}: no such file in package {spec.package!r}.")
    cached = Path(spec.cache_dir).expanduser() / spec.name
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    return str(cached)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise once (about 15 s for SmolLM2) into a safetensors folder that loads in 0.2 s.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights move into a model built from
    its config. Written to a temporary folder and renamed, so a crash leaves no half cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} into {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _blueprint(spec: ModelSpec, path: str | None, num_labels: int | None):
    """The auto class and Hugging Face config of the model (config.json only, no weights)."""
    import transformers

    auto = transformers.AutoModelForCausalLM if spec.kind == "causal_lm" else transformers.AutoModelForSequenceClassification
    extra = {"num_labels": num_labels} if spec.kind == "classification" else {}
    if spec.source == "random":
        tokenizer = byte_tokenizer()
        ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.eos_token_id)  # model.config may widen the vocabulary (benchmarks)
        return auto, transformers.AutoConfig.for_model(**{**ids, **spec.config, **extra})
    return auto, transformers.AutoConfig.from_pretrained(path, **extra)


def model_skeleton(spec: ModelSpec, path: str | None, num_labels: int | None = None) -> nn.Module:
    """The model's modules on the meta device: its blocks and weight shapes without its weights,
    so settings that depend on the model are checked in milliseconds, before loading."""
    auto, config = _blueprint(spec, path, num_labels)
    with torch.device("meta"):
        return auto.from_config(config)


def load_model(spec: ModelSpec, path: str | None, num_labels: int | None = None,
               tokenizer=None, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """Model and tokenizer (``tokenizer``, if already loaded), in train mode (transformers 5 loads in eval mode).

    ``dtype`` (e.g. bf16 for ``precision="bf16-true"``): weights are created or read in it, tensor by
    tensor, so no fp32 copy of the whole model ever exists; None keeps fp32."""
    auto, config = _blueprint(spec, path, num_labels)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, path)
    dtype = dtype or torch.float32
    model = (auto.from_config(config, dtype=dtype) if spec.source == "random"
             else auto.from_pretrained(path, config=config, dtype=dtype))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tokenizer


def untrained_model(spec: ModelSpec, path: str | None, num_labels: int | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """The model built from its config alone, with fresh weights in ``dtype`` (fp32 if None), for a
    checkpoint's to replace: nothing is read from the hub but config.json."""
    auto, config = _blueprint(spec, path, num_labels)
    model = auto.from_config(config, dtype=dtype or torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(spec, path).pad_token_id
    return model


# Lightning precisions whose weights are half precision: the model loads in that dtype.
WEIGHT_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}  # Lightning reads "bf16" as bf16-mixed


def weight_dtype(precision) -> torch.dtype | None:
    """The dtype ``trainer.precision`` holds weights in, or None for fp32 (``32-true``, the mixed ones)."""
    return WEIGHT_DTYPES.get(str(precision))


def load_tokenizer(spec: ModelSpec, path: str | None):
    """The model's tokenizer, with a padding token (its end-of-sequence or separator token if it has none)."""
    import transformers

    tokenizer = byte_tokenizer() if spec.source == "random" else transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def byte_tokenizer():
    """A 258-token byte-level tokenizer built in memory, with a chat template: tests need no vocabulary files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({"<pad>": len(vocab), "<eos>": len(vocab) + 1})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE  # tiny models train on chat data too
    return fast


# A minimal chat template for the byte tokenizer: a role line, the content, then <eos> ends the turn.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
