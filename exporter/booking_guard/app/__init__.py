"""What an application imports to work with booking_guard:

    from booking_guard.app import record_booking, retry_with_backoff, circuit, CircuitOpen, CallTimeout, call_async

The names live in booking_guard.app.booking (the booking path, backoff) and
booking_guard.app.circuit (the circuit breaker). Nothing here imports booking_guard.ops or
booking_guard.sim: an application needs psycopg and nothing else.
"""

from booking_guard.app.booking import BookingResult, backoff_delay, record_booking, retry_with_backoff, validation_reasons
from booking_guard.app.circuit import CallTimeout, CircuitOpen, call_async, circuit

__all__ = ["BookingResult", "CallTimeout", "CircuitOpen", "backoff_delay", "call_async", "circuit", "record_booking",
           "retry_with_backoff", "validation_reasons"]
