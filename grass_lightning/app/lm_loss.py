"""Next-token cross-entropy in chunks of tokens, so the fp32 logits are never held whole.

A causal LM's logits are vocabulary-wide: SmolLM2's 49,152 tokens make 201 MB of fp32 logits
at batch 8 x 128 tokens. Hugging Face's loss upcasts them to fp32 and keeps the fp32
log-softmax for backward, and backward makes an fp32 gradient of the same size, several times
the memory of everything a layer-wise method trains. Here each chunk's fp32 loss runs under
`torch.utils.checkpoint`: only the logits as the model made them (bf16 under ``bf16-true``) and
their gradient are held; a chunk's fp32 copy lives while that chunk is computed, in forward and
again in backward. The value is Hugging Face's ``ForCausalLMLoss`` (shifted labels, mean over
the target tokens, NaN when there are none), up to summation order.

Where the model's head is a plain linear layer on the body's last hidden state (Llama, Mistral,
Qwen2, GPT-2 and most decoders), `causal_lm_loss` goes one step further and applies the head
inside each chunk: no logits are held at all, only the hidden states, and backward computes
each chunk's logits again (one more head product per step). SmolLM2's head is 100 MB of bf16
logits and 100 MB of their gradient at batch 8 x 128. Models that change the logits after the
head (Gemma 2's soft-capping, Cohere's and Granite's scales) and wrappers that are not Hugging
Face models (peft) take the logits from their own forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

IGNORE = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MB in fp32, 341 tokens of SmolLM2's vocabulary
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config keys of heads that are more than a linear layer


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
                    head: nn.Module | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, i]`` against ``labels[:, i + 1]`` over labels not ``IGNORE``.

    With ``head``, ``logits`` are hidden states and each chunk's logits are ``head(hidden)``.
    """
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    vocabulary = flat.shape[1] if head is None else head.out_features
    rows = max(1, chunk_elements // vocabulary)
    total = sum(checkpoint(_summed_cross_entropy, flat[i : i + rows], targets[i : i + rows], head, use_reentrant=False)
                for i in range(0, flat.shape[0], rows))
    return total / (targets != IGNORE).sum()


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's next-token loss on ``labels`` (``IGNORE`` where there is no target), chunked,
    with the head applied per chunk where it is a plain linear layer."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    plain = (isinstance(head, nn.Linear) and model.base_model is not model
             and not any(getattr(model.config, key, None) for key in LOGIT_TRANSFORMS))
    if not plain:
        return next_token_loss(model(input_ids=input_ids, **inputs).logits, labels)
    if isinstance(model, FSDPModule):
        # an FSDP2 root all-gathers its own weights (embeddings, head) in its forward and keeps them
        # until backward: run it, for the last position only, and take the final (normed) hidden states
        out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, **inputs)
        return next_token_loss(out.hidden_states[-1], labels, head=head)
    hidden = model.base_model(input_ids=input_ids, **inputs).last_hidden_state
    return next_token_loss(hidden, labels, head=head)


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, head: nn.Module | None) -> torch.Tensor:
    logits = logits if head is None else head(logits)
    return nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
