"""Studies of the sampling: GRASS (paper rule), GRASS with re-probing, static GRASS and uniform
sampling (LISA's choice with GRASS's other settings, ``method=grass method.sampler=uniform``, so a
difference is the sampling's alone), paired by seed (the same data order per seed for every method).

``damaged``: does importance sampling find the blocks that matter most?

Re-initialise k blocks of a pretrained model (normal(0, initializer_range) weights, unit norms,
zero biases, from a fixed seed), so that those k blocks are known to be the ones fine-tuning
must repair. Then fine-tune the damaged model with GRASS (the paper's rule), GRASS with
re-probing, static GRASS and uniform sampling, over several seeds (one data order and one new head per seed,
shared by the methods), and report per method:

- the share of block updates that went to damaged blocks (uniform's is k/L in expectation);
- the validation loss at fixed update counts, and the held-out test score at the end;
- each method's paired difference to uniform sampling, seed by seed.

    grass-study damaged                      # 20 runs into multirun/damaged
    grass-study damaged --summarise-only     # tables and plot from the runs

``commonsense``: the real-data comparison, SmolLM2-135M-Instruct on `COMMONSENSE`'s five sets,
``--steps`` updates with a new active set every ``--period`` (GRASS probes ``--period`` steps
first), no setting chosen on any score; per set and over the sets' mean, with each variant's
paired difference to uniform sampling, adaptive minus static, and re-probing minus the paper's rule.

    grass-study commonsense --out multirun/commonsense10          # 100 runs
    grass-study commonsense --out multirun/commonsense10 --summarise-only --score accuracy_norm

``precision``: the same runs of GRASS on ARC-Easy and PIQA with fp32 weights (``32-true``), bf16
weights with fp32 master weights (``bf16-true``, the default) and pure bf16 (``bf16-true`` with
``method.master_weights=false``), paired by seed. Each run also scores its model before
training: bf16 weights are the fp32 ones rounded, a different start, so the summary also
compares what training added.

    grass-study precision --seeds 3 --out multirun/precision          # 18 runs

Runs already finished (a metrics.json) are kept, so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grass_lightning.app.heatmap import read_history
from grass_lightning.core.blocks import find_blocks
from grass_lightning.tools.gather import cell, spread

CONF = Path(__file__).resolve().parents[2] / "conf"
VARIANTS = {  # label: overrides; every block method with the same period, refresh and probe
    "grass": ["method=grass"],
    "grass_reprobe": ["method=grass", "method.reprobe_steps=1"],
    "static": ["method=grass", "method.sampler=static"],
    "uniform": ["method=grass", "method.sampler=uniform"],  # reads no importance: no probe
}


def _variant_overrides(overrides: list[str], period: int) -> list[str]:
    """A variant's overrides; those that read importance probe ``period`` steps first."""
    return overrides + ([] if "method.sampler=uniform" in overrides else [f"method.probe_steps={period}"])


def reinitialise(block: nn.Module, std: float, generator: torch.Generator) -> None:
    """Give ``block`` fresh weights as a model is initialised before pre-training: linear and
    embedding weights from normal(0, std), norm weights 1, biases 0."""
    with torch.no_grad():
        for module in block.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, nn.Parameter):
                if weight.dim() > 1:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * std)
                else:
                    weight.fill_(1.0)
            if isinstance(bias, nn.Parameter):
                bias.zero_()


def write_damaged_model(model: str, kind: str, blocks: list[int], out: Path, seed: int = 0) -> dict:
    """Save ``model`` (a ``conf/model`` name or a Hugging Face folder of ``kind``) with ``blocks``
    re-initialised, as the Hugging Face folder ``out/damaged_model``; a classifier is saved
    without its head, so each run draws a new one as it would for the undamaged model. Returns
    what was damaged (also written there as damage.json)."""
    import transformers
    from omegaconf import OmegaConf

    from grass_lightning.app.models import ModelSpec, resolve_model_path

    if Path(model).is_dir():
        spec = ModelSpec(name=Path(model).name, kind=kind, source="pretrained", path=model)
    else:
        spec = ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{model}.yaml")))
    path = resolve_model_path(spec)
    auto = transformers.AutoModelForCausalLM if spec.kind == "causal_lm" else transformers.AutoModel
    loaded = auto.from_pretrained(path)
    layout = find_blocks(loaded)
    if not blocks or min(blocks) < 0 or max(blocks) >= len(layout):
        raise ValueError(f"--blocks {blocks}: {spec.name} has blocks 0..{len(layout) - 1}.")
    generator = torch.Generator().manual_seed(seed)
    for index in blocks:
        reinitialise(layout.blocks[index], getattr(loaded.config, "initializer_range", 0.02), generator)
    folder = out / "damaged_model"
    if folder.exists():
        shutil.rmtree(folder)
    loaded.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    damage = {"model": spec.name, "kind": spec.kind, "blocks": blocks, "num_blocks": len(layout), "seed": seed}
    (folder / "damage.json").write_text(json.dumps(damage))
    return damage


