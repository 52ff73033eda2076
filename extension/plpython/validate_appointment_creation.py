"""Body of booking_guard.validate_appointment_creation(): the post-booking validation on its own.

Reads the call, the appointment and the validation window in one query, which hands them to
booking_guard_internal.validation_verdict() (the rules, and the reasons they give), then logs the
verdict. Which appointment it examines: with an appointment id, that one; without, the call's,
preferring the one with the expected booking id (the given one, else the call's), else the
newest; failing that, an appointment that carries the expected booking id but is not linked.

Every call appends one event (kind 'validation') with success, reason, duration_ms and the
appointment id it examined: the latency KPI and the metrics read those.

PL/Python runs in the server's own Python (Debian's system 3.11), not in the project's
virtual environment: standard library only. The plans are prepared once per session and
kept in SD; PostgreSQL replans them by itself when the attached tables change.
"""

import json
import time

# $1 call id, $2 appointment id, $3 booking id, $4 when the validation started (Unix time).
_VERDICT = """
select v.success, v.reason, v.details
  from (select) one
  left join booking_guard.settings s on s.name = 'validation_recent_window'
  left join booking_guard_internal.guarded_calls c on c.id = $1
  {appointment}
 cross join lateral booking_guard_internal.validation_verdict(
           $1, $2, $3, $4, c.id is not null, c.retell_call_id::text, c.booking_id::text,
           a.id::bigint, a.call_id::bigint, a.calcom_v2_booking_id::text, a.created_at::text,
           extract(epoch from now() - a.created_at)::float8, extract(epoch from s.interval_value)::float8) v
"""

VERDICT_BY_ID_SQL = _VERDICT.format(appointment="""
  left join booking_guard_internal.guarded_appointments a on a.id = $2 and c.id is not null""")

VERDICT_SQL = _VERDICT.format(appointment="""
  left join lateral (
        select g.id, g.call_id, g.calcom_v2_booking_id, g.created_at
          from booking_guard_internal.guarded_appointments g
         where g.call_id = $1 or g.calcom_v2_booking_id = coalesce($3, c.booking_id::text)
         order by coalesce(g.call_id = $1 and g.calcom_v2_booking_id = coalesce($3, c.booking_id::text), false) desc,
                  coalesce(g.call_id = $1, false) desc, g.created_at desc nulls last, g.id desc
         limit 1) a on c.id is not null""")

# The event is written by a SECURITY DEFINER function: the caller may not write booking_guard's
# tables. $1 call id, $2 success, $3 reason, $4 duration, $5 appointment id.
LOG_SQL = "select booking_guard_internal.log_validation($1, $2, $3, $4, $5)"


def _text(value):
    return "null" if value is None else repr(value)


def _plans(plpy, SD):
    plans = SD.get("plans")
    if plans is None:
        try:
            plans = {
                "verdict": plpy.prepare(VERDICT_SQL, ["bigint", "bigint", "text", "float8"]),
                "verdict_by_id": plpy.prepare(VERDICT_BY_ID_SQL, ["bigint", "bigint", "text", "float8"]),
                "log": plpy.prepare(LOG_SQL, ["bigint", "boolean", "text", "float8", "bigint"]),
            }
        except plpy.SPIError:
            # Most likely not attached (the guarded views do not exist): say so with BG003.
            plpy.execute("select booking_guard_internal.attached()")
            raise
        SD["plans"] = plans
    return plans


def validate_appointment_creation(plpy, SD, call_id, appointment_id, calcom_booking_id):
    started = time.time()
    if call_id is None:
        # PL/Python puts "plpy.Error: " before the message of every error raised in it
        plpy.error("validate_appointment_creation() needs a call id",
                   detail=f"call_id: null, appointment_id: {_text(appointment_id)}, "
                          f"calcom_booking_id: {_text(calcom_booking_id)}",
                   hint="select * from booking_guard.validate_appointment_creation(42);", sqlstate="BG005")
    plans = _plans(plpy, SD)
    try:
        verdict = plans["verdict" if appointment_id is None else "verdict_by_id"]
        row = plpy.execute(verdict, [call_id, appointment_id, calcom_booking_id, started])[0]
    except plpy.SPIError:
        plpy.execute("select booking_guard_internal.attached()")   # detached since the plans were made: BG003
        raise
    details = json.loads(row["details"])
    plpy.execute(plans["log"], [call_id, row["success"], row["reason"], details["duration_ms"],
                                details["appointment_id"]])
    return row
