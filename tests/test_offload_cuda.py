"""MomentOffloader on a GPU: side-stream copies give the same numbers as no offload (a missing
event would show as a mismatch), and the device holds only the allowed blocks' moments.
Skipped without CUDA; one command, well under 5 minutes on one GPU:

    python -m pytest tests/test_offload_cuda.py

Covers park with idle moments kept, and stream with them kept and dropped (where a draw can drop
a block whose prefetch is still in flight), and both with bf16 weights, whose fp32 masters move
with the moments. Step-time ratios are measured by the benchmark."""

import pytest
import torch
import transformers

from grass_lightning import GrassConfig, GrassSchedule, find_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _llama(blocks=8, width=512, dtype=torch.float32):
    # eager attention: fused attention backward kernels may use atomics, and runs must be bit-comparable
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=blocks, num_attention_heads=8, num_key_value_heads=8,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device="cuda", dtype=dtype)


def _train(offload, idle_moments, steps=24, dtype=torch.float32):
    model = _llama(dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = GrassSchedule(find_blocks(model), [optimizer],
                             GrassConfig(num_active=2, sampling_period=3, refresh_interval=3, probe_steps=0,
                                         idle_moments=idle_moments, sampler="uniform"), seed=0, offload=offload)
    schedule.start()
    g = torch.Generator().manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, 1024, (4, 128), generator=g).cuda()
        schedule.before_backward()
        model(input_ids=ids, labels=ids).loss.backward()
        schedule.measure()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.end_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    state = {i: {k: v.cpu().clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    visited = {b for _, active in schedule.history for b in active}
    block_moment_bytes = sum(p.numel() * p.element_size() * 2 for p in find_blocks(model).block_params(0))
    schedule.close()
    return model, state, peak, visited, block_moment_bytes


@pytest.mark.parametrize(("offload", "idle_moments"), [("park", "keep"), ("stream", "keep"), ("stream", "drop")])
def test_cuda_offload_is_bit_identical_and_lowers_peak_memory_by_the_parked_moments(offload, idle_moments):
    plain, plain_state, plain_peak, visited, block_bytes = _train("none", idle_moments)
    model, state, peak, visited_offload, _ = _train(offload, idle_moments)
    assert visited == visited_offload and len(visited) >= 6
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters()))
    assert all(torch.equal(plain_state[i][k], state[i][k]) for i in plain_state for k in plain_state[i])
    if idle_moments == "drop":
        return  # nothing is kept, so nothing is parked: the check is that no copy raced a release
    resident = 2 if offload == "park" else 3  # stream: block i, prefetched i+1, i-1 being written back
    expected_saving = (len(visited) - resident) * block_bytes
    assert plain_peak - peak >= 0.8 * expected_saving, (plain_peak, peak, expected_saving)


@pytest.mark.parametrize("offload", ["park", "stream"])
def test_cuda_bf16_weights_with_fp32_masters_offload_bit_identically(offload):
    """bf16 weights: fp32 masters and moments move to the host and back with the same numbers."""
    plain, plain_state, _, visited, _ = _train("none", "keep", dtype=torch.bfloat16)
    model, state, _, visited_offload, _ = _train(offload, "keep", dtype=torch.bfloat16)
    assert visited == visited_offload
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any("master" in s for s in state.values())
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters()))
    assert all(torch.equal(plain_state[i][k], state[i][k]) for i in plain_state for k in plain_state[i])
