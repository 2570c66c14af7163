#!/usr/bin/env bash
# make bench-peers: the peers a user of esk compares it with, measured on this
# machine with the load of esk-bench's appends: 1, 64 and 256 appends in
# flight, one 200 B event an append, 1,000 streams, the appends in flight on
# distinct streams (client c owns streams c, c+C, c+2C, ... below
# max(1000, C) and appends to them in turn), and on every append the
# condition that makes a concurrent append to the same stream fail rather than
# overwrite (esk: the exact expected version).
#
# - PostgreSQL (Debian's, installed here if missing): initdb in a temp dir,
#   started on a free 127.0.0.1 port (its socket in the temp dir; as nobody
#   when run as root), a table events(stream, version, data) whose primary key
#   is (stream, version); pgbench with a script that inserts the stream's next
#   version (the key refuses a version that exists: the expected version),
#   with synchronous_commit on, then off.
# - UmaDB (crates.io: the `umadb` server, installed with cargo under
#   target/peers/umadb; its build needs Debian's protobuf-compiler, installed
#   here if missing), with data in the temp dir; tools/peers/umadb-load (built
#   under target/peers/umadb-load) appends through umadb-client with a DCB
#   condition: fail if an event of the stream's tag lies after the position of
#   the stream's last event.
#
# Prints one table (system, clients, appends/s, p50, p99), with the esk rows of
# the newest esk report in target/bench beside them, and writes it to
# target/bench/peers-<time>.txt. Everything it starts is stopped at the end.
#
#   BENCH_PEERS_CLIENTS   appends in flight, one run each ("1 64 256")
#   BENCH_PEERS_SECONDS   duration of a run in seconds (10)
#   BENCH_PEERS_SIZE      event size in bytes (BENCH_SIZE, else 200)
#   BENCH_PEERS_STREAMS   streams the appends are spread over (1000)
#   BENCH_PEERS_SYSTEMS   which peers to run ("postgres umadb")
#   BENCH_PEERS_UMADB_VERSION  the umadb crate to install (0.7.8; the load
#                         generator's umadb-client is pinned in its Cargo.toml)
#   BENCH_PEERS_UMADB_CONNECTIONS  gRPC connections the UmaDB load shares (1,
#                         as one application client; 0 for one a client)
#   BENCH_PEERS_ESK       esk report whose "## esk append" rows are quoted
#                         (default: the newest target/bench/<time>.txt that has
#                         them; "none" for no esk rows)
#   BENCH_PEERS_REPORT    if set, a file the table is also appended to (so that
#                         infra/bench.sh can put it in its report)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
clients_list=${BENCH_PEERS_CLIENTS:-1 64 256}
seconds=${BENCH_PEERS_SECONDS:-10}
size=${BENCH_PEERS_SIZE:-${BENCH_SIZE:-200}}
streams=${BENCH_PEERS_STREAMS:-1000}
systems=${BENCH_PEERS_SYSTEMS:-postgres umadb}
umadb_version=${BENCH_PEERS_UMADB_VERSION:-0.7.8}
umadb_connections=${BENCH_PEERS_UMADB_CONNECTIONS:-1}
peers=$repo/target/peers
out_dir=$repo/target/bench
mkdir -p "$peers" "$out_dir"
report=$out_dir/peers-$(date -u +%Y%m%dT%H%M%SZ).txt

has() { case " $systems " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# wait_port PORT PID: until 127.0.0.1:PORT accepts (60 s), failing if PID dies.
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "the server on port $1 died" >&2; return 1; }
    sleep 0.1
  done
  echo "nothing answers on 127.0.0.1:$1 after 60 s" >&2
  return 1
}