def run_all(args: argparse.Namespace) -> None:
    """Every method and seed, in this process (the app's `train`), skipping finished runs."""
    from hydra import compose, initialize_config_dir

    from grass_lightning.app.run import train
    from grass_lightning.app.setup import register_method_defaults

    folder = args.out / "damaged_model"
    damage = json.loads((folder / "damage.json").read_text()) if (folder / "damage.json").is_file() else None
    if damage is None or damage["blocks"] != args.blocks:  # a study of other blocks: damage anew
        damage = write_damaged_model(args.model, args.kind, args.blocks, args.out)
    common = [
        "model=pretrained", f"model.path={folder.resolve()}", f"model.kind={damage['kind']}",
        f"model.name={damage['model']}-damaged",
        f"data={args.data}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.period}",
        f"method.sampling_period={args.period}", f"method.refresh_interval={args.period}",
        "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "~callbacks.checkpoint",
        "+trainer.enable_checkpointing=false", "trainer.log_every_n_steps=1", "export=false",
        "test_before=false", *args.overrides,
    ]
    for label in VARIANTS:
        method = _variant_overrides(VARIANTS[label], args.period)
        for seed in range(args.seeds):
            run_dir = args.out / label / f"seed{seed}"
            if (run_dir / "metrics.json").is_file():
                continue
            register_method_defaults()
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("train", overrides=[*common, *method, f"seed={seed}", f"paths.output_dir={run_dir}"])
            print(f"damaged study: {label} seed {seed}", flush=True)
            train(cfg)[1].release()


@dataclass(frozen=True)
class Comparison:
    """A real-data comparison: variants (label: overrides) on SmolLM2, sets (name: test size, None
    for the set's own), and the pairs whose seed-by-seed differences it reports. With
    ``test_before``, every run also scores its model before training, and the summary adds each
    variant's gain (after − before): variants that start from different models (bf16 and fp32
    weights) are then compared on what training added."""

    name: str
    variants: dict[str, list[str]]
    sets: dict[str, int | None]
    pairs: tuple[tuple[str, str], ...]
    test_before: bool = False


COMMONSENSE = Comparison(
    "commonsense", VARIANTS,
    {"arc_easy": None, "arc_challenge": None, "openbookqa": None, "winogrande": None, "piqa": 300},
    (("grass", "uniform"), ("grass_reprobe", "uniform"), ("static", "uniform"), ("grass", "static"),
     ("grass_reprobe", "grass")))
PRECISION = Comparison(  # GRASS with bf16 weights, with and without fp32 masters, against fp32 training
    "precision",
    {"fp32": ["method=grass", "trainer.precision=32-true"],
     "bf16_masters": ["method=grass", "trainer.precision=bf16-true"],
     "bf16_pure": ["method=grass", "trainer.precision=bf16-true", "method.master_weights=false"]},
    {"arc_easy": None, "piqa": 300},
    (("bf16_masters", "fp32"), ("bf16_pure", "fp32"), ("bf16_masters", "bf16_pure")), test_before=True)
COMPARISONS = {c.name: c for c in (COMMONSENSE, PRECISION)}


def run_comparison(study: Comparison, args: argparse.Namespace) -> None:
    """Seed by seed, every variant, as ``train.py`` multiruns over the sets (one process per variant and seed)."""
    import subprocess
    import sys

    for seed in range(args.seeds):
        for label, overrides in study.variants.items():
            common = ["experiment=smollm2_commonsense", f"trainer.max_steps={args.steps}",
                      f"method.sampling_period={args.period}", f"method.refresh_interval={args.period}",
                      "trainer.enable_progress_bar=false", *_variant_overrides(overrides, args.period), f"seed={seed}",
                      *(["test_before=true"] if study.test_before else []),
                      f"hydra.sweep.dir={args.out / label}", "hydra.sweep.subdir=${data.source}_seed${seed}", *args.overrides]
            todo = [name for name in study.sets if not (args.out / label / f"{name}_seed{seed}" / "metrics.json").is_file()]
            groups = [[n for n in todo if study.sets[n] is None]] + [[n] for n in todo if study.sets[n] is not None]
            for names in filter(None, groups):
                size = study.sets[names[0]]
                print(f"{study.name} study: {label} seed {seed}: {', '.join(names)}", flush=True)
                subprocess.run([sys.executable, str(CONF.parent / "train.py"), "-m", *common, f"data={','.join(names)}",
                                *([f"data.test_size={size}"] if size else [])], check=True, cwd=CONF.parent)


