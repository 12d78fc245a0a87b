#!/usr/bin/env bash
# A real single-node SLURM (slurmctld + slurmd + munged) on this machine, for CI and for trying the deploy/slurm
# recipes on a workstation: Debian bookworm, as root, no systemd, no cgroups (../shared/docs/ECOSYSTEM.md §4.2).
#   bash deploy/slurm/ci-single-node.sh start   # install the packages if missing, write slurm.conf, start, wait idle
#   bash deploy/slurm/ci-single-node.sh stop    # stop the daemons this script started (by pid file), wait for exit
# It never touches a SLURM it did not configure: an /etc/slurm/slurm.conf without our marker line stops it (exit 3).
set -euo pipefail
MARK="# written by gerelion deploy/slurm/ci-single-node.sh"
STARTED=/run/gerelion-ci-slurm.started   # the pid files of the daemons started here
cmd="${1:-start}"

stop() {
  [ -f "$STARTED" ] || { echo "nothing started by this script"; return 0; }
  # slurmd first, then slurmctld, then munged; wait for each (a quick restart otherwise races on the pid files)
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    grep -qx "$f" "$STARTED" || continue
    [ -f "$f" ] || continue
    pid=$(cat "$f"); kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  rm -f "$STARTED"
  echo "stopped"
}

start() {
  [ "$(id -u)" -eq 0 ] || { echo "needs root (writes /etc/slurm/slurm.conf, starts daemons)" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  if [ -f /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
    echo "/etc/slurm/slurm.conf exists and was not written by this script: not touching that SLURM" >&2; exit 3
  fi
  [ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  touch "$STARTED"
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    echo /run/munge/munged.pid >> "$STARTED"
  fi
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc); MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 80 / 100 ))
  cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=30
DefMemPerCPU=1024
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  if [ ! -f /run/slurmctld.pid ] || ! kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
    /usr/sbin/slurmctld; echo /run/slurmctld.pid >> "$STARTED"
  fi
  if [ ! -f /run/slurmd.pid ] || ! kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; then
    /usr/sbin/slurmd -N localhost; echo /run/slurmd.pid >> "$STARTED"
  fi
  for _ in $(seq 150); do [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break; sleep 0.2; done
  state=$(sinfo -h -o %T 2>/dev/null || true)
  [ "$state" = idle ] || { echo "the node is not idle (state '$state'); see /var/log/slurm/" >&2; exit 4; }
  echo "SLURM up: partition debug, node localhost, $NCPU CPUs, ${MEM} MB"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
