#!/usr/bin/env python3
"""Ask a Kafka broker for cluster metadata, speaking the wire protocol directly.

Usage: metadata_probe.py HOST:PORT [MIN_BROKERS] [--config CLIENT.properties]

Exit 0 when the broker answers an ApiVersions and a Metadata request and the
metadata lists at least MIN_BROKERS brokers (default 1); exit 1 otherwise, and
3 when the broker refused the credentials.
A readiness check that needs no JVM start and no client library.

--config reads a librdkafka-style properties file (the ones kafka.sh writes
in its sasl_ssl mode): security.protocol PLAINTEXT, SSL, SASL_PLAINTEXT or
SASL_SSL; sasl.mechanism SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN;
sasl.username, sasl.password; ssl.ca.location (a PEM file). TLS checks the
broker's certificate against that CA and the host name or IP address.
"""
import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import sys

API_VERSIONS, METADATA, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 3, 17, 36


class AuthError(Exception):
    """The broker refused the credentials (or the mechanism)."""


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


def api_ranges(api_versions_body):
    error, count = struct.unpack(">hi", api_versions_body[:6])
    if error != 0:
        raise ValueError(f"ApiVersions error {error}")
    off, ranges = 6, {}
    for _ in range(count):
        key, lo, hi = struct.unpack(">hhh", api_versions_body[off:off + 6])
        off += 6
        ranges[key] = (lo, hi)
    return ranges


def kstring(s):
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def read_config(path):
    conf = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    return conf


def pick(ranges, key, lo, hi, name):
    """The lowest version in lo..hi that the broker offers."""
    have_lo, have_hi = ranges.get(key, (0, -1))
    version = max(lo, have_lo)
    if version > min(hi, have_hi):
        raise ValueError(f"no usable {name} version in {have_lo}..{have_hi}")
    return version


def sasl_authenticate(sock, version, correlation, data):
    body = request(sock, SASL_AUTHENTICATE, version, correlation, struct.pack(">i", len(data)) + data)
    error, msg_len = struct.unpack(">hh", body[:4])
    off = 4
    message = None
    if msg_len >= 0:
        message = body[off:off + msg_len].decode(errors="replace")
        off += msg_len
    if error != 0:
        raise AuthError(f"SaslAuthenticate error {error}: {message}")
    size = struct.unpack(">i", body[off:off + 4])[0]
    return body[off + 4:off + 4 + max(size, 0)]


def scram(sock, version, digest, user, password):
    """RFC 5802 client, as Kafka's SCRAM-SHA-256/512 servers expect it."""
    nonce = os.urandom(16).hex()
    name = user.replace("=", "=3D").replace(",", "=2C")
    client_first_bare = f"n={name},r={nonce}"
    server_first = sasl_authenticate(sock, version, 4, ("n,," + client_first_bare).encode()).decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(",") if "=" in kv)
    if "e" in attrs:
        raise AuthError(f"SCRAM: {attrs['e']}")
    server_nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
    if not server_nonce.startswith(nonce):
        raise AuthError("SCRAM: the server's nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    stored_key = hashlib.new(digest, client_key).digest()
    client_final_bare = f"c=biws,r={server_nonce}"
    auth_message = f"{client_first_bare},{server_first},{client_final_bare}".encode()
    signature = hmac.new(stored_key, auth_message, digest).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    server_final = sasl_authenticate(sock, version, 5, f"{client_final_bare},p={proof}".encode()).decode()
    final = dict(kv.split("=", 1) for kv in server_final.split(",") if "=" in kv)
    if "e" in final:
        raise AuthError(f"SCRAM: {final['e']}")
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    expected = base64.b64encode(hmac.new(server_key, auth_message, digest).digest()).decode()
    if final.get("v") != expected:
        raise AuthError("SCRAM: the server's signature does not match: not the broker we know")


def authenticate(sock, ranges, conf):
    mechanism = conf.get("sasl.mechanism", "GSSAPI").upper()
    user, password = conf.get("sasl.username", ""), conf.get("sasl.password", "")
    # Handshake v1: the SASL tokens then travel in SaslAuthenticate requests.
    pick(ranges, SASL_HANDSHAKE, 1, 1, "SaslHandshake")
    body = request(sock, SASL_HANDSHAKE, 1, 3, kstring(mechanism))
    if struct.unpack(">h", body[:2])[0] != 0:
        raise AuthError(f"the broker does not enable SASL mechanism {mechanism}")
    # v0 and v1 share one non-flexible request layout; v1 adds a session lifetime after the token.
    version = pick(ranges, SASL_AUTHENTICATE, 0, 1, "SaslAuthenticate")
    if mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
        scram(sock, version, "sha512" if mechanism.endswith("512") else "sha256", user, password)
    elif mechanism == "PLAIN":
        sasl_authenticate(sock, version, 4, f"\0{user}\0{password}".encode())
    else:
        raise ValueError(f"SASL mechanism {mechanism} is not supported by this probe")


def broker_count(host, port, conf):
    protocol = conf.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ValueError(f"unknown security.protocol {protocol}")
    raw = socket.create_connection((host, port), timeout=3)
    raw.settimeout(3)
    sock = raw
    try:
        if protocol.endswith("SSL"):
            ctx = ssl.create_default_context(cafile=conf.get("ssl.ca.location") or None)
            sock = ctx.wrap_socket(raw, server_hostname=host)
        ranges = api_ranges(request(sock, API_VERSIONS, 0, 1, b""))
        if protocol.startswith("SASL"):
            authenticate(sock, ranges, conf)
        # Versions 4..8 share one non-flexible layout: topics (null = all) + auto-create flag.
        version = pick(ranges, METADATA, 4, 8, "Metadata")
        body = request(sock, METADATA, version, 2, struct.pack(">i?", -1, False))
        # Response v4..v8: throttle_time_ms, then the brokers array.
        return struct.unpack(">i", body[4:8])[0]
    finally:
        sock.close()


def main():
    args, config = [], None
    argv = sys.argv[1:]
    while argv:
        arg = argv.pop(0)
        if arg == "--config" and argv:
            config = argv.pop(0)
        else:
            args.append(arg)
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = args[0].rpartition(":")
    want = int(args[1]) if len(args) > 1 else 1
    try:
        conf = read_config(config) if config else {}
        have = broker_count(host, int(port), conf)
    except AuthError as err:
        print(f"{args[0]}: authentication failed: {err}", file=sys.stderr)
        return 3
    except (OSError, ValueError, KeyError, struct.error) as err:
        print(f"{args[0]}: {err}", file=sys.stderr)
        return 1
    if have < want:
        print(f"{args[0]}: {have} of {want} brokers registered", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
