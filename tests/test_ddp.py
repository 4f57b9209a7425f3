"""GRASS under Lightning's own DDP: two CPU processes (gloo) agree on blocks, importance, weights."""

import subprocess
import sys
from pathlib import Path


def test_two_ranks_train_the_same_blocks_and_end_with_the_same_weights():
    worker = Path(__file__).with_name("ddp_worker.py")
    done = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "history [[2, " in done.stdout  # the first draw comes after the 2 probe steps
