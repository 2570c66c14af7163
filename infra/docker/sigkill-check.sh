#!/usr/bin/env bash
# A test process killed with SIGKILL on the Docker path leaves no container:
# runs one integration test on a container broker, SIGKILLs the test binary
# once its container runs, and waits (20 s at most) for the watchdog to
# remove the container. Needs the binaries built (make build) and the image
# (infra/docker/build.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
say() { printf 'docker/sigkill-check: %s\n' "$*" >&2; }

ESK_TEST_BROKER=docker ESK_TEST_NO_BUILD=1 cargo test --locked -q -p esk-tests --test it -- writer::tail_follows_new_events \
  >target/docker/sigkill-check.log 2>&1 &
runner=$!
cid=""
for _ in $(seq 1 900); do
  cid=$(docker ps -q --filter label=esk.test-pid | head -n 1)
  [ -n "$cid" ] && break
  kill -0 "$runner" 2>/dev/null || { say "the test ended before its container ran: see target/docker/sigkill-check.log"; exit 1; }
  sleep 0.2
done
[ -n "$cid" ] || { say "no container in 180 s"; kill "$runner" 2>/dev/null; exit 1; }
# Mid-run: the broker serves and the test runs against it.
for _ in $(seq 1 600); do
  docker logs "$cid" 2>&1 | grep -q "Kafka Server started" && break
  sleep 0.2
done
sleep 2
pid=$(docker inspect --format '{{ index .Config.Labels "esk.test-pid" }}' "$cid")
say "container $cid runs for test process $pid: kill -9 $pid"
kill -9 "$pid"
wait "$runner" 2>/dev/null || true
for _ in $(seq 1 100); do
  if [ -z "$(docker ps -aq --filter "id=$cid")" ]; then
    say "the watchdog removed the container"
    exit 0
  fi
  sleep 0.2
done
say "container $cid still there 20 s after its test process was killed"
docker ps -a >&2
exit 1
