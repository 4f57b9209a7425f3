"""GrassModule's own duties: LR schedule, accumulation and mixed precision under manual optimization."""

import json

import pytest

import grass_lightning.run as run
from app import choice_rows, compose_run, write_jsonl
from grass_lightning.module import OptimConfig, lr_factor


def test_warmup_then_cosine_linear_or_constant():
    assert [lr_factor(s, warmup=3, total=10, kind="cosine") for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(3, 3, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 3, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6.5, 3, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(6.5, 3, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 3, 10, "constant") == 1.0


def test_optim_settings_are_validated_with_their_key():
    with pytest.raises(ValueError, match=r"optim\.lr=0 must be a number > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"optim\.accumulate_grad_batches=0"):
        OptimConfig(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match=r"optim\.gradient_clip_val=-1"):
        OptimConfig(gradient_clip_val=-1)


def test_accumulation_counts_optimizer_steps_under_bf16(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows())
    cfg = compose_run(tmp_path / "run", "model=tiny_llama", "data=jsonl", f"data.path={data}", "method.probe_steps=1",
                      "method.sampling_period=2", "method.refresh_interval=2", "optim.accumulate_grad_batches=2",
                      "trainer.precision=bf16-mixed", "trainer.max_steps=3")
    run.train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3  # optimizer steps, each of two micro-batches
    assert metrics["trainable_params_max"] > 0 and metrics["step_time_s"] > 0
