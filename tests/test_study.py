"""The studies on tiny models and fake runs: damage, runs, and what the tables read."""

import argparse
import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from grass_lightning import find_blocks
from grass_lightning.app.models import ModelSpec, load_model
from grass_lightning.tools.study import (COMMONSENSE, PRECISION, VARIANTS, main, reinitialise, run_comparison,
                                        summarise_comparison)
from tests.helpers.app import CONF, classification_rows, write_jsonl


def test_reinitialise_gives_the_block_fresh_weights_and_leaves_the_rest():
    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_bert.yaml")))
    torch.manual_seed(0)
    model, _ = load_model(spec, None, num_labels=2)
    layout = find_blocks(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "pretrained": far from an initialisation
    before = {n: p.clone() for n, p in model.named_parameters()}
    reinitialise(layout.blocks[1], std=0.02, generator=torch.Generator().manual_seed(0))
    prefix = layout.path.split(".", 1)[1] if layout.path.startswith("model.") else layout.path
    for name, p in model.named_parameters():
        in_block = f"{prefix}.1." in name
        assert torch.equal(p, before[name]) != in_block, name
        if in_block and p.dim() > 1:
            assert p.std().item() == pytest.approx(0.02, rel=0.3)
        elif in_block:
            assert set(p.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.slow
def test_the_damaged_study_runs_every_method_and_reports_the_share_of_updates_to_damaged_blocks(tmp_path):
    spec = ModelSpec(**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_bert.yaml")))
    model, tokenizer = load_model(spec, None, num_labels=2)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "cls.jsonl", classification_rows())
    out = tmp_path / "study"
    main(["damaged", "--model", str(folder), "--blocks", "0", "--seeds", "2", "--steps", "6", "--period", "2",
          "--out", str(out), "--data", "jsonl", f"data.path={data}", "data.val_size=4", "data.test_size=6",
          "data.batch_size=4", "data.eval_batch_size=4", "method.num_active=1"])
    runs = json.loads((out / "summary.json").read_text())
    assert set(runs) == set(VARIANTS) and all(set(by_seed) == {"0", "1"} for by_seed in runs.values())
    for label, by_seed in runs.items():
        for seed, run in by_seed.items():
            with (out / label / f"seed{seed}" / "csv" / "metrics.csv").open() as f:
                trained = [r["grass/active/00"] for r in csv.DictReader(f) if r.get("grass/probing") == "0.0"]
            assert len(trained) == 6 and run["share"] == pytest.approx(trained.count("1.0") / 6)  # gamma = 1
            assert all(v == v for v in run["val_loss"].values())  # validated at updates 2 and 4
    table = (out / "summary.md").read_text()
    assert "| grass_reprobe | 2 |" in table and "| uniform | 2 |" in table and "Blocks [0] of tiny" in table
    assert (out / "damaged.png").read_bytes()[:4] == b"\x89PNG"


def _fake_commonsense(root, scores, before=None):
    """metrics.json files laid out as the commonsense study writes them: <variant>/<set>_seed<s>/;
    ``before``: (variant, set) -> score before training."""
    for (label, name, seed), value in scores.items():
        folder = root / label / f"{name}_seed{seed}"
        folder.mkdir(parents=True)
        prior = None if before is None else before[label, name]
        (folder / "metrics.json").write_text(json.dumps({
            "score_name": "accuracy", "scores": {"accuracy": value, "accuracy_norm": value / 2},
            "scores_before": None if prior is None else {"accuracy": prior, "accuracy_norm": prior / 2}}))


def test_commonsense_summary_pairs_each_variant_with_uniform_sampling_seed_by_seed(tmp_path):
    offsets = {"grass": 0.02, "grass_reprobe": 0.03, "static": 0.01, "uniform": 0.0}
    scores = {(label, name, seed): 0.5 + offset + 0.1 * seed + (0.2 if name == "piqa" else 0.0)
              for label, offset in offsets.items() for name in ("arc_easy", "piqa") for seed in (0, 1)}
    scores[("uniform", "arc_easy", 2)] = 0.9  # a seed that the other variants lack is left out
    _fake_commonsense(tmp_path, scores)
    table = summarise_comparison(COMMONSENSE, tmp_path, None)
    summary = json.loads((tmp_path / "commonsense.json").read_text())
    assert summary["sets"] == ["arc_easy", "piqa"] and summary["seeds"] == [0, 1]
    assert summary["mean"]["grass"]["0"] == pytest.approx(0.62) and summary["mean"]["uniform"]["1"] == pytest.approx(0.7)
    assert "| grass − uniform | +0.0200 | +0.0200 | +0.020 ± 0.000 |" in table
    assert "| grass − static | +0.0100 | +0.0100 | +0.010 ± 0.000 |" in table
    summarise_comparison(COMMONSENSE, tmp_path, "accuracy_norm")
    assert json.loads((tmp_path / "commonsense_accuracy_norm.json").read_text())["mean"]["uniform"]["0"] == pytest.approx(0.3)


def test_commonsense_study_runs_seed_by_seed_and_skips_finished_runs(tmp_path, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
    _fake_commonsense(tmp_path, {("grass", name, 0): 0.5 for name in COMMONSENSE.sets})
    run_comparison(COMMONSENSE, argparse.Namespace(seeds=2, steps=40, period=4, out=tmp_path, overrides=[]))
    labels = [next(a for a in c if a.startswith("hydra.sweep.dir=")).rsplit("/", 1)[1] for c in calls]
    seeds = [next(a for a in c if a.startswith("seed=")) for c in calls]
    assert labels[:4] == ["grass_reprobe", "grass_reprobe", "static", "static"]  # grass seed 0 is done
    assert seeds == ["seed=0"] * 6 + ["seed=1"] * 8  # seed by seed: a study cut short still pairs its seeds
    piqa = [c for c in calls if "data=piqa" in c]
    assert len(piqa) == 7 and all("data.test_size=300" in c for c in piqa)
    assert all("method.probe_steps=4" in c for c in calls if "method.sampler=uniform" not in c)
    assert not any("method.probe_steps=4" in c for c in calls if "method.sampler=uniform" in c)
    assert not any("method=lisa" in c for c in calls)  # LISA as published trains embeddings: not the sampling alone


def test_precision_study_runs_grass_in_fp32_bf16_with_masters_and_pure_bf16(tmp_path, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
    run_comparison(PRECISION, argparse.Namespace(seeds=1, steps=40, period=4, out=tmp_path, overrides=[]))
    by_label = {next(a for a in c if a.startswith("hydra.sweep.dir=")).rsplit("/", 1)[1]: c for c in calls}
    assert "trainer.precision=32-true" in by_label["fp32"]
    assert "trainer.precision=bf16-true" in by_label["bf16_masters"] and not any("master_weights" in a for a in by_label["bf16_masters"])
    assert {"trainer.precision=bf16-true", "method.master_weights=false"} <= set(by_label["bf16_pure"])
    assert all("method.probe_steps=4" in c and "experiment=smollm2_commonsense" in c for c in calls)
    assert sorted(a for c in calls for a in c if a.startswith("data=")) == ["data=arc_easy"] * 3 + ["data=piqa"] * 3
    assert all("test_before=true" in c for c in calls)  # bf16 and fp32 runs start from different models
    # fp32 scores 0.01 higher after training, and also before: the same gain
    _fake_commonsense(tmp_path / "done", {(label, name, seed): 0.6 + (0.01 if label == "fp32" else 0.0)
                                          for label in PRECISION.variants for name in PRECISION.sets for seed in (0, 1)},
                      before={(label, name): 0.5 + (0.01 if label == "fp32" else 0.0)
                              for label in PRECISION.variants for name in PRECISION.sets})
    table = summarise_comparison(PRECISION, tmp_path / "done", None)
    after, before, gain = table.split("before training")  # the three tables, in that order
    assert "| bf16_masters − fp32 | -0.0100 | -0.0100 | -0.010 ± 0.000 |" in after
    assert "| bf16_masters − fp32 | -0.0100 | -0.0100 | -0.010 ± 0.000 |" in before
    assert "| bf16_masters − fp32 | +0.0000 | +0.0000 | +0.000 ± 0.000 |" in gain
    assert "| fp32 | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.100 ± 0.000 |" in gain
    assert (tmp_path / "done" / "precision.md").is_file()
