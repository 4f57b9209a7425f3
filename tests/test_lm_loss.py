"""The chunked next-token loss: Hugging Face's value and gradients, without holding fp32 logits."""

import pytest
import torch

from grass_lightning.app.lm_loss import IGNORE, causal_lm_loss, next_token_loss
from tests.helpers.models import FAMILIES, tiny_hf

CAUSAL = [family for family, (_, model_cls, _, _) in FAMILIES.items() if "Classification" not in model_cls]


@pytest.mark.parametrize(("family", "dtype"), [(family, torch.float32) for family in CAUSAL] + [("llama", torch.bfloat16)])
def test_the_chunked_loss_is_hugging_faces_loss_with_its_gradients(family, dtype):
    """Every family, whether its head runs inside the chunks (Llama, GPT-2, ...) or its logits
    come from its own forward (Gemma 2's soft-capping)."""
    model = tiny_hf(family).to(dtype).eval()  # no dropout: the two passes must see the same network
    ids = torch.randint(0, 64, (3, 10))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt
    hf = model(input_ids=ids, labels=labels).loss
    hf.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = causal_lm_loss(model, ids, labels)
    ours.backward()
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], **tolerance, msg=n)


def test_chunks_of_any_size_give_the_same_loss_and_no_target_gives_nan():
    logits = torch.randn(2, 7, 50, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 7))
    whole = next_token_loss(logits, labels, chunk_elements=10**9)
    for chunk in (1, 50, 149, 350):
        torch.testing.assert_close(next_token_loss(logits, labels, chunk_elements=chunk), whole)
    assert next_token_loss(logits, torch.full_like(labels, IGNORE)).isnan()  # as Hugging Face's mean of nothing


def test_backward_keeps_the_logits_not_an_fp32_log_softmax():
    """Bytes autograd saves for backward from the logits on: Hugging Face's loss keeps an fp32
    log-softmax of every position; the chunked loss keeps the bf16 logits it was given."""
    logits = torch.randn(4, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 64))

    def hugging_face():
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(logits, labels, 1000)

    assert _largest_saved_bytes(hugging_face) >= 4 * logits.numel()  # the fp32 log-softmax
    assert _largest_saved_bytes(lambda: next_token_loss(logits, labels, chunk_elements=64 * 1000)) <= 2 * logits.numel()


def _largest_saved_bytes(loss_fn) -> int:
    """The largest tensor autograd saves for backward while ``loss_fn`` runs."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.layout == torch.strided else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return max(saved, default=0)


def test_a_plain_linear_head_runs_inside_the_chunks_so_no_logits_are_kept():
    """A Llama's head is applied chunk by chunk: backward keeps the hidden states, never a
    vocabulary-wide tensor; Gemma 2 (soft-capped logits) keeps its logits."""
    ids = torch.randint(0, 64, (4, 16))
    for family, holds_logits in (("llama", False), ("gemma2", True)):
        model = tiny_hf(family)
        logits_bytes = ids.numel() * model.config.vocab_size * 4
        largest = _largest_saved_bytes(lambda: causal_lm_loss(model, ids, ids))
        assert (largest >= logits_bytes) == holds_logits, family
