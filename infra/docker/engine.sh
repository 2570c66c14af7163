#!/usr/bin/env bash
# A Docker engine for the tests' Docker path, that sends nothing beyond
# loopback: dockerd with no bridge and no iptables rules (containers run on
# the host's network and listen on 127.0.0.1).
#
#   infra/docker/engine.sh start   start dockerd unless an engine answers (waits up to 60 s)
#   infra/docker/engine.sh stop    stop the dockerd that `start` started (none other),
#                                  removing test containers (and compose test
#                                  projects' volumes) a failed run left
#   infra/docker/engine.sh clean   fail, naming them, if containers or compose test
#                                  volumes are left (docker ps -a)
#
# The pid of a dockerd it started: target/docker/dockerd.pid; its log:
# target/docker/dockerd.log.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=$repo/target/docker
pidfile=$work/dockerd.pid
say() { printf 'docker/engine: %s\n' "$*" >&2; }

answers() { docker info >/dev/null 2>&1; }

case "${1:-}" in
start)
  if answers; then
    say "a Docker engine answers already"
    exit 0
  fi
  command -v dockerd >/dev/null || { say "no dockerd (Debian: apt-get install docker.io)"; exit 1; }
  mkdir -p "$work"
  sudo_=""
  [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ setsid dockerd --bridge=none --iptables=false --ip-masq=false >"$work/dockerd.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 1 300); do
    answers && { say "dockerd started (pid $(cat "$pidfile"))"; exit 0; }
    sleep 0.2
  done
  say "dockerd did not answer in 60 s: see $work/dockerd.log"
  tail -n 20 "$work/dockerd.log" >&2 || true
  exit 1
  ;;
stop)
  [ -f "$pidfile" ] || exit 0
  pid=$(cat "$pidfile")
  # A run that failed half way may leave test containers whose watchdogs
  # cannot remove them once the engine is gone: they go now.
  left=$( {
    docker ps -aq --filter label=esk.test-pid
    docker ps -a --format '{{.ID}} {{.Label "com.docker.compose.project"}}' | awk '$2 ~ /^esk-test-/ { print $1 }'
  } 2>/dev/null || true)
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    docker rm -f -v $left >/dev/null 2>&1 || true
    say "removed $(echo "$left" | wc -w) test container(s) left behind"
  fi
  volumes=$(docker volume ls --format '{{.Name}} {{.Label "com.docker.compose.project"}}' 2>/dev/null |
    awk '$2 ~ /^esk-test-/ { print $1 }' || true)
  # shellcheck disable=SC2086
  [ -z "$volumes" ] || docker volume rm $volumes >/dev/null 2>&1 || true
  kill -TERM "$pid" 2>/dev/null || sudo kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  rm -f "$pidfile"
  say "dockerd stopped"
  ;;
clean)
  left=$(docker ps -a --format '{{.Names}} ({{.Image}}, {{.Status}})')
  volumes=$(docker volume ls --format '{{.Name}} {{.Label "com.docker.compose.project"}}' |
    awk '$2 ~ /^esk-test-/ { print $1 }')
  if [ -n "$left$volumes" ]; then
    say "left behind:"
    [ -z "$left" ] || printf '%s\n' "$left" >&2
    # shellcheck disable=SC2086
    [ -z "$volumes" ] || printf 'volume %s\n' $volumes >&2
    exit 1
  fi
  say "no container and no test volume left"
  ;;
*)
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
  ;;
esac
