#!/bin/sh
# The entrypoint of esk/kafka: one KRaft node (broker and controller), the
# Kafka of infra/kafka/pom.xml, in the foreground. It listens on 127.0.0.1
# only (the container runs on the host's network: nothing leaves loopback).
#
#   ESK_KAFKA_PORT   the client port (9092); the controller takes the next one
#   ESK_KAFKA_HEAP   the JVM heap (512m)
#
# The data lives in /var/lib/kafka (a volume, or the container's own layer).
set -eu
port=${ESK_KAFKA_PORT:-9092}
cport=$((port + 1))
data=/var/lib/kafka/data
config=/var/lib/kafka/server.properties
mkdir -p "$data"
cat >"$config" <<CONFIG
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
CONFIG
java_opts="-Xms128m -Xmx${ESK_KAFKA_HEAP:-512m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true"
cp="/opt/kafka/libs/*"
if [ ! -f "$data/meta.properties" ]; then
  # shellcheck disable=SC2086
  cid=$(java $java_opts -cp "$cp" kafka.tools.StorageTool random-uuid)
  # shellcheck disable=SC2086
  java $java_opts -cp "$cp" kafka.tools.StorageTool format -t "$cid" -c "$config" --standalone --ignore-formatted
fi
# shellcheck disable=SC2086
exec java $java_opts -Dkafka.logs.dir=/var/lib/kafka -Dlog4j2.configurationFile=/opt/kafka/log4j2.properties \
  -cp "$cp" kafka.Kafka "$config"
