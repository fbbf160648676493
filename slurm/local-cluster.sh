#!/usr/bin/env bash
# local-cluster.sh: a real SLURM cluster of one node on this machine, for the `slurm` tests and CI.
#
# Debian 12 (bookworm), as root; needs neither systemd nor cgroups. SLURM (22.05), MUNGE and, for
# accounting, MariaDB are installed from Debian's archive with apt-get the first time. Every daemon
# listens on 127.0.0.1 only. The script records the PID of each process it starts under
# /run/groupbench-slurm/ and stops only those processes.
#
#   bash slurm/local-cluster.sh start    install what is missing, write the configs, start the
#                                        daemons, wait until the node takes jobs (idempotent)
#   bash slurm/local-cluster.sh status   which daemons run, then `sinfo`; exit 1 if the controller
#                                        or the node daemon is not running
#   bash slurm/local-cluster.sh smoke    srun, sbatch --wait and sacct round trips
#   bash slurm/local-cluster.sh stop     cancel the jobs left, stop the daemons this script started
#   bash slurm/local-cluster.sh purge    stop, then delete the state, logs, accounting database and
#                                        the configs this script wrote (packages stay installed)
#
# What the cluster has:
#   partition `debug` (default): every CPU of the machine; a job that asks for no memory gets
#     DefMemPerCPU, not the whole node;
#   partition `low`: its jobs are preempted and requeued by jobs of `debug`, and receive their
#     --signal when preempted (submitit's USR2), so a test can watch a run checkpoint and resume;
#   accounting (slurmdbd + a private MariaDB), so that `sacct` works: submitit polls job states
#     with it, and without it a cancelled job leaves `job.result()` waiting forever.
#
# Environment (all optional):
#   GB_SLURM_CPUS          CPUs of the node (default: nproc)
#   GB_SLURM_MEM_MB        memory of the node in MB (default: 90 % of MemTotal)
#   GB_SLURM_ACCOUNTING    1 (default) or 0: no slurmdbd/MariaDB, no sacct
#   GB_SLURM_PREEMPT       1 (default) or 0: no `low` partition
#   GB_SLURM_FAKE_GPUS     N > 0 declares N `gpu` GRES without hardware, so that --gpus-per-node
#                          requests are scheduled on a CPU machine (default 0)
#   GB_SLURM_PORTS         "slurmctld slurmd slurmdbd mariadb" (default "6817 6818 6819 3307")
#   GB_SLURM_WAIT_S        seconds to wait for each daemon (default 60)
set -euo pipefail

NODE_CPUS=${GB_SLURM_CPUS:-$(nproc)}
NODE_MEM_MB=${GB_SLURM_MEM_MB:-$(awk '/^MemTotal:/ { printf "%d", $2 * 0.9 / 1024 }' /proc/meminfo)}
WITH_ACCOUNTING=${GB_SLURM_ACCOUNTING:-1}
WITH_PREEMPTION=${GB_SLURM_PREEMPT:-1}
FAKE_GPUS=${GB_SLURM_FAKE_GPUS:-0}
read -r PORT_CTLD PORT_SLURMD PORT_DBD PORT_DB <<<"${GB_SLURM_PORTS:-6817 6818 6819 3307}"
WAIT_S=${GB_SLURM_WAIT_S:-60}
CLUSTER_NAME=groupbench
MEM_PER_CPU=$(( NODE_MEM_MB / NODE_CPUS ))
(( MEM_PER_CPU > 2048 )) && MEM_PER_CPU=2048

PIDS=/run/groupbench-slurm
STATE=/var/lib/groupbench-slurm
LOGS=/var/log/groupbench-slurm
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
GRES_CONF=/etc/slurm/gres.conf
OWNED="# written by groupbench slurm/local-cluster.sh"
DB_PASSWORD=groupbench-local   # a throwaway database reachable from 127.0.0.1 only

STARTED_NS=$(date +%s%N)
say() {
  local ms=$(( ($(date +%s%N) - STARTED_NS) / 1000000 ))
  printf '[local-cluster %d.%ds] %s\n' $(( ms / 1000 )) $(( ms % 1000 / 100 )) "$*" >&2
}
fail() { say "error: $*"; exit 1; }

