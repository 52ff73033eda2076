"""What an operator runs: `booking-guard serve` (exporter, /probe, status page, /healthz, the
due-verification loop, the alert relay) for one database or a fleet (targets.py), `relay`,
`check` and `report`. May import booking_guard.app, never booking_guard.sim.
"""
