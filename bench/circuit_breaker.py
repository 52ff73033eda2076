"""The shared circuit breaker against pybreaker with its Redis storage, in one run.

Throughput: acquire + record round trips per second (the closed state's success path, the one every
booking takes) at 1, 8 and 32 clients, on one hot key and spread over 100 keys, under two policies:
the default (open after 3 consecutive failures: a success with no failure streak writes nothing) and
a failure-rate policy (count_based window of 100 calls: every result is written into the window
under the breaker's row lock). Each client has its own connection: booking_guard.circuit_acquire +
circuit_record_success with the call's duration (what booking_guard.app.circuit.circuit() sends) on
PostgreSQL (DATABASE_URL; a scratch database), pybreaker.CircuitBreaker(state_storage=
CircuitRedisStorage) on a redis-server this script starts on 127.0.0.1 and stops at the end.
pybreaker has no rate policy: its side is the same under both. Both sides do the same work: one breaker per key and
client, no protected work in between. Clients are processes (an application's worker processes; on a
small machine PostgreSQL's process per connection then competes with them for the CPUs) and threads
of one process (a threaded application server; the GIL caps both sides' client work alike).

Exactness: the same 32-process race on a half-open breaker that admits one trial call (booking_guard
under both policies). Each admitted call stays in progress until every process has tried, so a second
admission is a real over-admission. Counted over several rounds.

Target: booking_guard >= 0.5 x pybreaker+redis while exact.

Each cell is measured --repeat times, booking_guard under each policy and pybreaker in turn, and the
medians are printed, both policies against the same pybreaker figure (the machine may be shared;
taking turns spreads any disturbance over every side).

usage: .venv/bin/python bench/circuit_breaker.py [--seconds 1.5] [--repeat 3] [--rounds 20] [--clients 1,8,32]
                                                 [--policies default,count_based] [--model processes|threads|both]
"""

import argparse
import importlib.metadata
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pybreaker
import redis
from _common import emit, figure, machine, scratch_database

DB = "bg_bench_circuit"
KEYS = 100
# the default policy applies to appointment_booking:*, the rate policy to rated:*
POLICIES = {"default": "appointment_booking", "count_based": "rated"}
RATE_POLICY = ("insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size, "
               "minimum_number_of_calls) values ('rated:%', 'count_based', 100, 100)")
RACE_KEY = "appointment_booking:global"
RATE_RACE_KEY = "rated:global"
TOOK = timedelta(milliseconds=120)   # the duration each call reports (not slow under either policy)


def hot(policy: str) -> list[str]:
    return [f"{POLICIES[policy]}:service:1"]


def spread(policy: str) -> list[str]:
    return [f"{POLICIES[policy]}:service:{i}" for i in range(1, KEYS + 1)]

RACERS = 32
MAX_OPS = 5_000_000   # a bound on every loop, far above what a run reaches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server on loopback, no persistence; stopped (and waited for) on exit."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed (scripts/bootstrap installs it)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        for _ in range(200):   # readiness: up to 10 s
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise SystemExit("redis-server exited at start") from None
                time.sleep(0.05)
        else:
            self.stop()
            raise SystemExit("redis-server did not answer")
        self.version = client.info("server")["redis_version"]
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pybreaker_for(r: redis.Redis, key: str) -> pybreaker.CircuitBreaker:
    # the default policy: 3 failures, 30 s cooldown, 2 successes to close
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, r, namespace=key)
    return pybreaker.CircuitBreaker(fail_max=3, reset_timeout=30, success_threshold=2, state_storage=storage)


def noop() -> None:
    return None


# ---- throughput

def bg_client(dsn: str, keys: list[str], seconds: float, start: mp.Barrier, out: mp.Queue) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        start.wait()
        n, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while n < MAX_OPS and time.perf_counter() < end:
            key = keys[n % len(keys)]
            permit = conn.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0]
            conn.execute("select booking_guard.circuit_record_success(%s, %s, %s)", (key, permit, TOOK))
            n += 1
        out.put(n / (time.perf_counter() - t0))


