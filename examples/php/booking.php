<?php
/**
 * The booking path through booking_guard from PHP, with PDO (pdo_pgsql).
 *
 * The same story as the psql, Python and Node examples beside this one, printing the same lines:
 *
 *  1. insert a call, as the voice agent's webhook does;
 *  2. ask the circuit breaker for a permit under two scopes at once (the global breaker and the
 *     service's): one round trip, refused while either is open;
 *  3. call the calendar (a stub here) and report the result with the same scopes and permit;
 *  4. record the booking with record_booking() and report its result;
 *  5. the calendar goes down: three failed calls open the breakers (the default policy opens
 *     after 3 consecutive failures); the next ask is refused with BG001, and
 *     circuit_try_acquire() answers the same as a row, without raising;
 *  6. bad input to record_booking() is BG005; a transaction flagging a call as booked without an
 *     appointment is refused at COMMIT with BG002 (rule missing_appointment in enforce mode).
 *
 * With PDO::ERRMODE_EXCEPTION every server error is a PDOException whose errorInfo[0] is the
 * SQLSTATE. PDO has no field for DETAIL: errorInfo[2] is the server's whole report in one string
 * ("ERROR:  message", then "DETAIL:  ...", "HINT:  ...", "CONTEXT:  ..." lines, their labels
 * translated when the server's lc_messages is not English). So this program takes the message and
 * BG001's DETAIL out of that string, and relies on circuit_try_acquire()'s row for the
 * retry-after, which needs no parsing: prefer it from PHP.
 *
 * The connection comes from DATABASE_URL if it is set, otherwise from the libpq environment
 * (PGHOST, PGPORT, PGUSER, PGDATABASE), which the empty DSN "pgsql:" leaves to libpq. The database
 * needs examples/clients_setup.sql first; see docs/clients.md. Needs PHP >= 8.1 with pdo_pgsql.
 *
 *     php examples/php/booking.php
 */

declare(strict_types=1);

const COMPANY_ID = 1;
const SERVICE_ID = 1;
// Every scope the call runs under: a permit covers them all, and the call's result counts for each.
const SCOPES = ['appointment_booking:global', 'appointment_booking:service:' . SERVICE_ID];
// Consecutive failures that open a breaker under the default policy (circuit_policies, row '%').
const FAILURES_TO_OPEN = 3;
const APPOINTMENT = ['company_id' => COMPANY_ID, 'service_id' => SERVICE_ID,
                     'starts_at' => '2030-01-15T09:00:00Z', 'ends_at' => '2030-01-15T09:30:00Z'];

final class CalendarError extends RuntimeException
{
}

/**
 * Stands in for the calendar's booking API (Cal.com): the new booking's id, or CalendarError
 * while the calendar is down ($available is the stub's switch).
 */
function book_in_calendar(int $callId, bool $available): string
{
    if (!$available) {
        throw new CalendarError('Cal.com answered 503 Service Unavailable');
    }
    return sprintf('cal-%d-%s', $callId, bin2hex(random_bytes(4)));
}

/** retry_after_seconds in words: null means forced open until someone resets the breaker. */
function retry_text(int|string|null $seconds): string
{
    return $seconds === null ? 'no retry before a reset' : "retry after {$seconds} s";
}

/**
 * One field of the server's error report that PDO gives as one string (errorInfo[2]): 'ERROR'
 * for the message, or 'DETAIL', 'HINT'. Only its first line: enough for booking_guard's
 * messages and BG001's DETAIL, which are one line each.
 */
function error_field(PDOException $e, string $label): ?string
{
    $report = $e->errorInfo[2] ?? '';
    return preg_match('/^' . preg_quote($label, '/') . ':\s+(.*)$/m', $report, $m) ? $m[1] : null;
}

/** PDO binds strings only: a text[] parameter is passed as an array literal, each element quoted. */
function pg_text_array(array $items): string
{
    return '{' . implode(',', array_map(fn (string $s): string => '"' . addcslashes($s, '"\\') . '"', $items)) . '}';
}

/** Runs one statement with parameters and returns its first row (column name => value). */
function query_row(PDO $pdo, string $sql, array $params = []): array
{
    $statement = $pdo->prepare($sql);
    $statement->execute($params);
    return $statement->fetch(PDO::FETCH_ASSOC);
}

function insert_call(PDO $pdo): int
{
    $row = query_row($pdo, "insert into calls (retell_call_id, company_id, direction) values (?, ?, 'inbound') returning id",
                     ['example-php-' . bin2hex(random_bytes(4)), COMPANY_ID]);
    echo "call {$row['id']} inserted\n";
    return $row['id'];
}

/** A permit for a call under SCOPES; throws BG001 while a scope refuses (PDO autocommits: its own transaction). */
function acquire(PDO $pdo): int
{
    return query_row($pdo, 'select booking_guard.circuit_acquire(?::text[]) as permit', [pg_text_array(SCOPES)])['permit'];
}

/**
 * DATABASE_URL (postgresql://user:password@host:port/dbname?key=value) as PDO's DSN, user and
 * password. PDO appends options of its own to the DSN before libpq reads it, so a URI cannot be
 * passed whole: each part becomes a key='value' pair (query parameters such as host=/run/postgresql
 * or sslmode are kept). One host; no ';' in any value (PDO turns it into a space).
 */
