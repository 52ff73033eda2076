"""The status page: the health dashboard, rendered on the server (no JavaScript).

One page per target (`/?target=NAME`; `/` when serve has one target). With several targets `/`
is a list of them with links, and each page names its database and links to the others.

What an on-call needs, top to bottom: the overview (success rate and average latency over the last
24 hours, each saying which bookings it covers; active circuit breakers; the open inconsistencies
that need a person in `.inconsistency-count`; the review queue by priority), the inconsistencies
that need action, bookings per hour, the failure breakdown, each circuit breaker with its state and
when it last opened, the recent alerts, validation latency, and the review queue, most urgent first.
Every alert type and review reason links its runbook page (runbooks.py). It reads what metrics()
reads (folded counters and booking_guard's own tables), never the application's tables (the fold
reads the appointment ids added since the last one), in one bounded database call.
"""

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import psycopg

from booking_guard.ops.exporter import BoundedConnection, Unavailable
from booking_guard.ops.runbooks import DEFAULT_BASE, runbook_url

RECENT_ALERTS = 20
REVIEW_ITEMS = 20
NEEDS_ACTION = 20


@dataclass
class Snapshot:
    overview: dict = field(default_factory=dict)
    failures: list[tuple] = field(default_factory=list)
    breakers: list[tuple] = field(default_factory=list)
    alerts: list[tuple] = field(default_factory=list)
    review: list[tuple] = field(default_factory=list)
    review_counts: dict = field(default_factory=dict)
    review_by_priority: list[tuple] = field(default_factory=list)
    needs_action: list[tuple] = field(default_factory=list)
    hours: list[tuple] = field(default_factory=list)
    latency: list[tuple] = field(default_factory=list)
    read_at: datetime | None = None


