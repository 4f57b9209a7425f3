"""The fine-tuned model as a Hugging Face folder: at the end of a run, from any checkpoint, and
after GrassCallback in a user's own module."""

import shutil

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from grass_lightning import GrassCallback
from grass_lightning.app import run, setup
from grass_lightning.app.export_checkpoint import export_checkpoint, main
from tests.helpers.app import compose_run
from tests.helpers.models import HFModule, quiet_trainer, token_loader

TRAIN_A_LITTLE = ["method.probe_steps=1", "method.sampling_period=2", "method.refresh_interval=2", "test_before=false"]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8]])


def _train_like_train_py(cfg, run_dir):
    """run.train, plus the .hydra/config.yaml that a `python train.py` run leaves beside its checkpoints."""
    run.train(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")


def _logits(model, **extra):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS % model.config.vocab_size, **extra).logits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grass", "lora"])
def test_the_run_writes_a_folder_that_transformers_loads_with_the_trained_logits(tmp_path, data_files, method):
    extra = TRAIN_A_LITTLE if method == "grass" else ["method=lora", "method.r=2", "test_before=false"]
    cfg = compose_run(tmp_path, "model=tiny_llama", "data=jsonl", f"data.path={data_files['choice']}", *extra)
    _, objects = run.train(cfg)
    folder = tmp_path / "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert not any(name.startswith("base_model") or "lora" in name for name, _ in loaded.named_parameters())  # merged
    trained = objects.module.model
    assert torch.allclose(_logits(loaded), _logits(trained), atol=1e-5)


@pytest.mark.slow
def test_a_classifier_is_written_with_its_label_names(tmp_path, data_files):
    cfg = compose_run(tmp_path, "model=tiny_bert", "data=jsonl", f"data.path={data_files['classification']}", *TRAIN_A_LITTLE)
    _, objects = run.train(cfg)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert loaded.config.id2label == {0: "neg", 1: "pos"}
    mask = torch.ones_like(IDS)
    assert torch.allclose(_logits(loaded, attention_mask=mask), _logits(objects.module.model, attention_mask=mask), atol=1e-5)


@pytest.mark.slow
def test_lora_can_be_written_as_its_adapter_alone(tmp_path, data_files):
    cfg = compose_run(tmp_path, "model=tiny_llama", "data=jsonl", f"data.path={data_files['choice']}", "method=lora",
                      "method.r=2", "test_before=false", "export_lora=adapter")
    run.train(cfg)
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_export_from_a_mid_run_checkpoint_holds_that_checkpoints_weights(tmp_path, data_files):
    cfg = compose_run(tmp_path / "run", "model=tiny_llama", "data=jsonl", f"data.path={data_files['choice']}",
                      "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1",
                      "export=false", *TRAIN_A_LITTLE)
    _train_like_train_py(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step2.ckpt"
    assert checkpoint.is_file() and not (tmp_path / "run" / "model").exists()
    main([str(checkpoint), str(tmp_path / "exported")])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[f"model.{name}"]), name
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # step 2 is not the end: the test can tell them apart


@pytest.mark.slow
def test_export_refuses_a_checkpoint_of_another_model_and_one_without_its_run_config(tmp_path, data_files):
    cfg = compose_run(tmp_path / "run", "model=tiny_llama", "data=jsonl", f"data.path={data_files['choice']}",
                      "export=false", *TRAIN_A_LITTLE)
    _train_like_train_py(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="was written for another model"):
        export_checkpoint(checkpoint, tmp_path / "out", overrides=["model.config.hidden_size=64"])
    alone = tmp_path / "elsewhere" / "last.ckpt"
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    with pytest.raises(FileNotFoundError, match=r"no run config at .*\.hydra/config\.yaml\. Give the run's .* --config"):
        export_checkpoint(alone, tmp_path / "out")
    export_checkpoint(alone, tmp_path / "out", config=tmp_path / "run" / ".hydra" / "config.yaml")
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_bad_export_setting_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"export_lora='both' is not one of \('merged', 'adapter'\)"):
        run.train(compose_run(tmp_path, "export_lora=both"))
    with pytest.raises(ValueError, match=r"export='yes' must be true or false"):
        run.train(compose_run(tmp_path, "export=yes"))
    with pytest.raises(ValueError, match=r"export_dtype='float64' is not one of \(None, 'float32'\)"):
        run.train(compose_run(tmp_path, "export_dtype=float64"))


def test_after_fit_with_grass_callback_save_pretrained_gives_back_the_model_as_trained(tmp_path):
    module = HFModule()
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    quiet_trainer(max_steps=6, callbacks=[GrassCallback(num_active=1, probe_steps=2, sampling_period=2)]).fit(
        module, token_loader())
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags
    assert not any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in module.parameters())
    module.model.save_pretrained(tmp_path / "mine")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mine")
    assert torch.allclose(_logits(loaded), _logits(module.model), atol=1e-6)


@pytest.mark.slow
def test_a_bf16_run_writes_bf16_weights_and_export_dtype_float32_widens_them(tmp_path, data_files):
    cfg = compose_run(tmp_path / "run", "model=tiny_llama", "data=jsonl", f"data.path={data_files['choice']}",
                      "trainer.precision=bf16-true", *TRAIN_A_LITTLE)
    _train_like_train_py(cfg, tmp_path / "run")
    held = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype="auto")
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    main([str(checkpoint), str(tmp_path / "same")])  # rebuilt in the run's dtype: the same bf16 values
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "same", dtype="auto")
    assert all(torch.equal(p, q) for p, q in zip(held.parameters(), again.parameters()))
    main([str(checkpoint), str(tmp_path / "wide"), "export_dtype=float32"])
    wide = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "wide", dtype="auto")
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert all(torch.equal(p.bfloat16(), q) for p, q in zip(wide.parameters(), held.parameters()))