function pdo_dsn_from_url(string $url): array
{
    $uri = '~^postgres(?:ql)?://(?:([^:@/]*)(?::([^@/]*))?@)?(\[[^\]]*\]|[^:/?]*)(?::(\d+))?(?:/([^?]*))?(?:\?(.*))?$~';
    if (!preg_match($uri, $url, $m)) {
        throw new InvalidArgumentException('DATABASE_URL is not a postgresql:// URI');
    }
    $params = array_filter(['host' => rawurldecode(trim($m[3] ?? '', '[]')), 'port' => $m[4] ?? '',
                            'dbname' => rawurldecode($m[5] ?? '')], fn (string $v): bool => $v !== '');
    parse_str($m[6] ?? '', $query);
    $pairs = [];
    foreach ($params + $query as $key => $value) {
        $pairs[] = $key . "='" . addcslashes((string) $value, "'\\") . "'";
    }
    $user = ($m[1] ?? '') !== '' ? rawurldecode($m[1]) : null;
    $password = ($m[2] ?? '') !== '' ? rawurldecode($m[2]) : null;
    return ['pgsql:' . implode(';', $pairs), $user, $password];
}

function main(): int
{
    $url = getenv('DATABASE_URL');
    [$dsn, $user, $password] = $url ? pdo_dsn_from_url($url) : ['pgsql:', null, null];
    $pdo = new PDO($dsn, $user, $password, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);

    // 1-3. a call, a permit, the calendar; the result is reported with its duration (for policies
    // that count slow calls)
    $callId = insert_call($pdo);
    $permit = acquire($pdo);
    echo "breaker closed: permit {$permit}\n";
    $started = hrtime(true);
    $bookingId = book_in_calendar($callId, true);
    query_row($pdo, 'select booking_guard.circuit_record_success(?::text[], ?, make_interval(secs => ?))',
              [pg_text_array(SCOPES), $permit, (hrtime(true) - $started) / 1e9]);
    echo "calendar booked {$bookingId}\n";

    // 4. record the booking: appointment, call flags and validation in one call. (json_encode([])
    // gives '[]', which record_booking takes as an empty object.)
    $booking = query_row($pdo, 'select success, reason, appointment_id, created from booking_guard.record_booking(?, ?, ?::jsonb)',
                         [$callId, $bookingId, json_encode(APPOINTMENT, JSON_THROW_ON_ERROR)]);
    if (!$booking['success']) {
        // refused by validation: the call is rolled back to creation_failed and queued for review
        echo "booking refused: {$booking['reason']}\n";
        return 1;
    }
    $created = $booking['created'] ? 'true' : 'false';
    echo "booked: call {$callId}, appointment {$booking['appointment_id']}, created {$created}\n";

    // 5. the calendar goes down: each failure is reported, and the third opens the breakers
    $failingCallId = insert_call($pdo);
    for ($attempt = 1; $attempt <= FAILURES_TO_OPEN; $attempt++) {
        $permit = acquire($pdo);
        $started = hrtime(true);
        try {
            book_in_calendar($failingCallId, false);
        } catch (CalendarError $e) {
            $state = query_row($pdo, 'select booking_guard.circuit_record_failure(?::text[], ?, ?, make_interval(secs => ?)) as state',
                               [pg_text_array(SCOPES), $e->getMessage(), $permit, (hrtime(true) - $started) / 1e9])['state'];
            printf("calendar failed (%d/%d): %s; breaker %s\n", $attempt, FAILURES_TO_OPEN, $e->getMessage(), $state);
        }
    }

    // ... so the next ask is refused: BG001, its DETAIL a JSON object inside the report string
    try {
        acquire($pdo);
        fwrite(STDERR, "expected BG001: the breaker admitted the call\n");
        return 1;
    } catch (PDOException $e) {
        if ($e->errorInfo[0] !== 'BG001') {
            throw $e;
        }
        $refusal = json_decode(error_field($e, 'DETAIL') ?? 'null', true);
        echo 'BG001 ' . error_field($e, 'ERROR') . "\n";
        echo "BG001 DETAIL: key {$refusal['key']}, state {$refusal['state']}, " . retry_text($refusal['retry_after_seconds']) . "\n";
    }

    // ... or, without an exception, as a row: the way to read retry-after from PDO
    $try = query_row($pdo, 'select allowed, state, retry_after_seconds, refused_by from booking_guard.circuit_try_acquire(?::text[])',
                     [pg_text_array(SCOPES)]);
    $allowed = $try['allowed'] ? 'true' : 'false';
    echo "try_acquire: allowed {$allowed}, state {$try['state']}, refused by {$try['refused_by']}, "
        . retry_text($try['retry_after_seconds']) . "\n";

    // 6. BG005: the appointment names a column the appointments table does not have; nothing is written
    try {
        query_row($pdo, 'select * from booking_guard.record_booking(?, ?, ?::jsonb)',
                  [$failingCallId, "cal-{$failingCallId}-bad", json_encode(APPOINTMENT + ['room' => 'B'], JSON_THROW_ON_ERROR)]);
        fwrite(STDERR, "expected BG005: the appointment was accepted\n");
        return 1;
    } catch (PDOException $e) {
        if ($e->errorInfo[0] !== 'BG005') {
            throw $e;
        }
        echo 'BG005 invalid input: ' . error_field($e, 'ERROR') . "\n";
    }

    // BG002: flagging the call as booked without recording an appointment is refused at COMMIT
    $pdo->beginTransaction();
    $pdo->prepare("update calls set session_outcome = 'appointment_booked', appointment_made = true where id = ?")
        ->execute([$failingCallId]);
    try {
        $pdo->commit();
        fwrite(STDERR, "expected BG002: the commit went through\n");
        return 1;
    } catch (PDOException $e) {
        if ($e->errorInfo[0] !== 'BG002') {
            throw $e;
        }
        echo 'BG002 commit refused: ' . error_field($e, 'ERROR') . "\n";
    }
    return 0;
}

exit(main());
