#!/usr/bin/env python3
"""dispatch: the shop's dispatcher, in Python, through esk's HTTP gateway alone.

Delivery: every confirmed order is dispatched exactly once. The service follows
the `order` category's Server-Sent Events at least once (it keeps its cursor in
a file, written after the work is done, and resumes from it with
Last-Event-ID), and makes the work idempotent: the `Dispatched` event of order
<id> is appended to `parcel-<id>` with expected version `no-stream` and the
Idempotency-Key `dispatch-<id>`, so handling an event twice (after a crash
between the append and the cursor's write) writes nothing twice.

    python3 dispatch.py --state .esk/data/dispatch.cursor

Environment: ESK_GATEWAY_URL (default http://127.0.0.1:8705). Standard library
only. SIGTERM or SIGINT: finishes the event at hand, prints a summary, exits 0.
"""

import argparse
import http.client
import json
import os
import signal
import sys
import tempfile
import time
import urllib.parse
import zlib

CATEGORY = "order"
CARRIERS = ("post", "courier", "freight")
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0
# The gateway sends a keep-alive comment every 15 s: a silence much longer
# than that is a dead connection.
READ_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
# An event's data is bounded by the writer (256 KiB); a longer line is not ours.
MAX_LINE = 4 * 1024 * 1024


def log(message):
    print(f"dispatch: {message}", file=sys.stderr, flush=True)


class Stop(Exception):
    """SIGTERM or SIGINT while nothing was half done."""


class Shutdown:
    """The signal handler: stops at once when idle (reading the stream, waiting
    to reconnect), or after the event at hand when busy with one."""

    def __init__(self):
        self.requested = False
        self.busy = False

    def __call__(self, signum, frame):
        first = not self.requested
        self.requested = True
        if first and not self.busy:
            raise Stop()

    def sleep(self, seconds):
        """Sleeps, cut short by a stop request; whether one came."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.requested


class Transient(Exception):
    """Worth trying again: a 5xx, a timeout, a connection that failed or dropped."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class Refused(Exception):
    """A 4xx: the request will not succeed as it is. Holds the problem document."""

    def __init__(self, status, problem):
        self.status = status
        self.problem = problem
        super().__init__(describe(status, problem))

    @property
    def type(self):
        return self.problem.get("type", "")


def describe(status, problem):
    return f"{status} {problem.get('type', '(no type)')}: {problem.get('detail') or problem.get('title') or ''}"


def problem_of(status, headers, body):
    """The RFC 9457 problem of an error answer (a stand-in if it is not one)."""
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict) or content_type not in ("application/problem+json", "application/json"):
        doc = {"detail": body[:200].decode("utf-8", "replace") if body else ""}
    doc.setdefault("status", status)
    return doc


