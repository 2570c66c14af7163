#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft) from Maven Central jars: no Docker needed.
#
#   kafka.sh fetch                   jars into infra/kafka/lib, once (later calls stay offline)
#   kafka.sh start [--watch-pid P]   single node on 127.0.0.1:9092, waits until it answers metadata
#   kafka.sh stop | status
#   kafka.sh cluster start [--watch-pid P] | stop | status
#                                    three nodes on 127.0.0.1:19092, :29092, :39092
#   kafka.sh cluster kill N          SIGKILL node N (1..3)
#   kafka.sh cluster restart N       start node N again (same data, no re-format)
#   kafka.sh cluster bootstrap       prints the cluster's bootstrap servers
#   kafka.sh tool CLASS [ARGS...]    run a tool from the same jars, e.g. ProducerPerformance
#   kafka.sh tool-lines CLASS [ARGS...] <LINES   the tool once per line of stdin in one JVM
#                                    (ARGS, then the line), e.g. AclCommand with esk acls --commands
#   kafka.sh wait HOST:PORT [SECS] [MIN_BROKERS]
#   kafka.sh client-config USER [librdkafka|java]
#                                    sasl_ssl mode: prints the path of USER's client properties
#
# Environment (all optional):
#   ESK_HOME                   state root (default: <repo>/.esk): kafka/ data, run/ pids, log/ logs
#   ESK_KAFKA_PORT             single-node client port (9092); the controller uses the next port
#   ESK_KAFKA_CLUSTER_PORTS    client ports of the three nodes ("19092 29092 39092")
#   ESK_KAFKA_HEAP             broker heap (512m)
#   ESK_KAFKA_START_TIMEOUT    seconds to wait for readiness (90)
#   ESK_KAFKA_EPHEMERAL=1      with --watch-pid: remove ESK_HOME when the watched process ends
#   ESK_KAFKA_SECURITY         plaintext (default) or sasl_ssl (below)
#   ESK_KAFKA_SCRAM_USERS      sasl_ssl: users besides admin ("writer coordinator projector replica client")
#
# --watch-pid P ties the broker's life to process P: when P exits the broker is
# killed. The test harness uses it so that no broker outlives a test run.
#
# Secured mode, ESK_KAFKA_SECURITY=sasl_ssl (docs/adr/0010-secured-test-broker.md):
#   client port(s)    SASL_SSL, SCRAM-SHA-512, on 127.0.0.1 only; the brokers replicate
#                     over it too, as user admin (no extra port)
#   controller port   (client port + 1) PLAINTEXT on 127.0.0.1, principal User:ANONYMOUS
#   authorization     StandardAuthorizer, no ACL means denied; super users User:admin
#                     and User:ANONYMOUS (the controller listener: KRaft's own traffic)
#   users             admin and ESK_KAFKA_SCRAM_USERS, principal User:<name>, each with a
#                     random password made once per ESK_HOME; created at format time
#                     (a user added later is created at the next start)
#   $ESK_HOME/kafka-secrets/   (made once, reused; shared by the single node and the cluster)
#                     ca.pem (the CA clients trust), broker.p12 (key and certificate,
#                     SAN DNS:localhost, IP:127.0.0.1), <user>.password,
#                     <user>.librdkafka.properties, <user>.java.properties
#   data              $ESK_HOME/kafka-sasl, $ESK_HOME/kafka-cluster-sasl (plaintext's stay apart)
#   readiness         metadata_probe.py speaks TLS and SCRAM itself, as admin
# A running broker or cluster keeps the mode it was started in: status and
# cluster restart N follow it, and starting it in the other mode is refused.
# wait follows ESK_KAFKA_SECURITY.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
ESK_HOME=${ESK_HOME:-$repo/.esk}
lib=$here/lib
heap=${ESK_KAFKA_HEAP:-512m}
start_timeout=${ESK_KAFKA_START_TIMEOUT:-90}
single_port=${ESK_KAFKA_PORT:-9092}
read -r -a cluster_ports <<<"${ESK_KAFKA_CLUSTER_PORTS:-19092 29092 39092}"

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

