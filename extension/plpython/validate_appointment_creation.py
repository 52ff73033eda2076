"""Body of booking_guard.validate_appointment_creation(): the post-booking validation.

Checks, in this order, and stops at the first that fails:

    call_not_found          the call does not exist
    appointment_not_found   no appointment by the given id, or (without an id) none linked to
                            the call and none carrying the booking id
    appointment_not_linked  the appointment's call_id is not the call
    booking_id_mismatch     the appointment's calcom_v2_booking_id differs from the given booking
                            id, or from the call's booking_id when the call has one
    appointment_stale       the appointment was created longer ago than the setting
                            validation_recent_window (or has no created_at)
    ok                      all of the above hold

Every call appends one event (kind 'validation') with success, reason, duration_ms and the
appointment id it examined: the latency KPI and the metrics read those.

PL/Python runs in the server's own Python (Debian's system 3.11), not in the project's
virtual environment: standard library only. The plans are prepared once per session and
kept in SD; PostgreSQL replans them by itself when the attached tables change.
"""

import json
import time

# One query per validation: the call, the validation window and the appointment. With an
# appointment id (record_booking() always gives one) it is that appointment, a plain lookup
# by primary key; without, the call's, preferring the one with the expected booking id (the
# given one, else the call's), else the newest; failing that, an appointment that carries the
# expected booking id but is not linked. $1 call id, $2 appointment id, $3 booking id.
_CALL_COLUMNS = """
select c.id::bigint as call_id, c.retell_call_id::text as retell_call_id, c.booking_id::text as call_booking_id,
       extract(epoch from s.interval_value)::float8 as window_seconds,
       coalesce($3, c.booking_id::text) as expected_booking_id,
       a.id::bigint as id, a.call_id::bigint as appointment_call_id, a.calcom_v2_booking_id::text as booking_id,
       a.created_at::text as created_at, extract(epoch from now() - a.created_at)::float8 as age_seconds
  from booking_guard.settings s
  left join booking_guard_internal.guarded_calls c on c.id = $1
"""

LOOKUP_BY_ID_SQL = _CALL_COLUMNS + """
  left join booking_guard_internal.guarded_appointments a on a.id = $2 and c.id is not null
 where s.name = 'validation_recent_window'
"""

LOOKUP_SQL = _CALL_COLUMNS + """
  left join lateral (
        select g.id, g.call_id, g.calcom_v2_booking_id, g.created_at
          from booking_guard_internal.guarded_appointments g
         where g.call_id = $1 or g.calcom_v2_booking_id = coalesce($3, c.booking_id::text)
         order by coalesce(g.call_id = $1 and g.calcom_v2_booking_id = coalesce($3, c.booking_id::text), false) desc,
                  coalesce(g.call_id = $1, false) desc, g.created_at desc nulls last, g.id desc
         limit 1) a on c.id is not null
 where s.name = 'validation_recent_window'
"""

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
                "lookup": plpy.prepare(LOOKUP_SQL, ["bigint", "bigint", "text"]),
                "lookup_by_id": plpy.prepare(LOOKUP_BY_ID_SQL, ["bigint", "bigint", "text"]),
                "log": plpy.prepare(LOG_SQL, ["bigint", "boolean", "text", "float8", "bigint"]),
            }
        except plpy.SPIError:
            # Most likely not attached (the guarded views do not exist): say so with BG003.
            plpy.execute("select booking_guard_internal.attached()")
            raise
        SD["plans"] = plans
    return plans


def _verdict(plpy, plans, call_id, appointment_id, calcom_booking_id):
    """(reason, details, examined appointment id)."""
    details = {"call_id": call_id}
    if appointment_id is not None:
        details["given_appointment_id"] = appointment_id
    if calcom_booking_id is not None:
        details["given_booking_id"] = calcom_booking_id

    try:
        lookup = plans["lookup" if appointment_id is None else "lookup_by_id"]
        rows = plpy.execute(lookup, [call_id, appointment_id, calcom_booking_id])
    except plpy.SPIError:
        plpy.execute("select booking_guard_internal.attached()")   # detached since the plans were made: BG003
        raise
    if not rows:
        plpy.error("setting validation_recent_window is missing", sqlstate="BG004",
                   detail="booking_guard.settings has no row validation_recent_window.",
                   hint="Reinstall the extension's settings (ALTER EXTENSION booking_guard UPDATE or recreate it).")
    row = rows[0]
    if row["call_id"] is None:
        return "call_not_found", details, appointment_id
    details["retell_call_id"] = row["retell_call_id"]
    details["call_booking_id"] = row["call_booking_id"]
    if appointment_id is None:
        details["searched_booking_id"] = row["expected_booking_id"]
    if row["id"] is None:
        return "appointment_not_found", details, appointment_id
    details.update(appointment_id=row["id"], appointment_call_id=row["appointment_call_id"],
                   appointment_booking_id=row["booking_id"], appointment_created_at=row["created_at"])

    if row["appointment_call_id"] != call_id:
        return "appointment_not_linked", details, row["id"]

    for source, wanted in (("argument", calcom_booking_id), ("call", row["call_booking_id"])):
        if wanted is not None and row["booking_id"] != wanted:
            details.update(expected_booking_id=wanted, expected_from=source)
            return "booking_id_mismatch", details, row["id"]

    age, window = row["age_seconds"], row["window_seconds"]
    details.update(age_seconds=age, recent_window_seconds=window)
    if age is None or age > window:
        return "appointment_stale", details, row["id"]
    return "ok", details, row["id"]


def validate_appointment_creation(plpy, SD, call_id, appointment_id, calcom_booking_id):
    started = time.perf_counter()
    if call_id is None:
        # PL/Python puts "plpy.Error: " before the message of every error raised in it
        plpy.error("validate_appointment_creation() needs a call id",
                   detail=f"call_id: null, appointment_id: {_text(appointment_id)}, "
                          f"calcom_booking_id: {_text(calcom_booking_id)}",
                   hint="select * from booking_guard.validate_appointment_creation(42);", sqlstate="BG005")
    plans = _plans(plpy, SD)
    reason, details, examined = _verdict(plpy, plans, call_id, appointment_id, calcom_booking_id)
    details.setdefault("appointment_id", examined)
    success = reason == "ok"
    duration_ms = round((time.perf_counter() - started) * 1000.0, 3)
    details["duration_ms"] = duration_ms
    plpy.execute(plans["log"], [call_id, success, reason, duration_ms, examined])
    return {"success": success, "reason": reason, "details": json.dumps(details)}
