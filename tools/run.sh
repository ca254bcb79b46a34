#!/usr/bin/env bash
# The seed's deployment script (bin/run.sh) for hosts without containers: one `jobworker worker`
# per SERVICE_HOME, started in the background, stopped by a drain.
#
#   export SERVICE_HOME=/home/ec2-user/capshome/job-system/job-worker-app
#   export PROFILES_ACTIVE=live                  # default: local
#   $SERVICE_HOME/run.sh start|stop|status|restart
#
# SERVICE_HOME (default: the folder this script is in) holds
#   libs/    job_worker_app-<version>-*.whl, plus its dependencies' wheels for a host without an
#            index (`pip wheel '.[fast]' -w libs`; then set PIP_NO_INDEX=1)
#   config/  external application.toml / application-<profile>.toml (optional)
#   run/     jobworker.pid, jobworker.port, and the worker's remembered last port
#   logs/    jobworker.log (appended to by every start)
#   venv/    made by `start` from libs/, and made again when the wheels in libs/ change
#
# Environment: PROFILES_ACTIVE (the profile, passed on as PROFILE); PYTHON (the interpreter the
# venv is made with, 3.11+; default python3); START_TIMEOUT (seconds to wait for the gRPC port,
# default 30); STOP_TIMEOUT (seconds to wait for the drain before SIGKILL, default 75: above the
# live profile's 60 s drain grace). REDIS_URL, JOBWORKER_* and pip's PIP_* pass through.
#
# Exit codes: 0 done; 1 failed (or stop had to SIGKILL); 2 usage. `status` follows LSB:
# 0 running, 1 not running but a stale PID file, 3 stopped.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
service_home=${SERVICE_HOME:-$script_dir}
[[ -d $service_home ]] || { echo "jobworker: SERVICE_HOME $service_home is not a folder" >&2; exit 1; }
service_home=$(cd "$service_home" && pwd)
profile=${PROFILES_ACTIVE:-local}
python=${PYTHON:-python3}
start_timeout=${START_TIMEOUT:-30}
stop_timeout=${STOP_TIMEOUT:-75}

libs=$service_home/libs
config_dir=$service_home/config
run_dir=$service_home/run
logs_dir=$service_home/logs
venv=$service_home/venv
pid_file=$run_dir/jobworker.pid
port_file=$run_dir/jobworker.port
log_file=$logs_dir/jobworker.log

say() { echo "jobworker: $*"; }
fail() {
  echo "jobworker: $*" >&2
  exit 1
}

# The PID in the PID file when that process is alive and is a jobworker (not a reused PID).
running_pid() {
  local pid state cmdline
  [[ -r $pid_file ]] || return 1
  pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r /proc/$pid/stat ]]; then
    # an exited process that its new parent has not reaped yet is gone for our purposes
    state=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$pid/stat" 2>/dev/null || true)
    [[ $state != Z ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  else
    cmdline=$(ps -o args= -p "$pid" 2>/dev/null || true)
  fi
  [[ $cmdline == *jobworker* ]] || return 1
  echo "$pid"
}

is_alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(sed 's/^.*) \(.\).*$/\1/' "/proc/$1/stat" 2>/dev/null || true)
  [[ $state != Z ]]
}

