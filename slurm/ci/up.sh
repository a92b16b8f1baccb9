#!/usr/bin/env bash
# Bring up a real SLURM cluster on localhost for the test suite, from Debian 12's own packages,
# without systemd or cgroups.  Run as root, from any directory.  Idempotent: installs only what is
# missing, starts only daemons that are not running, and returns once every node is idle.
# Asking for a different configuration than the one running (node count, accounting, CPUs,
# partition, state dir) stops the running cluster with down.sh first, then starts the new one.
#
#   SLURM_CI_DIR         state, logs, pid files             (default /tmp/launcher-slurm-ci)
#   SLURM_CI_NODES       1: one node named $(hostname -s); N>1: fake nodes n1..nN     (default 2)
#   SLURM_CI_ACCOUNTING  1: mariadb + slurmdbd, so sacct and submitit's job.state work (default 1)
#   SLURM_CI_PART        partition name                                          (default debug)
#   SLURM_CI_CPUS        CPUs each node advertises                 (default max(nproc, 2))
#
# Output: redirect it to a file; do not pipe it into `head` (SIGPIPE would stop it halfway).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=$(realpath -m "${SLURM_CI_DIR:-/tmp/launcher-slurm-ci}")
NODES=${SLURM_CI_NODES:-2}
ACCT=${SLURM_CI_ACCOUNTING:-1}
PART=${SLURM_CI_PART:-debug}
NPROC=$(nproc)
CPUS=${SLURM_CI_CPUS:-$(( NPROC > 2 ? NPROC : 2 ))}
CONF=/etc/slurm/slurm.conf        # the compiled-in default: clients need no SLURM_CONF
DBDCONF=/etc/slurm/slurmdbd.conf
MARK='launcher-slurm-ci'          # tags every file line this script writes outside $D
DB=launcher_slurm_ci_acct         # our own accounting database (down.sh drops it)
T0=$(date +%s%N)
log() { echo "[up.sh +$(( ($(date +%s%N) - T0) / 1000000 ))ms] $*"; }
die() { echo "up.sh: $*" >&2; tail -n 20 "$D"/log/*.log >&2 2>/dev/null || true; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_NODES must be a positive integer, got '$NODES'"
[[ $ACCT == 0 || $ACCT == 1 ]] || die "SLURM_CI_ACCOUNTING must be 0 or 1, got '$ACCT'"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_CPUS must be a positive integer, got '$CPUS'"

# A pid file names a live process that really is that daemon (never trust a bare pid: reuse).
alive() { local pid; [[ -s $1 ]] || return 1; pid=$(<"$1"); [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]]; }
# Daemons fork and write their pid file a moment after the launching command returns.
wait_alive() { for _ in $(seq 100); do alive "$1" "$2" && return 0; sleep 0.1; done; die "$2 did not start (no live pid in $1)"; }
wait_for() { # $1=what, rest=command that must succeed within ~20 s
  local what=$1; shift; for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; die "$what not ready"
}

# ---- 1. packages (apt only when a command is missing) ----------------------------------------
PKGS=(slurmctld slurmd slurm-client munge); CMDS=(slurmctld slurmd sbatch sacct munged)
if (( ACCT )); then PKGS+=(slurmdbd mariadb-server); CMDS+=(slurmdbd mariadbd mariadb); fi
for c in "${CMDS[@]}"; do
  if ! command -v "$c" >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
    log "installed $(dpkg-query -W -f='${Package}=${Version} ' "${PKGS[@]}")"
    break
  fi
done

# ---- 2. the configuration we want ---------------------------------------------------------------
HOST=$(hostname -s)
if (( NODES == 1 )); then NODENAMES=("$HOST"); else mapfile -t NODENAMES < <(seq -f 'n%g' 1 "$NODES"); fi
MEM=$(free -m | awk '/^Mem:/{print int($2*0.9)}')
if (( NODES == 1 )); then
  NODELINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
else  # one slurmd per fake node, each on its own port, all on 127.0.0.1; each claims $CPUS CPUs
  NODELINES=$(for i in $(seq 1 "$NODES"); do
    echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000+i)) CPUs=$CPUS RealMemory=$((MEM/NODES)) State=UNKNOWN"
  done)
fi
if (( ACCT )); then
  ACCTCONF=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nAccountingStoragePort=6819'
else
  ACCTCONF='AccountingStorageType=accounting_storage/none'
fi
NEWCONF=$(cat <<EOF
# $MARK: written by slurm/ci/up.sh; dir=$D
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only cred_expire s after it ended (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups here: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# nodes advertise the CPUs/memory written below, whatever slurmd detects (else they drain)
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
$ACCTCONF
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$NODELINES
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

# ---- 3. a different configuration running? stop it first ---------------------------------------
if [[ -f $CONF ]] && [[ "$(<"$CONF")" != "$NEWCONF" ]]; then
  if head -n1 "$CONF" | grep -q "^# $MARK:"; then
    OLD_D=$(head -n1 "$CONF" | sed -n 's/.*dir=//p')
    log "configuration changed: stopping the running cluster (dir $OLD_D) with down.sh"
    SLURM_CI_DIR=$OLD_D bash "$HERE/down.sh" | sed 's/^/  /'
  else
    pid=$(sed -n 's/^SlurmctldPidFile=//p' "$CONF")
    if [[ -n $pid ]] && alive "$pid" slurmctld; then
      echo "up.sh: $CONF was not written by this script and its slurmctld is running: stop that cluster first" >&2
      exit 1
    fi
  fi
fi

# ---- 4. names must resolve (munge, srun, torch's MASTER_ADDR) -----------------------------------
missing=()
for n in "$HOST" "${NODENAMES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
if (( ${#missing[@]} )); then
  echo "127.0.0.1 ${missing[*]} # $MARK" >> /etc/hosts          # down.sh removes it
  log "added to /etc/hosts: 127.0.0.1 ${missing[*]}"
fi

# ---- 5. munge ---------------------------------------------------------------------------------
mkdir -p "$D"/{state,spool,log}
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key --force
chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge                 # systemd's RuntimeDirectory=
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if alive /run/munge/munged.pid munged; then
  log "munged already running (pid $(</run/munge/munged.pid))"
else
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged                          # forks, writes the pid file
  wait_alive /run/munge/munged.pid munged
  cp /run/munge/munged.pid "$D/munged.pid"                      # ours: down.sh may stop it
  log "munged started (pid $(</run/munge/munged.pid))"
fi
munge -n | unmunge >/dev/null || die "munge round trip failed"

# ---- 6. slurm.conf ------------------------------------------------------------------------------
if [[ ! -f $CONF ]] || [[ "$(<"$CONF")" != "$NEWCONF" ]]; then
  mkdir -p /etc/slurm
  printf '%s\n' "$NEWCONF" > "$CONF"
  log "wrote $CONF: ${#NODENAMES[@]} node(s) ${NODENAMES[*]}, CPUs=$CPUS each, accounting=$ACCT"
fi

# ---- 7. accounting: mariadb on a unix socket only, then slurmdbd (before slurmctld) -------------
if (( ACCT )); then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  touch "$D/log/mariadb.log"; chown mysql:mysql "$D/log/mariadb.log"   # mariadbd runs as mysql
  if alive /run/mysqld/mariadbd.pid mariadbd; then
    log "mariadbd already running (pid $(</run/mysqld/mariadbd.pid))"
  else
    setsid runuser -u mysql -- /usr/sbin/mariadbd --skip-networking \
      --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mariadbd.pid \
      --log-error="$D/log/mariadb.log" </dev/null >/dev/null 2>&1 &
    wait_alive /run/mysqld/mariadbd.pid mariadbd
    wait_for mariadb mariadb-admin ping
    cp /run/mysqld/mariadbd.pid "$D/mariadbd.pid"
    log "mariadbd started (pid $(</run/mysqld/mariadbd.pid))"
  fi
  cat > "$DBDCONF" <<EOF
# $MARK: written by slurm/ci/up.sh; dir=$D
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=$DB
PidFile=$D/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
EOF
  chmod 600 "$DBDCONF"                                          # slurmdbd refuses a readable one
  if alive "$D/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running (pid $(<"$D/slurmdbd.pid"))"
  else
    slurmdbd                                                    # daemonizes
    wait_alive "$D/slurmdbd.pid" slurmdbd
    wait_for slurmdbd sacctmgr -n list cluster
    log "slurmdbd started (pid $(<"$D/slurmdbd.pid"))"
  fi
fi

# ---- 8. slurmctld, then one slurmd per node ---------------------------------------------------
if alive "$D/slurmctld.pid" slurmctld; then
  log "slurmctld already running (pid $(<"$D/slurmctld.pid"))"
else
  slurmctld                                                     # daemonizes
  wait_alive "$D/slurmctld.pid" slurmctld
  log "slurmctld started (pid $(<"$D/slurmctld.pid"))"
fi
for n in "${NODENAMES[@]}"; do
  mkdir -p "$D/spool/slurmd-$n"
  if alive "$D/slurmd-$n.pid" slurmd; then
    log "slurmd $n already running (pid $(<"$D/slurmd-$n.pid"))"
  else
    if (( NODES == 1 )); then slurmd; else slurmd -N "$n"; fi
    wait_alive "$D/slurmd-$n.pid" slurmd
    log "slurmd $n started (pid $(<"$D/slurmd-$n.pid"))"
  fi
done

# ---- 9. ready: every node idle (or busy with jobs), and the cluster known to slurmdbd -----------
ready=0
for _ in $(seq 120); do
  states=$(sinfo -h -N -p "$PART" -o '%N %T' 2>/dev/null || true)
  if [[ -n $states ]] && (( $(grep -c -E ' (idle|mixed|allocated|completing)$' <<<"$states") == ${#NODENAMES[@]} )); then
    ready=1; break
  fi
  while read -r n; do                                    # left down/drained by a crash
    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
  done < <(awk '$2 ~ /^(down|drain)/ {print $1}' <<<"$states")
  sleep 0.5
done
(( ready )) || { sinfo -N -l >&2 || true; die "nodes not idle after 60 s"; }
if (( ACCT )); then
  wait_for "cluster 'ci' in slurmdbd" bash -c 'sacctmgr -n -P list cluster format=cluster | grep -qx ci'
fi
log "cluster ready: ${NODENAMES[*]} in partition $PART, accounting=$ACCT, state in $D"
sinfo