def read(conn: psycopg.Connection) -> Snapshot:
    snap = Snapshot(read_at=datetime.now(UTC))
    conn.execute("select booking_guard.fold_metrics(10000)")
    row = conn.execute("""
        with w as (
            select w.name, sum(w.value) as value from booking_guard.metric_windows w
             where w.bucket >= now() - interval '24 hours' group by w.name
        )
        select (select value from w where name = 'creation_success'),
               (select value from w where name = 'creation_failed'),
               (select value from w where name = 'creation_recorded'),
               (select value from w where name = 'creation_timed'),
               (select value from w where name = 'creation_seconds')
                 / nullif((select value from w where name = 'creation_timed'), 0),
               (select value from w where name = 'validation_success'),
               (select value from w where name = 'validation_total'),
               (select count(*) from booking_guard.open_inconsistencies),
               (select count(*) from booking_guard.open_inconsistencies i where i.severity = 'critical'),
               (select count(*) from booking_guard.alerts a
                 where a.resolved_at is null and a.auto_corrected
                   and booking_guard_internal.is_inconsistency(a.alert_type, a.details)),
               (select coalesce(sum(w.value), 0) from w where w.name = 'inconsistencies'),
               (select count(*) from booking_guard.due_verifications)""").fetchone()
    keys = ("creation_success", "creation_failed", "creation_recorded", "creation_timed", "avg_latency",
            "validation_success", "validation_total", "open_inconsistencies", "open_critical", "open_auto_corrected",
            "detected_24h", "due_verifications")
    snap.overview = dict(zip(keys, row, strict=True))
    snap.hours = conn.execute("""
        select h.hour,
               coalesce(sum(w.value) filter (where w.name = 'creation_success'), 0),
               coalesce(sum(w.value) filter (where w.name = 'creation_failed'), 0),
               coalesce(sum(w.value) filter (where w.name = 'inconsistencies'), 0)
          from generate_series(date_trunc('hour', now()) - interval '23 hours', date_trunc('hour', now()),
                               interval '1 hour') as h(hour)
          left join booking_guard.metric_windows w
                 on w.bucket >= h.hour and w.bucket < h.hour + interval '1 hour'
         group by h.hour order by h.hour""").fetchall()
    snap.latency = conn.execute("""
        select (c.labels ->> 'le')::double precision, c.value from booking_guard.metric_counters c
         where c.name = 'appointment_validation_duration_seconds_bucket' and c.value > 0
         order by 1""").fetchall()
    snap.failures = conn.execute("""
        select c.labels ->> 'reason', c.value from booking_guard.metric_counters c
         where c.name = 'appointment_creation_failure_total' and c.value > 0
         order by c.value desc, 1""").fetchall()
    snap.breakers = conn.execute("""
        select b.key, booking_guard.circuit_state(b.key), b.failure_count, b.opened_at, b.closed_at
          from booking_guard.circuit_breakers b
         order by booking_guard.circuit_state(b.key) = 'closed', b.opened_at desc nulls last, b.key""").fetchall()
    snap.overview["active_breakers"] = sum(1 for b in snap.breakers if b[1] != "closed")
    snap.needs_action = conn.execute("""
        select i.id, i.detected_at, i.severity, i.alert_type, i.entity_type, i.entity_id, i.description,
               i.occurrences, i.acknowledged_by, i.review_id
          from booking_guard.open_inconsistencies i
         order by i.severity = 'critical' desc, i.detected_at desc, i.id desc
         limit %s""", (NEEDS_ACTION,)).fetchall()
    snap.alerts = conn.execute("""
        select a.id, a.detected_at, a.severity, a.alert_type, a.entity_type, a.entity_id, a.description,
               a.auto_corrected, a.occurrences, a.acknowledged_at is not null, a.resolved_at is not null, a.review_id
          from booking_guard.alerts a
         order by a.id desc
         limit %s""", (RECENT_ALERTS,)).fetchall()
    snap.review = conn.execute("""
        select q.id, q.call_id, q.reason, q.priority, q.status, q.claimed_by, q.created_at, q.subject, q.delivered_at
          from booking_guard.review_queue q
         where q.status <> 'resolved'
         order by q.priority, q.created_at, q.id
         limit %s""", (REVIEW_ITEMS,)).fetchall()
    snap.review_by_priority = conn.execute("""
        select q.priority, q.reason, count(*) filter (where q.status = 'pending'),
               count(*) filter (where q.status = 'in_review'), min(q.created_at)
          from booking_guard.review_queue q
         where q.status <> 'resolved'
         group by q.priority, q.reason
         order by q.priority, q.reason""").fetchall()
    snap.review_counts = dict(conn.execute("""
        select q.status, count(*) from booking_guard.review_queue q where q.status <> 'resolved' group by q.status""").fetchall())
    return snap


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _percent(part: float | None, whole: float | None) -> str:
    if not whole:
        return "no data"
    return f"{100.0 * (part or 0) / whole:.1f}%"


STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#b8c0d0;font-size:13px}
main{padding:16px 24px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:#fff;border-radius:6px;padding:12px 16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
section.wide{grid-column:1/-1}h2{font-size:15px;margin:0 0 10px;text-transform:uppercase;letter-spacing:.04em;color:#4a5368}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px}
.tile{border:1px solid #e3e6ec;border-radius:6px;padding:10px}.tile .label{font-size:12px;color:#5d6678}
.tile .value{font-size:26px;font-weight:600;margin-top:4px}.tile .note{font-size:12px;color:#5d6678}
.bad{color:#b3261e}.ok{color:#1e7b34}.warn{color:#9a6700}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:5px 6px;border-bottom:1px solid #eceef2}
th{color:#5d6678;font-weight:600}.state{font-weight:600;text-transform:uppercase}
.state.closed{color:#1e7b34}.state.open{color:#b3261e}.state.half_open{color:#9a6700}
.sev{font-weight:600}.sev.critical{color:#b3261e}.sev.warning{color:#9a6700}.sev.info{color:#4a5368}
.bar{background:#d9534f;height:10px;border-radius:2px}.empty{color:#5d6678;font-style:italic}
.down{background:#b3261e;color:#fff;padding:12px 24px}
.chart{display:flex;align-items:flex-end;gap:3px;height:120px;border-bottom:1px solid #ccd1da;padding-top:6px}
.chart .col{flex:1;display:flex;flex-direction:column-reverse;min-width:6px}
.chart .ok{background:#3c9a5f}.chart .fail{background:#d9534f}.legend{font-size:12px;color:#5d6678;margin-top:6px}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
a.runbook{color:#2857a4}.prio{font-weight:600}.prio.p1{color:#b3261e}.prio.p2{color:#9a6700}
p.covers{font-size:12px;color:#5d6678;margin:8px 0 0}
nav{margin-top:6px;font-size:13px;color:#b8c0d0}nav a{color:#fff}
"""


def _link(name: str) -> str:
    return f"/?target={quote(name, safe='')}"


def _head(now: datetime, title: str, database: str | None, targets: Sequence[str]) -> list[str]:
    where = f" · database <strong class=\"database\">{_e(database)}</strong>" if database else ""
    parts = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta http-equiv=\"refresh\" content=\"15\">",
             f"<title>booking_guard — {_e(title.lower())}{' — ' + _e(database) if database else ''}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<header><h1>{_e(title)}</h1>",
             f"<p>booking_guard status page{where} · {_e(now.strftime('%Y-%m-%d %H:%M:%S UTC'))} · refreshes every 15 s</p>"]
    if targets:
        links = " · ".join(f"<strong>{_e(t)}</strong>" if t == database else f"<a href=\"{_e(_link(t))}\">{_e(t)}</a>"
                           for t in targets)
        parts.append(f"<nav id=\"targets\"><a href=\"/\">all databases</a>: {links}</nav>")
    parts.append("</header>")
    return parts


def render(snap: Snapshot | None, error: str | None = None, database: str | None = None,
           targets: Sequence[str] = (), runbook_base: str = DEFAULT_BASE) -> str:
    """The page of one target (`database`); `targets`, when there are several, for the links between them."""
    now = datetime.now(UTC)
    parts = _head(now, "Appointment booking health", database, targets)
    if snap is None:
        parts.append(f"<div class=\"down\" role=\"alert\"><strong>Database unreachable.</strong> {_e(error)}</div>")
        parts.append("</body></html>")
        return "".join(parts)

    o = snap.overview
    open_count = int(o["open_inconsistencies"] or 0)
    latency = o["avg_latency"]
    written, failed = int(o["creation_success"] or 0), int(o["creation_failed"] or 0)
    recorded = min(written, int(o["creation_recorded"] or 0))
    timed = int(o["creation_timed"] or 0)

    def rb(name: str) -> str:
        """The name, linked to its runbook page."""
        return f"<a class=\"runbook\" href=\"{_e(runbook_url(name, runbook_base))}\">{_e(name)}</a>"

    parts.append("<main>")
    parts.append("<section class=\"wide\" id=\"overview\"><h2>Overview</h2><div class=\"tiles\">")
    tiles = [
        ("Success rate (last 24 h)", _percent(written, written + failed),
         f"of {written + failed} bookings: {written} written, {failed} did not stand", "", "success-rate"),
        ("Average latency (last 24 h)", "no data" if latency is None else f"{latency * 1000:.0f} ms",
         f"record_booking() calls only ({timed} timed)", "", "latency"),
        ("Validation success (last 24 h)", _percent(o["validation_success"], o["validation_total"]),
         f"{int(o['validation_total'] or 0)} validations", "", "validation-rate"),
        ("Active circuit breakers", str(o["active_breakers"]), "open or half-open", "bad" if o["active_breakers"] else "ok",
         "active-breakers"),
    ]
    for label, value, note, cls, tile_id in tiles:
        parts.append(f"<div class=\"tile\" id=\"{tile_id}\"><div class=\"label\">{_e(label)}</div>"
                     f"<div class=\"value {cls}\">{_e(value)}</div><div class=\"note\">{_e(note)}</div></div>")
    parts.append(
        "<div class=\"tile\" id=\"inconsistencies\"><div class=\"label\">Open inconsistencies needing action</div>"
        f"<div class=\"value {'bad' if open_count else 'ok'}\"><span class=\"inconsistency-count\">{open_count}</span></div>"
        f"<div class=\"note\">{int(o['open_critical'] or 0)} critical · {int(o['detected_24h'] or 0)} detected in 24 h · "
        f"{int(o['open_auto_corrected'] or 0)} auto-corrected not counted</div></div>")
    queued = sum(snap.review_counts.values())
    by_priority: dict[int, int] = {}
    for priority, _reason, pending, in_review, _oldest in snap.review_by_priority:
        by_priority[priority] = by_priority.get(priority, 0) + pending + in_review
    split = " · ".join(f"P{p}: {n}" for p, n in sorted(by_priority.items())) or "empty"
    parts.append(
        f"<div class=\"tile\" id=\"review-tile\"><div class=\"label\">Review queue</div><div class=\"value\">{queued}</div>"
        f"<div class=\"note\">{_e(split)} · {int(o['due_verifications'] or 0)} awaiting verification</div></div>")
    parts.append("</div>")
    parts.append(
        f"<p class=\"covers\" id=\"coverage\">The success rate counts every booking written, whatever wrote it: {written}"
        f" appointment rows ({recorded} through record_booking(), {written - recorded} by plain SQL or the calendar webhook),"
        f" and {failed} that did not stand (refused by record_booking(), or a call that claimed a booking with no"
        " appointment and was rolled back). The latency covers record_booking() calls only: plain-SQL and webhook bookings"
        " carry no duration. Inconsistencies needing action are open alerts of the rules and of failed bookings that were"
        " not auto-corrected; auto-corrected ones stay open only until the monitor confirms the repair.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"needs-action\"><h2>Inconsistencies that need action</h2>")
    if snap.needs_action:
        parts.append("<table><tr><th>#</th><th>detected</th><th>severity</th><th>type (runbook)</th><th>entity</th>"
                     "<th>description</th><th>seen</th><th>acknowledged by</th><th>review item</th></tr>")
        for (alert_id, detected_at, severity, rule, entity_type, entity_id, description, occurrences, acked_by,
             review_id) in snap.needs_action:
            parts.append(f"<tr><td>{alert_id}</td><td>{_e(_ago(detected_at, now))}</td>"
                         f"<td class=\"sev {_e(severity)}\">{_e(severity)}</td><td>{rb(rule)}</td>"
                         f"<td>{_e(entity_type)} {_e(entity_id)}</td><td>{_e(description)}</td><td>{occurrences}×</td>"
                         f"<td>{_e(acked_by)}</td><td>{'#' + str(review_id) if review_id else ''}</td></tr>")
        parts.append("</table>")
        if open_count > len(snap.needs_action):
            parts.append(f"<p class=\"empty\">{open_count - len(snap.needs_action)} more: "
                         "select * from booking_guard.open_inconsistencies;</p>")
    else:
        parts.append("<p class=\"empty\">Nothing needs action: every open inconsistency was corrected.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"trends\"><h2>Bookings written vs did not stand (last 24 h, per hour)</h2>")
    if any(success + fail for _, success, fail, _ in snap.hours):
        top = max(success + fail for _, success, fail, _ in snap.hours) or 1
        parts.append("<div class=\"chart\">")
        for hour, success, fail, found in snap.hours:
            title = f"{hour:%H:00} UTC: {int(success)} written, {int(fail)} did not stand, {int(found)} inconsistencies"
            parts.append(f"<div class=\"col\" title=\"{_e(title)}\">"
                         f"<div class=\"ok\" style=\"height:{100 * success / top:.1f}px\"></div>"
                         f"<div class=\"fail\" style=\"height:{100 * fail / top:.1f}px\"></div></div>")
        parts.append(f"</div><div class=\"legend\">{snap.hours[0][0]:%H:00} to {snap.hours[-1][0]:%H:00}"
                     "<i style=\"background:#3c9a5f\"></i>written<i style=\"background:#d9534f\"></i>did not stand</div>")
    else:
        parts.append("<p class=\"empty\">No bookings in the last 24 hours.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"failures\"><h2>Failure breakdown</h2>")
    if snap.failures:
        top = max(v for _, v in snap.failures) or 1
        parts.append("<table><tr><th>reason</th><th>failures</th><th></th></tr>")
        for reason, value in snap.failures:
            parts.append(f"<tr><td>{_e(reason)}</td><td>{int(value)}</td>"
                         f"<td style=\"width:50%\"><div class=\"bar\" style=\"width:{100 * value / top:.0f}%\"></div></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=\"empty\">No failed bookings recorded.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"circuit-breakers\"><h2>Circuit breaker status</h2>")
    if snap.breakers:
        parts.append("<table><tr><th>key</th><th>state</th><th>failures</th><th>last opened</th><th>last closed</th></tr>")
        for key, state, failures, opened_at, closed_at in snap.breakers:
            opened = _ago(opened_at, now) + (f" ({opened_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)" if opened_at else "")
            parts.append(f"<tr><td>{_e(key)}</td><td class=\"state {_e(state)}\">{_e(state)}</td>"
                         f"<td>{_e(failures)}</td><td class=\"opened\">{_e(opened)}</td>"
                         f"<td>{_e(_ago(closed_at, now))}</td></tr>")
        parts.append(f"</table><p class=\"empty\">What an open breaker means: {rb('circuit_breaker_open')}</p>")
    else:
        parts.append("<p class=\"empty\">No circuit breaker has been used yet.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"alerts\"><h2>Data consistency alerts (recent)</h2>")
    if snap.alerts:
        parts.append("<table><tr><th>#</th><th>detected</th><th>severity</th><th>type (runbook)</th><th>entity</th>"
                     "<th>description</th><th>auto-corrected</th><th>seen</th><th>status</th><th>review item</th></tr>")
        for (alert_id, detected_at, severity, rule, entity_type, entity_id, description, corrected, occurrences,
             acknowledged, resolved, review_id) in snap.alerts:
            status = "resolved" if resolved else "acknowledged" if acknowledged else "open"
            parts.append(f"<tr><td>{alert_id}</td><td>{_e(_ago(detected_at, now))}</td>"
                         f"<td class=\"sev {_e(severity)}\">{_e(severity)}</td><td>{rb(rule)}</td>"
                         f"<td>{_e(entity_type)} {_e(entity_id)}</td><td>{_e(description)}</td>"
                         f"<td>{'yes' if corrected else 'no'}</td><td>{occurrences}×</td><td>{status}</td>"
                         f"<td>{'#' + str(review_id) if review_id else ''}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=\"empty\">No alerts.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"validation\"><h2>Validation performance</h2>")
    if snap.latency:
        top = max(v for _, v in snap.latency) or 1
        parts.append("<table><tr><th>latency up to</th><th>validations</th><th></th></tr>")
        for le, count in snap.latency:
            bound = "more" if le == float("inf") else f"{le * 1000:g} ms"
            parts.append(f"<tr><td>{_e(bound)}</td><td>{int(count)}</td><td style=\"width:60%\">"
                         f"<div class=\"bar\" style=\"background:#4a78c2;width:{100 * count / top:.0f}%\"></div></td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=\"empty\">No validation has run yet.</p>")
    parts.append("</section>")

    parts.append("<section class=\"wide\" id=\"review-queue\"><h2>Manual review queue (most urgent first)</h2>")
    if snap.review_by_priority:
        parts.append("<table id=\"review-by-priority\"><tr><th>priority</th><th>reason (runbook)</th><th>pending</th>"
                     "<th>in review</th><th>oldest</th></tr>")
        for priority, reason, pending, in_review, oldest in snap.review_by_priority:
            parts.append(f"<tr><td class=\"prio p{priority}\">P{priority}</td><td>{rb(reason)}</td><td>{pending}</td>"
                         f"<td>{in_review}</td><td>{_e(_ago(oldest, now))}</td></tr>")
        parts.append("</table><h2 style=\"margin-top:14px\">Items</h2>")
        parts.append("<table id=\"review-items\"><tr><th>#</th><th>priority</th><th>reason (runbook)</th><th>call</th>"
                     "<th>about</th><th>status</th><th>claimed by</th><th>queued</th><th>notified</th></tr>")
        for item_id, call_id, reason, priority, status, claimed_by, created_at, subject, delivered_at in snap.review:
            parts.append(f"<tr><td>{item_id}</td><td class=\"prio p{priority}\">P{priority}</td><td>{rb(reason)}</td>"
                         f"<td>{_e(call_id)}</td><td>{_e(subject)}</td><td>{_e(status)}</td><td>{_e(claimed_by)}</td>"
                         f"<td>{_e(_ago(created_at, now))}</td><td>{_e(_ago(delivered_at, now) if delivered_at else '')}</td>"
                         "</tr>")
        parts.append("</table>")
        if queued > len(snap.review):
            parts.append(f"<p class=\"empty\">{queued - len(snap.review)} more: select * from booking_guard.review_queue"
                         " where status &lt;&gt; 'resolved' order by priority, created_at;</p>")
    else:
        parts.append("<p class=\"empty\">Nothing waits for a person.</p>")
    parts.append("</section></main></body></html>")
    return "".join(parts)


def page(db: BoundedConnection, database: str | None = None, targets: Sequence[str] = (),
         runbook_base: str = DEFAULT_BASE) -> tuple[int, str]:
    """(HTTP status, HTML) of the status page; 503 with an explanation when the database is unavailable."""
    try:
        return 200, render(db.call(read), database=database, targets=targets, runbook_base=runbook_base)
    except Unavailable as error:
        return 503, render(None, str(error), database=database, targets=targets)


def index(targets: Sequence[tuple[str, dict]]) -> str:
    """`/` with several targets: each with a link to its page and what serve's own loops say of it
    (health.py; no database is asked, so the list answers at once however many targets are down)."""
    now = datetime.now(UTC)
    parts = _head(now, "Appointment booking health: databases", None, ())
    parts.append("<main><section class=\"wide\" id=\"databases\"><h2>Databases</h2>"
                 "<table><tr><th>database</th><th>status</th><th>verify_due() last ran</th><th>problem or last error</th></tr>")
    for name, health in targets:
        loop = health["loops"].get("verify_due") or {}
        ago = loop.get("last_success_seconds_ago")
        last = "not running" if not loop else "not yet" if ago is None else f"{ago:.0f} s ago"
        state = health["status"]
        cls = "ok" if state == "ok" else "bad"
        # a problem once a loop has failed for longer than the health grace; before that, its last error
        errors = [f"{n}: {lp['last_error']}" for n, lp in health["loops"].items() if lp.get("last_error")]
        problem = "; ".join(health["problems"] or errors)
        parts.append(f"<tr><td><a href=\"{_e(_link(name))}\">{_e(name)}</a></td><td class=\"{cls}\">{_e(state)}</td>"
                     f"<td>{_e(last)}</td><td>{_e(problem)}</td></tr>")
    parts.append("</table><p class=\"empty\">Each database's page shows its bookings, breakers, alerts and review"
                 " queue; /metrics labels every series with <code>database</code>.</p></section></main></body></html>")
    return "".join(parts)


def not_found(targets: Sequence[str]) -> str:
    """`/?target=` a name that is not configured (the name is not echoed)."""
    parts = _head(datetime.now(UTC), "Unknown database", None, ())
    links = ", ".join(f"<a href=\"{_e(_link(t))}\">{_e(t)}</a>" for t in targets)
    parts.append(f"<div class=\"down\" role=\"alert\">No such target. This exporter serves: {links}.</div></body></html>")
    return "".join(parts)
