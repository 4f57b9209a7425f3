"""Next-token cross-entropy in chunks of tokens, so the fp32 logits are never held whole.

A causal LM's logits are vocabulary-wide: SmolLM2's 49,152 tokens make 201 MB of fp32 logits
at batch 8 x 128 tokens. Hugging Face's loss upcasts them to fp32 and keeps the fp32
log-softmax for backward, and backward makes an fp32 gradient of the same size, several times
the memory of everything a layer-wise method trains. Here each chunk's fp32 loss runs under
`torch.utils.checkpoint`: only the logits as the model made them (bf16 under ``bf16-true``) and
their gradient are held; a chunk's fp32 copy lives while that chunk is computed, in forward and
again in backward. The value is Hugging Face's ``ForCausalLMLoss`` (shifted labels, mean over
the target tokens, NaN when there are none), up to summation order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MB in fp32, 341 tokens of SmolLM2's vocabulary


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, i]`` against ``labels[:, i + 1]`` over labels not ``IGNORE``."""
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, chunk_elements // flat.shape[1])
    total = sum(checkpoint(_summed_cross_entropy, flat[i : i + rows], targets[i : i + rows], use_reentrant=False)
                for i in range(0, flat.shape[0], rows))
    return total / (targets != IGNORE).sum()


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's next-token loss on ``labels`` (``IGNORE`` where there is no target), chunked."""
    return next_token_loss(model(input_ids=input_ids, **inputs).logits, labels)


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
