"""What an application imports to work with booking_guard: `from booking_guard.client import ...`.

One import line per concern; the names live in their own modules.
"""

__all__ = ["CircuitOpen", "circuit", "BookingResult", "record_booking", "retry_with_backoff"]

from booking_guard.booking import BookingResult, record_booking, retry_with_backoff
from booking_guard.circuit import CircuitOpen, circuit
