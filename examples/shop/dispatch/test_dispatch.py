"""The dispatcher against the real stack: a live esk-gateway in front of a
writer that takes raw appends for `order` and `parcel` (ESK_GATEWAY_URL).
Nothing of the gateway is mocked. tests/tests/it/polyglot.rs runs these
against a stack of its own; by hand:

    ESK_GATEWAY_URL=http://127.0.0.1:8705 python3 -m unittest -v

Each test runs dispatch.py as a subprocess with a state file of its own, and
names its orders with fresh uuids. Every wait is bounded.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
GATEWAY = os.environ.get("ESK_GATEWAY_URL", "").rstrip("/")
CARRIERS = ("post", "courier", "freight")
WAIT = 90.0


def call(method, path, body=None, headers=None, timeout=30.0):
    """(status, document or None) of one request to the gateway."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(GATEWAY + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def append(stream, *events, expected="any"):
    """Raw events ({"type", "data"}) appended to `stream`: the answer."""
    quoted = urllib.parse.quote(stream, safe="")
    status, doc = call("POST", f"/streams/{quoted}/events", {"expected_version": expected, "events": list(events)})
    assert status == 201, f"append to {stream}: {status} {doc}"
    return doc


def read(stream):
    return call("GET", f"/streams/{urllib.parse.quote(stream, safe='')}")


def order(oid):
    """Placed then Confirmed, in one append, for order-<oid>."""
    placed = {"type": "Placed", "data": {"customer": "ann", "item": "tea", "quantity": 2, "amount": 700}}
    return append(f"order-{oid}", placed, {"type": "Confirmed", "data": {}})


