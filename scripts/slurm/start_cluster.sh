#!/usr/bin/env bash
# A single-node Slurm cluster on this Debian machine (for tests and for trying scripts/train_slurm.sbatch):
# installs slurm-wlm and munge if missing, writes a munge key and a slurm.conf for this host's CPUs and
# memory (select/cons_tres, proctrack/linuxproc, no cgroups), starts munged, slurmctld and slurmd, and
# waits until the node is idle. Needs root. Stop it with scripts/slurm/stop_cluster.sh.
#   sudo bash scripts/slurm/start_cluster.sh        # then: sinfo; sbatch ...; squeue; scontrol show job N
# Environment: SLURM_STATE_DIR (logs, spool, state; default /var/lib/megatron_lite_slurm),
# SLURM_NO_INSTALL=1 (fail instead of running apt-get when Slurm is missing).
set -euo pipefail
CONF=/etc/slurm/slurm.conf
STATE=${SLURM_STATE_DIR:-/var/lib/megatron_lite_slurm}
MARK="# written by megatron_lite scripts/slurm/start_cluster.sh"

die() { echo "start_cluster: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (apt-get, munge key, /etc/slurm); run it with sudo."

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  [ "${SLURM_NO_INSTALL:-0}" = 1 ] && die "slurm-wlm/munge are not installed (SLURM_NO_INSTALL=1)."
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and this is not a Debian/Ubuntu machine."
  echo "start_cluster: installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# Never overwrite a real cluster's configuration.
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script: refusing to replace a real cluster's configuration."
fi
if scontrol ping >/dev/null 2>&1 && pgrep -x slurmd >/dev/null; then
  echo "start_cluster: already running"; sinfo; exit 0
fi

# munge: one key shared by every daemon and client (one node: just make sure it exists).
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)."

# slurm.conf for this host: `slurmd -C` reports CPUs, sockets, cores, threads and memory as slurmd sees them.
install -d -m 0755 "$STATE" "$STATE/ctld" "$STATE/slurmd" /etc/slurm
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST/")
CPUS=$(echo "$NODE" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
MEMORY=$(echo "$NODE" | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
MEM_PER_CPU=$(( MEMORY / CPUS ))  # a job without --mem gets memory for its CPUs, not the whole node
cat > "$CONF" <<CONF
$MARK
# A one-node cluster: controller and compute node are this host.
ClusterName=megatron-lite
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120; 10 keeps tests short).
AuthInfo=cred_expire=10
# No cgroups: linuxproc tracks a job's processes by parentage; no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$MEM_PER_CPU
# Keep finished jobs in scontrol for an hour (no slurmdbd here, so sacct has no database).
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
KillWait=30
ReturnToService=2
# Schedule every few seconds (defaults: 60 s, backfill 30 s): a requeued job starts again promptly.
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
CONF
# Slurm 22.05 reads cgroup.conf only for cgroup plugins; none are configured.

/usr/sbin/slurmctld
/usr/sbin/slurmd
for _ in $(seq 60); do
  if sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "start_cluster: node $HOST is up (config $CONF, logs and state in $STATE)"
    sinfo
    exit 0
  fi
  sleep 1
done
die "node $HOST did not come up in 60 s; see $STATE/slurmctld.log and $STATE/slurmd.log"
