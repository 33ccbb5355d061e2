#!/usr/bin/env bash
# OPD with ReNIO: Qwen3-8B teaches Qwen3-1.7B (same tokenizer) on the student's own samples.
# Before: python -m checkpoints_conversion.hf_to_megatron --hf-dir /models/Qwen3-1.7B --save $CKPT/qwen3-1.7b
#         python -m checkpoints_conversion.hf_to_megatron --hf-dir /models/Qwen3-8B   --save $CKPT/qwen3-8b
# Both models share one TP/PP layout: TP=2 fits the 8B teacher next to the student on 80 GB GPUs.
source "$(dirname "$0")/common.sh"
exec "${LAUNCH[@]}" -m megatron_renio.train \
  --mode opd --teacher separate --student-load "$CKPT/qwen3-1.7b" --teacher-load "$CKPT/qwen3-8b" \
  --data-path "$DATA" --task math \
  --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 256 --samples-per-prompt 4 \
  --seq-length 12288 --max-new-tokens 8192 \
  --lr 1e-6 --min-lr 1e-7 --lr-decay-style cosine --lr-warmup-iters 10 --clip-grad 1.0 \
  --loss reverse_kl "${RENIO_ARGS[@]}" \
  --bf16 --use-distributed-optimizer --train-iters 300 \
  --save "$RUNS/opd-qwen3-1.7b-from-8b" --load "$RUNS/opd-qwen3-1.7b-from-8b" --save-interval 25 \
  --tensorboard-dir "$RUNS/opd-qwen3-1.7b-from-8b/tb" "$@"
