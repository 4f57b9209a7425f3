"""What grass_lightning/lightning/compat.py assumes of Lightning's private API, pinned: a Lightning
release that changes any of it fails here, not in a user's run."""

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from grass_lightning.lightning.compat import ddp_kwargs, ddp_kwargs_set, optimizer_unscales_itself, tensor_parallel_size


def test_a_fused_optimizer_is_known_to_unscale_itself():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_unscales_itself(torch.optim.AdamW(params, fused=True))
    assert not optimizer_unscales_itself(torch.optim.AdamW(params))


def test_ddp_kwargs_are_what_the_strategy_hands_distributed_data_parallel():
    strategy = DDPStrategy(find_unused_parameters=True)
    assert ddp_kwargs(strategy) == {"find_unused_parameters": True}
    with ddp_kwargs_set(strategy, init_sync=False, find_unused_parameters=False):
        assert ddp_kwargs(strategy) == {"find_unused_parameters": False, "init_sync": False}
    assert ddp_kwargs(strategy) == {"find_unused_parameters": True}  # given back as it was
    assert "self._ddp_kwargs" in __import__("inspect").getsource(DDPStrategy._setup_model)  # and passed on


def test_tensor_parallel_size_is_what_the_model_parallel_strategy_was_given():
    assert tensor_parallel_size(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)) == 1
    assert tensor_parallel_size(ModelParallelStrategy()) == "auto"
