#!/usr/bin/env bash
# A real single-node SLURM (with accounting) on this machine, for trying and testing
# `hydra/launcher=slurm`:   scripts/slurm_local.sh start | stop | status
#
# Needs root and Debian's packages (installed with apt-get when missing). Its state, logs and pid
# files live in $ACTLAB_SLURM_DIR (default /tmp/actlab-slurm); /etc/slurm/slurm.conf and
# slurmdbd.conf are links to the files there. `stop` ends only the daemons `start` started, by the
# pids they wrote. Exit status 3 from `start`: SLURM cannot be installed here (no root or no apt).
set -euo pipefail

DIR=${ACTLAB_SLURM_DIR:-/tmp/actlab-slurm}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)  # stop order

say() { echo "slurm_local: $*" >&2; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  if ! command -v apt-get >/dev/null; then
    say "cannot install ${missing[*]}: no apt-get here"
    exit 3
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { timeout 90 apt-get update -qq && timeout 240 apt-get install -y -qq \
    --no-install-recommends "${missing[@]}"; } >"$DIR/apt.log" 2>&1; then
    say "apt-get failed (see $DIR/apt.log)"
    exit 3
  fi
}

# A pid file left by daemons that died with the machine (a reboot, a restored snapshot) may name a
# pid reused by another process: only a live (not zombie) process running that daemon counts.
alive() {
  local pid
  pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
  [[ $(ps -o stat=,comm= -p "$pid" 2>/dev/null) =~ ^[^Z][^\ ]*\ +$1$ ]]
}

wait_for() { # seconds, description, command...
  local n=$(($1 * 10)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((n-- > 0)) || { say "timed out waiting for $what (logs in $DIR)"; return 1; }
    sleep 0.1
  done
}

link_conf() { # our file -> /etc/slurm/<name>, refusing to replace a site's own config
  local target=/etc/slurm/$1
  if [[ -e $target && ! -L $target ]]; then
    say "$target exists and is not ours: refusing to replace it"
    exit 1
  fi
  ln -sfn "$DIR/$1" "$target"
}

write_configs() {
  local node
  node=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]*/NodeName=localhost/' -e 's/ UpTime=.*//')
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=actlab
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job takes the node's whole memory and jobs run one at a time.
DefMemPerCPU=1000
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobCompType=jobcomp/none
# Accounting, so that a killed job is reported by sacct (submitit asks it) instead of waited on.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
MinJobAge=30
# A node set DOWN before a restart (say, "unexpectedly rebooted" after the machine's reboot) is
# usable again as soon as its slurmd registers.
ReturnToService=2
$node
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=actlab_slurm_acct
EOF
  chmod 600 "$DIR/slurmdbd.conf"
  mkdir -p /etc/slurm
  link_conf slurm.conf
  link_conf slurmdbd.conf
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0 # a munged already runs (not ours: stop leaves it alone)
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  [[ -s /etc/munge/munge.key ]] || { say "no /etc/munge/munge.key (reinstall munge)"; exit 1; }
  install -d -o munge -g munge "$DIR/munge"
  runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid"
  wait_for 10 munged test -s "$DIR/munge/munged.pid"
  ln -sfn "$DIR/munge/munged.pid" "$DIR/munged.pid"
  wait_for 10 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
  mkdir -p /run/mysqld
  if [[ ! -d $DIR/mysql/mysql ]]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql" --skip-test-db >"$DIR/mariadb-install.log" 2>&1
  fi
  mariadbd --user=root --datadir="$DIR/mysql" --skip-networking --socket=/run/mysqld/mysqld.sock \
    --pid-file="$DIR/mariadbd.pid" --log-error="$DIR/mariadbd.log" >/dev/null 2>&1 &
  wait_for 30 mariadbd mariadb --socket=/run/mysqld/mysqld.sock -e "select 1"
}

start() {
  if status >/dev/null; then
    say "already running (pid $(cat "$DIR/slurmctld.pid"))"
    return 0
  fi
  stop >/dev/null # a cluster with a daemon down (say, MariaDB: no sacct) starts afresh
  if [[ $(id -u) != 0 ]]; then
    say "needs root (it runs munged, MariaDB and the SLURM daemons)"
    exit 3
  fi
  mkdir -p "$DIR/state" "$DIR/spool"
  install_packages
  write_configs
  start_munge
  start_mariadb
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster actlab >/dev/null 2>&1 || true # exists already after a restart
  slurmctld
  slurmd -N localhost
  wait_for 60 "the controller" squeue -h
  cancel_leftovers
  wait_for 60 "the node to be idle" bash -c 'sinfo -h -o %T | grep -qx idle' ||
    { say "node localhost is $(sinfo -h -N -o '%T (reason: %E)')"; exit 1; }
  wait_for 30 "the cluster to be registered" bash -c 'sacctmgr -n -P list cluster format=cluster | grep -qx actlab'
  say "up: partition debug, node localhost ($(sinfo -h -o '%c CPUs, %m MB')); state in $DIR"
}

# Jobs the controller recovered from its saved state belong to daemons that are gone: slurmctld
# would requeue them and run them again, unasked, and they would keep the node from being idle.
cancel_leftovers() {
  local jobs
  jobs=$(squeue -h -o %A | paste -sd ' ')
  [[ -z $jobs ]] && return 0
  # shellcheck disable=SC2086
  scancel $jobs
  say "cancelled the jobs left from before the daemons stopped: $jobs"
}

stop() {
  local pid
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then
      pid=$(cat "$DIR/$d.pid")
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      say "stopped $d (pid $pid)"
    fi
    rm -f "$DIR/$d.pid"
  done
}

status() {
  local rc=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: not running"; rc=1; fi
  done
  alive slurmctld && sinfo
  return $rc
}

mkdir -p "$DIR"
case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