def pb_client(port: int, keys: list[str], seconds: float, start: mp.Barrier, out: mp.Queue) -> None:
    r = redis.Redis(host="127.0.0.1", port=port)
    breakers = [pybreaker_for(r, key) for key in keys]
    start.wait()
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while n < MAX_OPS and time.perf_counter() < end:
        breakers[n % len(breakers)].call(noop)
        n += 1
    out.put(n / (time.perf_counter() - t0))
    r.close()


def throughput(target, args: tuple, clients: int, model: str) -> float:
    """Sum of the clients' rates; each client is a process, or a thread of this process."""
    if model == "processes":
        start, out = mp.Barrier(clients), mp.Queue()
        workers = [mp.Process(target=target, args=(*args, start, out)) for _ in range(clients)]
    else:
        start, out = threading.Barrier(clients), queue.Queue()
        workers = [threading.Thread(target=target, args=(*args, start, out)) for _ in range(clients)]
    for w in workers:
        w.start()
    rates = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    return sum(rates)


# ---- the half-open race

def bg_racer(dsn: str, key: str, rounds: int, start: mp.Barrier, done: mp.Barrier, release: mp.Event,
             out: mp.Queue) -> None:
    # this process's clock is 60 s ahead: the breaker the parent opens is past its 30 s cooldown here
    with psycopg.connect(dsn, autocommit=True, options="-c booking_guard.clock_offset=60s") as conn:
        for _ in range(rounds):
            start.wait()
            try:
                permit = conn.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0]
            except psycopg.Error as error:
                if error.sqlstate != "BG001":
                    raise
                out.put("rejected")
            else:
                out.put("admitted")
                release.wait(timeout=60)   # the trial call is in progress until everyone has tried
                conn.execute("select booking_guard.circuit_record_success(%s, %s, %s)", (key, permit, TOOK))
            done.wait()


def pb_racer(port: int, rounds: int, start: mp.Barrier, done: mp.Barrier, release: mp.Event, out: mp.Queue) -> None:
    r = redis.Redis(host="127.0.0.1", port=port)
    breaker = pybreaker_for(r, RACE_KEY)

    def trial() -> None:
        out.put("admitted")
        release.wait(timeout=60)

    for _ in range(rounds):
        start.wait()
        try:
            breaker.call(trial)
        except pybreaker.CircuitBreakerError:
            out.put("rejected")
        done.wait()
    r.close()


def bg_open(dsn: str, key: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("select count(*) from booking_guard.circuit_breakers where key = %s", (key,)).fetchone()[0]:
            conn.execute("select booking_guard.circuit_reset(%s)", (key,))
        conn.execute("select booking_guard.circuit_force_open(%s, clock_timestamp() + interval '1 second')", (key,))


def pb_open(port: int) -> None:
    r = redis.Redis(host="127.0.0.1", port=port)
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, r, namespace=RACE_KEY)
    storage.state = pybreaker.STATE_OPEN
    storage.reset_counter()
    storage.reset_success_counter()
    # opened 60 s ago: past the 30 s reset timeout for every process
    r.set(storage._namespace("opened_at"), int(datetime.now(UTC).timestamp()) - 60)
    r.close()


