#!/usr/bin/env bash
# `make lint`: crates/kafka is the only place that builds Kafka clients. Fails
# (exit 1, naming file and line) when any other Rust file of the workspace
# names rdkafka's `ClientConfig` or sets a client property itself
# (`.set("...` or `.set_log_level(`): use a profile of `esk_kafka::KafkaConfig`.
#
#   infra/lint/kafka-clients.sh [ROOT]     check ROOT (default: the repository)
#   infra/lint/kafka-clients.sh --self-test
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

check() {
  local root=$1 all found rc=0
  all=$(cd "$root" && grep -rnE --include='*.rs' \
    -e '\bClientConfig\b' -e '\.set\([[:space:]]*"' -e '\.set_log_level\(' \
    --exclude-dir=target --exclude-dir=.git --exclude-dir=node_modules .) || rc=$?
  if [ "$rc" -gt 1 ]; then
    echo "kafka-clients: grep failed in $root" >&2
    return 2
  fi
  found=$(printf '%s\n' "$all" | grep -v -e '^\./crates/kafka/' -e '^$' || true)
  if [ -n "$found" ]; then
    printf '%s\n' "$found" >&2
    printf 'kafka-clients: Kafka clients are built only in crates/kafka (esk_kafka::KafkaConfig profiles); found the above\n' >&2
    return 1
  fi
}

self_test() {
  local t
  t=$(mktemp -d)
  mkdir -p "$t/crates/kafka/src" "$t/services/x/src"
  printf 'fn f() { ClientConfig::new().set("acks", "all"); }\n' >"$t/crates/kafka/src/config.rs"
  printf 'fn f(k: &KafkaConfig) { k.admin(); metrics::gauge!("g").set(1.0); }\n' >"$t/services/x/src/lib.rs"
  check "$t" 2>/dev/null || { echo "kafka-clients self-test: a clean tree was refused" >&2; rm -rf "$t"; return 1; }
  local bad
  for bad in 'let c = rdkafka::ClientConfig::new();' \
             'k.admin()\n    .set("isolation.level", "read_uncommitted");' \
             'k.admin().set_log_level(l);'; do
    printf "fn f() { $bad }\n" >"$t/services/x/src/bad.rs"
    if check "$t" 2>/dev/null; then
      echo "kafka-clients self-test: not caught: $bad" >&2
      rm -rf "$t"
      return 1
    fi
  done
  rm -rf "$t"
  echo "kafka-clients self-test: ok"
}

case "${1:-}" in
  --self-test) self_test ;;
  *) check "${1:-$here/../..}" ;;
esac
