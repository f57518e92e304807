#!/usr/bin/env bash
# A single-node SLURM on this machine, for the tests and for trying `kind: slurm` (README, "Running on a real cluster").
#   bash scripts/slurm.sh install        apt-get install slurm-wlm (once; as root, or with sudo)
#   bash scripts/slurm.sh start [DIR]    slurm.conf, state, spool and logs in DIR (default /tmp/mnist-kmeans-slurm);
#                                        slurmctld and slurmd started; waits until `sinfo` shows the node idle
#   bash scripts/slurm.sh stop [DIR]     cancels every job, stops both daemons (by the pids they wrote in DIR)
#   bash scripts/slurm.sh status [DIR]   sinfo and squeue
# Then `export SLURM_CONF=DIR/slurm.conf` (start prints it): sbatch, squeue and dask-jobqueue find this cluster.
# No systemd, nothing in /etc/slurm: auth/none and cred/none (no munge), so it is for one trusted machine only.
# The daemons listen on free ports of 127.0.0.1 only; they run as the current user, and so do the jobs.
set -euo pipefail
cmd=${1:-}
dir=$(realpath -m "${2:-/tmp/mnist-kmeans-slurm}")
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  local node mem_mb
  node=$(hostname -s)
  # below the machine's memory: slurmd refuses a node that reports less than it is configured with
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024))
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat >"$conf" <<EOF
# written by scripts/slurm.sh: a single-node cluster on loopback for tests
ClusterName=mnist-kmeans
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# seconds: a cancelled job's processes are killed soon, a node that stops answering is noticed soon
KillWait=2
MinJobAge=10
SlurmdTimeout=30
InactiveLimit=0
# bind to the addresses above (127.0.0.1), not to every interface: auth/none trusts whoever connects
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  command -v slurmctld >/dev/null || { echo "slurm.sh: slurmctld not found; run: bash scripts/slurm.sh install" >&2; exit 1; }
  if pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid"; then
    echo "slurm.sh: already running; export SLURM_CONF=$conf"
    return
  fi
  stop >/dev/null 2>&1 || true
  write_conf
  # -c: a clean state (no jobs of an earlier run); -i: ignore a state that does not match the conf
  slurmctld -c -i
  slurmd -N "$(hostname -s)"
  for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "slurm.sh: node $(hostname -s) idle; export SLURM_CONF=$conf"
      return
    fi
    sleep 0.1
  done
  echo "slurm.sh: the node did not become idle within 10 s; see $dir/log/" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  [ -f "$conf" ] || return 0
  scancel --user="$(id -un)" 2>/dev/null || true
  for daemon in slurmd slurmctld; do
    if pid_alive "$dir/$daemon.pid"; then
      kill "$(cat "$dir/$daemon.pid")"
      for _ in $(seq 50); do pid_alive "$dir/$daemon.pid" || break; sleep 0.1; done
    fi
    rm -f "$dir/$daemon.pid"
  done
  echo "slurm.sh: stopped"
}

case "$cmd" in
  install)
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq slurm-wlm >/dev/null
    ;;
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: bash scripts/slurm.sh install|start|stop|status [DIR]" >&2; exit 2 ;;
esac
