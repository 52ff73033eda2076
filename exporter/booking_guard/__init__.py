"""booking_guard: the Python side of the booking_guard PostgreSQL extension.

Three subpackages, by audience, whose imports run one way (sim -> ops -> app):

- booking_guard.app: what an application imports (record_booking, the circuit breaker, retries);
- booking_guard.ops: what an operator runs (serve: exporter, status page, relay; check, report);
- booking_guard.sim: the workload simulator, the soak, the demo and the fake Cal.com.

booking_guard.cli is the `booking-guard` command: ops' commands plus sim's.
"""

__version__ = "0.1.0"
