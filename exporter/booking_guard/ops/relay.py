"""The alert relay: new alerts and urgent review items to a Slack-compatible webhook at once, an
e-mail digest per period.

Outbox semantics over booking_guard.alerts (SQL in extension/sql/510_alert_relay.sql):
claim_alerts() hands a relay a batch of undelivered alerts for a lease (SKIP LOCKED), the
relay posts them, then alerts_delivered() sets delivered_at. A failed post calls
alerts_failed(), which schedules the next attempt after backoff_delay(). A relay killed
between claim and send loses nothing: the lease runs out and another (or the restarted)
relay claims the alerts again, so delivery is at-least-once; two relays running normally
never send the same alert. LISTEN booking_guard_alert wakes the relay at once; it also
polls, so a missed NOTIFY only delays an alert.

Urgent review items (priority up to the setting review_notify_priority: 1 and 2 by default) go the
same way through their own outbox, booking_guard.review_notifications: claim_reviews(),
reviews_delivered(), reviews_failed(); LISTEN booking_guard_review wakes the relay. The digest of a
period lists its alerts and its urgent review items; claim_digest() hands out a period only once
every transaction that began before its end has ended, so each alert and item is in one digest.
Every line links the runbook page of its alert type or review reason (runbooks.py).

Behind a transaction pooler (PgBouncer pool_mode = transaction) notifications cannot reach the
relay: LISTEN registers whichever server connection ran it, which then serves other clients.
The relay then does not LISTEN at all and only polls (every --poll-interval); it says so once
in its log. `--pooler` (connection.py) says what is in between; by default it is detected.
"""

import http.client
import json
import logging
import os
import smtplib
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage

import psycopg

from booking_guard.ops.connection import POOLER_MODES, behind_pooler, connect
from booking_guard.ops.health import LoopHealth, first_line
from booking_guard.ops.runbooks import DEFAULT_BASE, runbook_url

log = logging.getLogger("booking_guard.relay")

CHANNEL = "booking_guard_alert"
REVIEW_CHANNEL = "booking_guard_review"


@dataclass
class RelayConfig:
    dsn: str
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    slack_webhook: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "booking-guard@localhost"
    smtp_to: list[str] = field(default_factory=list)
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    digest_every: float = 4 * 3600.0
    poll_interval: float = 5.0
    lease: float = 30.0
    batch: int = 10
    send_timeout: float = 10.0
    pooler: str = "auto"       # one of connection.POOLER_MODES
    #: the target's name (targets.py): said in every message and log line, so that alerts of
    #: several databases relayed to one channel tell where they come from
    database: str | None = None
    #: where the runbook pages are served (runbooks.py)
    runbook_base: str = DEFAULT_BASE

    def __post_init__(self) -> None:
        if self.pooler not in POOLER_MODES:
            raise ValueError(f"pooler must be one of {', '.join(POOLER_MODES)}, not {self.pooler!r}")

    @property
    def email(self) -> bool:
        return bool(self.smtp_host and self.smtp_to)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def slack_message(alerts: list[dict], database: str | None = None, runbook_base: str = DEFAULT_BASE) -> dict:
    """The webhook payload for a batch of alerts (Slack's incoming-webhook format: a `text` field)."""
    lines = [f"booking_guard: {_plural(len(alerts), 'new alert')}" + (f" in {database}" if database else "")]
    for a in alerts:
        corrected = " (auto-corrected)" if a["auto_corrected"] else ""
        entity = f"{a['entity_type'] or ''} {a['entity_id'] or ''}".strip()
        lines.append(f"• [{a['severity'].upper()}] {a['alert_type']} — {entity}: {a['description']}{corrected}"
                     f" (alert #{a['id']}) runbook: {runbook_url(a['alert_type'], runbook_base)}")
    return {"text": _slack_escape("\n".join(lines))}


def review_summary(item: dict) -> str:
    """One line on what a review item is about: its alert's description, else the facts of its context."""
    if item.get("alert"):
        return item["alert"]
    context = item.get("context") or {}
    facts = [f"{key} {context[key]}" for key in ("reason", "error", "calcom_booking_id", "operation", "last_error")
             if isinstance(context.get(key), str | int) and len(str(context[key])) <= 200]
    return "; ".join(facts) or "see the review queue"


