"""The methods as conf/method builds them: LISA as published, LISA's choice with GRASS's settings,
and BAdam by its own package under FineTuningModule."""

import argparse

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from omegaconf import OmegaConf

from grass_lightning import GrassConfig
from grass_lightning.app.methods import build_method
from grass_lightning.app.module import FineTuningModule, OptimConfig
from grass_lightning.core.blocks import find_blocks
from grass_lightning.tools.bench import _NextToken
from tests.helpers.app import compose_run
from tests.helpers.models import VOCAB, tiny_hf


def _built(tmp_path, *overrides):
    cfg = compose_run(tmp_path, *overrides)
    return build_method(OmegaConf.to_container(cfg.method, resolve=True), seed=0)


def test_lisa_is_lisa_as_published_and_grass_uniform_is_labelled_apart(tmp_path):
    lisa = _built(tmp_path, "method=lisa").callbacks[0].config
    assert (lisa.sampler, lisa.probe_steps, lisa.sampling_period, lisa.num_active) == ("uniform", 0, 20, 2)
    assert lisa.train_embeddings and lisa.train_head and lisa.idle_moments == "keep"  # LMFlow's optimizer keeps them
    uniform = _built(tmp_path, "method=grass", "method.sampler=uniform")
    config = uniform.callbacks[0].config
    assert uniform.name == "grass-uniform" and config.probe_steps == 0 and not config.train_embeddings
    assert _built(tmp_path, "method=grass", "method.sampler=static").name == "grass-static"
    assert _built(tmp_path, "method=grass").name == "grass"


def test_probe_steps_left_unset_follow_the_sampler():
    assert GrassConfig().probe_steps == 10 and GrassConfig(sampler="static").probe_steps == 10
    assert GrassConfig(sampler="uniform").probe_steps == 0
    assert GrassConfig(sampler="uniform", probe_steps=0).probe_steps == 0


class _Seen(Callback):
    """Per optimizer step: the blocks holding gradients where Lightning clips them."""

    def __init__(self, layout):
        self.layout, self.blocks = layout, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.blocks.append([i for i in range(len(self.layout)) if any(p.grad is not None for p in self.layout.block_params(i))])


