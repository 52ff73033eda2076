"""What an application imports to work with booking_guard:

    from booking_guard.app import record_booking, retry_with_backoff, circuit, CircuitOpen, CallTimeout, call_async

The names live in booking_guard.app.booking (the booking path, backoff) and
booking_guard.app.circuit (the circuit breaker). Nothing here imports booking_guard.ops or
booking_guard.sim: an application needs psycopg and nothing else.
"""

from booking_guard.app.booking import REASONS, BookingResult, backoff_delay, record_booking, retry_with_backoff
from booking_guard.app.circuit import CallTimeout, CircuitOpen, call_async, circuit

__all__ = ["REASONS", "BookingResult", "CallTimeout", "CircuitOpen", "call_async", "backoff_delay", "circuit", "record_booking", "retry_with_backoff"]
