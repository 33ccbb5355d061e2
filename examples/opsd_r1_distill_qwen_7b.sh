#!/usr/bin/env bash
# OPSD with ReNIO on DeepSeek-R1-Distill-Qwen-7B (Qwen2 architecture, QKV bias), TP=2.
# Before: python -m checkpoints_conversion.hf_to_megatron --hf-dir /models/DeepSeek-R1-Distill-Qwen-7B --save $CKPT/r1-qwen-7b
source "$(dirname "$0")/common.sh"
exec "${LAUNCH[@]}" -m megatron_renio.train \
  --mode opsd --teacher fixed --student-load "$CKPT/r1-qwen-7b" \
  --data-path "$DATA" --task math \
  --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 256 --samples-per-prompt 4 \
  --seq-length 16384 --max-new-tokens 12288 \
  --lr 1e-6 --min-lr 1e-7 --lr-decay-style cosine --lr-warmup-iters 10 --clip-grad 1.0 \
  --loss jsd --kd-beta 0.5 "${RENIO_ARGS[@]}" \
  --bf16 --use-distributed-optimizer --train-iters 300 \
  --save "$RUNS/opsd-r1-qwen-7b" --load "$RUNS/opsd-r1-qwen-7b" --save-interval 25 \
  --tensorboard-dir "$RUNS/opsd-r1-qwen-7b/tb" "$@"