def summarise_comparison(study: Comparison, out: Path, score: str | None) -> str:
    """Per set and over the sets' mean (per seed, then mean ± std over seeds), with paired
    differences; with the scores before training, the same for each variant's gain."""
    runs, before = {}, {}  # label -> set -> seed -> score (after, before training)
    for label in study.variants:
        for path in sorted((out / label).glob("*_seed*/metrics.json")):
            metrics = json.loads(path.read_text())
            name, seed = path.parent.name.rsplit("_seed", 1)
            key = score or metrics["score_name"]
            runs.setdefault(label, {}).setdefault(name, {})[int(seed)] = metrics["scores"][key]
            if metrics.get("scores_before"):
                before.setdefault(label, {}).setdefault(name, {})[int(seed)] = metrics["scores_before"][key]
    sets = [name for name in study.sets if all(name in runs.get(label, {}) for label in study.variants)]
    if not sets:
        raise FileNotFoundError(f"{out}: no set has finished runs of every variant {list(study.variants)} yet.")
    seeds = sorted(set.intersection(*(set(runs[label][name]) for label in study.variants for name in sets)))
    title = f"{score or 'headline score'}, mean ± std over seeds {seeds}; the mean of the sets is taken per seed first."
    lines, mean = _comparison_table(study, runs, sets, seeds, title)
    if all(s in before.get(label, {}).get(name, {}) for label in study.variants for name in sets for s in seeds):
        gains = {label: {name: {s: runs[label][name][s] - before[label][name][s] for s in seeds} for name in sets}
                 for label in study.variants}
        for table, what in ((before, "before training"), (gains, "gain, after − before training")):
            lines += ["", *_comparison_table(study, table, sets, seeds, f"{what}, mean ± std over seeds {seeds}.")[0]]
    table = "\n".join(lines) + "\n"
    suffix = f"_{score}" if score else ""
    (out / f"{study.name}{suffix}.md").write_text(table)  # not summary.md: gather writes that, per run
    (out / f"{study.name}{suffix}.json").write_text(json.dumps({"sets": sets, "seeds": seeds, "runs": runs, "before": before,
                                                                 "mean": mean}, indent=1))
    return table


def _comparison_table(study: Comparison, runs: dict, sets: list[str], seeds: list[int], title: str):
    """Markdown lines: each variant per set and over the sets' mean, then the study's paired
    differences seed by seed; and the per-seed means of the sets."""
    mean = {label: {s: statistics.fmean(runs[label][name][s] for name in sets) for s in seeds} for label in study.variants}
    header = ["variant", *sets, f"mean of {len(sets)}"]
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in study.variants:
        cells = [_spread([runs[label][name][s] for s in seeds]) for name in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_spread(list(mean[label].values()))} |")
    lines += ["", "| paired difference, mean of the sets | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
              "|" + "---|" * (len(seeds) + 2)]
    for a, b in study.pairs:
        diffs = [mean[a][s] - mean[b][s] for s in seeds]
        lines.append(f"| {a} − {b} | " + " | ".join(f"{d:+.4f}" for d in diffs) + f" | {_spread(diffs, signed=True)} |")
    return lines, mean


