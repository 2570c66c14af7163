#!/usr/bin/env python3
"""Ask a Kafka broker for cluster metadata, speaking the wire protocol directly.

Usage: metadata_probe.py HOST:PORT [MIN_BROKERS]

Exit 0 when the broker answers an ApiVersions and a Metadata request and the
metadata lists at least MIN_BROKERS brokers (default 1); exit 1 otherwise.
A readiness check that needs no JVM start and no client library.
"""
import socket
import struct
import sys

API_VERSIONS, METADATA = 18, 3


def request(sock, api_key, version, correlation, body):
    client = b"esk-probe"
    header = struct.pack(">hhih", api_key, version, correlation, len(client)) + client
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    payload = recv_exact(sock, size)
    if struct.unpack(">i", payload[:4])[0] != correlation:
        raise ValueError("correlation id mismatch")
    return payload[4:]


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def metadata_range(api_versions_body):
    error, count = struct.unpack(">hi", api_versions_body[:6])
    if error != 0:
        raise ValueError(f"ApiVersions error {error}")
    off = 6
    for _ in range(count):
        key, lo, hi = struct.unpack(">hhh", api_versions_body[off:off + 6])
        off += 6
        if key == METADATA:
            return lo, hi
    raise ValueError("broker does not offer Metadata")


def broker_count(host, port):
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.settimeout(3)
        lo, hi = metadata_range(request(sock, API_VERSIONS, 0, 1, b""))
        # Versions 4..8 share one non-flexible layout: topics (null = all) + auto-create flag.
        version = max(lo, 4)
        if version > min(hi, 8):
            raise ValueError(f"no usable Metadata version in {lo}..{hi}")
        body = request(sock, METADATA, version, 2, struct.pack(">i?", -1, False))
        # Response v4..v8: throttle_time_ms, then the brokers array.
        return struct.unpack(">i", body[4:8])[0]


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = sys.argv[1].rpartition(":")
    want = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    try:
        have = broker_count(host, int(port))
    except (OSError, ValueError) as err:
        print(f"{sys.argv[1]}: {err}", file=sys.stderr)
        return 1
    if have < want:
        print(f"{sys.argv[1]}: {have} of {want} brokers registered", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