# Installs: only what is missing.
pg_bin() { find /usr/lib/postgresql -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname; }
umadb=$peers/umadb/bin/umadb
umadb_installed() { [ -x "$umadb" ] && "$umadb" --version 2>/dev/null | grep -qF "$umadb_version"; }
missing=()
if has postgres && { [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/pgbench" ]; }; then missing+=(postgresql); fi
if has umadb && ! umadb_installed && ! command -v protoc >/dev/null; then missing+=(protobuf-compiler); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}..." >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if has umadb; then
  if ! umadb_installed; then
    echo "installing umadb $umadb_version (cargo install, a few minutes the first time)..." >&2
    nice -n 19 cargo install --locked --quiet --force --root "$peers/umadb" umadb --version "$umadb_version"
  fi
  echo "building tools/peers/umadb-load..." >&2
  (cd "$repo/tools/peers/umadb-load" &&
    nice -n 19 cargo build --release --locked --quiet --target-dir "$peers/umadb-load")
  load=$peers/umadb-load/release/umadb-load
fi

pids=()
home=$(mktemp -d /tmp/esk-peers-XXXXXX)
chmod 755 "$home"
pg_ctl_as=()
pgdata=$home/pg
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  [ -f "$pgdata/postmaster.pid" ] && "${pg_ctl_as[@]}" "$(pg_bin)/pg_ctl" -D "$pgdata" -m immediate -w stop >/dev/null 2>&1
  rm -rf "$home"
}
trap cleanup EXIT

results=$home/results.tsv # system, clients, appends/s, p50 ms, p99 ms
: >"$results"

# The esk rows: "1 in flight (low load) ... = 57/s latency p50 14.90 ms p99 56.13 ms".
esk_report=${BENCH_PEERS_ESK:-}
if [ -z "$esk_report" ]; then
  esk_report=$(grep -l '^## esk append' "$out_dir"/[0-9]*.txt 2>/dev/null | sort | tail -n 1 || true)
fi
if [ -n "$esk_report" ] && [ "$esk_report" != none ]; then
  python3 - "$esk_report" >>"$results" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read().split("## esk append", 1)[1].split("\n## ", 1)[0]
for m in re.finditer(r"^(\d+) in flight.*?=\s*(\d+)/s\s+latency p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", text, re.M):
    print(f"esk ({os.path.basename(sys.argv[1])})\t{m[1]}\t{m[2]}\t{m[3]}\t{m[4]}")
PY
fi

payload=\\x$(printf '78%.0s' $(seq 1 "$size"))

if has postgres; then
  pgbin=$(pg_bin)
  pg_version=$("$pgbin/postgres" --version | awk '{print $3}')
  mkdir -p "$pgdata" "$home/pgsock" "$home/pglog"
  if [ "$(id -u)" = 0 ]; then
    # postgres refuses to run as root.
    chown nobody: "$pgdata" "$home/pgsock" "$home/pglog"
    pg_ctl_as=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups)
  fi
  pg_user=esk
  "${pg_ctl_as[@]}" "$pgbin/initdb" -D "$pgdata" -U "$pg_user" --auth=trust -E UTF8 --no-instructions >"$home/initdb.log"
  pg_port=$(free_port)
  max_clients=100
  for c in $clients_list; do [ "$c" -le "$max_clients" ] || max_clients=$c; done
  echo "PostgreSQL $pg_version on 127.0.0.1:$pg_port..." >&2
  "${pg_ctl_as[@]}" "$pgbin/pg_ctl" -D "$pgdata" -l "$home/pglog/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$home/pgsock -c max_connections=$((max_clients + 20))" \
    start >/dev/null
  export PGHOST=127.0.0.1 PGPORT=$pg_port PGUSER=$pg_user PGDATABASE=postgres
  psql() { "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
  psql -c "create table events (stream text not null, version int not null, data bytea not null,
             primary key (stream, version))"
  # The condition is the key: a second append of a stream's version 1 fails.
  psql -c "insert into events values ('check', 1, '')"
  if psql -c "insert into events values ('check', 1, '')" 2>/dev/null; then
    echo "PostgreSQL accepted a second version 1 of a stream" >&2
    exit 1
  fi
  # Client c owns streams c, c+C, ... (own of them) and appends to them in
  # turn; n counts its appends, so the version it inserts is the one after the
  # stream's last (the key refuses it if another append took it).
  cat >"$home/append.sql" <<'SQL'
