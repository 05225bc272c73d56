#!/usr/bin/env bash
# The main job, from a fresh clone: install, build the Shakespeare corpus and a SentencePiece tokenizer,
# preprocess to Megatron .bin/.idx, and train a tiny GPT with TP=2, PP=2, DP=2 on 8 gloo CPU processes.
# Usage: bash scripts/quickstart.sh [extra pretrain_gpt.py flags, e.g. --train-iters 50]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
mkdir -p data runs
[ -f data/shakespeare.jsonl ] || $PY tools/prepare_corpus.py --output data/shakespeare.jsonl
[ -f data/tokenizer/tokenizer.model ] || $PY tools/train_tokenizer.py --input data/shakespeare.jsonl --output-dir data/tokenizer --vocab-size 4096
[ -f data/shakespeare_text_document.idx ] || $PY tools/preprocess_data.py --input data/shakespeare.jsonl \
  --output-prefix data/shakespeare --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model data/tokenizer/tokenizer.model --append-eod --workers 2
rm -f runs/quickstart/metrics.jsonl
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 8 --master-port "${MASTER_PORT:-29512}" pretrain_gpt.py \
  --config configs/tiny_cpu.yaml \
  --data-path data/shakespeare_text_document --data-cache-path data/cache \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/tokenizer.model \
  --save checkpoints/quickstart --save-interval 100 \
  --metrics-jsonl runs/quickstart/metrics.jsonl --tensorboard-dir runs/quickstart/tensorboard "$@"
$PY - <<'PY'
import json
records = [json.loads(line) for line in open("runs/quickstart/metrics.jsonl")]
train = [r for r in records if "split" not in r and "record" not in r]
print(f"quickstart done: lm loss {train[0]['lm_loss']:.3f} at iteration {train[0]['iteration']} -> "
      f"{train[-1]['lm_loss']:.3f} at iteration {train[-1]['iteration']}; checkpoint in checkpoints/quickstart")
PY