secdir=$ESK_HOME/kafka-secrets

# set_security MODE: the mode and what follows from it.
set_security() {
  security=$1
  case "$security" in
  plaintext)
    single_dir=$ESK_HOME/kafka cluster_base=$ESK_HOME/kafka-cluster
    probe_args=() mode_tag=""
    ;;
  sasl_ssl)
    single_dir=$ESK_HOME/kafka-sasl cluster_base=$ESK_HOME/kafka-cluster-sasl
    probe_args=(--config "$secdir/admin.librdkafka.properties") mode_tag="sasl_ssl, "
    ;;
  *) die "ESK_KAFKA_SECURITY must be plaintext or sasl_ssl, not '$security'" ;;
  esac
}
set_security "${ESK_KAFKA_SECURITY:-plaintext}"
secured() { [ "$security" = sasl_ssl ]; }

# follow_mode MODE_FILE WHAT: a running broker or cluster keeps the mode it was
# started in (recorded in MODE_FILE): taken when ESK_KAFKA_SECURITY is unset,
# refused when it names the other.
follow_mode() {
  local recorded
  recorded=$(cat "$1" 2>/dev/null || true)
  [ -n "$recorded" ] && [ "$recorded" != "$security" ] || return 0
  [ -z "${ESK_KAFKA_SECURITY:-}" ] ||
    die "$2 runs in $recorded mode, not ESK_KAFKA_SECURITY=$security: stop it first"
  set_security "$recorded"
}

# The SCRAM users: admin first, then ESK_KAFKA_SCRAM_USERS without repeats.
load_users() {
  local u names
  users=(admin)
  read -r -a names <<<"${ESK_KAFKA_SCRAM_USERS-writer coordinator projector replica client}"
  for u in "${names[@]}"; do
    # The format tool's [name=...,password=...] syntax and the file names allow no more.
    [[ $u =~ ^[A-Za-z0-9._-]+$ ]] || die "SCRAM user name '$u': only letters, digits, '.', '_' and '-'"
    [[ " ${users[*]} " == *" $u "* ]] || users+=("$u")
  done
}

# make_tls DIR: the CA and the broker's key and certificate (EC P-256, 10 years).
make_tls() {
  local d=$1
  openssl rand -hex 24 >"$d/keystore.password" &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=esk test CA" -keyout "$d/ca.key" -out "$d/ca.pem" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" &&
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=localhost" -keyout "$d/broker.key" -out "$d/broker.csr" &&
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      "extendedKeyUsage=serverAuth,clientAuth" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" >"$d/broker.ext" &&
    openssl x509 -req -in "$d/broker.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -sha256 -days 3650 \
      -set_serial "0x$(openssl rand -hex 8)" -extfile "$d/broker.ext" -out "$d/broker.pem" &&
    openssl pkcs12 -export -name broker -in "$d/broker.pem" -inkey "$d/broker.key" \
      -certfile "$d/ca.pem" -passout "file:$d/keystore.password" -out "$d/broker.p12" &&
    rm -f "$d/broker.csr" "$d/broker.ext"
}

# write_file PATH: stdin into PATH, which readers see whole or not at all.
write_file() {
  local tmp=$1.part.$$
  cat >"$tmp" && mv -f "$tmp" "$1"
}

write_client_configs() { # user
  local u=$1 pw
  pw=$(cat "$secdir/$u.password")
  write_file "$secdir/$u.librdkafka.properties" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.username=$u
sasl.password=$pw
ssl.ca.location=$secdir/ca.pem
PROPS
  write_file "$secdir/$u.java.properties" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$u" password="$pw";
ssl.truststore.type=PEM
ssl.truststore.location=$secdir/ca.pem
PROPS
}

