"""Block discovery in Hugging Face families and plain modules; roles of the other parameters."""

import pytest
from torch import nn

from grass_lightning.core.blocks import find_blocks
from tests.helpers.models import FAMILIES, HFModule, ScaledBlocks, tiny_hf


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_are_found_in_each_family(family):
    model = tiny_hf(family)
    layout = find_blocks(model)
    assert layout.path == FAMILIES[family][3]
    assert len(layout) == 4
    block_ids = {id(p) for b in layout.blocks for p in b.parameters()}
    outside = {id(p) for p in (*layout.embeddings, *layout.head)}
    every = {id(p) for p in model.parameters()}
    assert block_ids | outside == every and not block_ids & outside
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    assert embedding_ids <= {id(p) for p in layout.embeddings}


def test_blocks_are_found_through_a_lightning_module():
    layout = find_blocks(HFModule("llama"))
    assert layout.path == "model.model.layers"


def test_explicit_path_for_a_plain_module():
    layout = find_blocks(ScaledBlocks(), "body.layers")
    assert len(layout) == 4
    model = layout.blocks[0]
    # named by the domain: `embed` (a Linear here) is an embedding, `out` the head
    assert [tuple(p.shape) for p in layout.embeddings] == [(8, 4), (8,)]
    assert [tuple(p.shape) for p in layout.head] == [(1, 8), (1,)]
    assert isinstance(model, nn.Sequential)


def test_head_and_embeddings_are_told_apart():
    model = tiny_hf("llama")
    names = {id(p): n for n, p in model.named_parameters()}
    layout = find_blocks(model)
    assert [names[id(p)] for p in layout.embeddings] == ["model.embed_tokens.weight"]
    assert sorted(names[id(p)] for p in layout.head) == ["lm_head.weight", "model.norm.weight"]


def test_bert_embedding_norm_counts_as_embeddings_and_pooler_as_head():
    model = tiny_hf("bert")
    names = {id(p): n for n, p in model.named_parameters()}
    layout = find_blocks(model)
    assert "bert.embeddings.LayerNorm.weight" in [names[id(p)] for p in layout.embeddings]
    head = [names[id(p)] for p in layout.head]
    assert "bert.pooler.dense.weight" in head and "classifier.weight" in head


def test_tied_lm_head_trains_only_when_both_switches_are_on():
    model = tiny_hf("gpt2")
    names = {id(p): n for n, p in model.named_parameters()}
    layout = find_blocks(model)
    (tied,) = layout.tied()
    assert names[id(tied)] == "transformer.wte.weight" and model.lm_head.weight is tied

    def trained(emb, head):
        return sorted(names[id(p)] for p in layout.always_trained(emb, head))

    assert trained(True, True) == ["transformer.ln_f.bias", "transformer.ln_f.weight",
                                   "transformer.wpe.weight", "transformer.wte.weight"]
    assert trained(True, False) == ["transformer.wpe.weight"]
    assert trained(False, True) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    assert trained(False, False) == []


def test_a_path_that_does_not_resolve_names_the_missing_part():
    with pytest.raises(ValueError, match=r"blocks='model.blocks' does not resolve: model has no submodule 'blocks'"):
        find_blocks(HFModule("llama"), "model.blocks")


def test_a_path_to_something_else_than_a_module_list_is_refused():
    with pytest.raises(ValueError, match=r"blocks='model.model.norm' resolves to a LlamaRMSNorm"):
        find_blocks(HFModule("llama"), "model.model.norm")


def test_a_model_without_blocks_asks_for_a_path():
    with pytest.raises(ValueError, match="No transformer blocks found in Sequential.*Pass blocks="):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))


def test_discovery_prefers_the_largest_block_list():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
    assert find_blocks(model).path == "decoder.layers"
