#!/usr/bin/env bash
# A test process killed with SIGKILL on the Docker path leaves no container
# and no process: runs a long integration test on a container broker,
# SIGKILLs the test binary while its broker serves it, and waits (20 s at
# most each) for the watchdogs to remove the container and to end the
# services the test started. Needs the binaries built (make build), the
# image (infra/docker/build.sh) and a Docker engine.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
mkdir -p target/docker
log=target/docker/sigkill-check.log
say() { printf 'docker/sigkill-check: %s\n' "$*" >&2; }
fail() { say "$*"; tail -n 20 "$log" >&2 || true; exit 1; }

# The containers of earlier runs go first (their watchdogs take a second or two).
for _ in $(seq 1 100); do
  [ -z "$(docker ps -aq --filter label=esk.test-pid)" ] && break
  sleep 0.2
done
[ -z "$(docker ps -aq --filter label=esk.test-pid)" ] || fail "containers of earlier test runs are still there"

# Writes under load for half a minute or more: long enough to be killed mid-run.
ESK_TEST_BROKER=docker ESK_TEST_NO_BUILD=1 cargo test --locked -q -p esk-tests --test it -- \
  writer::sigkill_mid_load_loses_nothing_acknowledged_and_splits_nothing >"$log" 2>&1 &
runner=$!
cid="" pid=""
for _ in $(seq 1 900); do
  read -r cid pid < <(docker ps --filter label=esk.test-pid --format '{{.ID}} {{.Label "esk.test-pid"}}' | head -n 1) || true
  [ -n "$cid" ] && break
  kill -0 "$runner" 2>/dev/null || fail "the test ended before its container ran"
  sleep 0.2
done
[ -n "$cid" ] || { kill "$runner" 2>/dev/null; fail "no container in 180 s"; }
# Mid-run: the broker serves and the test runs against it.
for _ in $(seq 1 600); do
  docker logs "$cid" 2>&1 | grep -q "Kafka Server started" && break
  [ -n "$(docker ps -q --filter "id=$cid")" ] || fail "container $cid ended before its broker started"
  sleep 0.2
done
# The processes the test started (its services) carry ESK_TEST_OWNER=<its pid>.
owned() {
  local e p
  for e in /proc/[0-9]*/environ; do
    if grep -qzxF "ESK_TEST_OWNER=$pid" "$e" 2>/dev/null; then
      p=${e#/proc/}
      printf '%s ' "${p%/environ}"
    fi
  done
}
# Mid-run also for its services: the writer the test started runs.
started=""
for _ in $(seq 1 300); do
  started=$(owned)
  [ -n "$started" ] && break
  kill -0 "$pid" 2>/dev/null || fail "test process $pid ended before it started a service"
  sleep 0.2
done
[ -n "$started" ] || fail "test process $pid started no service in 60 s"
sleep 1
kill -0 "$pid" 2>/dev/null || fail "test process $pid ended before it could be killed"
say "container $cid and process(es) ${started% } serve test process $pid: kill -9 $pid"
kill -9 "$pid"
wait "$runner" 2>/dev/null || true
gone=""
for _ in $(seq 1 100); do
  if [ -z "$(docker ps -aq --filter "id=$cid")" ]; then
    gone=yes
    break
  fi
  sleep 0.2
done
[ -n "$gone" ] || { docker ps -a >&2; fail "container $cid still there 20 s after its test process was killed"; }
say "the watchdog removed the container"
for _ in $(seq 1 100); do
  left=$(owned)
  if [ -z "$left" ]; then
    say "no process the test started runs"
    exit 0
  fi
  sleep 0.2
done
left=${left% }
ps -o pid,args -p "${left// /,}" >&2 || true
fail "processes the test started still run 20 s after it was killed: $left"
