"""The benchmark entry point end to end on a tiny model: every method in its own process, one table."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from grass_lightning.tools.bench import ROWS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_runs_every_row_and_writes_table_json_and_plot(tmp_path):
    expected = [m for m in ROWS if m != "badam" or importlib.util.find_spec("badam")]  # BAdam's: the [peers] extra
    command = [sys.executable, "-m", "grass_lightning.tools.bench", "--model", "tiny_llama", "--steps", "2", "--probe-steps", "1",
               "--batch-size", "2", "--seq-len", "16", "--sampling-period", "2", "--methods", ",".join(expected),
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == expected
    assert all(r["step_time_s"] > 0 and r["whole_run_peak_mb"] > 0 and r["timed_steps"] == 2 for r in rows.values())
    assert rows["grass"]["probe_step_time_s"] > 0 and rows["lisa"]["probe_step_time_s"] is None
    assert rows["grass"]["probe_peak_mb"] > 0 and rows["full"]["deep_step_peak_mb"] is None
    assert all(r["whole_run_peak_mb"] >= max(v for v in (r["median_step_peak_mb"], r["probe_peak_mb"], r["deep_step_peak_mb"])
                                             if v is not None) for r in rows.values())
    assert rows["lisa"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["full"]["backward_blocks"] == 4 and rows["lisa"]["backward_blocks"] == 4  # LISA trains the embeddings
    assert all(rows[m]["deep_backward_blocks"] == 4 for m in ("grass", "grass-uniform", "grass+recompute-none"))
    assert rows["grass+stream"]["optimizer_state_mb"] < rows["grass"]["optimizer_state_mb"]
    # two processes each: DDP holds every weight in each, FSDP2 half (each block split in two shards)
    assert rows["grass+ddp"]["processes"] == rows["grass+fsdp2"]["processes"] == 2
    assert rows["grass+ddp"]["weights_mb"] == rows["full"]["weights_mb"]
    assert rows["grass+fsdp2"]["weights_mb"] == pytest.approx(rows["full"]["weights_mb"] / 2, rel=0.02)
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {m} |" in table for m in expected) and "(1.00×)" in table
    assert "| lisa | grass_lightning, LMFlow's rule | γ=2, period 2, sampler uniform, 0 probe steps, embeddings + head" in table
    if "badam" in rows:
        assert rows["badam"]["deep_backward_blocks"] == 4 and rows["badam"]["optimizer_state_mb"] > 0
        assert rows["badam"]["trainable_params"] < rows["grass"]["trainable_params"]  # one block, no head
        assert "| badam | badam BlockOptimizer | 1 block, switched every 2 steps, random order" in table


@pytest.mark.slow
def test_bench_in_bf16_runs_layer_wise_rows_with_bf16_weights_and_full_as_bf16_mixed(tmp_path):
    methods = ["full", "lisa", "grass", *(["badam"] if importlib.util.find_spec("badam") else [])]
    command = [sys.executable, "-m", "grass_lightning.tools.bench", "--model", "tiny_llama", "--steps", "2", "--probe-steps", "1",
               "--batch-size", "2", "--seq-len", "16", "--sampling-period", "2", "--methods", ",".join(methods),
               "--precision", "bf16-true", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert report["precision"] == "bf16-true"
    assert rows["full"]["precision"] == "bf16-mixed: fp32 weights, bf16 autocast"
    assert rows["grass"]["precision"] == "bf16 weights, fp32 masters of trained params"
    assert rows["lisa"]["precision"] == "bf16 weights, no masters (pure bf16)"  # as LMFlow's script runs it
    table = (tmp_path / "bench.md").read_text()
    assert "| bf16 weights, fp32 masters of trained params |" in table
    if "badam" in rows:
        assert rows["badam"]["precision"] == "bf16 weights, fp32 copy of the active block (BAdam's)"
        assert rows["badam"]["optimizer_state_mb"] > 0


@pytest.mark.slow
def test_bench_with_gradient_checkpointing_runs_every_row_with_it(tmp_path):
    command = [sys.executable, "-m", "grass_lightning.tools.bench", "--model", "tiny_llama", "--steps", "1", "--probe-steps", "1",
               "--batch-size", "2", "--seq-len", "16", "--methods", "full,grass", "--gradient-checkpointing",
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "--gradient-checkpointing" in report["command"] and len(report["rows"]) == 2
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_refuses_an_unknown_method_before_running_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "grass_lightning.tools.bench", "--methods", "full,qlora", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--methods: 'qlora' is not one of" in done.stderr
    assert not any(tmp_path.iterdir())
