#!/usr/bin/env bash
# make bench: esk's benchmarks, with Kafka's own tools on the same broker so
# every figure has its reference beside it.
#
# Builds the release binaries, uses KAFKA_BOOTSTRAP_SERVERS if set (else starts
# a broker of its own in a temp dir on a free port, stopped at the end), creates
# a fresh installation (prefix bench<time>), starts a writer, runs esk-bench,
# then ProducerPerformance, ConsumerPerformance and EndToEndLatency (the
# reference for esk's latency at 1 in flight). The report also goes to
# target/bench/<time>.txt.
#
#   BENCH_PARTITIONS  partitions of the installation (12)
#   BENCH_RECORDS     records for the reference tools (200000)
#   BENCH_E2E_RECORDS records of EndToEndLatency, one at a time (2000)
#   BENCH_SIZE        record size in bytes, for esk and the tools (200)
#   BENCH_PROJECTOR_EVENTS  backlog for the projector's catch-up (1000000)
#   BENCH_TRANSFERS   2PC transfers at 8, 32 and 256 clients (a fifth at 1) (5000)
#   BENCH_GATEWAY_APPENDS  appends through the gateway at 64 in flight, and
#                     through the client beside them (50000)
#   BENCH_SSE_EVENTS  backlog a subscription through the gateway reads (1000000)
#   BENCH_ARGS        extra arguments for esk-bench (e.g. --read-events 0)
#   BENCH_SATURATION_EVENTS   events of the saturation run, esk produce of
#                     one event a line over BENCH_SATURATION_STREAMS streams
#                     (10000) with BENCH_SATURATION_IN_FLIGHT (4096) in
#                     flight (1000000; 0 skips it)
#   BENCH_PEERS       1 (default): then infra/bench-peers.sh (PostgreSQL and
#                     UmaDB, installed if missing) under the same load, its
#                     table in the report; 0 skips it
#   The report's latency-vs-throughput plot goes beside it (<time>.png; its
#   matplotlib is installed in target/bench/venv on first use).
#   BENCH_SECURITY    1 (default): then the cost of TLS and SASL, the same
#                     short benchmark on this broker and on a SASL_SSL broker
#                     of its own (SCRAM-SHA-512, ACLs of esk acls, services as
#                     their roles), back to back, side by side; 0 skips it
#   BENCH_SECURITY_APPENDS    appends at 64 and 256 in flight in it (20000)
#   BENCH_SECURITY_EVENTS     projector backlog in it (200000)
#   BENCH_SECURITY_TRANSFERS  2PC transfers in it (1000)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kafka=$repo/infra/kafka/kafka.sh
partitions=${BENCH_PARTITIONS:-12}
records=${BENCH_RECORDS:-200000}
e2e_records=${BENCH_E2E_RECORDS:-2000}
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
  [ -d "$home/secured" ] && ESK_HOME=$home/secured "$kafka" stop 2>/dev/null
  rm -rf "$home"
}
trap cleanup EXIT

if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  bootstrap=$KAFKA_BOOTSTRAP_SERVERS
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  ESK_HOME=$home ESK_KAFKA_PORT=$port "$kafka" start --watch-pid $$ >/dev/null
  bootstrap=127.0.0.1:$port
fi
prefix=bench$(date +%s)
export KAFKA_BOOTSTRAP_SERVERS=$bootstrap ESK_TOPIC_PREFIX=$prefix ESK_DATA_DIR=$home/data

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# health_is URL FIELD VALUE: waits (up to 60 s) until /health's FIELD is VALUE.
health_is() {
  for _ in $(seq 1 300); do
    got=$(curl -fsS "$1/health" 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])" 2>/dev/null || echo 0)
    [ "$got" = "$3" ] && return 0
    sleep 0.2
  done
  echo "$1: $2 is not $3 after 60 s" >&2
  return 1
}

# services TAG ADMIN_CONFIG WRITER_CONFIG COORDINATOR_CONFIG: an
# installation's topics (made as admin) and its writer and coordinator on
# $KAFKA_BOOTSTRAP_SERVERS, each with its client properties file ("" for
# none); sets writer_http and coordinator_http.
services() {
  env ${2:+ESK_KAFKA_CONFIG="$2"} "$bin/esk" topics init --partitions "$partitions" >/dev/null
  writer_http=127.0.0.1:$(free_port)
  env ${3:+ESK_KAFKA_CONFIG="$3"} ESK_WRITER_HTTP="$writer_http" RUST_LOG=warn "$bin/esk-writer" \
    2>"$home/writer-$1.log" &
  writer_pid=$!
  pids+=($!)
  coordinator_http=127.0.0.1:$(free_port)
  env ${4:+ESK_KAFKA_CONFIG="$4"} ESK_COORDINATOR_HTTP="$coordinator_http" RUST_LOG=warn "$bin/esk-coordinator" \
    2>"$home/coordinator-$1.log" &
  pids+=($!)
  health_is "http://$writer_http" partitions_serving "$partitions"
  health_is "http://$coordinator_http" partitions_owned "$partitions"
}

