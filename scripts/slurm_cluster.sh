#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests and for trying the SLURM profile:
#   bash scripts/slurm_cluster.sh start [DIR]   # installs Debian's SLURM and munge if missing (root)
#   bash scripts/slurm_cluster.sh stop  [DIR]   # stops the daemons it started, by pid
# State, spool, pid and log files live in DIR (default /tmp/mechinterp-slurm); the config is linked
# from /etc/slurm/slurm.conf, where jobs look for it (the executor's job step clears SLURM_CONF).
# The partition is `debug`, the machine's cores and memory; there is no accounting daemon, so
# Snakemake needs `--slurm-status-command squeue` (the SLURM profile sets it).
set -euo pipefail

action=${1:-}
dir=$(realpath -m "${2:-/tmp/mechinterp-slurm}")
conf=/etc/slurm/slurm.conf

stop() {
  for daemon in slurmd slurmctld munged; do
    if [[ -f "$dir/$daemon.pid" ]]; then
      pid=$(cat "$dir/$daemon.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/$daemon.pid"
    fi
  done
  # the config link is ours only if it points into this cluster's folder
  if [[ -L "$conf" && "$(readlink "$conf")" == "$dir/slurm.conf" ]]; then rm -f "$conf"; fi
}

start() {
  if [[ $EUID -ne 0 ]]; then echo "slurm_cluster.sh: start needs root (it installs packages and starts daemons)" >&2; exit 2; fi
  if [[ -e "$conf" && ! ( -L "$conf" && "$(readlink "$conf")" == "$dir/slurm.conf" ) ]]; then
    echo "slurm_cluster.sh: $conf exists and is not this script's; is a real SLURM installed here? Not touching it." >&2
    exit 2
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge \
      >"$dir.apt.log" 2>&1 || { cat "$dir.apt.log" >&2; exit 1; }
  fi
  stop  # a cluster left running by an earlier start in this folder
  mkdir -p "$dir"/{state,spool,log}
  chown slurm:slurm "$dir"/{state,spool,log} 2>/dev/null || true

  # munge: the key exists once the package is installed; the daemon runs as user munge
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file /run/munge/munged.pid --force
  cp /run/munge/munged.pid "$dir/munged.pid"
  munge -n | unmunge >/dev/null

  host=$(hostname -s)
  hardware=$(slurmd -C | head -1)  # NodeName=... CPUs=... RealMemory=...
  cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$hardware")
  memory=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$hardware")
  memory=$(( memory * 95 / 100 ))  # a little under the machine's, or slurmd refuses the node
  cat >"$dir/slurm.conf" <<CONF
ClusterName=mechinterp
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  mkdir -p /etc/slurm
  ln -sfn "$dir/slurm.conf" "$conf"
  slurmctld
  slurmd
  for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "SLURM cluster up: partition debug, node $host ($cpus CPUs, $memory MB); folder $dir"
      return
    fi
    sleep 0.1
  done
  echo "slurm_cluster.sh: the node did not come up idle; logs in $dir/log" >&2
  sinfo >&2 || true
  exit 1
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash scripts/slurm_cluster.sh start|stop [DIR]" >&2; exit 2 ;;
esac
