"""The alert relay against real local servers: an HTTP server standing in for Slack's webhook,
and an SMTP server (aiosmtpd) for the e-mail digest."""

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from email import message_from_bytes

import psycopg
import pytest
from aiosmtpd.controller import Controller
from conftest import ROOT
from support.fake_slack import FakeSlack
from support.services import dsn_of, free_port, wait_for


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
    # the relay polls once an hour: an alert delivered before the test gives up (30 s) was woken by NOTIFY
    relays("--slack-webhook", slack.url, "--poll-interval", "3600s")
    wait_for(lambda: relay_is_waiting(db), 15, "the relay to start listening")
    [alert] = raise_alerts(db, 1, "notify")
    wait_for(lambda: undelivered(db) == 0, 30, "the alert to be delivered")
    assert slack.delivered_ids() == [alert]
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


# -- urgent review items, concurrent relays, failing channels ---------------------------------

def queue_items(db, n: int, reason: str, prefix: int) -> list[int]:
    return [db.execute("select booking_guard.queue_for_review(%s, %s, '{\"error\": \"HTTP 503\"}')",
                       (prefix + i, reason)).fetchone()[0] for i in range(n)]


def reviewed_ids(slack: FakeSlack) -> list[int]:
    with slack.lock:
        return [int(i) for _, text in slack.accepted for i in re.findall(r"review #(\d+)", text)]


def test_an_urgent_review_item_is_posted_once_with_its_runbook(db, slack, relays):
    relays("--slack-webhook", slack.url, "--poll-interval", "60s", "--runbook-base", "http://docs.example/runbooks")
    wait_for(lambda: relay_is_waiting(db), 15, "the relay to start listening")
    [urgent] = queue_items(db, 1, "calcom_booking_failed", 100)
    queue_items(db, 1, "service_not_found", 200)          # priority 4: the queue, not the pager
    wait_for(lambda: reviewed_ids(slack) == [urgent], 5, "the urgent item to be posted (woken by NOTIFY)")
    wait_for(lambda: db.execute("select delivered_at is not null from booking_guard.review_queue where id = %s",
                                (urgent,)).fetchone()[0], 5, "the item to be marked delivered")
    text = slack.accepted[0][1]
    assert text.startswith(f"booking_guard: 1 new review item for a person in {db.info.dbname}\n")
    assert "[P2] calcom_booking_failed — call 100: error HTTP 503" in text
    assert "runbook: http://docs.example/runbooks/calcom_booking_failed.md" in text
    assert db.execute("select count(*) from booking_guard.review_notifications").fetchone()[0] == 0


def test_two_relays_and_a_failing_webhook_send_each_critical_alert_and_urgent_item_once(db, slack, relays):
    slack.fail_next = 6
    for name in ("one", "two"):
        relays("--slack-webhook", slack.url, "--poll-interval", "0.3s", "--relay-batch", "4", "--relay-name", name)
    alerts = raise_alerts(db, 30, "storm-free")
    items = queue_items(db, 30, "appointment_validation_failed", 1000)

    def done() -> bool:
        return db.execute("""select (select count(*) from booking_guard.alerts where delivered_at is null)
                                  + (select count(*) from booking_guard.review_notifications)""").fetchone()[0] == 0

    wait_for(done, 60, "every alert and item to be delivered despite the failures")
    assert sorted(slack.delivered_ids()) == alerts          # each exactly once
    assert sorted(reviewed_ids(slack)) == items
    assert slack.fail_next == 0                              # the failures happened, and were retried
    assert db.execute("select count(*) from booking_guard.review_queue where delivered_at is null").fetchone()[0] == 0


class FlakyMailbox(Mailbox):
    """An SMTP server that refuses the first `refuse` messages (451: try again later)."""

    def __init__(self, refuse: int) -> None:
        super().__init__()
        self.refuse = refuse
        self.refused = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        if self.refused < self.refuse:
            self.refused += 1
            return "451 4.3.0 try again later"
        return await super().handle_DATA(server, session, envelope)


def test_two_relays_and_a_failing_mail_server_list_each_alert_and_item_in_one_digest(db, relays):
    mailbox = FlakyMailbox(refuse=2)
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for name in ("one", "two"):
            relays("--smtp-host", "127.0.0.1", "--smtp-port", str(port), "--smtp-to", "ops@example.com",
                   "--digest-every", "2s", "--poll-interval", "0.3s", "--relay-name", name)
        # a writer that began before a period ended and commits after: its alert must not be missed
        late = psycopg.connect(dsn_of(db))
        late.execute("select booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', 'late', 'late one')")
        late_id = late.execute("select max(id) from booking_guard.alerts").fetchone()[0]
        alerts = raise_alerts(db, 5, "digest-a")
        items = queue_items(db, 3, "calcom_booking_failed", 500)
        queue_items(db, 2, "customer_creation_failed", 600)   # priority 3: not in the digest
        # the period of the open transaction waits for it, while later periods are created and queued behind it
        wait_for(lambda: db.execute("""select count(*) from booking_guard.alert_digests where sent_at is null""").fetchone()[0]
                 >= 2, 20, "periods waiting for the open transaction")
        late.commit()
        late.close()
        alerts += raise_alerts(db, 5, "digest-b")
        items += queue_items(db, 3, "retry_exhausted", 700)

        def listed(pattern: str) -> list[int]:
            return [int(i) for m in mailbox.messages for i in re.findall(pattern, m.get_payload(), re.M)]

        wait_for(lambda: set(alerts + [late_id]) <= set(listed(r"^#(\d+) "))
                 and set(items) <= set(listed(r"^review #(\d+) ")), 60, "digests listing every alert and item")
        assert sorted(listed(r"^#(\d+) ")) == sorted(alerts + [late_id])      # each in exactly one digest
        assert sorted(listed(r"^review #(\d+) ")) == sorted(items)
        assert mailbox.refused == 2
        assert any("calcom_booking_failed.md" in m.get_payload() for m in mailbox.messages)   # runbook links
    finally:
        controller.stop()
