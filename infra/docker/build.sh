#!/usr/bin/env bash
# Builds the image esk/kafka:<Kafka version> with no registry pull: a Debian
# base made here by `debootstrap --variant=minbase` with Debian's JRE, the
# Kafka jars `infra/kafka/kafka.sh fetch` brings (the same Kafka as the local
# broker's, infra/kafka/pom.xml), and infra/docker/kafka-start.sh, imported
# with `docker import`. Built once per machine: the image carries the
# checksum of what it is made of (label esk.checksum) and is rebuilt only
# when that changes.
#
#   infra/docker/build.sh          build if missing or stale; print the image's name
#
# Needs a Docker engine, debootstrap, and root (debootstrap), or sudo.
# Environment: ESK_DEBIAN_MIRROR (http://deb.debian.org/debian),
# ESK_DEBIAN_SUITE (bookworm).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/infra/docker
say() { printf 'docker/build: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$repo/infra/kafka/pom.xml")
[ -n "$version" ] || die "no <kafka.version> in infra/kafka/pom.xml"
image=esk/kafka:$version
suite=${ESK_DEBIAN_SUITE:-bookworm}
mirror=${ESK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
sum=$(cat "$repo/infra/kafka/pom.xml" "$here/build.sh" "$here/kafka-start.sh" "$repo/infra/kafka/log4j2.properties" \
  <(echo "$suite") | sha256sum | cut -c1-16)

command -v docker >/dev/null || die "no docker client (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd; see .ci/run)"
if [ "$(docker image inspect "$image" --format '{{ index .Config.Labels "esk.checksum" }}' 2>/dev/null)" = "$sum" ]; then
  echo "$image"
  exit 0
fi
command -v debootstrap >/dev/null || die "no debootstrap (Debian: apt-get install debootstrap)"
sudo_=""
[ "$(id -u)" = 0 ] || sudo_=sudo

"$repo/infra/kafka/kafka.sh" fetch >&2
work=$repo/target/docker
rootfs=$work/rootfs-$sum
$sudo_ rm -rf "$rootfs"
mkdir -p "$work"
say "debootstrap $suite (minbase, openjdk-17-jre-headless) into $rootfs"
$sudo_ debootstrap --variant=minbase --include=openjdk-17-jre-headless "$suite" "$rootfs" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || die "debootstrap failed: see $work/debootstrap.log"
$sudo_ mkdir -p "$rootfs/opt/kafka/libs" "$rootfs/var/lib/kafka"
$sudo_ cp "$repo"/infra/kafka/lib/*.jar "$rootfs/opt/kafka/libs/"
$sudo_ cp "$repo/infra/kafka/log4j2.properties" "$rootfs/opt/kafka/"
$sudo_ install -m 755 "$here/kafka-start.sh" "$rootfs/opt/kafka/start"
# What an image need not carry.
$sudo_ rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc \
  "$rootfs"/usr/share/man
say "importing $image"
$sudo_ tar -C "$rootfs" -c . | docker import \
  --change 'ENTRYPOINT ["/opt/kafka/start"]' \
  --change "LABEL esk.checksum=$sum esk.kafka.version=$version" \
  --change "ENV ESK_KAFKA_VERSION=$version" \
  --change 'WORKDIR /var/lib/kafka' \
  - "$image" >/dev/null
$sudo_ rm -rf "$rootfs"
echo "$image"
