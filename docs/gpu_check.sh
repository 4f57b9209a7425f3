#!/usr/bin/env bash
# Every GPU check in one call, for a lent CUDA machine (no downloads: random-initialised models).
# About 7 minutes on one H100/H200; writes docs/results/bench_gpu_llama_1b_bf16 (copy it to $OUT
# on the device tool). Usage: bash docs/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-docs/results/bench_gpu_llama_1b_bf16}
nvidia-smi --query-gpu=name,memory.total --format=csv
# CUDA offload: park and stream, fp32 and bf16 weights with fp32 masters, bit-identical to no offload
timeout 240 python -m pytest -q tests/test_offload_cuda.py
# recompute replays dropout masks on CUDA for a block called by keyword (issue 24 item 4)
timeout 60 python -m pytest -q tests/test_recompute.py -k cuda
# FSDP2 on CUDA (NCCL, one process): train.py trainer=fsdp trains, exports and writes a distributed checkpoint
python -c "from pathlib import Path; from tests.helpers.app import choice_rows, write_jsonl; write_jsonl(Path('/tmp/gpu_mc.jsonl'), choice_rows())"
timeout 120 python train.py trainer=fsdp trainer.devices=1 trainer.accelerator=gpu model=tiny_llama data=jsonl \
    data.path=/tmp/gpu_mc.jsonl trainer.max_steps=6 method.probe_steps=2 method.sampling_period=2 data.val_size=4 data.test_size=6 \
    test_before=false trainer.enable_progress_bar=false "~callbacks.progress_bar" hydra.run.dir=/tmp/gpu_fsdp
# the llama_1b rows in bf16 weights (full as bf16-mixed), as each peer runs them
timeout 330 grass-bench --model llama_1b --precision bf16-true \
    --methods full,badam,lisa,grass,grass+stream --batch-size 8 --seq-len 512 --steps 10 --out "$out"