def review_message(items: list[dict], database: str | None = None, runbook_base: str = DEFAULT_BASE) -> dict:
    """The webhook payload for a batch of urgent review items."""
    lines = [f"booking_guard: {_plural(len(items), 'new review item')} for a person"
             + (f" in {database}" if database else "")]
    for q in items:
        about = " ".join(part for part in (f"call {q['call_id']}" if q["call_id"] is not None else "", q["subject"] or "")
                         if part)
        lines.append(f"• [P{q['priority']}] {q['reason']} — {about or 'no call'}: {review_summary(q)}"
                     f" (review #{q['id']}) runbook: {runbook_url(q['reason'], runbook_base)}")
    return {"text": _slack_escape("\n".join(lines))}


def digest_message(config: RelayConfig, start, end, alerts: list[dict], items: list[dict] | None = None) -> EmailMessage:
    items = items or []
    msg = EmailMessage()
    msg["From"] = config.smtp_from
    msg["To"] = ", ".join(config.smtp_to)
    where = f" in {config.database}" if config.database else ""
    counted = _plural(len(alerts), "alert") + (f", {_plural(len(items), 'urgent review item')}" if items else "")
    msg["Subject"] = f"booking_guard digest: {counted}{where}, {start:%Y-%m-%d %H:%M} to {end:%H:%M} UTC"
    by_kind: dict[tuple[str, str], int] = {}
    for a in alerts:
        by_kind[(a["severity"], a["alert_type"])] = by_kind.get((a["severity"], a["alert_type"]), 0) + 1
    order = {"critical": 0, "warning": 1, "info": 2}
    body = [f"booking_guard alerts and urgent review items{where} from {start:%Y-%m-%d %H:%M:%S} to "
            f"{end:%Y-%m-%d %H:%M:%S} UTC", "", "SUMMARY", "-------"]
    for (severity, rule), n in sorted(by_kind.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        body.append(f"{severity:<9} {rule:<32} {n:>5}  {runbook_url(rule, config.runbook_base)}")
    for reason in sorted({q["reason"] for q in items}):
        n = sum(1 for q in items if q["reason"] == reason)
        body.append(f"{'review':<9} {reason:<32} {n:>5}  {runbook_url(reason, config.runbook_base)}")
    body += ["", "ALERTS", "------"]
    for a in alerts:
        state = "resolved" if a["resolved_at"] else "open"
        corrected = ", auto-corrected" if a["auto_corrected"] else ""
        body.append(f"#{a['id']} {a['detected_at']:%H:%M:%S} [{a['severity']}] {a['alert_type']} "
                    f"{a['entity_type'] or ''} {a['entity_id'] or ''}: {a['description']} ({state}{corrected})")
    if items:
        body += ["", "REVIEW ITEMS (urgent)", "---------------------"]
        for q in items:
            about = " ".join(p for p in (f"call {q['call_id']}" if q["call_id"] is not None else "", q["subject"] or "") if p)
            body.append(f"review #{q['id']} {q['created_at']:%H:%M:%S} [P{q['priority']}] {q['reason']} "
                        f"{about}: {review_summary(q)} ({q['status']})")
    msg.set_content("\n".join(body) + "\n")
    return msg


class Prefixed(logging.LoggerAdapter):
    """Log lines that start with the target's name, `[clinics] ...`, when there is one."""

    def __init__(self, logger: logging.Logger, prefix: str | None) -> None:
        super().__init__(logger, {})
        self.prefix = f"[{prefix}] " if prefix else ""

    def process(self, msg, kwargs):
        return f"{self.prefix}{msg}", kwargs


ALERT_COLUMNS = ("id, alert_type, severity, entity_type, entity_id, description, auto_corrected, occurrences, "
                 "detected_at, resolved_at")
# a review item, with the description of the alert it answers (if any)
REVIEW_COLUMNS = ("q.id, q.call_id, q.reason, q.subject, q.priority, q.status, q.created_at, q.context,"
                  " (select a.description from booking_guard.alerts a where a.review_id = q.id order by a.id limit 1) as alert")


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.last_activity = time.monotonic()
        self._next_digest_check = 0.0
        self._next_retry: float | None = None
        self.health = LoopHealth("relay", config.poll_interval)
        self.health.details["notifications"] = None     # unknown until connected: LISTEN used, or polling only
        self._said_polling = False
        self.log = Prefixed(log, config.database)

    # --- sending -------------------------------------------------------------------------------
    def post_slack(self, payload: dict) -> None:
        request = urllib.request.Request(self.config.slack_webhook, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.send_timeout) as response:  # noqa: S310 - configured URL
            if not 200 <= response.status < 300:
                raise OSError(f"webhook answered HTTP {response.status}")

    def send_mail(self, msg: EmailMessage) -> None:
        c = self.config
        with smtplib.SMTP(c.smtp_host, c.smtp_port, timeout=c.send_timeout) as smtp:
            if c.smtp_starttls:
                smtp.starttls()
            if c.smtp_user:
                smtp.login(c.smtp_user, c.smtp_password or "")
            smtp.send_message(msg)

    # --- one round -----------------------------------------------------------------------------
    def deliver_alerts(self, conn: psycopg.Connection) -> int:
        """Claims, sends and marks one batch; returns how many alerts were claimed."""
        c = self.config
        cur = conn.execute(f"select {ALERT_COLUMNS} from booking_guard.claim_alerts(%s, %s, %s)",
                           (c.name, c.batch, timedelta(seconds=c.lease)))
        names = [d.name for d in cur.description]
        alerts = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        if not alerts:
            return 0
        ids = [a["id"] for a in alerts]
        try:
            self.post_slack(slack_message(alerts, c.database, c.runbook_base))
        except (OSError, http.client.HTTPException, ValueError) as error:   # URLError is an OSError
            retry_in = conn.execute(
                "select extract(epoch from booking_guard.alerts_failed(%s, %s, %s) - clock_timestamp())::float8",
                (c.name, ids, str(error))).fetchone()[0]
            self.log.warning("webhook failed for alerts %s (%s); next attempt in %.1f s", ids, error, retry_in)
            retry_at = time.monotonic() + max(0.0, retry_in or 0.0)
            self._next_retry = retry_at if self._next_retry is None else min(self._next_retry, retry_at)
            return 0
        conn.execute("select booking_guard.alerts_delivered(%s, %s)", (c.name, ids))
        self.log.info("delivered alerts %s to the webhook", ids)
        return len(alerts)

    def deliver_reviews(self, conn: psycopg.Connection) -> int:
        """Claims, sends and marks one batch of urgent review items; returns how many were claimed."""
        c = self.config
        cur = conn.execute(f"select {REVIEW_COLUMNS} from booking_guard.claim_reviews(%s, %s, %s) q",
                           (c.name, c.batch, timedelta(seconds=c.lease)))
        names = [d.name for d in cur.description]
        items = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        if not items:
            return 0
        ids = [q["id"] for q in items]
        try:
            self.post_slack(review_message(items, c.database, c.runbook_base))
        except (OSError, http.client.HTTPException, ValueError) as error:
            retry_in = conn.execute(
                "select extract(epoch from booking_guard.reviews_failed(%s, %s, %s) - clock_timestamp())::float8",
                (c.name, ids, str(error))).fetchone()[0]
            self.log.warning("webhook failed for review items %s (%s); next attempt in %.1f s", ids, error, retry_in)
            retry_at = time.monotonic() + max(0.0, retry_in or 0.0)
            self._next_retry = retry_at if self._next_retry is None else min(self._next_retry, retry_at)
            return 0
        conn.execute("select booking_guard.reviews_delivered(%s, %s)", (c.name, ids))
        self.log.info("delivered review items %s to the webhook", ids)
        return len(items)

    def deliver_digest(self, conn: psycopg.Connection) -> bool:
        """Sends the digest of the period that has just ended, if no relay has; True if one was claimed."""
        c = self.config
        now = time.monotonic()
        if now < self._next_digest_check:
            return False
        self._next_digest_check = now + min(c.digest_every / 4, 30.0)
        row = conn.execute("select period_start, period_end from booking_guard.claim_digest(%s, %s, %s)",
                           (c.name, timedelta(seconds=c.digest_every), timedelta(seconds=max(c.lease, 2 * c.send_timeout)))
                           ).fetchone()
        if row is None:
            return False
        start, end = row
        cur = conn.execute(f"select {ALERT_COLUMNS} from booking_guard.alerts"
                           " where detected_at >= %s and detected_at < %s order by id", (start, end))
        names = [d.name for d in cur.description]
        alerts = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        cur = conn.execute(f"select {REVIEW_COLUMNS} from booking_guard.review_queue q"
                           " where q.created_at >= %s and q.created_at < %s"
                           "   and q.priority <= (select s.integer_value from booking_guard.settings s"
                           "                       where s.name = 'review_notify_priority')"
                           " order by q.id", (start, end))
        names = [d.name for d in cur.description]
        items = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        if alerts or items:
            try:
                self.send_mail(digest_message(c, start, end, alerts, items))
            except (OSError, smtplib.SMTPException) as error:
                retry_at = conn.execute("select booking_guard.digest_failed(%s, %s, %s)",
                                        (c.name, end, str(error))).fetchone()[0]
                self.log.warning("digest for %s failed (%s); next attempt at %s", end, error, retry_at)
                self._next_digest_check = 0.0
                return True
        conn.execute("select booking_guard.digest_sent(%s, %s, %s, %s)", (c.name, end, len(alerts), len(items)))
        if alerts or items:
            self.log.info("sent the digest of %s alerts and %s review items up to %s", len(alerts), len(items), end)
        return True

    # --- the loop ---------------------------------------------------------------------------------
    def _listen(self, conn: psycopg.Connection) -> bool:
        """LISTEN, unless a transaction pooler is in between; True if notifications will come."""
        mode = self.config.pooler
        detected = mode == "auto" and behind_pooler(conn)
        if mode == "transaction" or detected:
            self.health.details["notifications"] = False
            if not self._said_polling:
                self._said_polling = True
                how = ("a connection pooler was detected (the server process differs from the one the connection"
                       " announced; assuming transaction pooling, say --pooler session if it pools sessions)"
                       if detected else "--pooler transaction")
                # one line, the same everywhere: notifications need a direct or session-mode connection
                self.log.log(logging.WARNING if detected else logging.INFO,
                        "relay: %s: notifications need a direct or session-mode connection; polling for new alerts"
                        " and review items every %g s instead", how, self.config.poll_interval)
            return False
        conn.execute(f"listen {CHANNEL}")
        conn.execute(f"listen {REVIEW_CHANNEL}")
        self.health.details["notifications"] = True
        return True

    def run(self, stop: threading.Event) -> None:
        c = self.config
        if not c.slack_webhook and not c.email:
            self.log.info("alert relay off: no webhook and no SMTP server configured")
            return
        failures = 0
        while not stop.is_set():
            try:
                with connect(c.dsn, "booking-guard relay") as conn:
                    listening = self._listen(conn)
                    failures = 0
                    while not stop.is_set():
                        self.last_activity = time.monotonic()
                        busy = False
                        if c.slack_webhook:
                            busy = self.deliver_alerts(conn) >= c.batch
                            busy = self.deliver_reviews(conn) >= c.batch or busy
                        if c.email:
                            self.deliver_digest(conn)
                        self.health.succeeded()
                        if not busy:
                            self._wait(conn, stop, listening)
            except psycopg.Error as error:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                self.health.failed(first_line(error))
                self.log.warning("relay: database error (%s); reconnecting in %.1f s", str(error).strip(), delay)
                stop.wait(delay)
            except Exception as error:   # a bug must not end delivery for good: log it, back off, go on
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                self.health.failed(f"{type(error).__name__}: {first_line(error)}")
                self.log.exception("relay: unexpected error; starting again in %.1f s", delay)
                stop.wait(delay)

    def _wait(self, conn: psycopg.Connection, stop: threading.Event, listening: bool = True) -> None:
        """Until a NOTIFY (when listening), the poll interval, or stop (checked every second)."""
        deadline = time.monotonic() + self.config.poll_interval
        if self._next_retry is not None:
            deadline = min(deadline, self._next_retry + 0.05)
            self._next_retry = None
        if self.config.email:
            deadline = min(deadline, time.monotonic() + max(0.2, self._next_digest_check - time.monotonic()))
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not listening:
                # a notification a pooled server connection passes on belongs to someone else's LISTEN
                stop.wait(left)
                continue
            for _ in conn.notifies(timeout=min(left, 1.0), stop_after=1):
                return
