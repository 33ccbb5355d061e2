# Shared launch settings for the example scripts (sourced, not run).
# Single node:  bash examples/opsd_qwen3_1.7b.sh
# Multi-node:   set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node, or RDZV_ENDPOINT
#               to use torchrun's c10d rendezvous instead of the static form.
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CKPT=${CKPT:-/ckpt}          # converted checkpoints (python -m checkpoints_conversion.hf_to_megatron)
DATA=${DATA:-data/train.jsonl}
RUNS=${RUNS:-runs}  # the --save folders: on storage every node mounts (another node's is refused at start-up)

# On SIGTERM (preemption) torchrun forwards the signal and kills the workers after this many seconds;
# they save at the end of the current step, so the default 30 is too short (torch versions without
# the setting keep 30).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

if [ -n "${RDZV_ENDPOINT:-}" ]; then
  LAUNCH=(torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --rdzv-backend c10d
          --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-renio}")
else
  LAUNCH=(torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi

# The reference settings of the method (README, "The method, as implemented"): loss temperature = sampling temperature
# 1.1, token clip 0.05, ReNIO clip 2.5, threshold 0.8, weight temperature 1, batch-mean normalisation,
# normalised over the whole step (--renio-scope global). The reference's weight cap (--renio-max-weight 10, the
# default) is taken against a micro-batch's mean weight and cannot bind with micro-batches of a few samples (the
# trainer notes it); micro-batches form longest first, so that each pads little.
RENIO_ARGS=(--kd-temperature 1.1 --rollout-temperature 1.1 --kd-token-clip 0.05
            --renio --renio-clip 2.5 --renio-threshold 0.8 --renio-temperature 1.0
            --renio-norm batch_mean --renio-scope global --micro-batch-order length)
