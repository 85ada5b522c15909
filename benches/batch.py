"""Batch metering (issue 16 item 3): events per second ingested by billing.record_usage_batch in
batches of 1,000 from one client, beside the same events sent one call each, in one run.

Each round sends the same kind of events both ways, interleaved (batch, single, batch, single...);
every event has its own idempotency key (so each is checked and applied once) and a user among
10,000 (or, the second workload, among 100: a batch then touches fewer usage rows). The client
sends JSON text, as an app would (psycopg2, one connection, autocommit). Medians of the rounds.
"""
import json
import os
import statistics
import time
import uuid

import psycopg2

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
ROUNDS = 1 if SMOKE else int(os.environ.get("BENCH_ROUNDS", "5"))
BATCHES = 3 if SMOKE else int(os.environ.get("BENCH_BATCHES", "40"))   # batches of 1,000 per round
SINGLES = 200 if SMOKE else int(os.environ.get("BENCH_SINGLES", "4000"))  # single calls per round
DB = os.environ.get("PGDATABASE", "bench")


def uid(i):
    return f"00000000-0000-4000-8000-{i:012x}"


def events(n, users, rnd):
    return [{"user_id": uid(rnd.randrange(users) + 1), "metric": "messages", "value": 1,
             "idempotency_key": uuid.uuid4().hex} for _ in range(n)]


def run_batches(cur, batches):
    t = time.perf_counter()
    for b in batches:
        cur.execute("SELECT jsonb_array_length(billing.record_usage_batch(%s::jsonb))", (b,))
        assert cur.fetchone()[0] == 1000
    return 1000 * len(batches) / (time.perf_counter() - t)


def run_singles(cur, singles):
    t = time.perf_counter()
    for e in singles:
        cur.execute("SELECT billing.record_usage_batch(%s::jsonb)", (e,))
        cur.fetchone()
    return len(singles) / (time.perf_counter() - t)


def bench(users, rnd):
    c = psycopg2.connect(dbname=DB, options="-c synchronous_commit=off")
    c.autocommit = True
    cur = c.cursor()
    batch_eps, single_eps = [], []
    for _ in range(ROUNDS):
        batches = [json.dumps(events(1000, users, rnd)) for _ in range(BATCHES)]
        singles = [json.dumps(events(1, users, rnd)) for _ in range(SINGLES)]
        batch_eps.append(run_batches(cur, batches))
        single_eps.append(run_singles(cur, singles))
    # Every event was applied once: count the keys written (scope 'usage').
    c.close()
    return statistics.median(batch_eps), statistics.median(single_eps), batch_eps, single_eps


def bench_batch(results, targets):
    import random
    rnd = random.Random(16)
    print("record_usage_batch: batches of 1,000 beside one call per event", flush=True)
    lines = []
    for users in (10_000, 100):
        before = sql_count()
        b, s, bs, ss = bench(users, rnd)
        applied = sql_count() - before
        expected = ROUNDS * (BATCHES * 1000 + SINGLES)
        assert applied == expected, f"{applied} events applied, {expected} sent"
        lines.append(f"| {users:,} users | **{b:,.0f}** | {s:,.0f} | {b / s:.1f}x | "
                     f"{', '.join(f'{x:,.0f}' for x in bs)} | {', '.join(f'{x:,.0f}' for x in ss)} |")
        if users == 10_000:
            targets.append(("record_usage_batch >= 100,000 events/s in batches of 1,000 (one client)", b >= 100_000,
                            f"{b:,.0f} events/s ({s:,.0f} one call each)"))
    body = "\n".join([
        f"One client, synchronous_commit=off (CPU-bound, as the consume benchmarks), JSON text over the wire, each event "
        f"with its own idempotency key; {ROUNDS} interleaved rounds of "
        f"{BATCHES} batches of 1,000 and {SINGLES:,} single-event calls; medians (every round listed). Every event was "
        "applied exactly once (counted in billing.usage_event_keys).", "",
        "| events over | batches of 1,000 (events/s) | one call per event (events/s) | ratio | batch rounds | single rounds |",
        "|---|---|---|---|---|---|"] + lines)
    results.append(("Batch metering, record_usage_batch", body))


def sql_count():
    c = psycopg2.connect(dbname=DB)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT count(*) FROM billing.usage_event_keys")
            return cur.fetchone()[0]
    finally:
        c.close()
