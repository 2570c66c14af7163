#!/usr/bin/env bash
# make up | down | status: the local esk platform.
#
#   up      the broker (unless KAFKA_BOOTSTRAP_SERVERS names one), the topics, the
#           platform's services, then the shop's (examples/shop: payments,
#           inventory and orders, each its own bounded context, and shipping);
#           waits until each answers; idempotent
#   down    stops what up started
#   status  what runs, where
#
# Pids go to $ESK_HOME/run/<name>.pid, logs to $ESK_HOME/log/<name>.log
# (ESK_HOME defaults to <repo>/.esk, which git ignores).
#
# Environment: KAFKA_BOOTSTRAP_SERVERS (use this cluster, start no broker),
# ESK_TOPIC_PREFIX (esk), ESK_PARTITIONS (12 for a new installation),
# ESK_BIN_DIR (use these binaries instead of building target/release),
# ESK_KAFKA_PORT (9092, for the local broker), ESK_<NAME>_HTTP (a service's
# HTTP address, e.g. ESK_WRITER_HTTP=127.0.0.1:8701; the shop's:
# ESK_PAYMENTS_HTTP, ESK_PAYMENTS_PROJECTOR_HTTP, ESK_INVENTORY_HTTP,
# ESK_ORDERS_HTTP, ESK_ORDERS_PROJECTOR_HTTP, ESK_SHIPPING_HTTP; the gateway's
# ESK_GATEWAY_HTTP, 127.0.0.1:8705),
# ESK_CHECKOUT_TIMEOUT (the checkout saga's, 30s).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ESK_HOME=${ESK_HOME:-$repo/.esk}
run=$ESK_HOME/run
logs=$ESK_HOME/log
prefix=${ESK_TOPIC_PREFIX:-esk}
kafka=$repo/infra/kafka/kafka.sh

# name:port of every service, in start order. Each binary is <bin_dir>/esk-<name>.
SERVICES=("writer:8701" "projector:8702" "replica:8703" "coordinator:8704" "gateway:8705")
# The shop: name:port[:projector port], binary <bin_dir>/shop-<name>. Each
# service with a writer serves the bounded context of its name.
SHOP=("payments:8711:8712" "inventory:8713" "orders:8714:8715" "shipping:8716")
# What the platform's services are told: the default context's writer takes
# raw appends only (the shop's contexts claim account, inventory and order);
# the replica follows the payments context's state.
PLATFORM_ENV=(ESK_WRITER_AGGREGATES=none ESK_CONTEXT=default)
replica_env() { [ "$1" = replica ] && echo ESK_CONTEXT=payments || echo ESK_CONTEXT=default; }




say() { printf 'esk: %s\n' "$*"; }
die() { printf 'esk: %s\n' "$*" >&2; exit 1; }
# pid_runs PID [WHAT]: whether it runs (a zombie does not); see infra/proc.sh.
# shellcheck source=infra/proc.sh
. "$repo/infra/proc.sh"

# Whether the service of pid file $1 runs (esk-<name> for $1 = .../<name>.pid).
alive() {
  local name
  name=$(basename "$1" .pid)
  [[ $name == shop-* ]] || name=esk-$name
  [ -f "$1" ] && pid_runs "$(cat "$1" 2>/dev/null)" "$name"
}

# Whether the process of pid file $1, just started, still runs. Not what it
# runs: until the forked shell has exec'd the service, its command line is
# this script's.
started() { [ -f "$1" ] && pid_runs "$(cat "$1" 2>/dev/null)"; }

bin_dir() {
  if [ -n "${ESK_BIN_DIR:-}" ]; then
    echo "$ESK_BIN_DIR"
    return
  fi
  (cd "$repo" && cargo build --release --locked --workspace --bins -q) >&2 || die "cargo build failed"
  echo "$repo/target/release"
}

bootstrap() {
  if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
    echo "$KAFKA_BOOTSTRAP_SERVERS"
  else
    echo "127.0.0.1:${ESK_KAFKA_PORT:-9092}"
  fi
}

# The HTTP address of a service: ESK_<NAME>_HTTP if set, else its default port.
http_addr() { # name port
  local var="ESK_${1^^}_HTTP"
  echo "${!var:-127.0.0.1:$2}"
}

