"""``grass-export``: the model of any checkpoint that ``train.py`` wrote, as a Hugging Face folder::

    grass-export outputs/<date>/<time>/checkpoints/last.ckpt exported/
    grass-export step40.ckpt exported/ --config outputs/.../.hydra/config.yaml model.path=/elsewhere

The model is rebuilt from the run's ``.hydra/config.yaml`` (found beside the checkpoints' folder,
or given by ``--config``; ``key=value`` arguments override it) by the run's own setup steps, with
random weights that the checkpoint's then replace: no weights come from the hub. Then
`grass_lightning.app.export.export_model` writes it, as at the end of a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from grass_lightning.app.export import export_model
from grass_lightning.app.models import ModelSpec, load_tokenizer, resolve_model_path, untrained_model, weight_dtype
from grass_lightning.app.setup import check_checkpoint, configure_console, read_records, setup_method


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
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r}: no such checkpoint file.")
    cfg = run_config(checkpoint, Path(config) if config is not None else None, list(overrides or []))
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    path = resolve_model_path(spec)
    labels = None
    if spec.kind == "classification":
        labels = read_records(cfg.data.records)[0].choices
    method = setup_method(cfg.method, cfg.seed)
    dtype = weight_dtype(cfg.trainer.get("precision"))  # the checkpoint's weights: bf16 after a bf16-true run
    model = method.prepare(untrained_model(spec, path, len(labels) if labels else None, dtype), spec.kind)
    module = nn.ModuleDict({"model": model})  # the keys FineTuningModule's checkpoints use
    check_checkpoint(str(checkpoint), {key: tuple(t.shape) for key, t in module.state_dict().items()})
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return export_model(model, load_tokenizer(spec, path), out_dir, cfg.get("export_lora", "merged"), labels,
                        cfg.get("export_dtype"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="grass-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt that train.py wrote")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face folder to write")
    parser.add_argument("--config", type=Path, default=None, help="the run's .hydra/config.yaml (default: beside the checkpoints)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config, e.g. model.path=...")
    args = parser.parse_args(argv)
    configure_console()
    out = export_checkpoint(args.checkpoint, args.out_dir, args.config, args.overrides)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
