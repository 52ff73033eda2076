"""The alert relay against real local servers: an HTTP server standing in for Slack's webhook,
and an SMTP server (aiosmtpd) for the e-mail digest."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from conftest import ROOT
from test_exporter import dsn_of, free_port


class FakeSlack:
    """A webhook that records what it accepted; it can fail or hang on demand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: list[tuple[float, str]] = []   # (time, text) answered 200
        self.requests: list[float] = []               # every request's arrival
        self.fail_next = 0
        self.hang_next = 0
        self.hanging = threading.Event()              # set when a request is being held
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    fake.requests.append(time.monotonic())
                    hang, fail = fake.hang_next > 0, fake.hang_next == 0 and fake.fail_next > 0
                    if hang:
                        fake.hang_next -= 1
                    elif fail:
                        fake.fail_next -= 1
                if hang:
                    fake.hanging.set()
                    fake.release.wait(30)
                    self.close_connection = True
                    return   # no answer at all
                if fail:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"rate_limited")
                    return
                with fake.lock:
                    fake.accepted.append((time.monotonic(), json.loads(body)["text"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/services/T000/B000/XXXX"

    def delivered_ids(self) -> list[int]:
        with self.lock:
            return [int(i) for _, text in self.accepted for i in re.findall(r"alert #(\d+)", text)]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    fake = FakeSlack()
    yield fake
    fake.close()


@pytest.fixture
def relays(db) -> Iterator[Callable[..., subprocess.Popen]]:
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        # --dsn after the command: global options are accepted on either side of it
        proc = subprocess.Popen([sys.executable, "-m", "booking_guard.cli", "relay", "--dsn", dsn_of(db), *args],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


def raise_alerts(db, n: int, prefix: str) -> list[int]:
    return [db.execute("select booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', %s, %s)",
                       (f"{prefix}-{i}", f"call {prefix}-{i} claims a booking")).fetchone()[0] for i in range(n)]


def undelivered(db) -> int:
    return db.execute("select count(*) from booking_guard.alerts where delivered_at is null").fetchone()[0]


def relay_is_waiting(db) -> bool:
    # the relay has finished its first round (alerts, then review items) and sits in LISTEN
    return db.execute("""select exists (select from pg_stat_activity
                                         where datname = current_database() and application_name = 'booking-guard relay'
                                           and state = 'idle' and query like '%%claim_reviews%%')""").fetchone()[0]


def test_a_new_alert_is_posted_at_once_woken_by_notify(db, slack, relays):
    relays("--slack-webhook", slack.url, "--poll-interval", "60s")
    wait_for(lambda: relay_is_waiting(db), 15, "the relay to start listening")
    raised = time.monotonic()
    [alert] = raise_alerts(db, 1, "notify")
    wait_for(lambda: undelivered(db) == 0, 5, "the alert to be delivered")
    assert slack.delivered_ids() == [alert]
    assert slack.accepted[0][0] - raised < 5          # long before the 60 s poll
    assert db.execute("select count(*) from booking_guard.alert_claims").fetchone()[0] == 0
    assert "[CRITICAL] phantom_booking" in slack.accepted[0][1]
    assert slack.accepted[0][1].startswith(f"booking_guard: 1 new alert in {db.info.dbname}\n")   # the target's name


def test_a_failed_post_is_retried_with_backoff(db, slack, relays):
    slack.fail_next = 2
    [alert] = raise_alerts(db, 1, "retry")
    relays("--slack-webhook", slack.url, "--poll-interval", "30s")
    wait_for(lambda: undelivered(db) == 0, 20, "the alert to be delivered after two failures")
    assert slack.delivered_ids() == [alert]
    assert len(slack.requests) == 3
    first_gap, second_gap = slack.requests[1] - slack.requests[0], slack.requests[2] - slack.requests[1]
    assert first_gap >= 0.85     # backoff_delay(1): 1 s, 10 % jitter
    assert second_gap >= 1.7     # backoff_delay(2): 2 s, 10 % jitter


def test_a_relay_killed_between_claim_and_send_loses_nothing(db, slack, relays):
    alerts = raise_alerts(db, 3, "killed")
    slack.hang_next = 1
    first = relays("--slack-webhook", slack.url, "--claim-lease", "2s", "--poll-interval", "0.5s", "--relay-name", "first")
    assert slack.hanging.wait(15), "the first relay never posted"
    claimed = db.execute("select alert_id, claimed_by from booking_guard.alert_claims order by alert_id").fetchall()
    assert claimed == [(a, "first") for a in alerts]
    first.kill()
    first.wait()
    slack.release.set()
    assert undelivered(db) == 3 and slack.delivered_ids() == []
    relays("--slack-webhook", slack.url, "--claim-lease", "2s", "--poll-interval", "0.5s", "--relay-name", "second")
    wait_for(lambda: undelivered(db) == 0, 20, "the restarted relay to deliver the claimed alerts")
    assert sorted(slack.delivered_ids()) == alerts


def test_two_relays_never_send_the_same_alert_twice(db, slack, relays):
    for name in ("one", "two"):
        relays("--slack-webhook", slack.url, "--poll-interval", "0.5s", "--relay-batch", "3", "--relay-name", name)
    alerts = raise_alerts(db, 60, "pair")
    wait_for(lambda: undelivered(db) == 0, 30, "every alert to be delivered")
    delivered = slack.delivered_ids()
    assert sorted(delivered) == alerts           # each exactly once
    assert len(slack.accepted) >= 20             # in batches of at most 3


class Mailbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def test_the_email_digest_lists_each_alert_of_its_period_once(db, smtp, relays):
    mailbox, port = smtp
    relays("--smtp-host", "127.0.0.1", "--smtp-port", str(port), "--smtp-to", "ops@example.com",
           "--digest-every", "2s", "--poll-interval", "0.5s")
    alerts = raise_alerts(db, 3, "digest")

    def listed() -> list[int]:
        return [int(i) for m in mailbox.messages for i in re.findall(r"^#(\d+) ", m.get_payload(), re.M)]

    wait_for(lambda: set(alerts) <= set(listed()), 20, "a digest listing the alerts")
    assert sorted(listed()) == sorted(set(listed()))      # no alert in two digests
    message = mailbox.messages[-1]
    assert message["To"] == "ops@example.com"
    subject = " ".join(message["Subject"].split())     # unfolded (a long header is folded onto lines)
    assert re.match(rf"booking_guard digest: \d+ alerts? in {db.info.dbname}, ", subject), subject   # the target's name
    assert "phantom_booking" in message.get_payload()

    def sent() -> int:
        return db.execute("select count(*) from booking_guard.alert_digests"
                          " where sent_at is not null and alerts > 0").fetchone()[0]

    # The mailbox has the message before the relay records it as sent (digest_sent runs after SMTP).
    wait_for(lambda: sent() >= len(mailbox.messages), 10, "the relay to record the digest as sent")
    assert sent() == len(mailbox.messages)
