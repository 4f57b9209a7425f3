"""Peak memory is per run: a sweep's later jobs do not inherit an earlier job's peak."""

import sys

import pytest
import torch

from grass_lightning.lightning.stats import current_memory_mb, peak_memory_mb, reset_peak_memory

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux's /proc/self/clear_refs")
def test_reset_forgets_an_earlier_jobs_peak():
    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    during = peak_memory_mb(CPU)
    del big
    reset_peak_memory(CPU)
    after = peak_memory_mb(CPU)
    assert during - after > 300, (during, after)
    assert abs(after - current_memory_mb(CPU)) < 50


def test_run_stats_before_grass_callback_is_refused_in_setup():
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from grass_lightning import GrassCallback
    from grass_lightning.lightning.stats import RunStats
    from tests.helpers.models import HFModule, quiet_trainer, token_loader

    trainer = quiet_trainer(max_steps=1, callbacks=[RunStats(), GrassCallback(probe_steps=0, sampler="uniform")])
    with pytest.raises(MisconfigurationException, match="Put RunStats after GrassCallback"):
        trainer.fit(HFModule(), token_loader())
    quiet_trainer(max_steps=1, callbacks=[GrassCallback(probe_steps=0, sampler="uniform"), RunStats()]).fit(
        HFModule(), token_loader())