# ------------------------------------------------------------------------------------ processes
# running PID COMM: the process exists, is not a zombie and is named COMM (so a recycled PID that
# now belongs to something else is never taken for ours)
running() {
  local pid=${1:-} comm=$2
  [[ -n $pid && -r /proc/$pid/comm ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}
pid_of() { [[ -s $PIDS/$1.pid ]] && tr -dc '0-9' <"$PIDS/$1.pid" || true; }
ours_running() { running "$(pid_of "$1")" "$1"; }

# until DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds, for up to WAIT_S
until_ok() {
  local what=$1 deadline=$(( $(date +%s) + WAIT_S ))
  shift
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || fail "no $what after ${WAIT_S} s"
    sleep 0.2
  done
}

# halt COMM: SIGTERM the process this script started under that name, SIGKILL after 30 s
halt() {
  local comm=$1 pid i
  pid=$(pid_of "$comm")
  if running "$pid" "$comm"; then
    say "stopping $comm ($pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 150); do running "$pid" "$comm" || break; sleep 0.2; done
    if running "$pid" "$comm"; then
      say "$comm ($pid) still running after 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$PIDS/$comm.pid"
}

# ------------------------------------------------------------------------------------- packages
needed_packages() {
  local p=(slurmctld slurmd slurm-client munge)
  [[ $WITH_ACCOUNTING == 1 ]] && p+=(slurmdbd mariadb-server-core mariadb-client-core)
  echo "${p[@]}"
}

ensure_packages() {
  local absent=() p
  for p in $(needed_packages); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || absent+=("$p")
  done
  (( ${#absent[@]} )) || return 0
  say "apt-get install ${absent[*]}"
  # the packages' scripts would start munge themselves; this script starts every daemon itself
  local blocker=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    blocker=1
  fi
  local status=0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${absent[@]}" \
      >/tmp/groupbench-slurm-apt.log 2>&1 || status=$?
  (( blocker )) && rm -f /usr/sbin/policy-rc.d
  if (( status )); then tail -n 20 /tmp/groupbench-slurm-apt.log >&2; fail "apt-get install failed"; fi
}

# -------------------------------------------------------------------------------------- configs
# write_owned PATH MODE <CONTENT: install CONTENT at PATH; status 0 when the file changed. A file
# this script did not write is kept beside it as PATH.before-groupbench.
write_owned() {
  local path=$1 mode=$2 new
  new=$(mktemp)
  cat >"$new"
  if [[ -f $path ]] && cmp -s "$new" "$path"; then rm -f "$new"; return 1; fi
  if [[ -f $path ]] && ! grep -qF "$OWNED" "$path"; then
    cp -p "$path" "$path.before-groupbench"
    say "kept the existing $path as $path.before-groupbench"
  fi
  install -m "$mode" -o root -g root "$new" "$path"
  rm -f "$new"
}

slurm_conf() {
  cat <<EOF
$OWNED
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_SLURMD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after 5 s instead of the default 120 s
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
# no systemd, no cgroups: processes are tracked through /proc and tasks are not confined
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
# a scheduling pass every 2 s, so that pending and requeued jobs start soon
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
# 5 s from SIGTERM to SIGKILL (default 30 s): submitit jobs ignore SIGTERM
KillWait=5
MinJobAge=300
SlurmctldTimeout=120
SlurmdTimeout=300
Waittime=0
EOF
  if [[ $WITH_ACCOUNTING == 1 ]]; then
    printf 'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n'
    printf 'AccountingStoragePort=%s\n' "$PORT_DBD"
  else
    echo "AccountingStorageType=accounting_storage/none"
  fi
  local gres="" debug_extra=""
  if (( FAKE_GPUS > 0 )); then
    echo "GresTypes=gpu"
    gres="Gres=gpu:$FAKE_GPUS"
  fi
  if [[ $WITH_PREEMPTION == 1 ]]; then
    echo "PreemptType=preempt/partition_prio"
    echo "PreemptMode=REQUEUE"
    echo "# preemption also delivers the job's --signal, not only the approaching time limit"
    echo "SlurmctldParameters=preempt_send_user_signal"
    debug_extra="PriorityTier=10 PreemptMode=OFF"
  fi
  echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB $gres State=UNKNOWN"
  echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE DefMemPerCPU=$MEM_PER_CPU $debug_extra State=UP"
  if [[ $WITH_PREEMPTION == 1 ]]; then
    echo "PartitionName=low Nodes=localhost Default=NO MaxTime=INFINITE DefMemPerCPU=$MEM_PER_CPU PriorityTier=1 PreemptMode=REQUEUE GraceTime=30 State=UP"
  fi
}

gres_conf() {
  echo "$OWNED"
  (( FAKE_GPUS > 0 )) || return 0
  # slurmd ignores a gpu GRES without a device file: one character device per fake GPU, with
  # /dev/null's numbers (there is no hardware behind them)
  local i
  for i in $(seq 0 $(( FAKE_GPUS - 1 ))); do
    [[ -e $PIDS/fake-gpu$i ]] || mknod "$PIDS/fake-gpu$i" c 1 3 2>/dev/null || touch "$PIDS/fake-gpu$i"
  done
  if (( FAKE_GPUS == 1 )); then echo "Name=gpu File=$PIDS/fake-gpu0"
  else echo "Name=gpu File=$PIDS/fake-gpu[0-$(( FAKE_GPUS - 1 ))]"; fi
}

dbd_conf() {
  cat <<EOF
$OWNED
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$PIDS/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
}

CONFIG_CHANGED=0
write_configs() {
  mkdir -p /etc/slurm "$PIDS" "$STATE/ctld" "$STATE/slurmd" "$LOGS"
  chmod 755 "$PIDS"
  gres_conf | write_owned "$GRES_CONF" 644 && CONFIG_CHANGED=1
  slurm_conf | write_owned "$SLURM_CONF" 644 && CONFIG_CHANGED=1
  if [[ $WITH_ACCOUNTING == 1 ]]; then dbd_conf | write_owned "$DBD_CONF" 600 || true; fi
  return 0
}

# ---------------------------------------------------------------------------------------- munge
munge_answers() { munge -n </dev/null | unmunge >/dev/null; }

start_munge() {
  if ours_running munged; then return 0; fi
  if munge_answers 2>/dev/null; then
    say "using the munged already running (this script will not stop it)"
    return 0
  fi
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  until_ok "munged" munge_answers
  tr -dc '0-9' </run/munge/munged.pid >"$PIDS/munged.pid"
  say "munged up ($(pid_of munged))"
}

# ---------------------------------------------------------------------- accounting: db + slurmdbd
db() { mariadb --no-defaults --protocol=socket --socket="$PIDS/mariadb.sock" -uroot -N -e "$1"; }

start_database() {
  if ours_running mariadbd; then return 0; fi
  if [[ ! -d $STATE/mysql/mysql ]]; then
    mkdir -p "$STATE/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOGS/mariadb-install.log" 2>&1 \
      || { tail -n 20 "$LOGS/mariadb-install.log" >&2; fail "mariadb-install-db failed"; }
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
    --socket="$PIDS/mariadb.sock" --pid-file="$PIDS/mariadbd.pid" --bind-address=127.0.0.1 \
    --port="$PORT_DB" --skip-name-resolve --innodb-buffer-pool-size=256M \
    --innodb-lock-wait-timeout=900 --log-error="$LOGS/mariadbd.log" </dev/null >/dev/null 2>&1 &
  until_ok "MariaDB" db "SELECT 1"
  local host
  db "CREATE DATABASE IF NOT EXISTS slurm_acct_db"
  for host in 127.0.0.1 localhost; do
    db "CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY '$DB_PASSWORD';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$host'"
  done
  say "MariaDB up ($(pid_of mariadbd), 127.0.0.1:$PORT_DB)"
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; }

start_slurmdbd() {
  if ! ours_running slurmdbd; then
    /usr/sbin/slurmdbd
    until_ok "slurmdbd" sacctmgr -n -P list cluster format=cluster
    say "slurmdbd up ($(pid_of slurmdbd))"
  fi
  cluster_registered || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
}

# --------------------------------------------------------------------------- slurmctld + slurmd
controller_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# the node has registered with the controller since $1 (epoch seconds)
node_registered_since() {
  local t
  t=$(scontrol show node localhost 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
  [[ -n $t && $t != None ]] && (( $(date -d "$t" +%s 2>/dev/null || echo 0) >= $1 - 1 ))
}

# the node takes jobs; a DOWN or DRAIN state left by an unclean stop is resumed
node_takes_jobs() {
  case $(sinfo -h -n localhost -o '%T' 2>/dev/null) in
    idle | mixed | allocated | completing) return 0 ;;
    down | drained | draining) scontrol update nodename=localhost state=resume >/dev/null 2>&1 ;;
  esac
  return 1
}

start_slurm() {
  if (( CONFIG_CHANGED )) && { ours_running slurmctld || ours_running slurmd; }; then
    say "the configuration changed: restarting slurmctld and slurmd"
    halt slurmd
    halt slurmctld
  fi
  if ! ours_running slurmctld; then
    /usr/sbin/slurmctld
    until_ok "slurmctld" controller_up
    say "slurmctld up ($(pid_of slurmctld))"
  fi
  if ! ours_running slurmd; then
    local since
    since=$(date +%s)
    /usr/sbin/slurmd
    until_ok "slurmd registration" node_registered_since "$since"
    say "slurmd up ($(pid_of slurmd))"
  fi
  until_ok "an idle node in sinfo" node_takes_jobs
}

# ------------------------------------------------------------------------------------- commands
do_start() {
  ensure_packages
  write_configs
  start_munge
  if [[ $WITH_ACCOUNTING == 1 ]]; then
    start_database
    start_slurmdbd
  fi
  start_slurm
  say "ready: $(sinfo -h -o '%P %a %T %c CPUs %m MB' | tr '\n' ';')"
}

do_stop() {
  if ours_running slurmctld; then
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      say "cancelling jobs $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for i in $(seq 150); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  local comm
  for comm in slurmd slurmctld slurmdbd mariadbd munged; do halt "$comm"; done
  say "stopped"
}

do_status() {
  local comm rc=0
  for comm in munged mariadbd slurmdbd slurmctld slurmd; do
    if ours_running "$comm"; then
      echo "$comm: running ($(pid_of "$comm"))"
    else
      echo "$comm: not running (not started by this script)"
      [[ $comm == slurmctld || $comm == slurmd ]] && rc=1
    fi
  done
  sinfo 2>/dev/null || true
  return "$rc"
}

do_smoke() {
  local host job
  host=$(srun -N1 -n1 hostname)
  say "srun hostname: $host"
  job=$(sbatch --parsable --wait -o /dev/null --wrap='true')
  say "sbatch --wait: job $job ended"
  if [[ $WITH_ACCOUNTING == 1 ]]; then
    until_ok "COMPLETED for job $job in sacct" \
      bash -c "sacct -n -X -P -j '$job' -o State | grep -q COMPLETED"
    say "sacct: $(sacct -n -X -P -j "$job" -o JobID,State,ExitCode)"
  fi
}

do_purge() {
  do_stop
  rm -rf "$PIDS" "$STATE" "$LOGS"
  local f
  for f in "$SLURM_CONF" "$DBD_CONF" "$GRES_CONF"; do
    [[ -f $f ]] && grep -qF "$OWNED" "$f" && rm -f "$f"
  done
  say "state, logs, accounting database and configs removed"
}

command=${1:-}
case $command in
  start | stop | status | smoke | purge) ;;
  -h | --help | help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) echo "usage: bash $0 start|stop|status|smoke|purge" >&2; exit 2 ;;
esac
if [[ $command != status && $command != smoke && $(id -u) != 0 ]]; then
  fail "'$command' must run as root"
fi
"do_$command"
