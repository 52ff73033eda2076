"""Body of booking_guard.validate_appointment_creation(): the seed's post-booking validation.

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

CALL_SQL = """
select c.id::bigint as id, c.retell_call_id::text as retell_call_id, c.booking_id::text as booking_id,
       extract(epoch from s.interval_value)::float8 as window_seconds
  from booking_guard.guarded_calls c
 cross join booking_guard.settings s
 where c.id = $1 and s.name = 'validation_recent_window'
"""

APPOINTMENT_COLUMNS = """
select a.id::bigint as id, a.call_id::bigint as call_id, a.calcom_v2_booking_id::text as booking_id,
       a.created_at::text as created_at, extract(epoch from now() - a.created_at)::float8 as age_seconds
  from booking_guard.guarded_appointments a
"""

# By id: exactly that appointment.
APPOINTMENT_BY_ID_SQL = APPOINTMENT_COLUMNS + " where a.id = $1"

# Without an id: the call's appointment, preferring the one with the expected booking id, else
# the newest; failing that, an appointment that carries the booking id but is not linked.
APPOINTMENT_FOR_CALL_SQL = APPOINTMENT_COLUMNS + """
 where a.call_id = $1 or a.calcom_v2_booking_id = $2
 order by coalesce(a.call_id = $1 and a.calcom_v2_booking_id = $2, false) desc,
          coalesce(a.call_id = $1, false) desc, a.created_at desc nulls last, a.id desc
 limit 1
"""

LOG_SQL = """
select booking_guard.log_event('validation', null, 'call', $1,
                               jsonb_build_object('success', $2, 'reason', $3, 'duration_ms', $4,
                                                  'appointment_id', $5))
"""


def _text(value):
    return "null" if value is None else repr(value)


def _plans(plpy, SD):
    plans = SD.get("plans")
    if plans is None:
        try:
            plans = {
                "call": plpy.prepare(CALL_SQL, ["bigint"]),
                "by_id": plpy.prepare(APPOINTMENT_BY_ID_SQL, ["bigint"]),
                "for_call": plpy.prepare(APPOINTMENT_FOR_CALL_SQL, ["bigint", "text"]),
                "log": plpy.prepare(LOG_SQL, ["text", "boolean", "text", "float8", "bigint"]),
            }
        except plpy.SPIError:
            # Most likely not attached (the guarded views do not exist): say so with BG003.
            plpy.execute("select booking_guard.attached()")
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
        calls = plpy.execute(plans["call"], [call_id])
    except plpy.SPIError:
        plpy.execute("select booking_guard.attached()")   # detached since the plans were made: BG003
        raise
    if not calls:
        return "call_not_found", details, appointment_id
    call = calls[0]
    details["retell_call_id"] = call["retell_call_id"]
    details["call_booking_id"] = call["booking_id"]

    expected = calcom_booking_id if calcom_booking_id is not None else call["booking_id"]
    if appointment_id is not None:
        found = plpy.execute(plans["by_id"], [appointment_id])
    else:
        found = plpy.execute(plans["for_call"], [call_id, expected])
        details["searched_booking_id"] = expected
    if not found:
        return "appointment_not_found", details, appointment_id
    appointment = found[0]
    details.update(appointment_id=appointment["id"], appointment_call_id=appointment["call_id"],
                   appointment_booking_id=appointment["booking_id"], appointment_created_at=appointment["created_at"])

    if appointment["call_id"] != call_id:
        return "appointment_not_linked", details, appointment["id"]

    for source, wanted in (("argument", calcom_booking_id), ("call", call["booking_id"])):
        if wanted is not None and appointment["booking_id"] != wanted:
            details.update(expected_booking_id=wanted, expected_from=source)
            return "booking_id_mismatch", details, appointment["id"]

    age, window = appointment["age_seconds"], call["window_seconds"]
    details.update(age_seconds=age, recent_window_seconds=window)
    if age is None or age > window:
        return "appointment_stale", details, appointment["id"]
    return "ok", details, appointment["id"]


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
    plpy.execute(plans["log"], [str(call_id), success, reason, duration_ms, examined])
    return {"success": success, "reason": reason, "details": json.dumps(details)}