# The secured mode's files in $secdir: made once, later only a new user's
# password is added. Brokers started side by side (the tests' broker and their
# cluster) may both get here first: each makes the files in a directory of its
# own, the first to rename its directory into place wins, the others use that.
ensure_secrets() {
  load_users
  if [ ! -f "$secdir/id" ]; then
    command -v openssl >/dev/null || die "openssl not found: the sasl_ssl mode makes its CA and certificate with it"
    local part=$secdir.part.$$
    rm -rf "$part"
    mkdir -p "$ESK_HOME"
    if ! (umask 077 && mkdir "$part" && make_tls "$part" >"$part/openssl.log" 2>&1 &&
      openssl rand -hex 16 >"$part/id"); then
      cat "$part/openssl.log" >&2 2>/dev/null || true
      rm -rf "$part"
      die "making the CA and broker certificate failed"
    fi
    rm -f "$part/openssl.log"
    if mv -T "$part" "$secdir" 2>/dev/null; then
      log "made a CA and a broker certificate in $secdir"
    else
      rm -rf "$part"
    fi
    [ -f "$secdir/id" ] || die "$secdir has no id file: remove it to make it afresh"
  fi
  local u tmp=$secdir/.password.$$
  for u in "${users[@]}"; do
    if [ ! -s "$secdir/$u.password" ]; then
      # ln fails if the file exists: every process reads the first password made.
      if (umask 077 && openssl rand -hex 24 >"$tmp"); then ln "$tmp" "$secdir/$u.password" 2>/dev/null || true; fi
      rm -f "$tmp"
    fi
    write_client_configs "$u"
  done
}

# scram_flags: the format tool's flags that create every user.
scram_format_flags() {
  local u
  scram_flags=()
  secured || return 0
  for u in "${users[@]}"; do
    scram_flags+=(--add-scram "SCRAM-SHA-512=[name=$u,password=$(cat "$secdir/$u.password")]")
  done
}

# check_secrets_of ROOT: ROOT's data was formatted with the passwords in
# $secdir. Passwords made afresh (after $secdir was removed) would lock out
# even the brokers: refused, with what to do.
check_secrets_of() {
  local have
  secured || return 0
  have=$(cat "$1/secrets.id" 2>/dev/null || true)
  [ -z "$have" ] || [ "$have" = "$(cat "$secdir/id")" ] ||
    die "$1 was formatted with other passwords than those in $secdir: remove $1 (its data) to start afresh"
}

# record_users_of ROOT: after the first format, which users ROOT's data has.
record_users_of() {
  secured || return 0
  [ -f "$1/secrets.id" ] && return 0
  printf '%s\n' "${users[@]}" >"$1/scram-users"
  cat "$secdir/id" >"$1/secrets.id"
}

# add_missing_users ROOT BOOTSTRAP LOGFILE: users that ROOT's data lacks
# (ESK_KAFKA_SCRAM_USERS grew since the format) are created through the
# running broker, as admin.
add_missing_users() {
  local root=$1 bootstrap=$2 logfile=$3 u i
  secured || return 0
  for u in "${users[@]}"; do
    grep -qxF -- "$u" "$root/scram-users" 2>/dev/null && continue
    log "creating SCRAM user $u"
    kafka_java org.apache.kafka.tools.ConfigCommand --bootstrap-server "$bootstrap" \
      --command-config "$secdir/admin.java.properties" --alter --entity-type users --entity-name "$u" \
      --add-config "SCRAM-SHA-512=[password=$(cat "$secdir/$u.password")]" >>"$logfile" 2>&1 ||
      die "creating SCRAM user $u failed: see $logfile"
    # The credential reaches the brokers a moment after the controller took it.
    for ((i = 0; i < 50; i++)); do
      python3 "$here/metadata_probe.py" "${bootstrap%%,*}" 1 \
        --config "$secdir/$u.librdkafka.properties" 2>/dev/null && break
      sleep 0.2
    done
    echo "$u" >>"$root/scram-users"
  done
}