# Stops the services started so far (so that the next run has the machine).
stop_services() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  pids=()
}

services plaintext "" "" ""
broker_pid=$(cat "$home/run/kafka.pid" 2>/dev/null || true)
saturation_events=${BENCH_SATURATION_EVENTS:-1000000}
saturation_streams=${BENCH_SATURATION_STREAMS:-10000}
saturation_in_flight=${BENCH_SATURATION_IN_FLIGHT:-4096}

# cpu_of PID: its user + system CPU seconds (USER_HZ is 100).
cpu_of() { awk '{sub(/.*\) /, ""); print ($12 + $13) / 100}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Saturation: esk produce of one event a line, the streams in turn, with
# thousands in flight; the writer's and the broker's CPU per append.
saturation() {
  local input=$home/saturation.jsonl
  python3 - "$input" "$saturation_events" "$saturation_streams" "$size" <<'PY'
import json, sys
path, events, streams, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pad = "x" * max(0, size - 20)
with open(path, "w") as f:
    for i in range(events):
        f.write(json.dumps({"stream": f"saturation-{i % streams}", "type": "Measured",
                            "data": {"n": i, "pad": pad}}) + "\n")
PY
  local w0 b0 out
  w0=$(cpu_of "$writer_pid")
  b0=$(cpu_of "${broker_pid:-0}")
  out=$("$bin/esk" produce --in-flight "$saturation_in_flight" --timeout 120s -f "$input" --json)
  python3 - "$out" "$w0" "$(cpu_of "$writer_pid")" "$b0" "$(cpu_of "${broker_pid:-0}")" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); w = float(sys.argv[3]) - float(sys.argv[2]); b = float(sys.argv[5]) - float(sys.argv[4])
n = max(r["appended"], 1)
print(f"saturation: {r['appended']} of {r['lines']} appended in {r['seconds']:.1f}s = {r['rate']:.0f}/s"
      f" ({r['failed']} failed)   CPU per append: writer {w * 1e6 / n:.0f} µs, broker {b * 1e6 / n:.0f} µs")
PY
  rm -f "$input"
}

{
  echo "# esk bench $(date -u +%FT%TZ): $(nproc) cores, broker $bootstrap, $partitions partitions, ${size} B records"
  echo
  # shellcheck disable=SC2086
  "$bin/esk-bench" --record-size "$size" --projector-bin "$bin/esk-projector" \
    --replica-bin "$bin/esk-replica" --writer-bin "$bin/esk-writer" --gateway-bin "$bin/esk-gateway" \
    --gateway-appends "${BENCH_GATEWAY_APPENDS:-50000}" --sse-events "${BENCH_SSE_EVENTS:-1000000}" \
    --writer-pid "$writer_pid" ${broker_pid:+--broker-pid "$broker_pid"} \
    --projector-events "$projector_events" --transfers "$transfers" ${BENCH_ARGS:-}
  if [ "$saturation_events" -gt 0 ]; then
    echo
    echo "## esk saturation: esk produce of $saturation_events events over $saturation_streams streams, $saturation_in_flight in flight"
    saturation
  fi
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
  echo "## Kafka reference: EndToEndLatency ($e2e_records x $size B, acks=all, one at a time: produced, then consumed)"
  "$kafka" tool EndToEndLatency --bootstrap-server "$bootstrap" --topic "$prefix.e2e" \
    --num-records "$e2e_records" --producer-acks all --record-size "$size" 2>&1 | tail -n 2
  echo
  echo "## writer metrics"
  curl -fsS "http://$writer_http/metrics" | grep -E "^esk_writer_(batches_total|records_total|events_total|aborts_total|batch_records_(sum|count)|transaction_seconds_(sum|count))"
} 2>&1 | tee "$report"

# plot: the latency-vs-throughput picture of the report, beside it.
plot() {
  local venv=$out_dir/venv
  if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    echo "installing matplotlib for the plot in $venv..." >&2
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q matplotlib >&2; } ||
      { echo "no plot: matplotlib cannot be installed" >&2; return 0; }
  fi
  "$venv/bin/python" "$repo/infra/bench-plot.py" "$report" "${report%.txt}.png" >&2 || echo "no plot (see above)" >&2
}

if [ "${BENCH_PEERS:-1}" = 1 ]; then
  # The peers get the machine to themselves, as esk had it.
  stop_services
  echo "measuring the peers (PostgreSQL, UmaDB)..." >&2
  { echo; BENCH_PEERS_ESK=$report "$repo/infra/bench-peers.sh"; } 2>&1 | tee -a "$report"
fi

[ "${BENCH_SECURITY:-1}" = 1 ] || { plot; echo "report: $report" >&2; exit 0; }

