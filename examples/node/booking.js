'use strict';
// The booking path through booking_guard from Node.js, with node-postgres (pg).
//
// The same story as the psql, Python and PHP examples beside this one, printing the same lines:
//
//  1. insert a call, as the voice agent's webhook does;
//  2. ask the circuit breaker for a permit under two scopes at once (the global breaker and the
//     service's): one round trip, refused while either is open;
//  3. call the calendar (a stub here) and report the result with the same scopes and permit;
//  4. record the booking with record_booking() and report its result;
//  5. the calendar goes down: three failed calls open the breakers (the default policy opens after
//     3 consecutive failures); the next ask is refused with BG001, whose DETAIL is JSON with
//     retry_after_seconds, and circuit_try_acquire() answers the same as a row, without raising;
//  6. bad input to record_booking() is BG005; a transaction flagging a call as booked without an
//     appointment is refused at COMMIT with BG002 (rule missing_appointment in enforce mode).
//
// A server error rejects the query's promise with an error whose .code is the SQLSTATE, .message
// the message and .detail the DETAIL. pg returns bigint and numeric columns as strings (they may
// not fit a JS number): ids, permits and retry_after_seconds arrive as text.
//
// The connection comes from DATABASE_URL if it is set, otherwise from the libpq environment
// (PGHOST, PGPORT, PGUSER, PGDATABASE), which pg reads itself. The database needs
// examples/clients_setup.sql first; see docs/clients.md.
//
//     cd examples/node && npm ci && node booking.js

const crypto = require('node:crypto');
const { Client } = require('pg');

const COMPANY_ID = 1;
const SERVICE_ID = 1;
// Every scope the call runs under: a permit covers them all, and the call's result counts for each.
const SCOPES = ['appointment_booking:global', `appointment_booking:service:${SERVICE_ID}`];
// Consecutive failures that open a breaker under the default policy (circuit_policies, row '%').
const FAILURES_TO_OPEN = 3;
const APPOINTMENT = { company_id: COMPANY_ID, service_id: SERVICE_ID,
                      starts_at: '2030-01-15T09:00:00Z', ends_at: '2030-01-15T09:30:00Z' };

class CalendarError extends Error {}

// Stands in for the calendar's booking API (Cal.com): the new booking's id, or a CalendarError
// while the calendar is down (`available` is the stub's switch).
async function bookInCalendar(callId, available) {
  if (!available) {
    throw new CalendarError('Cal.com answered 503 Service Unavailable');
  }
  return `cal-${callId}-${crypto.randomBytes(4).toString('hex')}`;
}

// retry_after_seconds in words: null means forced open until someone resets the breaker.
function retryText(seconds) {
  return seconds === null ? 'no retry before a reset' : `retry after ${seconds} s`;
}

// Seconds since a process.hrtime.bigint() reading, for the breaker's slow-call count.
function secondsSince(started) {
  return Number(process.hrtime.bigint() - started) / 1e9;
}

// An error of the server with the given SQLSTATE is returned; anything else is thrown again.
function expectSqlstate(err, sqlstate) {
  if (err.code !== sqlstate) {
    throw err;
  }
  return err;
}

async function insertCall(client) {
  const { rows } = await client.query(
    "insert into calls (retell_call_id, company_id, direction) values ($1, $2, 'inbound') returning id",
    [`example-node-${crypto.randomBytes(4).toString('hex')}`, COMPANY_ID]);
  console.log(`call ${rows[0].id} inserted`);
  return rows[0].id;
}

// A permit for a call under SCOPES (pg passes a JS array as a Postgres array); rejects with BG001
// while a scope refuses. Outside BEGIN, each query is its own transaction.
async function acquire(client) {
  const { rows } = await client.query('select booking_guard.circuit_acquire($1::text[]) as permit', [SCOPES]);
  return rows[0].permit;
}

