#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (Debian's slurmctld, slurmd and munge) for trying and testing
# the SLURM scripts: `.ci/run` starts it before the tests. Needs root (apt-get, daemons).
#
#   sudo launch/slurm/local_cluster.sh start     # install if missing, configure under $SLURM_LOCAL_DIR, start
#   launch/slurm/local_cluster.sh status
#   sudo launch/slurm/local_cluster.sh stop
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/bonedist-slurm}
CONF=/etc/slurm/slurm.conf

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
}

configure() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$DIR"/{state,spool,log} /etc/slurm
  cat > "$CONF" <<EOF
ClusterName=bonedist-local
SlurmctldHost=${host}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if [ ! -f /etc/munge/munge.key ]; then
    mungekey -c 2>/dev/null || /usr/sbin/mungekey -c
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c /usr/sbin/munged
  fi
}

start() {
  install
  configure
  start_munge
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -q -E '^idle|^mix|^alloc'; then
      scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
      echo "slurm is up: $(sinfo -h -o '%P %D %T %C')"
      return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; logs in ${DIR}/log" >&2
  tail -n 20 "${DIR}"/log/*.log >&2 || true
  return 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