# How a service this script started, which no longer runs, ended. It is this
# shell's child, so `wait` has its status (at once: it has exited).
exit_reason() { # pid
  local pid=$1 state rc
  state=$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ' || true)
  if [ -n "$state" ] && [[ $state != Z* ]]; then
    echo "pid $pid in state $state"
    return
  fi
  wait "$pid" 2>/dev/null && rc=0 || rc=$?
  if ((rc == 127)); then
    echo "pid $pid gone, its exit status unknown"
  elif ((rc > 128)); then
    echo "pid $pid killed by signal $((rc - 128))"
  else
    echo "pid $pid exit status $rc"
  fi
}

# Waits for a service's /ready (it owns and serves its partitions, has caught
# up, and reaches Kafka): 120 s at most, then says why not from /ready.
wait_ready() { # name addr pidfile
  local name=$1 addr=$2 pf=$3 i why
  for ((i = 0; i < 600; i++)); do
    if ! started "$pf"; then
      sleep 0.2 # a second look before calling it dead
      started "$pf" || die "$name exited during start ($(exit_reason "$(cat "$pf")")); see $logs/$name.log"
    fi
    if curl -fsS "http://$addr/ready" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  why=$(curl -sS "http://$addr/ready" 2>&1 || true)
  die "$name did not become ready on $addr in 120 s (${why:-no answer}); see $logs/$name.log"
}