class Gateway:
    """The few calls of esk's HTTP gateway this service makes."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"ESK_GATEWAY_URL: not an http(s) URL: {url!r}")
        self.scheme, self.netloc, self.base = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.writes = None  # one kept-alive connection for the appends

    def connection(self, timeout):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.netloc, timeout=timeout)

    def append(self, stream, events, expected_version, idempotency_key):
        """POST /streams/{stream}/events: the answer's document (201). Raises
        Refused on a 4xx, Transient on anything worth trying again."""
        body = json.dumps({"expected_version": expected_version, "events": events}).encode()
        path = f"{self.base}/streams/{urllib.parse.quote(stream, safe='')}/events"
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Idempotency-Key": idempotency_key}
        try:
            if self.writes is None:
                self.writes = self.connection(REQUEST_TIMEOUT)
            self.writes.request("POST", path, body=body, headers=headers)
            response = self.writes.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as e:
            # The key makes the retry safe whether or not this one was written.
            self.close()
            raise Transient(f"POST {path}: {e or type(e).__name__}") from e
        if response.status >= 300:
            problem = problem_of(response.status, response.headers, answer)
            if response.status >= 500 or response.status in (408, 429):
                raise Transient(describe(response.status, problem), retry_after_of(response.headers))
            raise Refused(response.status, problem)
        try:
            return json.loads(answer)
        except ValueError:
            return {}

    def subscribe(self, category, cursor, start):
        """GET /subscriptions/{category}: the open response, resuming after
        `cursor` (Last-Event-ID) or, without one, from `start` (start|end)."""
        path = f"{self.base}/subscriptions/{urllib.parse.quote(category, safe='')}"
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if cursor:
            headers["Last-Event-ID"] = cursor
        else:
            path += f"?from={start}"
        conn = self.connection(READ_TIMEOUT)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise Transient(f"GET {path}: {e or type(e).__name__}") from e
        if response.status != 200:
            try:
                body = response.read(64 * 1024)
            except (OSError, http.client.HTTPException):
                body = b""
            conn.close()
            problem = problem_of(response.status, response.headers, body)
            if response.status >= 500 or response.status in (404, 408, 429):
                # 404: no such category yet, it appears with its first event.
                raise Transient(describe(response.status, problem), retry_after_of(response.headers))
            raise Refused(response.status, problem)
        return conn, response

    def close(self):
        if self.writes is not None:
            self.writes.close()
            self.writes = None


def retry_after_of(headers):
    try:
        return float(headers.get("Retry-After", ""))
    except ValueError:
        return None


def sse_events(response):
    """(id, event type, data) of each event of a text/event-stream, as the
    HTML standard parses it; the id is the last one seen, as a browser keeps."""
    last_id, event_type, data = None, "", []
    while True:
        raw = response.readline(MAX_LINE)
        if not raw:
            return
        if not raw.endswith((b"\n", b"\r")) and len(raw) >= MAX_LINE:
            raise Transient(f"an SSE line longer than {MAX_LINE} bytes")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield last_id, event_type or "message", "\n".join(data)
            event_type, data = "", []
            continue
        if line.startswith(":"):
            continue  # a comment: the keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            last_id = value
        elif field == "event":
            event_type = value


def read_cursor(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def write_cursor(path, cursor):
    """Atomically: a reader (or a restart after SIGKILL) sees the old cursor or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dispatch-cursor-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(cursor + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def carrier_for(order):
    """The order's carrier, chosen by its id alone: the Dispatched event of an
    order is one request whatever the event that asked for it, so that every
    retry under its key (a restart, a second Confirmed) is the same request
    and the gateway answers it with the first answer."""
    return CARRIERS[zlib.crc32(order.encode()) % len(CARRIERS)]


class Dispatcher:
    def __init__(self, gateway, shutdown):
        self.gateway = gateway
        self.shutdown = shutdown
        self.counts = {"events": 0, "dispatched": 0, "duplicates": 0, "skipped": 0}

    def handle(self, sse_id, data):
        """Handles one SSE event to the end (a Dispatched appended, found
        already there, or the event skipped as bad); False if a stop came
        before that."""
        self.counts["events"] += 1
        try:
            event = json.loads(data)
        except ValueError:
            return self.skip(sse_id, f"data is not JSON: {data[:200]!r}")
        if not isinstance(event, dict):
            return self.skip(sse_id, f"data is not an event object: {data[:200]!r}")
        stream, event_type = event.get("stream"), event.get("type")
        if event_type != "Confirmed":
            return True
        prefix = CATEGORY + "-"
        if not isinstance(stream, str) or not stream.startswith(prefix) or len(stream) == len(prefix):
            return self.skip(sse_id, f"a Confirmed event of stream {stream!r}, not {prefix}<id>")
        order = stream[len(prefix) :]
        dispatched = {"type": "Dispatched", "data": {"order": order, "carrier": carrier_for(order)}}
        return self.append(sse_id, order, dispatched)

    def append(self, sse_id, order, dispatched):
        parcel = f"parcel-{order}"
        backoff = BACKOFF_FIRST
        while True:
            try:
                answer = self.gateway.append(parcel, [dispatched], "no-stream", f"dispatch-{order}")
            except Refused as e:
                if e.status == 409 and e.type == "urn:esk:problem:wrong-expected-version":
                    self.counts["duplicates"] += 1
                    log(f"order {order}: already dispatched ({parcel} is at version {e.problem.get('actual_version')})")
                    return True
                return self.skip(sse_id, f"order {order}: the gateway refused the Dispatched event: {e}")
            except Transient as e:
                delay = max(backoff, min(e.retry_after or 0.0, 30.0))
                log(f"order {order}: {e}; again in {delay:.1f} s")
                if self.shutdown.sleep(delay):
                    return False
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.counts["dispatched"] += 1
            carrier = dispatched["data"]["carrier"]
            log(f"order {order}: dispatched with {carrier} ({parcel} version {answer.get('last_version')})")
            return True

    def skip(self, sse_id, why):
        self.counts["skipped"] += 1
        log(f"skipped event {sse_id}: {why}")
        return True

    def summary(self):
        c = self.counts
        return (
            f"{c['events']} events, {c['dispatched']} dispatched, "
            f"{c['duplicates']} duplicates avoided, {c['skipped']} skipped"
        )


def run(args, shutdown):
    gateway = Gateway(args.gateway)
    dispatcher = Dispatcher(gateway, shutdown)
    cursor = read_cursor(args.state)
    log(f"following {CATEGORY} at {args.gateway}, " + (f"after {cursor}" if cursor else f"from {args.start}"))
    backoff = BACKOFF_FIRST
    try:
        while not shutdown.requested:
            conn = None
            try:
                conn, response = gateway.subscribe(CATEGORY, cursor, args.start)
                for sse_id, event_type, data in sse_events(response):
                    backoff = BACKOFF_FIRST
                    if event_type != "message":
                        continue
                    shutdown.busy = True
                    try:
                        if dispatcher.handle(sse_id, data) and sse_id and sse_id != cursor:
                            write_cursor(args.state, sse_id)
                            cursor = sse_id
                    finally:
                        shutdown.busy = False
                    if shutdown.requested:
                        raise Stop()
                log("the subscription ended; reconnecting")
            except Transient as e:
                log(f"{e}; reconnecting in {backoff:.1f} s")
            except (OSError, http.client.HTTPException) as e:
                log(f"the subscription dropped ({e or type(e).__name__}); reconnecting in {backoff:.1f} s")
            finally:
                if conn is not None:
                    conn.close()
            if shutdown.sleep(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)
    except Stop:
        pass
    except Refused as e:
        log(f"the gateway refused the subscription: {e}")
        return 1
    finally:
        gateway.close()
        log(f"stopped: {dispatcher.summary()}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state", required=True, help="file that keeps the cursor (the last SSE id handled)")
    parser.add_argument(
        "--gateway",
        default=os.environ.get("ESK_GATEWAY_URL", "http://127.0.0.1:8705"),
        help="the gateway's URL (default: ESK_GATEWAY_URL, else http://127.0.0.1:8705)",
    )
    parser.add_argument(
        "--from",
        dest="start",
        choices=("start", "end"),
        default="start",
        help="where to begin without a cursor: every order ever (start, the default) or new ones (end)",
    )
    args = parser.parse_args(argv)
    try:
        Gateway(args.gateway)
    except ValueError as e:
        parser.error(str(e))
    shutdown = Shutdown()
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    return run(args, shutdown)


if __name__ == "__main__":
    sys.exit(main())
