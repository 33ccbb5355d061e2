#!/usr/bin/env bash
# OPSD with ReNIO: Qwen3-1.7B teaches itself (frozen initial weights given the reference solution).
# Before: python -m checkpoints_conversion.hf_to_megatron --hf-dir /models/Qwen3-1.7B --save $CKPT/qwen3-1.7b
source "$(dirname "$0")/common.sh"
exec "${LAUNCH[@]}" -m megatron_renio.train \
  --mode opsd --teacher fixed --student-load "$CKPT/qwen3-1.7b" \
  --data-path "$DATA" --task math \
  --tensor-model-parallel-size 1 --micro-batch-size 4 --global-batch-size 256 --samples-per-prompt 4 \
  --seq-length 12288 --max-new-tokens 8192 \
  --lr 2e-6 --min-lr 2e-7 --lr-decay-style cosine --lr-warmup-iters 10 --clip-grad 1.0 --weight-decay 0.0 \
  --loss jsd --kd-beta 0.5 "${RENIO_ARGS[@]}" \
  --bf16 --use-distributed-optimizer --train-iters 300 \
  --save "$RUNS/opsd-qwen3-1.7b" --load "$RUNS/opsd-qwen3-1.7b" --save-interval 25 \
  --tensorboard-dir "$RUNS/opsd-qwen3-1.7b/tb" --save-samples-interval 25 "$@"
