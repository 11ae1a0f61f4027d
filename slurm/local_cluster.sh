#!/bin/bash
# A real Slurm cluster on this one machine, for rehearsing the cluster path (tests, CI, a laptop with root):
# Debian's slurmctld + N slurmd "virtual nodes" (n1..nN, each on its own port) + munge, started in the
# foreground-backgrounded way (no systemd needed) and stopped by the PIDs this script recorded, never by name.
#
#   slurm/local_cluster.sh up [--nodes N] [--dir DIR]   # installs the Debian packages if missing; prints SLURM_CONF
#   slurm/local_cluster.sh down [--dir DIR]
#   slurm/local_cluster.sh status [--dir DIR]
#
# Then: export SLURM_CONF=DIR/slurm.conf; sbatch --wait --nodes=2 slurm/asyncopd_70b.sh experiment=cluster_tiny
# DIR (default /tmp/asyncopd-slurm) holds slurm.conf, state, spool, logs and the PIDs; keep it short (Ray's
# AF_UNIX socket paths must stay under 108 bytes). Ports: slurmctld ASYNCOPD_SLURMCTLD_PORT (6817), node i on
# ASYNCOPD_SLURMD_PORT + i (6900 + i): below Ray's worker port range (10002-19999).
set -euo pipefail

cmd=${1:-}
shift || true
nodes=2
dir=/tmp/asyncopd-slurm
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    *) echo "local_cluster.sh: unknown argument $1 (use up [--nodes N] [--dir DIR] | down | status)" >&2; exit 2 ;;
  esac
done
conf=$dir/slurm.conf
ctld_port=${ASYNCOPD_SLURMCTLD_PORT:-6817}
slurmd_port=${ASYNCOPD_SLURMD_PORT:-6900}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "local_cluster.sh: Slurm is not installed and this is not root: apt-get install slurmctld slurmd" \
         "slurm-client munge" >&2
    exit 2
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge \
    >"$dir/log/apt.log" 2>&1 || { echo "local_cluster.sh: apt-get failed, see $dir/log/apt.log" >&2; exit 1; }
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged already runs (ours from an earlier `up`, or the machine's)
  fi
  [ -f /etc/munge/munge.key ] || mungekey --create >/dev/null
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$dir/munged.pid"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "local_cluster.sh: munged did not come up" >&2
  exit 1
}

write_conf() {
  local cpus mem names i
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / nodes ))
  names=$(seq -s, -f "n%g" 1 "$nodes")
  cat >"$conf" <<EOF
ClusterName=asyncopd
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd-%n.daemon.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=60
EOF
  for i in $(seq 1 "$nodes"); do
    echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((slurmd_port + i)) CPUs=$cpus" \
         "RealMemory=$mem State=UNKNOWN" >>"$conf"
  done
  echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP" >>"$conf"
}

stop_pid_file() {  # TERM, then KILL after 5 s, the process a PID file names
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

case "$cmd" in
  up)
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
      echo "local_cluster.sh: a cluster already runs from $dir (slurm/local_cluster.sh down --dir $dir first)" >&2
      exit 2
    fi
    mkdir -p "$dir/state" "$dir/log" "$dir/spool"
    install_packages
    start_munge
    write_conf
    export SLURM_CONF=$conf
    slurmctld -D -f "$conf" >"$dir/log/slurmctld.out" 2>&1 &
    echo $! >"$dir/slurmctld.pid"
    for i in $(seq 1 "$nodes"); do
      mkdir -p "$dir/spool/n$i"
      slurmd -D -N "n$i" -f "$conf" >"$dir/log/slurmd-n$i.out" 2>&1 &
      echo $! >"$dir/slurmd-n$i.pid"
    done
    for _ in $(seq 300); do
      idle=$(sinfo -h -N -o %T 2>/dev/null | grep -c '^idle' || true)
      if [ "$idle" = "$nodes" ]; then
        echo "export SLURM_CONF=$conf   # $nodes idle node(s): $(seq -s, -f "n%g" 1 "$nodes")"
        exit 0
      fi
      sleep 0.1
    done
    echo "local_cluster.sh: the nodes did not come up idle in 30 s (sinfo: $(sinfo -h -N -o '%N %T' 2>&1 | tr '\n' ' ')); logs in $dir/log" >&2
    exit 1
    ;;
  down)
    for f in "$dir"/slurmd-n*.pid; do stop_pid_file "$f"; done
    stop_pid_file "$dir/slurmctld.pid"
    stop_pid_file "$dir/munged.pid"
    echo "local Slurm cluster in $dir stopped"
    ;;
  status)
    SLURM_CONF=$conf sinfo -N
    ;;
  *)
    echo "usage: slurm/local_cluster.sh up [--nodes N] [--dir DIR] | down [--dir DIR] | status [--dir DIR]" >&2
    exit 2
    ;;
esac