\set own (:streams - 1 - :client_id) / :clients + 1
\set k :n % :own
\set version :n / :own + 1
\set stream :client_id + :clients * :k
\set n :n + 1
insert into events (stream, version, data) values ('s-' || :stream, :version, :payload);
SQL
  for sync in on off; do
    for c in $clients_list; do
      psql -c "truncate events" -c checkpoint
      prefix=$home/pglog/$sync-$c
      out=$home/pgbench-$sync-$c.txt
      status=0
      PGOPTIONS="-c synchronous_commit=$sync" "$pgbin/pgbench" -n -M prepared -f "$home/append.sql" \
        -c "$c" -j "$((c < 2 ? c : 2))" -T "$seconds" -l --log-prefix="$prefix" \
        -D clients="$c" -D streams="$((c > streams ? c : streams))" -D n=0 -D payload="$payload" \
        >"$out" 2>&1 || status=$?
      python3 - "$out" "$prefix" "$status" "PostgreSQL $pg_version, synchronous_commit=$sync" "$c" \
        >>"$results" <<'PY'
import glob, re, sys
out, prefix, status, system, clients = sys.argv[1:]
text = open(out).read()
failed = re.search(r"number of failed transactions: (\d+)", text)
if status != "0" or "aborted" in text or (failed and failed[1] != "0"):
    sys.exit(f"pgbench failed ({system}, {clients} clients, exit {status}):\n{text}")
tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
if not tps:
    sys.exit(f"no tps in pgbench's output ({system}, {clients} clients):\n{text}")
tps = float(tps[1])
lat = sorted(int(line.split()[2]) for f in glob.glob(prefix + ".*") for line in open(f)
             if line.split()[2].isdigit())
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
print(f"{system}\t{clients}\t{tps:.0f}\t{q(0.50):.2f}\t{q(0.99):.2f}")
PY
      rm -f "$prefix".*
      # Each stream's versions are 1..last: the key forbids a version twice,
      # and the rows add up to the last versions, so none is skipped.
      dense=$(psql -At -c "select count(*) > 0 and count(*) = (select sum(last) from
                (select max(version) as last from events group by stream) s) from events")
      [ "$dense" = t ] || { echo "PostgreSQL: the streams' versions are not 1..last" >&2; exit 1; }
    done
  done
  "${pg_ctl_as[@]}" "$pgbin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
fi

if has umadb; then
  umadb_port=$(free_port)
  echo "UmaDB $umadb_version on 127.0.0.1:$umadb_port..." >&2
  mkdir -p "$home/umadb"
  "$umadb" --listen "127.0.0.1:$umadb_port" --db-path "$home/umadb/data" >"$home/umadb.log" 2>&1 &
  pids+=($!)
  wait_port "$umadb_port" "${pids[-1]}"
  for c in $clients_list; do
    line=$("$load" --url "http://127.0.0.1:$umadb_port" --clients "$c" --seconds "$seconds" --size "$size" \
      --streams "$streams" --connections "$umadb_connections" --run "c$c")
    python3 - "$line" "UmaDB $umadb_version" >>"$results" <<'PY'
import sys
f = dict(kv.split("=", 1) for kv in sys.argv[1].split()[1:])
if f["conflicts"] != "0" or f["errors"] != "0":
    sys.exit(f"umadb-load: {sys.argv[1]}")
print(f"{sys.argv[2]}\t{f['clients']}\t{f['rate']}\t{float(f['p50_ms']):.2f}\t{float(f['p99_ms']):.2f}")
PY
  done
fi

{
  echo "## Peers $(date -u +%FT%TZ): $(nproc) cores, the same appends as esk-bench's on this machine"
  echo "(${size} B events, $streams streams, the appends in flight on distinct streams, a condition on every append; ${seconds} s a run)"
  python3 - "$results" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
width = max([len("system")] + [len(r[0]) for r in rows])
print(f"{'system':{width}}  {'clients':>7}  {'appends/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}")
for r in rows:
    print(f"{r[0]:{width}}  {r[1]:>7}  {r[2]:>9}  {r[3]:>8}  {r[4]:>8}")
PY
  echo "conditions: esk, the exact expected version; PostgreSQL, primary key (stream, version) on the stream's next"
  echo "version (pgbench, a connection a client); UmaDB, fail if an event of the stream's tag lies after the stream's"
  echo "last position (umadb-load, $umadb_connections gRPC connection(s)); a stale append refused by each peer before its runs"
} | tee "$report"
if [ -n "${BENCH_PEERS_REPORT:-}" ]; then
  { echo; cat "$report"; } >>"$BENCH_PEERS_REPORT"
fi
echo "report: $report" >&2
