#!/usr/bin/env bash
# One node's task of scripts/train_slurm.sbatch (started by its srun, one per node): runs torchrun with
# SIGTERM ignored, so that torchrun neither handles it (it would stop the workers after its shutdown
# timeout and fail with SignalException) nor dies of it; the workers install pretrain_gpt.py's handler,
# save, exit 0, and torchrun exits with their exit code. A SIGTERM that reaches this task (--signal,
# pre-emption, GraceTime, `scancel --signal=TERM`) is noted in $STOP_MARK on the batch host, where the
# batch shell reads it to decide on a requeue.
#   usage: torchrun_node.sh PYTHON [torchrun arguments...]   (SLURM_NODEID gives --node-rank)
set -uo pipefail
PYTHON=$1; shift
trap '' TERM  # inherited by torchrun, which does not install its own handler (PET_SIGNALS_TO_HANDLE)
"$PYTHON" -m torch.distributed.run --node-rank "$SLURM_NODEID" "$@" &
TORCHRUN=$!
note_sigterm() {
  echo "[torchrun_node ${SLURMD_NODENAME:-?} $(date -u +%H:%M:%S)] SIGTERM ($(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null) left): the workers save and exit, torchrun waits for them"
  if [ -n "${STOP_MARK:-}" ] && [ "${SLURMD_NODENAME:-}" = "${BATCH_HOST:-}" ]; then echo sigterm >> "$STOP_MARK"; fi
}
trap note_sigterm TERM
while kill -0 "$TORCHRUN" 2>/dev/null; do wait "$TORCHRUN"; done  # a trapped signal interrupts wait
wait "$TORCHRUN"
