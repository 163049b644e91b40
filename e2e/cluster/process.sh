# shellcheck shell=bash disable=SC2153  # STATE, SOCK, PIDS, LOGS, PKI and the rest come from e2e/cluster.sh
# Processes of the harness, started and stopped by their recorded PID only; sourced by e2e/cluster.sh.

# starttime <pid>: the process' start time in clock ticks; empty when it is gone or a zombie
starttime() { sed -n 's/^.*) \([^Z]\) .*$/&/p' "/proc/$1/stat" 2>/dev/null | sed 's/^.*) //' | cut -d' ' -f20; }

# alive <name>: the recorded PID runs and is the same process (same start time), not a reused PID
alive() {
  local f=$PIDS/$1.pid pid st
  [ -f "$f" ] || return 1
  read -r pid st <"$f" || return 1
  [ -n "$pid" ] && [ "$(starttime "$pid")" = "$st" ]
}

start_bg() { # start_bg <name> <cmd...>
  local name=$1; shift
  mkdir -p "$PIDS" "$LOGS"
  # Only stdin, stdout and stderr reach the component: a lock the caller holds (the harness' own on fd
  # 9, or a `flock FILE cmd` around a test run) must not be inherited by what outlives the caller.
  (
    for fd in "/proc/$BASHPID/fd"/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
    done
    exec nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null
  ) &
  local pid=$!
  echo "$pid $(starttime $pid)" >"$PIDS/$name.pid"
  # the command line, so that start-component can start exactly this process again
  printf '%q ' "$@" >"$PIDS/$name.cmd"
}

stop_many() { # stop_many [-w <secs>] <name...>: SIGTERM all, wait up to 10 s (or secs) for all, then SIGKILL the rest
  local name pid st waiting grace=10
  if [ "${1:-}" = -w ]; then grace=$2; shift 2; fi
  for name in "$@"; do
    alive "$name" || continue
    read -r pid st <"$PIDS/$name.pid"
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq $((grace * 10))); do
    waiting=0
    for name in "$@"; do alive "$name" && waiting=1; done
    [ $waiting = 0 ] && break
    sleep 0.1
  done
  for name in "$@"; do
    if alive "$name"; then
      read -r pid st <"$PIDS/$name.pid"
      log "$name ($pid) ignored SIGTERM for $grace s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    rm -f "$PIDS/$name.pid"
  done
}

wait_for() { # wait_for <secs> <what> <log name|-> <cmd...>
  local t=$1 what=$2 name=$3; shift 3
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ "$name" != - ] && ! alive "$name"; then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$name exited while waiting for $what (log: $LOGS/$name.log)"
    fi
    if [ $SECONDS -ge $end ]; then
      [ "$name" != - ] && tail -n 30 "$LOGS/$name.log" >&2
      die "timeout after ${t}s waiting for $what${name:+ (log: $LOGS/$name.log)}"
    fi
    sleep 0.2
  done
}
