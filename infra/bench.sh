#!/usr/bin/env bash
# make bench: esk's benchmarks, and Kafka's own tools on the same broker so every
# figure has its reference beside it.
#
# Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts a local broker of its own in a
# temp dir (on a free port) and stops it at the end. Results go to stdout and to
# target/bench/<date>.txt.
#
#   BENCH_RECORDS   records for the reference tools (200000)
#   BENCH_SIZE      record size in bytes (200)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kafka=$repo/infra/kafka/kafka.sh
records=${BENCH_RECORDS:-200000}
size=${BENCH_SIZE:-200}
out_dir=$repo/target/bench
mkdir -p "$out_dir"
report=$out_dir/$(date -u +%Y%m%dT%H%M%SZ).txt

if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  bootstrap=$KAFKA_BOOTSTRAP_SERVERS
else
  home=$(mktemp -d /tmp/esk-bench-kafka-XXXXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export ESK_HOME=$home ESK_KAFKA_PORT=$port ESK_KAFKA_EPHEMERAL=1
  "$kafka" start --watch-pid $$
  bootstrap=127.0.0.1:$port
  trap '"$kafka" stop; rm -rf "$home"' EXIT
fi
prefix=bench$(date +%s)

{
  echo "# esk bench $(date -u +%FT%TZ) on $(nproc) cores, broker $bootstrap"
  echo
  echo "## Kafka reference: ProducerPerformance ($records x ${size} B, acks=all, idempotent)"
  "$kafka" tool TopicCommand --bootstrap-server "$bootstrap" --create --topic "$prefix.raw" \
    --partitions 12 --replication-factor 1 >/dev/null
  "$kafka" tool ProducerPerformance --topic "$prefix.raw" --num-records "$records" \
    --record-size "$size" --throughput -1 \
    --producer-props bootstrap.servers="$bootstrap" acks=all enable.idempotence=true 2>&1 | tail -n 1
  echo
  echo "## Kafka reference: ConsumerPerformance (same topic)"
  "$kafka" tool ConsumerPerformance --bootstrap-server "$bootstrap" --topic "$prefix.raw" \
    --num-records "$records" --timeout 60000 2>&1 | tail -n 2
} 2>&1 | tee "$report"
echo "report: $report"