def race(target, args: tuple, reopen, rounds: int) -> list[int]:
    """Admitted calls per round of RACERS processes racing on a half-open breaker (allowed: 1)."""
    start, done, release, out = mp.Barrier(RACERS + 1), mp.Barrier(RACERS + 1), mp.Event(), mp.Queue()
    procs = [mp.Process(target=target, args=(*args, rounds, start, done, release, out)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    admitted = []
    for _ in range(rounds):
        reopen()
        start.wait(timeout=120)
        outcomes = [out.get(timeout=60) for _ in range(RACERS)]
        admitted.append(outcomes.count("admitted"))
        release.set()
        done.wait(timeout=120)
        release.clear()
    for p in procs:
        p.join(timeout=30)
    return admitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="duration of each throughput measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per cell (median printed)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the half-open race")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--model", choices=["processes", "threads", "both"], default="both",
                        help="clients as processes (an application's workers), threads (one process), or both")
    parser.add_argument("--policies", default=",".join(POLICIES), help="booking_guard policies to measure")
    args = parser.parse_args()
    policies = args.policies.split(",")
    clients = [int(c) for c in args.clients.split(",")]
    models = ["processes", "threads"] if args.model == "both" else [args.model]
    mp.set_start_method("fork")

    server = RedisServer()
    try:
        with scratch_database(DB) as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(RATE_POLICY)
                # create the breakers (and their windows) once
                for policy in POLICIES:
                    for key in spread(policy):
                        conn.execute("select booking_guard.circuit_acquire(%s)", (key,))
            env = machine()
            print(f"circuit breaker bench: {env['cpu']}, PostgreSQL {env['postgresql']}, redis-server {server.version} "
                  f"(127.0.0.1), Python {env['python']}, pybreaker {importlib.metadata.version('pybreaker')}; "
                  f"load average before: {os.getloadavg()[0]:.1f}")
            figures: list[dict] = []
            for model in models:
                print(f"\nacquire + record round trips per second (median of {args.repeat} x {args.seconds:g} s), "
                      f"each client one {model[:-2] if model == 'processes' else model[:-1]} with its own connection")
                print(f"{'policy':<12} {'keys':<9} {'clients':>7} {'booking_guard':>14} {'pybreaker+redis':>16} {'ratio':>6}")
                ratios: dict[str, list[float]] = {policy: [] for policy in policies}
                for label, keys_of in (("hot key", hot), (f"{KEYS} keys", spread)):
                    for n in clients:
                        flush = server.client()
                        flush.flushall()
                        flush.close()
                        # the three sides in turn, each repeat: one pybreaker figure for both policies
                        runs: dict[str, list[float]] = {"pybreaker": [], **{policy: [] for policy in policies}}
                        for _ in range(args.repeat):
                            for policy in policies:
                                runs[policy].append(throughput(bg_client, (dsn, keys_of(policy), args.seconds), n, model))
                            runs["pybreaker"].append(throughput(pb_client, (server.port, keys_of("default"), args.seconds),
                                                                n, model))
                        pb = statistics.median(runs["pybreaker"])
                        for policy in policies:
                            bg = statistics.median(runs[policy])
                            ratios[policy].append(bg / pb)
                            figures.append(figure(f"{policy} policy, {label}, {n} client(s) as {model}: acquire + record per s",
                                                  bg, "1/s", "pybreaker + redis", pb, ">= 0.5"))
                            print(f"{policy:<12} {label:<9} {n:>7} {bg:>14,.0f} {pb:>16,.0f} {bg / pb:>6.2f}")
                for policy, values in ratios.items():
                    print(f"ratio booking_guard ({policy} policy) / pybreaker+redis ({model}): min {min(values):.2f}, "
                          f"max {max(values):.2f} (target >= 0.5)")

            print(f"\nhalf-open race: {RACERS} processes, {args.rounds} rounds, 1 trial call allowed, "
                  "each admitted call in progress until all have tried")
            beyond: dict[str, int] = {}
            for name, target, targs, reopen in (
                    ("booking_guard (default policy)", bg_racer, (dsn, RACE_KEY), lambda: bg_open(dsn, RACE_KEY)),
                    ("booking_guard (count_based)", bg_racer, (dsn, RATE_RACE_KEY), lambda: bg_open(dsn, RATE_RACE_KEY)),
                    ("pybreaker+redis", pb_racer, (server.port,), lambda: pb_open(server.port))):
                admitted = race(target, targs, reopen, args.rounds)
                over = [a for a in admitted if a > 1]
                print(f"{name:<31} over-admitted in {len(over)}/{len(admitted)} rounds; admitted per round: "
                      f"min {min(admitted)}, max {max(admitted)}, mean {sum(admitted) / len(admitted):.1f}; "
                      f"calls beyond the limit: {sum(a - 1 for a in over)}")
                beyond[name] = sum(a - 1 for a in over)
            for name in ("booking_guard (default policy)", "booking_guard (count_based)"):
                figures.append(figure(f"half-open race, {RACERS} processes, {name.removeprefix('booking_guard ')}: "
                                      "calls beyond the limit", beyond[name], "calls", "pybreaker + redis",
                                      beyond["pybreaker+redis"], "0"))
            print(f"load average after: {os.getloadavg()[0]:.1f}")
            emit("circuit_breaker", figures)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