def wait_until(what, check, timeout=WAIT, every=0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def dispatched(oid):
    """The parcel's events once it exists, else None."""
    status, doc = read(f"parcel-{oid}")
    if status == 404:
        return None
    assert status == 200, f"GET parcel-{oid}: {status} {doc}"
    return doc


class Dispatch:
    """dispatch.py as a subprocess: stderr to a log file."""

    def __init__(self, state, workdir):
        self.log_path = os.path.join(workdir, f"dispatch-{uuid.uuid4().hex[:8]}.log")
        self.log_file = open(self.log_path, "wb")
        env = dict(os.environ, ESK_GATEWAY_URL=GATEWAY, PYTHONDONTWRITEBYTECODE="1")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "dispatch.py"), "--state", state],
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def lines(self, pattern):
        return [line for line in self.log().splitlines() if re.search(pattern, line)]

    def running(self):
        return self.process.poll() is None

    def terminate(self):
        """SIGTERM: the exit code (asserted within 20 s)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"dispatch did not stop on SIGTERM:\n{self.log()}") from None
        finally:
            self.log_file.close()

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.log_file.close()

    def close(self):
        if self.running():
            self.kill()
        self.log_file.close()


@unittest.skipUnless(GATEWAY, "needs ESK_GATEWAY_URL: a live esk-gateway (tests/tests/it/polyglot.rs starts one)")
class DispatchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        wait_until("the gateway's /health", healthy, 60)

    def setUp(self):
        self.workdir = tempfile.mkdtemp(prefix="dispatch-test-")
        self.state = os.path.join(self.workdir, "dispatch.cursor")
        self.services = []

    def tearDown(self):
        result = self._outcome.result
        failed = any(test is self for test, _ in result.errors + result.failures)
        for s in self.services:
            s.close()
            if failed:
                print(f"\n--- {s.log_path}\n{s.log()[-6000:]}", file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self):
        s = Dispatch(self.state, self.workdir)
        self.services.append(s)
        return s

    def assert_one_dispatched(self, oid):
        doc = dispatched(oid)
        self.assertIsNotNone(doc, f"parcel-{oid} was not dispatched")
        self.assertEqual(doc["version"], 1, doc)
        self.assertEqual([e["type"] for e in doc["events"]], ["Dispatched"], doc)
        data = doc["events"][0]["data"]
        self.assertEqual(data, {"order": oid, "carrier": data["carrier"]})
        self.assertIn(data["carrier"], CARRIERS)

    def test_a_confirmed_order_is_dispatched_once(self):
        oid = uuid.uuid4().hex
        order(oid)
        # An order someone dispatched by hand already: a duplicate avoided (409).
        by_hand = uuid.uuid4().hex
        append(f"parcel-{by_hand}", {"type": "Dispatched", "data": {"order": by_hand, "carrier": "post"}})
        order(by_hand)
        s = self.start()
        wait_until(f"parcel-{oid}", lambda: dispatched(oid))
        self.assert_one_dispatched(oid)
        wait_until("the hand-made parcel seen", lambda: s.lines(rf"order {by_hand}: already dispatched"))
        self.assert_one_dispatched(by_hand)
        # A second Confirmed of the same order: the same request under the
        # same key, answered as the first was; nothing written twice.
        append(f"order-{oid}", {"type": "Confirmed", "data": {}})
        wait_until("the second Confirmed handled", lambda: len(s.lines(rf"order {oid}: ")) == 2)
        self.assert_one_dispatched(oid)
        self.assertEqual(s.terminate(), 0, s.log())
        self.assertTrue(s.lines(r"stopped: \d+ events, \d+ dispatched, [1-9]\d* duplicates avoided"), s.log())
        self.assertFalse(s.lines(rf"skipped .*order ({oid}|{by_hand})"), s.log())

    def test_b_sigkill_mid_stream_then_restart_dispatches_every_order_exactly_once(self):
        oids = [uuid.uuid4().hex for _ in range(50)]
        for oid in oids:
            order(oid)
        mine = "|".join(oids)

        def handled(s):
            """Our orders that run `s` handled (dispatched or found dispatched), in order."""
            return [re.search(r"order (\w+):", line)[1] for line in s.lines(rf"order ({mine}): ")]

        def missing():
            return [oid for oid in oids if dispatched(oid) is None]

        # SIGKILLed twice in the middle of the orders, then left to finish.
        done = set()
        for run in range(3):
            s = self.start()
            left = len(oids) - len(done)
            if run < 2 and left >= 2:
                enough = min(10, left // 2)
                wait_until(f"{enough} more orders handled", lambda: len(set(handled(s)) - done) >= enough)
                s.kill()
            else:
                wait_until("every order dispatched", lambda: not missing(), every=0.5)
                self.assertEqual(s.terminate(), 0, s.log())
            ours = handled(s)
            self.assertEqual(len(ours), len(set(ours)), f"an order handled twice in one run:\n{s.log()}")
            # Resumed from the cursor: only the event in hand at the kill may come again.
            again = done & set(ours)
            self.assertLessEqual(len(again), 1, f"handled again after the restart: {again}")
            done |= set(ours)
            if not missing():
                break
        for oid in oids:
            self.assert_one_dispatched(oid)

    def test_c_the_cursor_resumes_after_the_last_event_handled(self):
        before, after = uuid.uuid4().hex, uuid.uuid4().hex
        order(before)
        cursor = sse_id_of(f"order-{before}", "Confirmed")
        with open(self.state, "w", encoding="utf-8") as f:
            f.write(cursor + "\n")
        order(after)
        s = self.start()
        wait_until(f"parcel-{after}", lambda: dispatched(after))
        self.assertEqual(s.terminate(), 0, s.log())
        self.assertIsNone(dispatched(before), f"order {before}, before the cursor, was handled")
        self.assertFalse(s.lines(before), s.log())
        with open(self.state, encoding="utf-8") as f:
            self.assertNotEqual(f.read().strip(), cursor, "the cursor did not move")
        self.assertFalse([n for n in os.listdir(self.workdir) if n.startswith(".dispatch-cursor-")], "temp files left")

    def test_d_hostile_events_are_skipped_and_the_service_goes_on(self):
        text_data = uuid.uuid4().hex
        append(f"order-{text_data}", {"type": "Confirmed", "data": "not an object"})
        list_data = uuid.uuid4().hex
        append(f"order-{list_data}", {"type": "Confirmed", "data": [1, {"carrier": "post"}]})
        odd = f"a:b@c.d_{uuid.uuid4().hex}"  # every odd character a stream id may hold
        append(f"order-{odd}", {"type": "Confirmed", "data": {"carrier": {"$ne": 1}}})
        # order-<194 characters> is a stream; parcel-<same> is one byte too long.
        too_long = uuid.uuid4().hex + "x" * 162
        append(f"order-{too_long}", {"type": "Confirmed", "data": {}})
        s = self.start()
        normal = uuid.uuid4().hex
        order(normal)
        wait_until(f"parcel-{normal}", lambda: dispatched(normal))
        wait_until("the long id skipped", lambda: s.lines(rf"skipped event .*order {too_long}: .*invalid-input"))
        for oid in (text_data, list_data, odd):
            wait_until(f"parcel-{oid}", lambda: dispatched(oid))
            self.assert_one_dispatched(oid)
        self.assertTrue(s.running(), s.log())
        self.assertEqual(s.terminate(), 0, s.log())

    def test_e_sigterm_while_idle_exits_cleanly(self):
        s = self.start()
        wait_until("the subscription", lambda: s.lines("following order"))
        time.sleep(0.5)
        self.assertEqual(s.terminate(), 0, s.log())
        self.assertTrue(s.lines("stopped: "), s.log())


def healthy():
    try:
        return call("GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def sse_id_of(stream, event_type, timeout=60.0):
    """The SSE id the gateway gives `stream`'s first event of `event_type`,
    read from the start of its category, line by line."""
    category = stream.split("-", 1)[0]
    request = urllib.request.Request(f"{GATEWAY}/subscriptions/{category}?from=start")
    request.add_header("Accept", "text/event-stream")
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:
        sse_id = None
        for raw in response:
            if time.monotonic() > deadline:
                break
            line = raw.decode().rstrip("\r\n")
            if line.startswith("id:"):
                sse_id = line[3:].removeprefix(" ")
            elif line.startswith("data:"):
                event = json.loads(line[5:])
                if event["stream"] == stream and event["type"] == event_type:
                    return sse_id
    raise AssertionError(f"no {event_type} of {stream} in the subscription within {timeout} s")


if __name__ == "__main__":
    unittest.main()
