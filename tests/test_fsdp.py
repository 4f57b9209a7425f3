"""GRASS under FSDP2 (Lightning's ModelParallelStrategy, each block fully_shard-ed) on two CPU
processes (gloo): it trains as one process does on the same micro-batches, and resumes exactly."""

import json
import subprocess
import sys

import pytest
import torch

from grass_lightning import GrassCallback
from tests.fsdp_worker import CLIP, SETTINGS, UPDATES, reference_loader
from tests.helpers.app import CONF, choice_rows, write_jsonl
from tests.helpers.models import HFModule, quiet_trainer

pytestmark = pytest.mark.slow


def run_worker(mode: str, out) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.fsdp_worker", mode, str(out)], cwd=CONF.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_sharded_ranks_train_as_one_process_on_the_same_micro_batches(tmp_path):
    """Probe steps, four draws, clipping and recompute of frozen blocks: per-block importance,
    draws and final weights agree with one unsharded process that accumulates the two ranks'
    micro-batches (the worker asserts, step by step, equal active sets on both ranks and no
    gradient or moments on frozen blocks)."""
    sharded = run_worker("train", tmp_path / "sharded.pt")
    grass = GrassCallback(**SETTINGS)
    module = HFModule("llama")
    quiet_trainer(max_steps=UPDATES, max_epochs=-1, accumulate_grad_batches=2, gradient_clip_val=CLIP, callbacks=[grass]).fit(
        module, reference_loader())
    one = grass.state_dict()
    assert sharded["grass"]["history"] == one["history"] and len(one["history"]) == 5
    assert sharded["grass"]["importance"]["estimate"].tolist() == pytest.approx(one["importance"]["estimate"].tolist(),
                                                                              rel=1e-4)
    weights = module.model.state_dict()
    assert sharded["weights"].keys() == weights.keys()
    for name, value in weights.items():  # reduction order differs: a few fp32 roundings after 8 updates
        torch.testing.assert_close(sharded["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_resumed_from_a_distributed_checkpoint_continues_as_the_uninterrupted_one(tmp_path):
    """Lightning's distributed checkpoint of a GRASS run holds optimizer state for the active
    blocks and the head only; torch's loader used to ask it for every parameter's
    ("Missing key in checkpoint state_dict: optimizer_0.state...embed_tokens.weight.step")."""
    runs = run_worker("resume", tmp_path / "resume.pt")
    assert (tmp_path / "resume.pt.ckpt").is_dir()  # the distributed format: a folder of shards
    assert runs["resumed_grass"]["history"] == runs["whole_grass"]["history"]
    assert torch.equal(runs["resumed_grass"]["importance"]["estimate"], runs["whole_grass"]["importance"]["estimate"])
    for name, value in runs["whole"].items():
        assert torch.equal(runs["resumed"][name], value), name


def test_bf16_shards_with_masters_and_offloading_are_refused_with_the_way_out():
    done = subprocess.run([sys.executable, "-m", "tests.fsdp_worker", "refusals"], cwd=CONF.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    masters, offload = done.stdout.strip().splitlines()[-2:]
    assert masters.startswith("GrassCallback: bfloat16 weights with master_weights=True under FSDP2") \
        and "precision='bf16-mixed'" in masters
    assert offload.startswith("offload='park' with FSDP2-sharded blocks") and "offload='none'" in offload


def test_train_py_trains_exports_and_resumes_under_trainer_fsdp(tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows())
    common = [sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", "model=tiny_llama", "data=jsonl",
              f"data.path={data}", "method.probe_steps=2", "method.sampling_period=2", "method.refresh_interval=2",
              "data.val_size=4", "data.test_size=6", "test_before=false", "trainer.enable_progress_bar=false",
              "~callbacks.progress_bar"]
    first = tmp_path / "first"
    done = subprocess.run([*common, "trainer.max_steps=4", f"hydra.run.dir={first}"], cwd=CONF.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["updates"] == 4 and metrics["steps"] == 6 and metrics["method"] == "grass"
    checkpoint = first / "checkpoints" / "last.ckpt"
    assert (checkpoint / "meta.pt").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    exported = AutoModelForCausalLM.from_pretrained(first / "model")  # a plain transformers folder: whole tensors
    assert sum(p.numel() for p in exported.parameters()) == metrics["total_params"]

    resumed = tmp_path / "resumed"
    done = subprocess.run([*common, "trainer.max_steps=6", f"ckpt_path={checkpoint}", f"hydra.run.dir={resumed}"],
                          cwd=CONF.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 8  # 2 more updates after the restored 6 steps