# What the gateway's console shows: every service of the platform and the shop.
gateway_env() {
  local urls
  urls() { local u="" e; for e in "$@"; do u+="${u:+,}http://$(http_addr "${e%%:*}" "${e##*:}")"; done; echo "$u"; }
  echo "ESK_GATEWAY_WRITER_URL=$(urls writer:8701 payments:8711 inventory:8713 orders:8714)"
  echo "ESK_GATEWAY_PROJECTOR_URL=$(urls projector:8702 payments_projector:8712 orders_projector:8715 shipping:8716)"
  echo "ESK_GATEWAY_REPLICA_URL=$(urls replica:8703)"
  echo "ESK_GATEWAY_COORDINATOR_URL=$(urls coordinator:8704)"
}

start_service() { # name port bin_dir bootstrap
  local name=$1 bins=$3 bs=$4 pf=$run/$1.pid addr extra=()
  addr=$(http_addr "$1" "$2")
  if [ "$name" = gateway ]; then mapfile -t extra < <(gateway_env); fi
  if alive "$pf"; then
    wait_ready "$name" "$addr" "$pf"
    say "$name already running (pid $(cat "$pf"), http://$addr)"
    return
  fi
  setsid nohup env KAFKA_BOOTSTRAP_SERVERS="$bs" ESK_TOPIC_PREFIX="$prefix" \
    "ESK_${name^^}_HTTP=$addr" ESK_DATA_DIR="$ESK_HOME/data" "${PLATFORM_ENV[@]}" "$(replica_env "$name")" \
    "${extra[@]}" "$bins/esk-$name" >>"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pf"
  wait_ready "$name" "$addr" "$pf"
  say "$name started (pid $(cat "$pf"), http://$addr)"
}

# The shop's service `name` (binary shop-<name>): its writer's HTTP on
# ESK_<NAME>_HTTP, its projector's on ESK_<NAME>_PROJECTOR_HTTP.
start_shop() { # entry bin_dir bootstrap
  local entry=$1 bins=$2 bs=$3 name port pport pf addr paddr vars=()
  IFS=: read -r name port pport <<<"$entry"
  pf=$run/shop-$name.pid
  addr=$(http_addr "$name" "$port")
  if [ "$name" = shipping ]; then
    vars+=("ESK_PROJECTOR_HTTP=$addr")
  else
    vars+=("ESK_WRITER_HTTP=$addr")
  fi
  if [ -n "$pport" ]; then
    paddr=$(http_addr "${name}_projector" "$pport")
    vars+=("ESK_PROJECTOR_HTTP=$paddr")
  fi
  if alive "$pf"; then
    wait_ready "shop-$name" "$addr" "$pf"
    say "shop-$name already running (pid $(cat "$pf"), http://$addr${paddr:+, http://$paddr})"
    return
  fi
  # ESK_PROJECTOR_INSTANCE: the shop's `accounts` model is a copy of its own
  # beside the platform projector's (each instance keeps a full copy).
  setsid nohup env KAFKA_BOOTSTRAP_SERVERS="$bs" ESK_TOPIC_PREFIX="$prefix" ESK_DATA_DIR="$ESK_HOME/data" \
    ESK_PROJECTOR_INSTANCE=shop ESK_CHECKOUT_TIMEOUT="${ESK_CHECKOUT_TIMEOUT:-30s}" "${vars[@]}" \
    "$bins/shop-$name" >>"$logs/shop-$name.log" 2>&1 </dev/null &
  echo $! >"$pf"
  wait_ready "shop-$name" "$addr" "$pf"
  say "shop-$name started (pid $(cat "$pf"), http://$addr${paddr:+, http://$paddr})"
}


up() {
  mkdir -p "$run" "$logs" "$ESK_HOME/data"
  local bins bs
  bins=$(bin_dir)
  bs=$(bootstrap)
  if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
    say "using the Kafka cluster at $bs (KAFKA_BOOTSTRAP_SERVERS)"
  else
    "$kafka" start 2>&1 | sed 's/^kafka: /esk: kafka /'
  fi
  local init_args=(topics init --bootstrap-servers "$bs" --prefix "$prefix" --timeout 30s)
  if [ -n "${ESK_PARTITIONS:-}" ]; then init_args+=(--partitions "$ESK_PARTITIONS"); fi
  "$bins/esk" "${init_args[@]}" | tail -n 1 | sed 's/^/esk: topics: /'
  local context
  for context in payments inventory orders; do
    "$bins/esk" "${init_args[@]}" --context "$context" | tail -n 1 | sed "s/^/esk: topics ($context): /"
  done
  local entry
  for entry in "${SERVICES[@]}"; do
    start_service "${entry%%:*}" "${entry##*:}" "$bins" "$bs"
  done
  for entry in "${SHOP[@]}"; do
    start_shop "$entry" "$bins" "$bs"
  done
  cat <<INFO
esk: up.
  kafka       $bs
  topics      prefix '$prefix' (esk topics describe)
  logs        $logs/<name>.log
  pids        $run/<name>.pid
  cli         $bins/esk --help
  http api    http://$(http_addr gateway 8705) (OpenAPI: /openapi.json; console: http://$(http_addr gateway 8705)/console/)
  shop        payments http://$(http_addr payments 8711) (accounts: http://$(http_addr payments_projector 8712)/accounts/{id})
              inventory http://$(http_addr inventory 8713)
              orders http://$(http_addr orders 8714) (orders and checkouts: http://$(http_addr orders_projector 8715)/orders/{id})
              shipping http://$(http_addr shipping 8716)/shipments/{order}
INFO
}

down() {
  local entry i
  for ((i = ${#SHOP[@]} - 1; i >= 0; i--)); do
    entry=${SHOP[i]}
    stop_service "shop-${entry%%:*}"
  done
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    entry=${SERVICES[i]}
    stop_service "${entry%%:*}"
  done
  if [ -f "$run/kafka.pid" ]; then
    "$kafka" stop 2>&1 | sed 's/^kafka: /esk: kafka /'
  fi
  say "down."
}

stop_service() {
  local name=$1 pf=$run/$1.pid pid i
  alive "$pf" || { rm -f "$pf"; return 0; }
  pid=$(cat "$pf")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    pid_runs "$pid" || break
    sleep 0.1
  done
  if pid_runs "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pf"
  say "$name stopped"
}

status() {
  local rc=0 entry
  if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
    say "kafka: external, $KAFKA_BOOTSTRAP_SERVERS"
  else
    "$kafka" status | sed 's/^kafka: /esk: kafka: /' || rc=1
  fi
  for entry in "${SERVICES[@]}"; do
    local name=${entry%%:*} port=${entry##*:}
    if alive "$run/$name.pid"; then
      say "$name: running (pid $(cat "$run/$name.pid"), http://$(http_addr "$name" "$port"))"

    else
      say "$name: stopped"
      rc=1
    fi
  done
  for entry in "${SHOP[@]}"; do
    local name=shop-${entry%%:*} port
    port=$(cut -d: -f2 <<<"$entry")
    if alive "$run/$name.pid"; then
      say "$name: running (pid $(cat "$run/$name.pid"), http://$(http_addr "${entry%%:*}" "$port"))"
    else
      say "$name: stopped"
      rc=1
    fi
  done
  return $rc
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
