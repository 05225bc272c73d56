#!/usr/bin/env bash
# Stop the single-node cluster started by scripts/slurm/start_cluster.sh: cancels its jobs, then stops
# slurmd, slurmctld and munged (only the daemons of that cluster: it checks the config marker first).
#   sudo bash scripts/slurm/stop_cluster.sh
set -uo pipefail
CONF=/etc/slurm/slurm.conf
STATE=${SLURM_STATE_DIR:-/var/lib/megatron_lite_slurm}
MARK="# written by megatron_lite scripts/slurm/start_cluster.sh"
if [ ! -f "$CONF" ] || ! grep -qF "$MARK" "$CONF"; then
  echo "stop_cluster: $CONF was not written by start_cluster.sh; not touching it." >&2
  exit 1
fi
if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
  scancel --user "$(id -un)" 2>/dev/null || true
fi
stop() {  # stop the daemon whose pid is in $1 (only if that pid is still $2), waiting up to 20 s
  local pidfile=$1 name=$2 pid=""
  [ -f "$pidfile" ] && pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || { echo "stop_cluster: stopped $name"; return 0; }; sleep 1; done
  kill -9 "$pid" 2>/dev/null; echo "stop_cluster: killed $name"
}
stop "$STATE/slurmd.pid" slurmd
stop "$STATE/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
