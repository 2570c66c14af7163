#!/usr/bin/env bash
# Builds esk's images here, with no registry pull (none serves images here):
#
#   esk/kafka:<Kafka version>   a Debian base made by `debootstrap
#       --variant=minbase` with Debian's JRE, the Kafka jars `infra/kafka/kafka.sh
#       fetch` brings (the same Kafka as the local broker's, infra/kafka/pom.xml),
#       and infra/docker/kafka-start.sh, imported with `docker import`. The tests'
#       Docker path and infra/docker-compose.yml run it.
#   esk/esk:<esk version>       esk's binaries (esk, esk-writer, esk-projector,
#       esk-replica, esk-coordinator, esk-gateway, the shop's shop-*) on a
#       minbase Debian with OpenSSL, CA certificates and curl (esk/base), run as
#       the user esk; infra/docker-compose.yml runs it.
#
#   infra/docker/build.sh [kafka]   build esk/kafka if missing or stale; print its name
#   infra/docker/build.sh esk       build esk/esk (and esk/base) likewise; print its name
#   infra/docker/build.sh all       both; print both names
#
# Built once per machine: each image carries the checksum of what it is made
# of (label esk.checksum) and is rebuilt only when that changes (for esk/esk:
# when a binary does).
#
# Needs a Docker engine, debootstrap, and root (debootstrap), or sudo.
# Environment: ESK_DEBIAN_MIRROR (http://deb.debian.org/debian),
# ESK_DEBIAN_SUITE (bookworm), ESK_BIN_DIR (esk/esk's binaries: this folder's
# instead of `cargo build --release`), ESK_IMAGE (esk/esk's name,
# esk/esk:<version of Cargo.toml>).
set -euo pipefail
# A failure inside $(...) (the base image's name) fails the build too.
shopt -s inherit_errexit

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/infra/docker
work=$repo/target/docker
say() { printf 'docker/build: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

suite=${ESK_DEBIAN_SUITE:-bookworm}
mirror=${ESK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# esk/esk's binaries.
BINARIES=(esk esk-writer esk-projector esk-replica esk-coordinator esk-gateway
  shop-payments shop-inventory shop-orders shop-shipping)

command -v docker >/dev/null || die "no docker client (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd: infra/docker/engine.sh start)"
sudo_=""
[ "$(id -u)" = 0 ] || sudo_=sudo
# One build at a time on a machine (the tests' broker and the compose test
# may both ask at once): they share target/docker.
mkdir -p "$work"
exec 9>"$work/build.lock"
flock 9

# Removes image id $1 unless it is image $2's (a rebuilt image leaves the one
# it replaced dangling); one still in use stays.
forget() { # old-id image
  [ -n "$1" ] && [ "$1" != "$(docker image inspect "$2" --format '{{.Id}}' 2>/dev/null)" ] &&
    docker image rm "$1" >/dev/null 2>&1 || true
}
id_of() { docker image inspect "$1" --format '{{.Id}}' 2>/dev/null || true; }

# Whether image $1 exists with checksum $2.
current() {
  [ "$(docker image inspect "$1" --format '{{ index .Config.Labels "esk.checksum" }}' 2>/dev/null)" = "$2" ]
}

# A Debian root file system made by debootstrap (minbase, with the packages
# $2), in $1, without what an image need not carry.
rootfs() { # dir packages
  command -v debootstrap >/dev/null || die "no debootstrap (Debian: apt-get install debootstrap)"
  $sudo_ rm -rf "$1"
  mkdir -p "$work"
  say "debootstrap $suite (minbase, $2) into $1"
  $sudo_ debootstrap --variant=minbase --include="$2" "$suite" "$1" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || die "debootstrap failed: see $work/debootstrap.log"
  $sudo_ rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/usr/share/doc "$1"/usr/share/man
}

kafka() {
  local version image sum root old
  version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$repo/infra/kafka/pom.xml")
  [ -n "$version" ] || die "no <kafka.version> in infra/kafka/pom.xml"
  image=esk/kafka:$version
  sum=$(cat "$repo/infra/kafka/pom.xml" "$here/build.sh" "$here/kafka-start.sh" "$repo/infra/kafka/log4j2.properties" \
    <(echo "$suite") | sha256sum | cut -c1-16)
  if current "$image" "$sum"; then
    echo "$image"
    return
  fi
  "$repo/infra/kafka/kafka.sh" fetch >&2
  root=$work/rootfs-kafka-$sum
  rootfs "$root" openjdk-17-jre-headless
  $sudo_ mkdir -p "$root/opt/kafka/libs" "$root/var/lib/kafka"
  $sudo_ cp "$repo"/infra/kafka/lib/*.jar "$root/opt/kafka/libs/"
  $sudo_ cp "$repo/infra/kafka/log4j2.properties" "$root/opt/kafka/"
  $sudo_ install -m 755 "$here/kafka-start.sh" "$root/opt/kafka/start"
  say "importing $image"
  old=$(id_of "$image")
  $sudo_ tar -C "$root" -c . | docker import \
    --change 'ENTRYPOINT ["/opt/kafka/start"]' \
    --change "LABEL esk.checksum=$sum esk.kafka.version=$version" \
    --change "ENV ESK_KAFKA_VERSION=$version" \
    --change 'WORKDIR /var/lib/kafka' \
    - "$image" >/dev/null || die "importing $image failed"
  $sudo_ rm -rf "$root"
  forget "$old" "$image"
  echo "$image"
}

# esk/base: what esk's binaries need beside glibc (ldd: libssl, libcrypto,
# libz), CA certificates for TLS to a secured cluster, curl for health
# checks, and the user esk (uid 10001) owning /var/lib/esk.
base() {
  local image=esk/base:$suite sum root old
  sum=$(cat "$here/build.sh" <(echo "$suite") | sha256sum | cut -c1-16)
  if current "$image" "$sum"; then
    echo "$image"
    return
  fi
  root=$work/rootfs-base-$sum
  rootfs "$root" libssl3,ca-certificates,curl
  $sudo_ chroot "$root" useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/esk \
    --shell /usr/sbin/nologin esk
  $sudo_ mkdir -p "$root/var/lib/esk"
  $sudo_ chown 10001:10001 "$root/var/lib/esk"
  say "importing $image"
  old=$(id_of "$image")
  $sudo_ tar -C "$root" -c . | docker import --change "LABEL esk.checksum=$sum" - "$image" >/dev/null ||
    die "importing $image failed"
  $sudo_ rm -rf "$root"
  forget "$old" "$image"
  echo "$image"
}

esk() {
  local version image bins base_image staged sum ctr b old
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
  image=${ESK_IMAGE:-esk/esk:$version}
  if [ -n "${ESK_BIN_DIR:-}" ]; then
    bins=$ESK_BIN_DIR
  else
    say "cargo build --release"
    (cd "$repo" && cargo build --release --locked --workspace --bins -q) >&2 || die "cargo build failed"
    bins=$repo/target/release
  fi
  base_image=$(base)
  # Without debug information (a debug build's binaries are 100 MB each);
  # symbols stay, for backtraces.
  staged=$work/bin
  rm -rf "$staged"
  mkdir -p "$staged"
  for b in "${BINARIES[@]}"; do
    [ -x "$bins/$b" ] || die "no $bins/$b (build the workspace's binaries first: make build)"
    objcopy --strip-debug "$bins/$b" "$staged/$b"
  done
  sum=$( (docker image inspect "$base_image" --format '{{.Id}}' && cd "$staged" && sha256sum "${BINARIES[@]}") |
    sha256sum | cut -c1-16)
  if current "$image" "$sum"; then
    echo "$image"
    return
  fi
  say "making $image from $base_image and $bins"
  old=$(id_of "$image")
  ctr=$(docker create "$base_image" /bin/true)
  if ! docker cp "$staged/." "$ctr:/usr/local/bin/" >/dev/null || ! docker commit \
    --change "LABEL esk.checksum=$sum esk.version=$version" \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin ESK_DATA_DIR=/var/lib/esk' \
    --change 'USER esk' \
    --change 'WORKDIR /var/lib/esk' \
    --change 'CMD ["esk", "--help"]' \
    "$ctr" "$image" >/dev/null; then
    docker rm -f "$ctr" >/dev/null 2>&1 || true
    die "making $image failed"
  fi
  docker rm -f "$ctr" >/dev/null
  forget "$old" "$image"
  echo "$image"
}

case "${1:-kafka}" in
kafka) kafka ;;
esk) esk ;;
all)
  kafka
  esk
  ;;
*) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
