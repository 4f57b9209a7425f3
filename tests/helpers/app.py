"""Helpers for tests of the Hydra app: compose conf/ into a temporary run directory, write JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from grass_lightning.app.setup import register_method_defaults

CONF = Path(__file__).resolve().parents[2] / "conf"
FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "data.val_size=4", "data.test_size=6", "data.batch_size=4",
        "data.eval_batch_size=4"]


def compose_run(tmp_path: Path, *overrides: str):
    register_method_defaults()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path}", *FAST, *overrides])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classification_rows(n=40):
    return [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} item {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def choice_rows(n=40):
    return [{"question": f"Pick the number {i % 3}:", "choices": ["zero", "one", "two"], "label": i % 3} for i in range(n)]


def prompt_rows(n=40):
    return [{"prompt": f"{i} plus 1 is", "response": f"{i + 1}", "answer": f"{i + 1}"} for i in range(n)]
