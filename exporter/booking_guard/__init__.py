"""booking_guard: the Python side of the booking_guard PostgreSQL extension."""

__version__ = "0.1.0"
