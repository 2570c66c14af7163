#!/usr/bin/env bash
# make bench: esk's benchmarks, with Kafka's own tools on the same broker so
# every figure has its reference beside it.
#
# Builds the release binaries, uses KAFKA_BOOTSTRAP_SERVERS if set (else starts
# a broker of its own in a temp dir on a free port, stopped at the end), creates
# a fresh installation (prefix bench<time>), starts a writer, runs esk-bench,
# then ProducerPerformance and ConsumerPerformance. The report also goes to
# target/bench/<time>.txt.
#
#   BENCH_PARTITIONS  partitions of the installation (12)
#   BENCH_RECORDS     records for the reference tools (200000)
#   BENCH_SIZE        record size in bytes, for esk and the tools (200)
#   BENCH_PROJECTOR_EVENTS  backlog for the projector's catch-up (1000000)
#   BENCH_TRANSFERS   2PC transfers at 8 and 32 clients (a fifth at 1) (5000)
#   BENCH_ARGS        extra arguments for esk-bench (e.g. --read-events 0)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kafka=$repo/infra/kafka/kafka.sh
partitions=${BENCH_PARTITIONS:-12}
records=${BENCH_RECORDS:-200000}
size=${BENCH_SIZE:-200}
projector_events=${BENCH_PROJECTOR_EVENTS:-1000000}
transfers=${BENCH_TRANSFERS:-5000}
out_dir=$repo/target/bench
mkdir -p "$out_dir"
report=$out_dir/$(date -u +%Y%m%dT%H%M%SZ).txt

echo "building release binaries..." >&2
(cd "$repo" && cargo build --release --locked --workspace --bins -q)
bin=$repo/target/release

pids=()
home=$(mktemp -d /tmp/esk-bench-XXXXXX)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then ESK_HOME=$home "$kafka" stop 2>/dev/null || true; fi
  rm -rf "$home"
}
trap cleanup EXIT

if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  bootstrap=$KAFKA_BOOTSTRAP_SERVERS
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  ESK_HOME=$home ESK_KAFKA_PORT=$port "$kafka" start --watch-pid $$
  bootstrap=127.0.0.1:$port
fi
prefix=bench$(date +%s)
export KAFKA_BOOTSTRAP_SERVERS=$bootstrap ESK_TOPIC_PREFIX=$prefix ESK_DATA_DIR=$home/data

"$bin/esk" topics init --partitions "$partitions" >/dev/null
writer_http=127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ESK_WRITER_HTTP=$writer_http RUST_LOG=warn "$bin/esk-writer" 2>"$home/writer.log" &
pids+=($!)
coordinator_http=127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ESK_COORDINATOR_HTTP=$coordinator_http RUST_LOG=warn "$bin/esk-coordinator" 2>"$home/coordinator.log" &
pids+=($!)
for _ in $(seq 1 300); do
  serving=$(curl -fsS "http://$writer_http/health" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitions_serving"])' 2>/dev/null || echo 0)
  [ "$serving" = "$partitions" ] && break
  sleep 0.2
done

for _ in $(seq 1 300); do
  owned=$(curl -fsS "http://$coordinator_http/health" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitions_owned"])' 2>/dev/null || echo 0)
  [ "$owned" = "$partitions" ] && break
  sleep 0.2
done

{
  echo "# esk bench $(date -u +%FT%TZ): $(nproc) cores, broker $bootstrap, $partitions partitions, ${size} B records"
  echo
  # shellcheck disable=SC2086
  "$bin/esk-bench" --record-size "$size" --projector-bin "$bin/esk-projector" \
    --replica-bin "$bin/esk-replica" --writer-bin "$bin/esk-writer" \
    --projector-events "$projector_events" --transfers "$transfers" ${BENCH_ARGS:-}
  echo
  echo "## Kafka reference: ConsumerPerformance on the same category topic ($projector_events records)"
  "$kafka" tool ConsumerPerformance --bootstrap-server "$bootstrap" --topic "$prefix.events.account" \
    --num-records "$projector_events" --timeout 60000 2>&1 | tail -n 2
  echo
  echo "## Kafka reference: ProducerPerformance ($records x $size B, acks=all, idempotent)"
  "$kafka" tool TopicCommand --bootstrap-server "$bootstrap" --create --topic "$prefix.raw" \
    --partitions "$partitions" --replication-factor 1 >/dev/null
  "$kafka" tool ProducerPerformance --topic "$prefix.raw" --num-records "$records" \
    --record-size "$size" --throughput -1 \
    --producer-props bootstrap.servers="$bootstrap" acks=all enable.idempotence=true 2>&1 | tail -n 1
  echo
  echo "## Kafka reference: ConsumerPerformance (same topic)"
  "$kafka" tool ConsumerPerformance --bootstrap-server "$bootstrap" --topic "$prefix.raw" \
    --num-records "$records" --timeout 60000 2>&1 | tail -n 2
  echo
  echo "## writer metrics"
  curl -fsS "http://$writer_http/metrics" | grep -E "^esk_writer_(batches_total|records_total|events_total|aborts_total|batch_records_(sum|count)|transaction_seconds_(sum|count))"
} 2>&1 | tee "$report"
echo "report: $report" >&2
