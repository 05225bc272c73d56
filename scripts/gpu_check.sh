#!/usr/bin/env bash
# GPU lane (issue 19, item 8): run everything CPU CI cannot, on one CUDA GPU, in under ~8 minutes, and
# append a dated summary to benchmarks/RESULTS.md. Run it first whenever a GPU machine is available:
#
#   bash scripts/gpu_check.sh            # uses .venv (scripts/install.sh with a CUDA torch: TORCH_INDEX=...)
#
# Steps (each under its own time limit; a failing step is reported and the next one still runs):
#   1. the GPU-only tests: tests/unit/test_kernels.py (CUDA / Transformer Engine / Apex kernels against
#      their torch twins), the device-placement and NaN-guard tests, and anything marked @pytest.mark.gpu;
#   2. a short NCCL run of the quickstart model (configs/tiny_cpu.yaml) on this one device: NCCL cannot
#      put two ranks on one GPU, so the layout is TP=PP=DP=1 (the quickstart's TP2 x PP2 x DP2 needs 8 GPUs);
#      it must finish with finite, decreasing losses;
#   3. benchmarks/bench_gpu_mfu.py (GPT ~1.3B, bf16; local kernels, and TE when installed);
#   4. benchmarks/bench_cross_entropy.py at a GPU shape (fused output layer + CE vs unfused).
# Exit code: 0 if every step passed, 1 if any failed, 2 if there is no CUDA GPU (nothing was run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False, or torch is a CPU build):" \
       "nothing was run. Run it on a GPU machine with a CUDA torch (TORCH_INDEX=<CUDA wheel index> bash scripts/install.sh)." >&2
  exit 2
fi

OUT=$(mktemp -d /tmp/gpu_check.XXXXXX)
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')
echo "gpu_check on: $DEVICE (logs in $OUT)"
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? took=$((SECONDS - start)) verdict=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT after ${limit}s"; FAILED=1
  elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; FAILED=1; fi
  echo "== $name: $verdict in ${took}s"
  tail -n 5 "$OUT/$name.log"
  SUMMARY+=("| $name | $verdict | ${took} s | $(tail -n 1 "$OUT/$name.log" | tr '|' '/' | cut -c1-160) |")
}

# 1. GPU-only tests (-m 'gpu or not slow' keeps the default deselection of slow tests but adds gpu ones).
step gpu_tests 180 "$PY" -m pytest -q -x -m "gpu or not slow" tests/unit/test_kernels.py \
  tests/unit/test_collective_devices.py tests/faults/test_fault_nan.py

# 2. NCCL on one device: the quickstart model, mock data, 30 iterations, losses finite and going down.
rm -f "$OUT/nccl.jsonl"
step nccl_quickstart_1gpu 150 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain_gpt.py \
  --config configs/tiny_cpu.yaml --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
  --distributed-backend nccl --mock-data --vocab-size 4096 --tokenizer-type NullTokenizer --train-iters 30 \
  --eval-iters 0 --log-interval 10 --metrics-jsonl "$OUT/nccl.jsonl"
step nccl_losses 30 "$PY" - "$OUT/nccl.jsonl" <<'PY'
import json, math, sys
losses = [r["lm_loss"] for r in map(json.loads, open(sys.argv[1])) if "split" not in r]
assert len(losses) == 30 and all(math.isfinite(x) for x in losses), losses
assert losses[-1] < losses[0], f"loss did not decrease: {losses[0]} -> {losses[-1]}"
print(f"NCCL 1-GPU quickstart model: lm loss {losses[0]:.3f} -> {losses[-1]:.3f} over 30 iterations")
PY

# 3. MFU benchmark (appends its own table to RESULTS.md); TE's row is skipped with a reason if TE is absent.
step bench_gpu_mfu 240 "$PY" benchmarks/bench_gpu_mfu.py --impl local transformer_engine --steps 8 --append-results

# 4. Fused output layer + cross entropy vs unfused, at a Llama-like GPU shape (appends its table).
step bench_cross_entropy 90 "$PY" benchmarks/bench_cross_entropy.py --tokens 8192 --hidden 4096 --vocab 128256 \
  --append-results

{
  echo
  echo "## GPU lane check (scripts/gpu_check.sh), $(date -u +%F)"
  echo
  echo "$DEVICE"
  echo
  echo "| step | result | time | last line of its log |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${SUMMARY[@]}"
} >> benchmarks/RESULTS.md
echo "gpu_check: summary appended to benchmarks/RESULTS.md; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED, see above')"
exit $FAILED
