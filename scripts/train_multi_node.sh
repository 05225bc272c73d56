#!/usr/bin/env bash
# Several nodes without Slurm: run on every node with the same MASTER_ADDR and its own NODE_RANK.
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=0 bash scripts/train_multi_node.sh 8 configs/llama_7b.yaml --data-path ...
set -euo pipefail
GPUS=${1:?processes per node}; CONFIG=${2:?config yaml}; shift 2
exec torchrun --nnodes "${NNODES:?}" --node-rank "${NODE_RANK:?}" --nproc-per-node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" \
  pretrain_gpt.py --config "$CONFIG" "$@"
