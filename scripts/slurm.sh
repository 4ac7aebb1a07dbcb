#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on 127.0.0.1 for the `cluster` tests (and for trying
# `deep-repro submit` on one machine): munged + slurmctld + slurmd with their own config, key,
# state and logs under $DEEP_REPRO_SLURM_DIR, started as root (slurmd must be root to run jobs
# as their submitter). No accounting database: like many real clusters, `sacct` is unavailable.
#   scripts/slurm.sh start   -> prints the path of an env file (SLURM_CONF=...)
#   scripts/slurm.sh stop    -> stops what start started, by PID
set -euo pipefail
DIR="${DEEP_REPRO_SLURM_DIR:-/tmp/deep-repro-slurm-$(id -u)}"
SBIN=/usr/sbin

stop() {
  for name in slurmd slurmctld munged; do
    pidfile="$DIR/$name.pid"
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  if [ "$(id -u)" != 0 ]; then
    echo "scripts/slurm.sh: slurmd runs jobs as their user, so it must start as root" >&2
    exit 2
  fi
  for bin in munged slurmctld slurmd; do
    [ -x "$SBIN/$bin" ] || { echo "scripts/slurm.sh: $bin missing: apt-get install -y slurm-wlm munge" >&2; exit 2; }
  done
  stop
  rm -rf "$DIR"
  mkdir -p "$DIR"/{state,spool,munge}
  chmod 700 "$DIR/munge"
  head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  "$SBIN/munged" --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/seed"
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {print int($2/1024*0.8)}' /proc/meminfo)"
  cat > "$DIR/slurm.conf" <<CONF
ClusterName=deeprepro
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1024
CONF
  export SLURM_CONF="$DIR/slurm.conf"
  "$SBIN/slurmctld" -f "$SLURM_CONF"
  "$SBIN/slurmd" -f "$SLURM_CONF" -N localhost
  for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      printf 'SLURM_CONF=%s\n' "$SLURM_CONF" > "$DIR/env"
      echo "$DIR/env"
      return 0
    fi
    sleep 0.2
  done
  echo "scripts/slurm.sh: the node did not become idle; logs in $DIR" >&2
  tail -5 "$DIR"/slurmctld.log "$DIR"/slurmd.log >&2 || true
  stop
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