async function main() {
  const client = new Client(process.env.DATABASE_URL ? { connectionString: process.env.DATABASE_URL } : undefined);
  await client.connect();
  try {
    // 1-3. a call, a permit, the calendar; the result is reported with its duration (for
    // policies that count slow calls)
    const callId = await insertCall(client);
    let permit = await acquire(client);
    console.log(`breaker closed: permit ${permit}`);
    let started = process.hrtime.bigint();
    const bookingId = await bookInCalendar(callId, true);
    await client.query('select booking_guard.circuit_record_success($1::text[], $2, make_interval(secs => $3))',
                       [SCOPES, permit, secondsSince(started)]);
    console.log(`calendar booked ${bookingId}`);

    // 4. record the booking: appointment, call flags and validation in one call
    const booking = (await client.query(
      'select success, reason, appointment_id, created from booking_guard.record_booking($1, $2, $3::jsonb)',
      [callId, bookingId, JSON.stringify(APPOINTMENT)])).rows[0];
    if (!booking.success) {
      // refused by validation: the call is rolled back to creation_failed and queued for review
      console.log(`booking refused: ${booking.reason}`);
      return 1;
    }
    console.log(`booked: call ${callId}, appointment ${booking.appointment_id}, created ${booking.created}`);

    // 5. the calendar goes down: each failure is reported, and the third opens the breakers
    const failingCallId = await insertCall(client);
    for (let attempt = 1; attempt <= FAILURES_TO_OPEN; attempt++) {
      permit = await acquire(client);
      started = process.hrtime.bigint();
      try {
        await bookInCalendar(failingCallId, false);
      } catch (err) {
        if (!(err instanceof CalendarError)) {
          throw err;
        }
        const { rows } = await client.query(
          'select booking_guard.circuit_record_failure($1::text[], $2, $3, make_interval(secs => $4)) as state',
          [SCOPES, err.message, permit, secondsSince(started)]);
        console.log(`calendar failed (${attempt}/${FAILURES_TO_OPEN}): ${err.message}; breaker ${rows[0].state}`);
      }
    }

    // ... so the next ask is refused: BG001, its DETAIL a JSON object
    const refused = await acquire(client).then(() => null, (err) => expectSqlstate(err, 'BG001'));
    if (refused === null) {
      console.error('expected BG001: the breaker admitted the call');
      return 1;
    }
    const refusal = JSON.parse(refused.detail);
    console.log(`BG001 ${refused.message}`);
    console.log(`BG001 DETAIL: key ${refusal.key}, state ${refusal.state}, ${retryText(refusal.retry_after_seconds)}`);

    // ... or, without an exception, as a row
    const tried = (await client.query(
      'select allowed, state, retry_after_seconds, refused_by from booking_guard.circuit_try_acquire($1::text[])',
      [SCOPES])).rows[0];
    console.log(`try_acquire: allowed ${tried.allowed}, state ${tried.state}, refused by ${tried.refused_by}, `
                + retryText(tried.retry_after_seconds));

    // 6. BG005: the appointment names a column the appointments table does not have; nothing is written
    const invalid = await client.query('select * from booking_guard.record_booking($1, $2, $3::jsonb)',
                                       [failingCallId, `cal-${failingCallId}-bad`,
                                        JSON.stringify({ ...APPOINTMENT, room: 'B' })])
      .then(() => null, (err) => expectSqlstate(err, 'BG005'));
    if (invalid === null) {
      console.error('expected BG005: the appointment was accepted');
      return 1;
    }
    console.log(`BG005 invalid input: ${invalid.message}`);

    // BG002: flagging the call as booked without recording an appointment is refused at COMMIT
    await client.query('begin');
    await client.query("update calls set session_outcome = 'appointment_booked', appointment_made = true where id = $1",
                       [failingCallId]);
    const rejected = await client.query('commit').then(() => null, (err) => expectSqlstate(err, 'BG002'));
    if (rejected === null) {
      console.error('expected BG002: the commit went through');
      return 1;
    }
    console.log(`BG002 commit refused: ${rejected.message}`);
    return 0;
  } finally {
    await client.end();
  }
}

main().then((status) => { process.exitCode = status; },
            (err) => { console.error(err); process.exitCode = 1; });