client_config() { # user [librdkafka|java]
  local u=${1:?usage: kafka.sh client-config USER [librdkafka|java]} kind=${2:-librdkafka}
  case "$kind" in
  librdkafka | java) ;;
  *) die "client-config: the kind is librdkafka or java, not '$kind'" ;;
  esac
  load_users
  if [ ! -f "$secdir/$u.$kind.properties" ]; then
    [[ " ${users[*]} " == *" $u "* ]] ||
      die "no SCRAM user '$u': the users are ${users[*]} (ESK_KAFKA_SCRAM_USERS)"
    ensure_secrets
  fi
  echo "$secdir/$u.$kind.properties"
}

need_java() {
  command -v java >/dev/null || die "java not found: Kafka 4 needs Java 17 or newer"
  local major
  major=$(java -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/{print $2}')
  [ "${major%%.*}" -ge 17 ] 2>/dev/null || die "java $major found: Kafka 4 needs Java 17 or newer"
}

# Jars are fetched once per pom: the stamp holds the pom's checksum, so a second
# start does not touch the network and a changed pom fetches afresh. One fetch
# at a time: brokers started side by side (the tests' broker and their 3-node
# cluster, on a fresh clone) each found no jars, and one's `rm -rf lib` pulled
# the jars from under the other's copy or JVM. The others wait for the lock,
# then find the jars; the jars land in lib/ only complete (fetched beside it,
# then moved).
fetch() {
  local stamp=$lib/.fetched sum lock=$here/.fetch.lock part=$lib.part.$$ holder i
  sum=$(sha256sum "$here/pom.xml" | cut -d' ' -f1)
  fetched() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; }
  fetched && return 0
  for ((i = 0; ; i++)); do
    mkdir "$lock" 2>/dev/null && break
    holder=$(cat "$lock/pid" 2>/dev/null || true)
    if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null; then
      rm -rf "$lock" # its holder died
      continue
    fi
    ((i < 6000)) || die "another fetch has held $lock for 10 minutes"
    ((i % 50 == 1)) && log "waiting for another fetch of the Kafka jars (pid ${holder:-?})"
    sleep 0.2
  done
  echo $$ >"$lock/pid"
  trap 'rm -rf "$lock" "$part"' EXIT
  if ! fetched; then
    command -v mvn >/dev/null || die "mvn not found: it fetches the Kafka jars from Maven Central"
    log "fetching Kafka jars from Maven Central into $lib"
    rm -rf "$part"
    mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$part" >&2 || die "fetching the Kafka jars failed"
    echo "$sum" >"$part/.fetched"
    rm -rf "$lib"
    mv "$part" "$lib"
  fi
  rm -rf "$lock"
  trap - EXIT
}

classpath() { printf '%s/*' "$lib"; }

kafka_java() {
  java -Xms128m -Xmx"$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$(classpath)" "$@"
}

# pid_runs PID [WHAT]: whether it runs (a zombie does not); see infra/proc.sh.
# shellcheck source=infra/proc.sh
. "$repo/infra/proc.sh"

# Whether the broker of pid file $1 runs.
alive() { [ -f "$1" ] && pid_runs "$(cat "$1" 2>/dev/null)" kafka.Kafka; }

