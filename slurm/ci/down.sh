#!/usr/bin/env bash
# Stop what slurm/ci/up.sh started and forget its state, so the next up.sh starts from scratch
# (job ids start at 1 again).  Run as root, from any directory.  Idempotent: safe when nothing runs.
# Daemons are stopped by pid (pid file + /proc/PID/comm check), never by name; munged and mariadbd
# only when up.sh started them.  Logs in $SLURM_CI_DIR/log are kept.
#   SLURM_CI_DIR  the state dir up.sh used                     (default /tmp/launcher-slurm-ci)
set -uo pipefail
D=$(realpath -m "${SLURM_CI_DIR:-/tmp/launcher-slurm-ci}")
MARK='launcher-slurm-ci'
DB=launcher_slurm_ci_acct

stop() { # pairs of (pid file, expected comm): TERM them all at once, wait up to 15 s, then KILL
  local pids=() names=() pid i
  while (( $# )); do
    if [[ -s $1 ]]; then
      pid=$(<"$1")
      if [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]]; then
        kill -TERM "$pid"; pids+=("$pid"); names+=("$2")
      fi
    fi
    rm -f "$1"; shift 2
  done
  (( ${#pids[@]} )) || return 0
  gone() { for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && return 1; done; return 0; }
  for _ in $(seq 150); do gone && break; sleep 0.1; done
  for i in "${!pids[@]}"; do
    if [[ -d /proc/${pids[$i]} ]]; then echo "down.sh: ${names[$i]} (pid ${pids[$i]}) ignored TERM for 15 s: KILL"; kill -KILL "${pids[$i]}"; fi
    echo "down.sh: stopped ${names[$i]} (pid ${pids[$i]})"
  done
  for _ in $(seq 50); do gone && break; sleep 0.1; done
}
ours() { [[ -s $1 && -s $2 ]] && [[ $(<"$1") == $(<"$2") ]]; }   # recorded pid == live pid?
alive_pidfile() { local pid; [[ -s $1 ]] && pid=$(<"$1") && [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]]; }

# 1. cancel jobs while the daemons still run, so job processes and slurmstepd exit cleanly
if alive_pidfile "$D/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null)
  if [[ -n $jobs ]]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 150); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.2; done
    echo "down.sh: cancelled jobs ${jobs//$'\n'/ }"
  fi
fi

# 2. slurm daemons, then the accounting database and the helpers up.sh started
#    (each takes 2-3 s to exit on TERM: stop them together; their state is thrown away anyway)
daemons=()
for f in "$D"/slurmd-*.pid; do [[ -e $f ]] && daemons+=("$f" slurmd); done
stop "${daemons[@]}" "$D/slurmctld.pid" slurmctld "$D/slurmdbd.pid" slurmdbd
if [[ -S /run/mysqld/mysqld.sock ]] && command -v mariadb >/dev/null; then
  mariadb -e "DROP DATABASE IF EXISTS $DB" 2>/dev/null || true   # job ids restart at 1 next time
fi
ours "$D/mariadbd.pid" /run/mysqld/mariadbd.pid && stop /run/mysqld/mariadbd.pid mariadbd
ours "$D/munged.pid" /run/munge/munged.pid && stop /run/munge/munged.pid munged
rm -f "$D/munged.pid" "$D/mariadbd.pid"

# 3. what up.sh wrote outside $D: /etc/hosts line (rewritten in place: it may be a bind mount),
#    and its config files (only those it wrote, only if they point at this dir)
if grep -q "# $MARK\$" /etc/hosts; then
  h=$(grep -v "# $MARK\$" /etc/hosts); printf '%s\n' "$h" > /etc/hosts
  echo "down.sh: removed the /etc/hosts line"
fi
for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
  [[ -f $f ]] && [[ $(head -n1 "$f") == "# $MARK: written by slurm/ci/up.sh; dir=$D" ]] && rm -f "$f"
done

# 4. state (jobs, node spools); logs stay for post-mortems
rm -rf "$D/state" "$D/spool"
echo "down.sh: done (logs kept in $D/log)"
