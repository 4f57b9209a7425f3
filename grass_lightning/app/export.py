"""The fine-tuned model as a Hugging Face folder (config.json, safetensors, tokenizer files), which
``transformers``, vLLM and lm-eval load.

Every ``train.py`` run writes ``model/`` in its run directory at the end (``export=false`` skips
it). From any checkpoint that ``train.py`` wrote::

    python -m grass_lightning.export outputs/<date>/<time>/checkpoints/last.ckpt exported/
    python -m grass_lightning.export step40.ckpt exported/ --config outputs/.../.hydra/config.yaml model.path=/elsewhere

The model is rebuilt from the run's ``.hydra/config.yaml`` (found beside the checkpoints' folder,
or given by ``--config``; ``key=value`` arguments override it) with random weights that the
checkpoint's then replace: no weights come from the hub. A LoRA model is written merged into its
base (a plain model) by default; ``export_lora=adapter`` writes the peft adapter alone. Weights
are written in the dtype the run held them in (bf16 under ``trainer.precision=bf16-true``);
``export_dtype=float32`` widens them.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

EXPORT_LORA = ("merged", "adapter")
EXPORT_DTYPES = (None, "float32")


def export_model(model: nn.Module, tokenizer, out_dir: str | Path, lora: str = "merged",
                 labels: tuple[str, ...] | None = None, dtype: str | None = None) -> Path:
    """Write ``model`` (a Hugging Face model, or a peft one) and ``tokenizer`` to ``out_dir``.

    A peft model is merged into a copy of its base (``lora="merged"``; the trained module keeps
    its adapters) or saved as its adapter (``"adapter"``). A classifier's ``labels`` become its
    ``id2label``. Weights are written in the dtype the model holds (bf16 after a ``bf16-true``
    run), or in ``dtype="float32"``. Written to a temporary folder beside ``out_dir`` and renamed
    over it, so a crash never leaves a half-written folder under the real name.
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
            model.save_pretrained(staging)
        else:  # a widened copy of each tensor; the model itself stays as it is
            wide = getattr(torch, dtype)
            model.save_pretrained(staging, state_dict={k: v.to(wide) for k, v in model.state_dict().items()})
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


def run_config(checkpoint: Path, config: Path | None, overrides: list[str]) -> DictConfig:
    """The config of the run that wrote ``checkpoint``, with ``overrides`` applied."""
    if config is None:
        config = checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"  # <run>/checkpoints/x.ckpt
        if not config.is_file():
            raise FileNotFoundError(
                f"{checkpoint}: no run config at {config}. Give the run's .hydra/config.yaml with --config.")
    elif not config.is_file():
        raise FileNotFoundError(f"--config {str(config)!r}: no such file.")
    cfg = OmegaConf.load(config)
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ValueError(f"{bad[0]!r}: overrides are key=value, e.g. model.path=/path/to/model.")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, config: str | Path | None = None,
                      overrides: list[str] | None = None) -> Path:
    """Rebuild the run's model, load ``checkpoint``'s weights into it, and export it to ``out_dir``."""
    from grass_lightning.app.methods import build_method
    from grass_lightning.app.models import ModelSpec, load_tokenizer, resolve_model_path, untrained_model, weight_dtype
    from grass_lightning.app.run import _check_checkpoint, _read_records

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r}: no such checkpoint file.")
    cfg = run_config(checkpoint, Path(config) if config is not None else None, list(overrides or []))
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    path = resolve_model_path(spec)
    labels = None
    if spec.kind == "classification":
        labels = _read_records(cfg.data.records)[0].choices
    method = build_method(cfg.method, seed=cfg.seed)
    dtype = weight_dtype(cfg.trainer.get("precision"))  # the checkpoint's weights: bf16 after a bf16-true run
    model = method.prepare(untrained_model(spec, path, len(labels) if labels else None, dtype), spec.kind)
    module = nn.ModuleDict({"model": model})  # the keys GrassModule's checkpoints use
    _check_checkpoint(str(checkpoint), {key: tuple(t.shape) for key, t in module.state_dict().items()})
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return export_model(model, load_tokenizer(spec, path), out_dir, cfg.get("export_lora", "merged"), labels,
                        cfg.get("export_dtype"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grass_lightning.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt that train.py wrote")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face folder to write")
    parser.add_argument("--config", type=Path, default=None, help="the run's .hydra/config.yaml (default: beside the checkpoints)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config, e.g. model.path=...")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out_dir, args.config, args.overrides)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