# The cost of TLS and SASL: one short benchmark on each protocol, back to back.
short_appends=${BENCH_SECURITY_APPENDS:-20000}
short_events=${BENCH_SECURITY_EVENTS:-200000}
short_transfers=${BENCH_SECURITY_TRANSFERS:-1000}
short() { # LABEL BOOTSTRAP ADMIN_CONFIG JAVA_CONFIG: esk-bench and ProducerPerformance into $home/LABEL.txt
  local out=$home/$1.txt
  env ${3:+ESK_KAFKA_CONFIG="$3"} KAFKA_BOOTSTRAP_SERVERS="$2" "$bin/esk-bench" --record-size "$size" \
    --sequential 1000 --pipelined "$short_appends" --read-events 0 --memory-streams 0 \
    --transfers "$short_transfers" --projector-bin "$bin/esk-projector" --projector-events "$short_events" >"$out" 2>&1
  "$kafka" tool TopicCommand --bootstrap-server "$2" ${4:+--command-config "$4"} --create \
    --topic "$ESK_TOPIC_PREFIX.raw" --partitions "$partitions" --replication-factor 1 >/dev/null
  "$kafka" tool ProducerPerformance --topic "$ESK_TOPIC_PREFIX.raw" --num-records "$records" \
    --record-size "$size" --throughput -1 ${4:+--command-config "$4"} \
    --producer-props bootstrap.servers="$2" acks=all enable.idempotence=true 2>&1 | tail -n 1 >>"$out"
}
echo "measuring PLAINTEXT and SASL_SSL side by side..." >&2
export ESK_TOPIC_PREFIX=${prefix}p
stop_services
services plaintext-short "" "" ""
short plaintext "$bootstrap" "" ""

secured=$home/secured
mkdir -p "$secured"
users="writer coordinator"
sport=$(free_port)
ESK_HOME=$secured ESK_KAFKA_PORT=$sport ESK_KAFKA_SECURITY=sasl_ssl ESK_KAFKA_SCRAM_USERS=$users \
  "$kafka" start --watch-pid $$ >/dev/null
config() { ESK_HOME=$secured ESK_KAFKA_SCRAM_USERS=$users "$kafka" client-config "$1" "$2"; }
export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$sport ESK_TOPIC_PREFIX=${prefix}s
# Topics and ACLs as admin; the services as their roles; esk-bench (and the
# projector it starts) as admin, who may do all it does.
"$bin/esk" acls --commands | ESK_HOME=$secured "$kafka" tool-lines AclCommand \
  --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --command-config "$(config admin java)" >/dev/null 2>"$home/acls.log"
stop_services
services sasl-short "$(config admin librdkafka)" "$(config writer librdkafka)" "$(config coordinator librdkafka)"
short sasl_ssl "$KAFKA_BOOTSTRAP_SERVERS" "$(config admin librdkafka)" "$(config admin java)"

{
  echo
  echo "## PLAINTEXT vs SASL_SSL (TLS 1.3, SCRAM-SHA-512, ACLs), the same short run back to back"
  python3 - "$home/plaintext.txt" "$home/sasl_ssl.txt" <<'PY'
import re, sys
def figures(path):
    text = open(path).read()
    f = {}
    for label, key in [("1 in flight", "append, 1 in flight"), ("64 in flight", "append, 64 in flight"),
                       ("256 in flight", "append, 256 in flight")]:
        m = re.search(re.escape(label) + r".*?=\s*(\d+)/s\s+latency p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", text)
        if m: f[key] = (f"{m[1]}/s", f"{m[2]} ms", f"{m[3]} ms")
    for m in re.finditer(r"^\s*(\d+) clients\s+\d+ committed in\s+[\d.]+s =\s*(\d+)/s.*?p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", text, re.M):
        f[f"2PC transfer, {m[1]} clients"] = (f"{m[2]}/s", f"{m[3]} ms", f"{m[4]} ms")
    m = re.search(r"catch-up: \d+ events in [\d.]+s from process start = (\d+) events/s", text)
    if m: f["projector catch-up"] = (f"{m[1]} events/s", "", "")
    m = re.search(r"append reply -> visible in a query: p50 ([\d.]+) ms\s+p99 ([\d.]+) ms", text)
    if m: f["append -> visible in a query"] = ("", f"{m[1]} ms", f"{m[2]} ms")
    m = re.search(r"([\d.]+) records/sec.*?(\d+) ms 50th.*?(\d+) ms 99th", text)
    if m: f["Kafka ProducerPerformance"] = (f"{float(m[1]):.0f}/s", f"{m[2]} ms", f"{m[3]} ms")
    return f
plain, secured = figures(sys.argv[1]), figures(sys.argv[2])
print(f"{'':32} {'PLAINTEXT':>14} {'p50':>10} {'p99':>10}   {'SASL_SSL':>14} {'p50':>10} {'p99':>10}")
for key in list(dict.fromkeys([*plain, *secured])):
    a, b = plain.get(key, ("-", "-", "-")), secured.get(key, ("-", "-", "-"))
    print(f"{key:32} {a[0]:>14} {a[1]:>10} {a[2]:>10}   {b[0]:>14} {b[1]:>10} {b[2]:>10}")
PY
  echo
  echo "(full outputs: PLAINTEXT, then SASL_SSL)"
  cat "$home/plaintext.txt"
  echo
  cat "$home/sasl_ssl.txt"
} 2>&1 | tee -a "$report"
plot
echo "report: $report" >&2