# The venv is made again only when the set of wheels in libs/ changes, so a restart is quick.
ensure_venv() {
  local wheels=() stamp
  shopt -s nullglob
  wheels=("$libs"/job_worker_app-*.whl)
  shopt -u nullglob
  ((${#wheels[@]} > 0)) || fail "no job_worker_app-*.whl in $libs (build one: pip wheel . --no-deps -w $libs)"
  ((${#wheels[@]} == 1)) || fail "${#wheels[@]} job_worker_app wheels in $libs; keep one"
  stamp=$(cd "$libs" && stat -c "%n %s %Y" -- *.whl | sha1sum | cut -c1-16)
  if [[ -x $venv/bin/jobworker && -r $venv/.libs-stamp && $(<"$venv/.libs-stamp") == "$stamp" ]]; then
    return 0
  fi
  say "making $venv from $(basename "${wheels[0]}")"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$python is older than Python 3.11 (set PYTHON)"
  rm -rf "$venv"
  "$python" -m venv "$venv" || fail "could not make a venv with $python (Debian: apt-get install python3-venv)"
  # deps from libs/ first, then the index unless PIP_NO_INDEX=1; the [fast] extra is uvloop
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --find-links "$libs" "${wheels[0]}[fast]" \
    || fail "could not install ${wheels[0]} into $venv (offline? put the dependencies' wheels in libs/ and set PIP_NO_INDEX=1)"
  echo "$stamp" >"$venv/.libs-stamp"
}

# What this start has written to the log so far (the log is shared by every start).
log_since() { tail -c "+$(($1 + 1))" "$log_file" 2>/dev/null || true; }

start() {
  local pid offset port deadline new
  if pid=$(running_pid); then
    say "already running (pid $pid); not starting another"
    return 0
  fi
  [[ -d $libs ]] || fail "$service_home has no libs/ folder (set SERVICE_HOME)"
  ensure_venv
  mkdir -p "$run_dir" "$logs_dir"
  rm -f "$pid_file" "$port_file"
  echo "==== $(date '+%Y-%m-%dT%H:%M:%S%z') run.sh start: profile $profile" >>"$log_file"
  offset=$(stat -c %s "$log_file")
  local env_args=(PROFILE="$profile" XDG_STATE_HOME="$run_dir")
  [[ -d $config_dir ]] && env_args+=(JOBWORKER_CONFIG_DIR="$config_dir")
  # from SERVICE_HOME, as a daemon would, whatever folder run.sh was called from; nohup and
  # env both exec, so $! is the worker's own PID
  cd "$service_home"
  nohup env "${env_args[@]}" "$venv/bin/jobworker" worker >>"$log_file" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"

  local port_re='->SVC::gRPC server started on port ([0-9]+)'
  deadline=$((SECONDS + start_timeout))
  port=
  while :; do
    new=$(log_since "$offset")
    if [[ -z $port && $new =~ $port_re ]]; then
      port=${BASH_REMATCH[1]}
    fi
    if [[ -n $port && $new == *"worker ready"* ]]; then
      break
    fi
    if ! is_alive "$pid"; then
      rm -f "$pid_file"
      log_since "$offset" | tail -n 20 >&2
      fail "exited during start; see $log_file"
    fi
    if ((SECONDS >= deadline)); then
      log_since "$offset" | tail -n 20 >&2
      kill -TERM "$pid" 2>/dev/null || true
      fail "not ready within ${start_timeout}s (pid $pid sent SIGTERM); see $log_file"
    fi
    sleep 0.2
  done
  echo "$port" >"$port_file"
  say "started (pid $pid, port $port, profile $profile); log: $log_file"
}

stop() {
  local pid deadline
  if ! pid=$(running_pid); then
    if [[ -e $pid_file ]]; then
      say "not running (removing the stale $pid_file)"
    else
      say "not running"
    fi
    rm -f "$pid_file" "$port_file"
    return 0
  fi
  say "SIGTERM to pid $pid; waiting up to ${stop_timeout}s for the drain"
  kill -TERM "$pid"
  deadline=$((SECONDS + stop_timeout))
  while is_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$pid_file" "$port_file"
      echo "jobworker: pid $pid did not drain within ${stop_timeout}s: sent SIGKILL." \
        "Its running jobs were lost and its PodInfo key stays until its TTL runs out." >&2
      return 1
    fi
    sleep 0.2
  done
  rm -f "$pid_file" "$port_file"
  say "stopped (pid $pid drained and exited)"
}

status() {
  local pid port host health
  if pid=$(running_pid); then
    port=$(cat "$port_file" 2>/dev/null || true)
    if [[ -z $port ]]; then
      # the last port the log reported, for a worker started by an older run.sh
      port=$(grep -o -- '->SVC::gRPC server started on port [0-9]*' "$log_file" 2>/dev/null \
        | tail -n 1 | grep -o '[0-9]*$' || true)
    fi
    host=${JOBWORKER_GRPC__HOST:-127.0.0.1}
    [[ $host != 0.0.0.0 && $host != "::" ]] || host=127.0.0.1
    health=
    if [[ -n $port && -x $venv/bin/jobworker ]]; then
      health=$("$venv/bin/jobworker" health --target "$host:$port" --timeout 3 2>/dev/null || true)
    fi
    say "running (pid $pid, port ${port:-unknown}, health ${health:-unknown})"
    return 0
  fi
  if [[ -e $pid_file ]]; then
    say "not running, but $pid_file remains (pid $(<"$pid_file"))"
    return 1
  fi
  say "stopped"
  return 3
}

(($# == 1)) || usage
case $1 in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart)
    # a stop that had to SIGKILL has still stopped the worker: start anyway
    stop || true
    start
    ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
