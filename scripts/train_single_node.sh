#!/usr/bin/env bash
# One node: bash scripts/train_single_node.sh <gpus> <config.yaml> [extra flags...]
set -euo pipefail
GPUS=${1:?number of processes}; CONFIG=${2:?config yaml}; shift 2
exec torchrun --standalone --nproc-per-node "$GPUS" pretrain_gpt.py --config "$CONFIG" "$@"