def read_run(run_dir: Path, damaged: set[int], checkpoints: list[int]) -> dict:
    """One run's share of block updates to damaged blocks, its validation loss after each of
    ``checkpoints`` updates, and its test score."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _, _, active = read_history(run_dir / "csv" / "metrics.csv")  # a probe step trains no block
    to_any = sum(sum(flags) for flags in active)
    to_damaged = sum(flags[b] for flags in active for b in damaged)
    with (run_dir / "csv" / "metrics.csv").open() as f:  # logged at the step's index: + 1 is the steps taken
        val_loss = {int(r["step"]) + 1 - metrics["probe_steps"]: float(r["val/loss"]) for r in csv.DictReader(f)
                    if r.get("val/loss")}
    return {
        "share": to_damaged / to_any if to_any else float("nan"),
        "val_loss": {n: val_loss.get(n, float("nan")) for n in checkpoints},
        "final_val_loss": metrics["val_scores"]["loss"] if metrics.get("val_scores") else float("nan"),
        "score": metrics["score"],
        "score_name": metrics["score_name"],
    }


def summarise(out: Path, steps: int) -> str:
    """The study's table (markdown) and plot, from its finished runs."""
    damage = json.loads((out / "damaged_model" / "damage.json").read_text())
    damaged = set(damage["blocks"])
    checkpoints = [steps // 3, 2 * steps // 3]
    runs = {label: {int(d.name[4:]): read_run(d, damaged, checkpoints)
                    for d in sorted((out / label).glob("seed*")) if (d / "metrics.json").is_file()}
            for label in VARIANTS if (out / label).is_dir()}
    score_name = next(iter(next(iter(runs.values())).values()))["score_name"]
    header = ["method", "seeds", "share to damaged", *[f"val loss @{n}" for n in checkpoints],
              f"val loss @{steps}", f"test {score_name}", f"{score_name} − uniform, paired"]
    lines = [f"Blocks {sorted(damaged)} of {damage['model']}'s {damage['num_blocks']} re-initialised (seed "
             f"{damage['seed']}); a uniform draw gives them {len(damaged) / damage['num_blocks']:.3f} of the block "
             f"updates.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    uniform = runs.get("uniform", {})
    for label, by_seed in runs.items():
        seeds = sorted(by_seed)
        cells = [label, str(len(seeds)), _spread([by_seed[s]["share"] for s in seeds])]
        cells += [_spread([by_seed[s]["val_loss"][n] for s in seeds]) for n in checkpoints]
        cells += [_spread([by_seed[s]["final_val_loss"] for s in seeds]), _spread([by_seed[s]["score"] for s in seeds])]
        paired = [by_seed[s]["score"] - uniform[s]["score"] for s in seeds if s in uniform]
        cells.append(_spread(paired, signed=True) if label != "uniform" and paired else "–")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(runs, indent=1))
    _plot(runs, out / "damaged.png", sorted(damaged))
    return table


def _spread(values: list[float], signed: bool = False) -> str:
    """Mean ± std over seeds as gather writes it; a seed whose value is missing (NaN) is left out."""
    values = [v for v in values if v == v]
    return cell(statistics.fmean(values), spread(values), "+.3f" if signed else ".3f") if values else "–"


def _plot(runs: dict, path: Path, damaged: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (share_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = list(runs)
    shares = [[r["share"] for r in runs[label].values()] for label in labels]
    share_ax.boxplot(shares, tick_labels=labels)
    share_ax.set_ylabel(f"share of block updates to damaged blocks {damaged}")
    scores = [[r["score"] for r in runs[label].values()] for label in labels]
    score_ax.boxplot(scores, tick_labels=labels)
    score_ax.set_ylabel("test score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="grass-study", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["damaged", *COMPARISONS])
    parser.add_argument("--model", default="minilm", help="a conf/model name, or a Hugging Face folder (default minilm)")
    parser.add_argument("--kind", default="classification", choices=["classification", "causal_lm"],
                        help="the folder's kind, when --model is a folder")
    parser.add_argument("--data", default="sst2", help="a conf/data name (default sst2)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 3], help="blocks to re-initialise")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="updates per run (default: damaged 150, else 40)")
    parser.add_argument("--period", type=int, default=None,
                        help="sampling period = refresh interval = GRASS's probe steps (and the damaged study's "
                             "validation interval); default: damaged 10, else 4 (10 draws in 40 updates)")
    parser.add_argument("--out", type=Path, default=None, help="default multirun/<study>")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--score", default=None, help="commonsense, precision: the score to table (default: the headline accuracy)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_intermixed_args(argv)
    damaged = args.study == "damaged"
    args.steps = args.steps or (150 if damaged else 40)
    args.period = args.period or (10 if damaged else 4)
    args.out = args.out or Path("multirun") / args.study
    if not args.summarise_only:
        from grass_lightning.app.setup import configure_console

        configure_console()
        args.out.mkdir(parents=True, exist_ok=True)
        run_all(args) if damaged else run_comparison(COMPARISONS[args.study], args)
    print(summarise(args.out, args.steps) if damaged else summarise_comparison(COMPARISONS[args.study], args.out, args.score))


if __name__ == "__main__":
    main()
