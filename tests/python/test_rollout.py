"""Canary rollout: a rule's mode applies to a stable share of companies (a hash of company_id),
its fallback_mode to the others; real writes follow the company's answer."""

import hashlib

import psycopg
import pytest
from support.application_rows import FAILED, alerts, flags, new_appointment, new_call

COMPANIES = range(1, 2001)


@pytest.fixture
def core(attached: psycopg.Connection) -> psycopg.Connection:
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    return attached


def modes(db: psycopg.Connection, rule: str) -> dict[int, str]:
    return dict(db.execute("""select c, booking_guard.rule_mode(%s, c::text)
                                from generate_series(%s::int, %s::int) c""",
                           (rule, COMPANIES.start, COMPANIES.stop - 1)).fetchall())


def enforced(db: psycopg.Connection, rule: str) -> set[int]:
    return {c for c, mode in modes(db, rule).items() if mode == "enforce"}


def bucket(company_id: int) -> int:
    """README: the first 32 bits of md5(company_id::text), modulo 100."""
    return int(hashlib.md5(str(company_id).encode()).hexdigest()[:8], 16) % 100


def test_enforce_at_10_percent_applies_to_a_stable_tenth_of_companies(core, connect):
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 10, 'correct')")
    first = modes(core, "missing_appointment")
    assert set(first.values()) == {"enforce", "correct"}
    inside = {c for c, m in first.items() if m == "enforce"}
    # about a tenth (2000 companies: 200 expected, a fair hash stays well within +-30 %)
    assert 140 <= len(inside) <= 260
    # the same answer every time, in this session and in another one
    assert modes(core, "missing_appointment") == first
    assert modes(connect(), "missing_appointment") == first
    # the answer is the documented formula, so it is the same on every server and release
    assert inside == {c for c in COMPANIES if bucket(c) < 10}


def test_raising_the_rollout_keeps_the_companies_already_in_it(core):
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 10, 'correct')")
    ten = enforced(core, "missing_appointment")
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 50)")
    fifty = enforced(core, "missing_appointment")
    assert ten < fifty
    assert 800 <= len(fifty) <= 1200
    assert set(modes(core, "missing_appointment").values()) == {"enforce", "correct"}   # the fallback stayed
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 100)")
    assert enforced(core, "missing_appointment") == set(COMPANIES)
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 0)")
    assert enforced(core, "missing_appointment") == set()


def test_the_rollout_of_one_rule_leaves_the_others_alone(core):
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 10)")
    assert set(modes(core, "phantom_booking").values()) == {"correct"}
    # the default fallback is observe
    assert set(modes(core, "missing_appointment").values()) == {"enforce", "observe"}


def companies_inside_and_outside(db: psycopg.Connection) -> tuple[int, int]:
    inside = next(c for c in COMPANIES if bucket(c) < 10)
    outside = next(c for c in COMPANIES if bucket(c) >= 10)
    db.execute("insert into companies (id, name) values (%s, 'inside'), (%s, 'outside')", (inside, outside))
    return inside, outside


def test_real_phantoms_follow_the_companys_rollout(core):
    """missing_appointment enforced for 10 % of companies, corrected for the others: a phantom of
    a company inside is rejected at COMMIT, one of a company outside is rolled back."""
    inside, outside = companies_inside_and_outside(core)
    core.execute("select booking_guard.set_rule('missing_appointment', 'enforce', 10, 'correct')")
    with pytest.raises(psycopg.Error) as caught, core.transaction():
        new_call(core, company_id=inside, session_outcome="appointment_booked", appointment_made=True)
    assert caught.value.diag.sqlstate == "BG002"
    assert core.execute("select count(*) from calls where company_id = %s", (inside,)).fetchone()[0] == 0

    call_id = new_call(core, company_id=outside, session_outcome="appointment_booked", appointment_made=True)
    assert flags(core, call_id) == FAILED
    assert [a["alert_type"] for a in alerts(core, call_id=call_id)] == ["missing_appointment"]

    # a real booking of the company inside goes through
    with core.transaction():
        booked = new_call(core, company_id=inside, session_outcome="appointment_booked", appointment_made=True)
        new_appointment(core, booked, company_id=inside)
    assert flags(core, booked)[1] is True


def test_statement_level_rules_follow_the_companys_rollout(core):
    """phantom_booking enforced for 10 %, observed for the rest (the default fallback)."""
    inside, outside = companies_inside_and_outside(core)
    core.execute("select booking_guard.set_rule('missing_appointment', 'off')")
    core.execute("select booking_guard.set_rule('phantom_booking', 'enforce', 10)")
    with pytest.raises(psycopg.Error) as caught:
        new_call(core, company_id=inside, session_outcome="appointment_booked")
    assert caught.value.diag.sqlstate == "BG002"
    assert "rule phantom_booking" in caught.value.diag.message_primary
    call_id = new_call(core, company_id=outside, session_outcome="appointment_booked")
    assert flags(core, call_id) == ("appointment_booked", False, None)
    assert [(a["alert_type"], a["auto_corrected"]) for a in alerts(core, call_id=call_id)] == [("phantom_booking", False)]