@pytest.mark.parametrize("mode", ["ascending", "random"])
def test_badam_trains_one_block_at_a_time_by_its_own_optimizer(tmp_path, mode):
    pytest.importorskip("badam")
    method = _built(tmp_path, "method=badam", f"method.switch_mode={mode}", "method.switch_block_every=2")
    model = tiny_hf("llama")
    layout = find_blocks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = _Seen(layout)
    module = FineTuningModule(model, _NextToken(), OptimConfig(lr=1e-3, gradient_clip_val=1e-4), method.wrap_optimizer)
    trainer = Trainer(max_steps=8, callbacks=[seen], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    tokens = torch.randint(3, VOCAB, (32, 8), generator=torch.Generator().manual_seed(0))
    trainer.fit(module, torch.utils.data.DataLoader(tokens, batch_size=4))
    # Lightning's hook (clipping, callbacks) sees the gradients of exactly one block, two steps each
    assert all(len(blocks) == 1 for blocks in seen.blocks) and len(seen.blocks) == 8
    trained = [blocks[0] for blocks in seen.blocks]
    # BAdam switches when (its step count + 1) % switch_block_every == 0: the first block gets one step
    assert trained[1] == trained[2] and trained[3] == trained[4] and trained[5] == trained[6]
    order = trained[0:1] + trained[1:7:2]
    assert sorted(order) == [0, 1, 2, 3] and (order == [0, 1, 2, 3] or mode == "random")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert all(n.startswith("model.layers.") for n in changed) and len(changed) == 4 * 9  # embeddings, norm, head frozen


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_badam_groups_carry_the_configured_weight_decay_not_adamws_default(tmp_path, weight_decay):
    """BAdam's groups take their settings from the base optimizer's defaults, whose weight decay is
    AdamW's 0.01 unless given: without care every run decayed by 0.01 whatever optim says."""
    pytest.importorskip("badam")
    method = _built(tmp_path, "method=badam")
    model = tiny_hf("llama")
    module = FineTuningModule(model, _NextToken(), OptimConfig(lr=1e-3, weight_decay=weight_decay), method.wrap_optimizer)
    module.trainer = argparse.Namespace(max_steps=4)
    [optimizer], _ = module.configure_optimizers()
    groups = optimizer.base_optimizer.param_groups
    assert groups[0]["params"]  # the active block (the tiny Llama has no biases: the second group is empty)
    assert [group["weight_decay"] for group in groups] == [weight_decay, weight_decay]


@pytest.mark.parametrize("include_lm_head", [False, True])
def test_badam_trains_a_classifiers_new_head_in_every_step(tmp_path, data_files, include_lm_head):
    """A classifier's head starts random; one block at a time (or the head as one more block, trained
    1/(L+1) of the time) left it so and BAdam scored about chance."""
    pytest.importorskip("badam")
    import grass_lightning.app.run as run

    cfg = compose_run(tmp_path, "model=tiny_bert", "data=jsonl", f"data.path={data_files['classification']}",
                      "method=badam", "method.switch_block_every=1", f"method.include_lm_head={include_lm_head}",
                      "trainer.max_steps=3")
    objects = run.assemble(cfg)
    head = {n: p.detach().clone() for n, p in objects.module.model.named_parameters()
            if n.startswith(("classifier.", "bert.pooler."))}
    objects.trainer.fit(objects.module, datamodule=objects.datamodule)
    changed = {n for n, p in objects.module.model.named_parameters() if n in head and not torch.equal(p, head[n])}
    assert changed == set(head)  # every step trains the head, whichever block is drawn
    assert objects.trainer.optimizers[0].active_param_prefixs[-len(head):] == list(head)


def test_badam_settings_are_checked_before_any_model_loads(tmp_path):
    pytest.importorskip("badam")
    with pytest.raises(ValueError, match=r"method\.switch_mode='fixed' is not one of 'random', 'ascending', 'descending'"):
        _built(tmp_path, "method=badam", "method.switch_mode=fixed")
    with pytest.raises(ValueError, match=r"method\.switch_block_every=0 must be an integer >= 1"):
        _built(tmp_path, "method=badam", "method.switch_block_every=0")


def test_badam_without_its_package_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "badam", None)  # import badam raises ImportError
    with pytest.raises(ValueError, match=r'needs the badam package: pip install "grass-lightning\[peers\]"'):
        _built(tmp_path, "method=badam")


def test_a_badam_run_refuses_to_resume_before_loading_anything(tmp_path):
    pytest.importorskip("badam")
    import grass_lightning.app.run as run

    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    cfg = compose_run(tmp_path, "model=tiny_llama", "method=badam", f"ckpt_path={checkpoint}")
    with pytest.raises(ValueError, match=r"ckpt_path=.*last\.ckpt': method=badam cannot resume a run \(BAdam's"):
        run.assemble(cfg)


def test_a_methods_defaults_live_in_its_settings_dataclass_alone(tmp_path):
    """conf/method/grass.yaml restated every GrassConfig default, so a default changed in
    core/config.py did not change train.py. Now the YAML sets none of them and the composed
    config holds the dataclass's."""
    import dataclasses

    from grass_lightning.app.methods import Badam, BlockMethod
    from tests.helpers.app import CONF

    for name, cls in (("grass", BlockMethod), ("badam", Badam)):
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Settings) if f.default is not dataclasses.MISSING}
        assert not set(OmegaConf.load(CONF / "method" / f"{name}.yaml")) & set(defaults)
        composed = compose_run(tmp_path, f"method={name}").method
        assert {key: composed[key] for key in defaults} == defaults
