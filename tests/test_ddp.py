"""GRASS under Lightning's own DDP: two CPU processes (gloo) agree on blocks, importance, weights."""

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers.app import CONF, choice_rows, write_jsonl


@pytest.mark.parametrize(("strategy", "expected"), [
    ("ddp_find_unused_parameters_true", "DDPStrategy moments on host False"),
    ("grass_offload_ddp_stream", "GrassOffloadDDPStrategy moments on host True"),
])
@pytest.mark.slow
def test_two_ranks_train_the_same_blocks_and_end_with_the_same_weights(strategy, expected):
    done = subprocess.run([sys.executable, "-m", "tests.ddp_worker", strategy], cwd=CONF.parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "history [[2, " in done.stdout  # the first draw comes after the 2 probe steps
    assert f"strategy {expected}" in done.stdout
    # DDP's buckets hold what trains (re-wrapped at each change), not every parameter
    buckets, trained, every = map(int, re.search(r"ddp bucket bytes (\d+) trained bytes (\d+) parameter bytes (\d+)",
                                                   done.stdout).groups())
    assert 0 < buckets == trained < every
    # re-wraps at the probe's start and end, each draw and the hand-picked set; the weights are equal on
    # every rank already, so none broadcasts them (each did, every parameter and buffer, before)
    rewraps, broadcast = map(int, re.search(r"rewraps (\d+) seconds \S+ broadcast bytes (\d+)", done.stdout).groups())
    assert rewraps >= 5 and broadcast == 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_train_py_runs_grass_under_lightning_ddp(tmp_path, precision):
    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows())
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "model=tiny_llama", "data=jsonl",
               f"data.path={data}", "trainer.max_steps=6", "method.probe_steps=2", "method.sampling_period=2",
               "method.refresh_interval=2", "data.val_size=4", "data.test_size=6", "trainer.enable_progress_bar=false",
               "~callbacks.progress_bar", f"hydra.run.dir={run_dir}", f"trainer.precision={precision}"]
    done = subprocess.run(command, cwd=CONF.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["updates"] == 6 and metrics["steps"] == 8 and metrics["method"] == "grass"
    assert (run_dir / "train_ddp_process_1.log").exists()  # the second rank ran in the same run directory
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["optimizer_states"][0]["state"]
    masters = [s["master"] for s in state.values() if "master" in s]
    assert bool(masters) == (precision == "bf16-true") and all(m.dtype == torch.float32 for m in masters)
    weights = {t.dtype for t in checkpoint["state_dict"].values() if t.is_floating_point()}
    assert weights == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})


@pytest.mark.slow
def test_one_process_and_two_read_the_same_importance_from_the_same_micro_batches():
    """1 rank x 4 micro-batches of 8 and 2 ranks x 2 micro-batches of 8, the same 32 rows: the
    probe reads the mean squared RMS of a micro-batch's gradient on both. Under DDP it used to
    read the all-reduced step gradient instead (s^2 + sigma^2/32 against s^2 + sigma^2/8)."""
    from tests.ddp_worker import probe_readings

    done = subprocess.run([sys.executable, "-m", "tests.ddp_worker", "readings"], cwd=CONF.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(re.search(r"readings (\[.*\])", done.stdout).group(1))
    one = probe_readings(devices=1)
    assert two == pytest.approx(one, rel=1e-4)  # the same micro-batches: equal up to summation order
