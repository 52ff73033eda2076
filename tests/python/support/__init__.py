"""Helpers the test modules share: the rows they write, and the services they run.

Nothing here is a test (pytest collects only test_*.py); fixtures live in conftest.py."""
