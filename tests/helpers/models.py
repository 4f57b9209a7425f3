"""Tiny models, loaders and trainers for the tests: random-initialised Hugging Face models built from configs (no
download) and a plain block model whose blocks have gradients of known relative size."""

from __future__ import annotations

import torch
import transformers
from lightning.pytorch import LightningModule
from torch import nn

VOCAB = 64
_DECODER = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, model class, config kwargs, block path inside the model)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, "model.layers"),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER, "model.layers"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER, "model.layers"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=8), "model.layers"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, head_dim=8), "model.layers"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER, "model.layers"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=16, n_layer=4, n_head=2, n_positions=32, bos_token_id=1,
                  eos_token_id=2, loss_type="ForCausalLM"), "transformer.h"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_DECODER, num_key_value_heads=None), "gpt_neox.layers"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=4, num_attention_heads=2,
                 max_position_embeddings=32, word_embed_proj_dim=16), "model.decoder.layers"),
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=2, max_position_embeddings=32, num_labels=2), "bert.encoder.layer"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                     num_attention_heads=2, max_position_embeddings=40, num_labels=2), "roberta.encoder.layer"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=VOCAB, dim=16, hidden_dim=32, n_layers=4, n_heads=2, max_position_embeddings=32,
                        num_labels=2), "distilbert.transformer.layer"),
}


def tiny_hf(family: str) -> nn.Module:
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config)


def hf_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if model.config.architectures and "SequenceClassification" in model.config.architectures[0] or hasattr(
        model, "classifier"
    ):
        return model(input_ids=batch, labels=(batch[:, 0] % 2)).loss
    return model(input_ids=batch, labels=batch).loss


class ScaledBlocks(nn.Module):
    """Residual MLP blocks; block l's output is multiplied by a fixed ``scales[l]``, so its
    weight gradients are proportionally larger. Blocks live at ``body.layers``."""

    def __init__(self, scales=(0.1, 0.2, 1.0, 3.0), width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.body = nn.Module()
        self.body.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)) for _ in scales
        )
        self.register_buffer("scales", torch.tensor(scales))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for scale, block in zip(self.scales, self.body.layers):
            h = h + scale * block(h)
        return self.out(h).squeeze(-1)


def regression_batch(generator: torch.Generator, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 4, generator=generator)
    return x, x.sum(-1).sin()


class HFModule(LightningModule):
    """A user's ordinary automatic-optimization module around a Hugging Face model."""

    def __init__(self, family: str = "llama", lr: float = 1e-2) -> None:
        super().__init__()
        self.model = tiny_hf(family)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return hf_loss(self.model, ids)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ScaledModule(LightningModule):
    def __init__(self, lr: float = 1e-2, **kwargs) -> None:
        super().__init__()
        self.net = ScaledBlocks(**kwargs)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def token_loader(n_batches: int = 64, batch: int = 4, seq: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n_batches * batch, seq), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch)


def regression_loader(n_batches: int = 64, batch: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * batch, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(-1).sin()), batch_size=batch)


def quiet_trainer(**kwargs):
    from lightning.pytorch import Trainer

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    defaults.update(kwargs)
    return Trainer(**defaults)


def gradient_rms(params) -> torch.Tensor:
    """r_l = sqrt(||g_l||^2 / N_l) of the gradients ``params`` hold (fp32): the reference the probe's
    readings are checked against."""
    params = list(params)
    sq = sum(torch.linalg.vector_norm(p.grad, dtype=torch.float32).square() for p in params if p.grad is not None)
    return (torch.as_tensor(sq, dtype=torch.float32) / sum(p.numel() for p in params)).sqrt()


class ShardedHFModule(HFModule):
    """`HFModule` for Lightning's `ModelParallelStrategy`: FSDP2 over each block, then the root; its
    loss is the app's chunked one (Hugging Face's own in `HFModule`, the unsharded reference)."""

    def training_step(self, batch, batch_idx):
        from grass_lightning.app.lm_loss import causal_lm_loss

        (ids,) = batch
        return causal_lm_loss(self.model, ids, ids)

    def configure_model(self):
        from grass_lightning.core.sharding import shard_blocks

        shard_blocks(self.model, self.model.model.layers, mesh=self.device_mesh["data_parallel"])
