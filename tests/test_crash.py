"""Crash safety: a run killed at any moment resumes from its last complete checkpoint, and a
checkpoint write that dies half-way never replaces a good checkpoint."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from grass_lightning.lightning.checkpoint_io import AtomicCheckpointIO
from tests.helpers.app import CONF, choice_rows, write_jsonl


def test_a_write_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as a kill would stop it

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    io.save_checkpoint({"step": 3, "w": torch.zeros(1000)}, path)  # the next save replaces the leftover
    assert torch.load(path, weights_only=True)["step"] == 3 and not path.with_name("last.ckpt.partial").exists()


def _command(data, run_dir, resume):
    command = [sys.executable, "train.py", "model=tiny_llama", "data=jsonl", f"data.path={data}", "trainer.max_steps=400",
               "method.probe_steps=3", "method.sampling_period=4", "method.refresh_interval=4",
               "callbacks.checkpoint.every_n_train_steps=1", "trainer.val_check_interval=1000", "data.val_size=4",
               "data.test_size=6", "data.batch_size=2", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
               f"hydra.run.dir={run_dir}"]
    return command + ([f"ckpt_path={resume}"] if resume else [])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", choice_rows(120))
    straight = tmp_path / "straight"
    done = subprocess.run(_command(data, straight, None), cwd=CONF.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed, last = tmp_path / "killed", tmp_path / "killed" / "checkpoints" / "last.ckpt"
    rng, kills = random.Random(0), 0
    for attempt in range(5):  # four kill attempts at random moments (a run may end first), then one to the end
        process = subprocess.Popen(_command(data, killed, last if last.exists() else None), cwd=CONF.parent,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < 4:
            time.sleep(rng.uniform(3.0, 7.0))  # start-up takes ~4 s, then 400 steps, each checkpointed, in ~12 s
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        assert process.wait(timeout=600) in (0, -signal.SIGKILL), process.stderr.read()[-3000:]
        for checkpoint in last.parent.glob("*.ckpt"):  # whatever a kill interrupted, every .ckpt is whole
            torch.load(checkpoint, weights_only=True)
    assert process.returncode == 0 and kills >= 3
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 403  # 400 updates after 3 probe steps
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
