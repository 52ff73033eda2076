"""Body of booking_guard_internal.validation_verdict(): the rules of the post-booking validation.

The one place that decides whether an appointment stands, on facts read by the caller:
validate_appointment_creation() reads them with its own query (by appointment id, or searching
the call's appointments), record_booking() takes them from the statements that wrote the rows
(their RETURNING). Reading is
left to them because PL/Python runs every query of its own in a subtransaction, which on the
booking path costs more than the rest of the validation; this function runs no SQL.

Checks, in this order, and stops at the first that fails:

    call_not_found          the call does not exist
    appointment_not_found   no appointment was found (by the given id, or by the search)
    appointment_not_linked  the appointment's call_id is not the call
    booking_id_mismatch     the appointment's calcom_v2_booking_id differs from the given booking
                            id, or from the call's booking_id when the call has one
    appointment_stale       the appointment was created longer ago than the setting
                            validation_recent_window (or has no created_at)
    ok                      all of the above hold

Returns (success, reason, details) with the facts behind the verdict and duration_ms, the time
since `started` (Unix time, when the caller began to validate).

PL/Python runs in the server's own Python (Debian's system 3.11), not in the project's
virtual environment: standard library only.
"""

import json
import time


def _verdict(plpy, call_id, appointment_id, calcom_booking_id, call_found, retell_call_id, call_booking_id,
             found_id, appointment_call_id, appointment_booking_id, appointment_created_at, age_seconds,
             window_seconds):
    """(reason, details)."""
    if window_seconds is None:
        plpy.error("setting validation_recent_window is missing", sqlstate="BG004",
                   detail="booking_guard.settings has no row validation_recent_window.",
                   hint="Reinstall the extension's settings (ALTER EXTENSION booking_guard UPDATE or recreate it).")
    details = {"call_id": call_id}
    if appointment_id is not None:
        details["given_appointment_id"] = appointment_id
    if calcom_booking_id is not None:
        details["given_booking_id"] = calcom_booking_id
    if not call_found:
        details["appointment_id"] = appointment_id
        return "call_not_found", details
    details["retell_call_id"] = retell_call_id
    details["call_booking_id"] = call_booking_id
    if appointment_id is None:
        details["searched_booking_id"] = calcom_booking_id if calcom_booking_id is not None else call_booking_id
    if found_id is None:
        details["appointment_id"] = appointment_id
        return "appointment_not_found", details
    details.update(appointment_id=found_id, appointment_call_id=appointment_call_id,
                   appointment_booking_id=appointment_booking_id, appointment_created_at=appointment_created_at)

    if appointment_call_id != call_id:
        return "appointment_not_linked", details

    for source, wanted in (("argument", calcom_booking_id), ("call", call_booking_id)):
        if wanted is not None and appointment_booking_id != wanted:
            details.update(expected_booking_id=wanted, expected_from=source)
            return "booking_id_mismatch", details

    details.update(age_seconds=age_seconds, recent_window_seconds=window_seconds)
    if age_seconds is None or age_seconds > window_seconds:
        return "appointment_stale", details
    return "ok", details


def validation_verdict(plpy, call_id, appointment_id, calcom_booking_id, started, *facts):
    reason, details = _verdict(plpy, call_id, appointment_id, calcom_booking_id, *facts)
    details["duration_ms"] = round(max(time.time() - started, 0.0) * 1000.0, 3)
    return (reason == "ok", reason, json.dumps(details))