# Whether the process of pid file $1, just started, still runs. Not what it
# runs: until the forked shell has exec'd java, its command line is this script's.
started() { [ -f "$1" ] && pid_runs "$(cat "$1" 2>/dev/null)"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_ready() { # addr secs min_brokers [pidfile...]
  local addr=$1 secs=$2 want=$3 deadline pf
  shift 3
  deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    for pf in "$@"; do
      # A second look before calling it dead.
      started "$pf" || { sleep 0.3 && started "$pf"; } || return 1
    done
    if python3 "$here/metadata_probe.py" "$addr" "$want" "${probe_args[@]}" 2>/dev/null; then
      return 0
    fi
    sleep 0.3
  done
  python3 "$here/metadata_probe.py" "$addr" "$want" "${probe_args[@]}"
}

# ": a port was taken (...)" when a broker log says a listener could not bind.
port_taken() { # log...
  local line
  line=$(grep -h -m 1 -E 'BindException|Address already in use' "$@" 2>/dev/null | head -n 1) || true
  [ -z "$line" ] || printf ': a port was taken (%s)' "$(echo "$line" | cut -c1-200)"
}

# write_config FILE NODE_ID PORT DIR VOTERS|"" EXTRA...
write_config() {
  local file=$1 id=$2 port=$3 dir=$4 voters=$5
  shift 5
  local cport=$((port + 1))
  # In sasl_ssl mode the file holds admin's and the keystore's passwords.
  if secured; then (umask 077 && : >"$file") && chmod 600 "$file"; fi
  {
    echo "process.roles=broker,controller"
    echo "node.id=$id"
    if [ -n "$voters" ]; then
      echo "controller.quorum.voters=$voters"
    else
      echo "controller.quorum.bootstrap.servers=127.0.0.1:$cport"
    fi
    if secured; then
      local ks_pw
      ks_pw=$(cat "$secdir/keystore.password")
      echo "listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
      echo "advertised.listeners=SASL_SSL://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
      echo "controller.listener.names=CONTROLLER"
      echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
      # Brokers replicate over the client listener, as admin.
      echo "inter.broker.listener.name=SASL_SSL"
      echo "sasl.enabled.mechanisms=SCRAM-SHA-512"
      echo "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512"
      echo "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"$(cat "$secdir/admin.password")\";"
      echo "ssl.keystore.type=PKCS12"
      echo "ssl.keystore.location=$secdir/broker.p12"
      echo "ssl.keystore.password=$ks_pw"
      echo "ssl.key.password=$ks_pw"
      echo "ssl.truststore.type=PEM"
      echo "ssl.truststore.location=$secdir/ca.pem"
      echo "ssl.client.auth=none"
      echo "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer"
      echo "allow.everyone.if.no.acl.found=false"
      # ANONYMOUS: whoever speaks on the PLAINTEXT controller listener, that is
      # the controllers and brokers themselves (registration, heartbeats, the
      # quorum), before any ACL can exist. No SASL_SSL connection is ANONYMOUS.
      echo "super.users=User:admin;User:ANONYMOUS"
    else
      echo "listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
      echo "advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
      echo "inter.broker.listener.name=PLAINTEXT"
      echo "controller.listener.names=CONTROLLER"
      echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    fi
    echo "log.dirs=$dir/data"
    echo "group.initial.rebalance.delay.ms=0"
    # esk creates every topic it uses, with its own configs (DESIGN section 2).
    echo "auto.create.topics.enable=false"
    printf '%s\n' "$@"
  } >"$file"
}

# start_node NAME CONFIG DIR WATCH_PID CLUSTER_ID FORMAT_FLAGS...
start_node() {
  local name=$1 config=$2 dir=$3 watch=$4 cid=$5
  shift 5
  local pidfile=$ESK_HOME/run/$name.pid logfile=$ESK_HOME/log/$name.log
  mkdir -p "$ESK_HOME/run" "$ESK_HOME/log" "$dir"
  if [ ! -f "$dir/data/meta.properties" ]; then
    kafka_java kafka.tools.StorageTool format -t "$cid" -c "$config" "$@" --ignore-formatted \
      >>"$logfile" 2>&1 || die "formatting $name failed: see $logfile"
  fi
  # setsid: the broker must not die with the shell that started it (make up), nor
  # get its terminal's signals.
  setsid nohup java -Xms128m -Xmx"$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dkafka.logs.dir="$ESK_HOME/log" \
    -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$(classpath)" kafka.Kafka "$config" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  if [ -n "$watch" ]; then
    # The watchdog: when process $watch ends, the broker is killed (and with
    # ESK_KAFKA_EPHEMERAL=1 its state dir removed). A broker that dies first
    # (say, killed by a fault test) just ends the watchdog.
    # shellcheck disable=SC2016 # the inner bash expands them
    setsid nohup bash -c '
      watch=$1 broker=$2 pidfile=$3 home=$4
      while kill -0 "$watch" 2>/dev/null && kill -0 "$broker" 2>/dev/null; do sleep 1; done
      kill -0 "$watch" 2>/dev/null && exit 0
      kill -9 "$broker" 2>/dev/null
      [ "$(cat "$pidfile" 2>/dev/null)" = "$broker" ] && rm -f "$pidfile"
      if [ -n "$home" ]; then sleep 0.5; rm -rf "$home"; fi' \
      watchdog "$watch" "$!" "$pidfile" "${ESK_KAFKA_EPHEMERAL:+$ESK_HOME}" \
      >/dev/null 2>&1 </dev/null &
  fi
}

stop_pidfiles() {
  local pf pids=() i
  for pf in "$@"; do
    if alive "$pf"; then
      pids+=("$(cat "$pf")")
      kill -TERM "$(cat "$pf")" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < 300; i++)); do
    local left=0 pid
    for pid in "${pids[@]}"; do pid_runs "$pid" && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if pid_runs "$pid"; then
      log "pid $pid did not stop in 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
  ((${#pids[@]} == 0)) || log "stopped (pid ${pids[*]})"
}

single_start() {
  local watch=""
  if [ "${1:-}" = "--watch-pid" ]; then watch=${2:?--watch-pid needs a pid}; fi
  local pf=$ESK_HOME/run/kafka.pid mf=$ESK_HOME/run/kafka.security
  if alive "$pf"; then
    follow_mode "$mf" "the broker (pid $(cat "$pf"))"
    wait_ready "127.0.0.1:$single_port" "$start_timeout" 1 "$pf" ||
      die "broker pid $(cat "$pf") runs but does not answer on 127.0.0.1:$single_port"
    log "already running on 127.0.0.1:$single_port (pid $(cat "$pf"))"
    return 0
  fi
  if port_open "$single_port"; then
    die "port $single_port is taken by another process; stop it or set ESK_KAFKA_PORT"
  fi
  need_java
  fetch
  local t0=$SECONDS cid dir=$single_dir
  if secured; then
    ensure_secrets
    check_secrets_of "$dir"
  fi
  mkdir -p "$dir" "$ESK_HOME/run"
  write_config "$dir/server.properties" 1 "$single_port" "$dir" "" \
    "offsets.topic.replication.factor=1" \
    "transaction.state.log.replication.factor=1" \
    "transaction.state.log.min.isr=1" \
    "share.coordinator.state.topic.replication.factor=1" \
    "share.coordinator.state.topic.min.isr=1" \
    "num.partitions=1"
  cid=$(cat "$dir/cluster.id" 2>/dev/null || true)
  if [ -z "$cid" ]; then
    cid=$(kafka_java kafka.tools.StorageTool random-uuid)
    echo "$cid" >"$dir/cluster.id"
  fi
  scram_format_flags
  echo "$security" >"$mf"
  start_node kafka "$dir/server.properties" "$dir" "$watch" "$cid" --standalone "${scram_flags[@]}"
  record_users_of "$dir"
  if ! wait_ready "127.0.0.1:$single_port" "$start_timeout" 1 "$pf"; then
    tail -n 30 "$ESK_HOME/log/kafka.log" >&2 || true
    if started "$pf"; then
      stop_pidfiles "$pf"
      die "broker did not answer on 127.0.0.1:$single_port within ${start_timeout}s$(port_taken "$ESK_HOME/log/kafka.log")"
    fi
    rm -f "$pf"
    die "broker exited during start$(port_taken "$ESK_HOME/log/kafka.log"); see $ESK_HOME/log/kafka.log"
  fi
  add_missing_users "$dir" "127.0.0.1:$single_port" "$ESK_HOME/log/kafka.log"
  log "ready on 127.0.0.1:$single_port in $((SECONDS - t0))s (${mode_tag}pid $(cat "$pf"), data $dir, log $ESK_HOME/log/kafka.log)"
}

single_status() {
  local pf=$ESK_HOME/run/kafka.pid
  alive "$pf" && follow_mode "$ESK_HOME/run/kafka.security" "the broker (pid $(cat "$pf"))"
  if alive "$pf" && python3 "$here/metadata_probe.py" "127.0.0.1:$single_port" "${probe_args[@]}" 2>/dev/null; then
    echo "kafka: running on 127.0.0.1:$single_port (${mode_tag}pid $(cat "$pf"))"
  elif alive "$pf"; then
    echo "kafka: pid $(cat "$pf") alive but not answering on 127.0.0.1:$single_port"
    return 1
  else
    echo "kafka: stopped"
    return 1
  fi
}

cluster_voters() {
  local i voters=""
  for i in 1 2 3; do
    voters+="${voters:+,}$i@127.0.0.1:$((cluster_ports[i - 1] + 1))"
  done
  echo "$voters"
}

cluster_node_start() { # N
  local n=$1 dir=$cluster_base/node$1 base=$cluster_base
  local pf=$ESK_HOME/run/kafka-node$n.pid
  [[ $n =~ ^[123]$ ]] || die "node must be 1, 2 or 3, not '$n'"
  if alive "$pf"; then
    log "node $n already running (pid $(cat "$pf"))"
    return 0
  fi
  port_open "${cluster_ports[n - 1]}" && die "port ${cluster_ports[n - 1]} is taken by another process"
  if secured; then
    ensure_secrets
    check_secrets_of "$base"
  fi
  mkdir -p "$dir"
  write_config "$dir/server.properties" "$n" "${cluster_ports[n - 1]}" "$dir" "$(cluster_voters)" \
    "default.replication.factor=3" \
    "min.insync.replicas=2" \
    "offsets.topic.replication.factor=3" \
    "transaction.state.log.replication.factor=3" \
    "transaction.state.log.min.isr=2" \
    "share.coordinator.state.topic.replication.factor=3" \
    "share.coordinator.state.topic.min.isr=2" \
    "broker.session.timeout.ms=6000" \
    "broker.heartbeat.interval.ms=1000"
  # A restarted node keeps the watchdog binding the cluster was started with.
  local watch
  watch=$(cat "$ESK_HOME/run/kafka-cluster.watch" 2>/dev/null || true)
  scram_format_flags
  start_node "kafka-node$n" "$dir/server.properties" "$dir" "$watch" "$(cat "$base/cluster.id")" "${scram_flags[@]}"
}

cluster_bootstrap() {
  local i out=""
  for i in 0 1 2; do out+="${out:+,}127.0.0.1:${cluster_ports[i]}"; done
  echo "$out"
}

cluster() {
  local sub=${1:-}
  shift || true
  local mf=$ESK_HOME/run/kafka-cluster.security n
  case "$sub" in
  start)
    mkdir -p "$ESK_HOME/run"
    for n in 1 2 3; do
      alive "$ESK_HOME/run/kafka-node$n.pid" && follow_mode "$mf" "the cluster (node $n)"
    done
    echo "$security" >"$mf"
    if [ "${1:-}" = "--watch-pid" ]; then
      echo "${2:?--watch-pid needs a pid}" >"$ESK_HOME/run/kafka-cluster.watch"
    else
      rm -f "$ESK_HOME/run/kafka-cluster.watch"
    fi
    need_java
    fetch
    local base=$cluster_base
    mkdir -p "$base"
    [ -f "$base/cluster.id" ] || kafka_java kafka.tools.StorageTool random-uuid >"$base/cluster.id"
    local t0=$SECONDS
    for n in 1 2 3; do cluster_node_start "$n"; done
    record_users_of "$base"
    # A quorum needs two of three controllers, so wait for all three together.
    for n in 1 2 3; do
      if ! wait_ready "127.0.0.1:${cluster_ports[n - 1]}" "$start_timeout" 3 "$ESK_HOME/run/kafka-node$n.pid"; then
        local m
        for m in 1 2 3; do
          started "$ESK_HOME/run/kafka-node$m.pid" && continue
          tail -n 30 "$ESK_HOME/log/kafka-node$m.log" >&2 || true
          die "node $m exited during start$(port_taken "$ESK_HOME/log/kafka-node$m.log"); see $ESK_HOME/log/kafka-node$m.log"
        done
        tail -n 30 "$ESK_HOME/log/kafka-node$n.log" >&2 || true
        die "node $n did not answer with 3 brokers within ${start_timeout}s$(port_taken "$ESK_HOME"/log/kafka-node{1,2,3}.log)"
      fi
    done
    add_missing_users "$base" "$(cluster_bootstrap)" "$ESK_HOME/log/kafka-node1.log"
    log "cluster ready on $(cluster_bootstrap) in $((SECONDS - t0))s${mode_tag:+ (${mode_tag%, })}"
    ;;
  stop)
    stop_pidfiles "$ESK_HOME"/run/kafka-node{1,2,3}.pid
    rm -f "$ESK_HOME/run/kafka-cluster.watch" "$mf"
    ;;
  status)
    local rc=0 tag=""
    [ "$(cat "$mf" 2>/dev/null)" != sasl_ssl ] || tag="sasl_ssl, "
    for n in 1 2 3; do
      if alive "$ESK_HOME/run/kafka-node$n.pid"; then
        echo "node $n: running on 127.0.0.1:${cluster_ports[n - 1]} (${tag}pid $(cat "$ESK_HOME/run/kafka-node$n.pid"))"
      else
        echo "node $n: stopped"
        rc=1
      fi
    done
    return $rc
    ;;
  kill)
    local n=${1:?which node: 1, 2 or 3} pf
    pf=$ESK_HOME/run/kafka-node$n.pid
    alive "$pf" || die "node $n is not running"
    local pid i
    pid=$(cat "$pf")
    kill -KILL "$pid"
    # Gone, not just signalled: until it is, its ports still accept, and a
    # restart right after the kill found its port "taken by another process".
    # Its main thread is a zombie before the other threads (and the sockets)
    # are, so the ports are what to wait for.
    for ((i = 0; i < 100; i++)); do
      pid_runs "$pid" || port_open "${cluster_ports[n - 1]}" || port_open "$((cluster_ports[n - 1] + 1))" || break
      sleep 0.05
    done
    log "node $n killed (SIGKILL, pid $pid)"
    rm -f "$pf"
    ;;
  restart)
    local n=${1:?which node: 1, 2 or 3}
    # A restarted node keeps the mode the cluster was started in.
    follow_mode "$mf" "the cluster"
    cluster_node_start "$n"
    wait_ready "127.0.0.1:${cluster_ports[n - 1]}" "$start_timeout" 3 "$ESK_HOME/run/kafka-node$n.pid" ||
      die "node $n did not rejoin within ${start_timeout}s"
    log "node $n rejoined"
    ;;
  bootstrap) cluster_bootstrap ;;
  *) die "usage: kafka.sh cluster start [--watch-pid P]|stop|status|kill N|restart N|bootstrap" ;;
  esac
}

