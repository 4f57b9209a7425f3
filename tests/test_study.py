"""The damaged-block study on a tiny random BERT: damage, runs, and what the table reads."""

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from grass_lightning import find_blocks
from grass_lightning.app.models import ModelSpec, load_model
from grass_lightning.tools.study import VARIANTS, main, reinitialise
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
    assert "| grass_reprobe | 2 |" in table and "| lisa | 2 |" in table and "Blocks [0] of tiny" in table
    assert (out / "damaged.png").read_bytes()[:4] == b"\x89PNG"
