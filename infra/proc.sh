# shellcheck shell=bash
# Process helpers shared by infra/platform.sh and infra/kafka/kafka.sh (sourced).

# Whether process PID runs, and (given WHAT) runs a command line containing
# WHAT. A zombie does not count: a killed process stays one until init reaps
# it, which on some machines takes a second or two, and `kill -0` succeeds on a
# zombie (`make up` right after a crash then waited on the dead process instead
# of starting a new one). Nor does a pid that a pid file outlived and another
# program now has.
pid_runs() { # pid [what]
  local pid=$1 what=${2:-} ps_out
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  ps_out=$(ps -ww -o stat= -o args= -p "$pid" 2>/dev/null) || return 1
  ps_out=${ps_out#"${ps_out%%[![:space:]]*}"}
  [[ -n $ps_out && $ps_out != Z* ]] || return 1
  [[ -z $what || $ps_out == *"$what"* ]]
}