tool() {
  local class=${1:?usage: kafka.sh tool CLASS [ARGS...]}
  shift
  [[ $class == *.* ]] || class=org.apache.kafka.tools.$class
  need_java
  fetch
  exec java -Xmx"$heap" -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$(classpath)" "$class" "$@"
}

# Like tool, once per line of stdin in one JVM (ToolLines.java): the ARGS
# first, then the line's words. For `esk acls --commands`.
tool_lines() {
  local class=${1:?usage: kafka.sh tool-lines CLASS [ARGS...] <LINES}
  shift
  [[ $class == *.* ]] || class=org.apache.kafka.tools.$class
  need_java
  fetch
  exec java -Xmx"$heap" -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$(classpath)" "$here/ToolLines.java" "$class" "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
fetch) fetch ;;
start) single_start "$@" ;;
stop)
  stop_pidfiles "$ESK_HOME/run/kafka.pid"
  rm -f "$ESK_HOME/run/kafka.security"
  ;;
status) single_status ;;
cluster) cluster "$@" ;;
tool) tool "$@" ;;
tool-lines) tool_lines "$@" ;;
wait) wait_ready "${1:?HOST:PORT}" "${2:-$start_timeout}" "${3:-1}" ;;
client-config) client_config "$@" ;;
*)
  # The header comment, up to the first line that is not one.
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  exit 2
  ;;
esac
