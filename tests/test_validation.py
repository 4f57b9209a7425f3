"""Bad arguments fail early with a message that names the argument and its value."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                          SingleDeviceStrategy)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from grass_lightning import GrassCallback
from tests.helpers.models import HFModule, quiet_trainer, token_loader

BAD_ARGUMENTS = [
    (dict(num_active=0), "num_active=0 must be an integer >= 1"),
    (dict(num_active=1.5), "num_active=1.5 must be an integer"),
    (dict(num_active=True), "num_active=True must be an integer"),
    (dict(sampling_period=0), "sampling_period=0 must be an integer >= 1"),
    (dict(sampling_period=-5), "sampling_period=-5"),
    (dict(refresh_interval=0), "refresh_interval=0 must be an integer >= 1"),
    (dict(probe_steps=-1), "probe_steps=-1 must be an integer >= 0"),
    (dict(temperature=0), "temperature=0 must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature="hot"), "temperature='hot'"),
    (dict(ema=0.0), r"ema=0.0 must lie in \(0, 1\]"),
    (dict(ema=1.5), r"ema=1.5 must lie in \(0, 1\]"),
    (dict(sampler="lisa"), "sampler='lisa' is not one of 'grass', 'uniform', 'static'"),
    (dict(normalization="rank"), "normalization='rank' is not one of 'max', 'zscore'"),
    (dict(idle_moments="offload"), "idle_moments='offload' is not one of 'drop', 'keep'"),
    (dict(train_embeddings="no"), "train_embeddings='no' must be True or False"),
    (dict(train_head=None), "train_head=None must be True or False"),
    (dict(blocks=""), "blocks='' must be a dotted module path"),
    (dict(blocks=3), "blocks=3 must be a dotted module path"),
    (dict(seed="0"), "seed='0' must be an integer or None"),
    (dict(sampler="static", probe_steps=0), "sampler='static' with probe_steps=0"),
    (dict(sampler="uniform", probe_steps=3), "sampler='uniform' with probe_steps=3: .* set probe_steps=0"),
    (dict(reprobe_steps=-1), "reprobe_steps=-1 must be an integer >= 0"),
    (dict(reprobe_steps=5, refresh_interval=4), "reprobe_steps=5 exceeds refresh_interval=4"),
    (dict(reprobe_steps=1, sampler="static"), "reprobe_steps=1 with sampler='static': .* set reprobe_steps=0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS, ids=[str(k) for k, _ in BAD_ARGUMENTS])
def test_bad_argument_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrassCallback(**kwargs)


def test_more_active_blocks_than_the_model_has():
    with pytest.raises(ValueError, match=r"num_active=5 exceeds the 4 blocks found at 'model.model.layers'"):
        quiet_trainer(max_steps=1, callbacks=[GrassCallback(num_active=5)]).fit(HFModule(), token_loader())


def test_blocks_path_that_does_not_resolve_fails_at_fit_start():
    with pytest.raises(ValueError, match=r"blocks='model.layers' does not resolve: model has no submodule 'layers'"):
        quiet_trainer(max_steps=1, callbacks=[GrassCallback(blocks="model.layers")]).fit(HFModule(), token_loader())


def test_model_without_blocks_asks_for_a_path():
    class NoBlocks(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch).sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    with pytest.raises(ValueError, match="No transformer blocks found in NoBlocks"):
        quiet_trainer(max_steps=1, callbacks=[GrassCallback()]).fit(NoBlocks(), [torch.zeros(3)])


@pytest.mark.parametrize(
    "strategy",
    [FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)],
    ids=["fsdp", "deepspeed"],
)
def test_fsdp1_and_deepspeed_are_refused_in_setup_with_fsdp2_as_the_way(strategy):
    with pytest.raises(MisconfigurationException, match="GrassCallback: .*Strategy shards flattened parameters.*"
                                                        r"ModelParallelStrategy\(tensor_parallel_size=1\).*trainer=fsdp"):
        GrassCallback().setup(SimpleNamespace(strategy=strategy), None, "fit")


def test_fsdp2_is_accepted_with_data_parallelism_only():
    GrassCallback().setup(SimpleNamespace(strategy=ModelParallelStrategy(2, 1)), None, "fit")
    for tensor_parallel in (2, "auto"):
        with pytest.raises(MisconfigurationException,
                           match=f"tensor_parallel_size={tensor_parallel!r}: tensor parallelism splits a block's weights"):
            GrassCallback().setup(SimpleNamespace(strategy=ModelParallelStrategy(1, tensor_parallel)), None, "fit")


def test_ddp_needs_find_unused_parameters():
    with pytest.raises(MisconfigurationException, match="find_unused_parameters=True"):
        GrassCallback().setup(SimpleNamespace(strategy=DDPStrategy()), None, "fit")
    GrassCallback().setup(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)), None, "fit")
    GrassCallback().setup(SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), None, "fit")


def test_keep_warns_that_memory_grows_on_a_plain_strategy():
    with pytest.warns(UserWarning, match="grows toward full fine-tuning"):
        quiet_trainer(max_steps=1, callbacks=[GrassCallback(idle_moments="keep")]).fit(HFModule(), token_loader())


def test_the_callback_takes_a_grass_config_or_its_fields_not_both_and_names_an_unknown_setting():
    from grass_lightning import GrassConfig

    config = GrassConfig(num_active=3, sampling_period=7)
    assert GrassCallback(config).config is config
    assert GrassCallback(num_active=3, sampling_period=7).config == config
    with pytest.raises(ValueError, match=r"got a config and settings \['num_active'\]"):
        GrassCallback(config, num_active=2)
    with pytest.raises(ValueError, match=r"num_activ=3 is not a GrassCallback setting; the settings are num_active, "):
        GrassCallback(num_activ=3)
