#!/usr/bin/env python3
"""Part 1 of the reliability harness: contention.

N client threads (one connection each) run a random mix of consume (service and PostgREST-style
end-user calls), add (both pools), refund, expire, renew, idempotent retries of earlier calls,
concurrent repeats of the same keyed call, rate-limit checks and usage recording over 100 users,
for a bounded time. Credit grants (0.4.0): 70 of the users also get grant_credits (every
category, custom priorities, feature scopes, expiries 3-8 s ahead, starts up to 4 s ahead),
void_grant (also repeated), consume_credits with and without a feature (service and end user),
set_overdraft_limit (a third may overdraw by 30, a third by 150) and reads of their grants
(get_credit_grants, balance_at). The client keeps its own account: per user, the sum of what
every successful call returned. Afterwards it checks:
  - billing.verify_ledger() is empty and no balance is negative;
  - each call's ledger rows (by transaction_id = operation_id) match what it returned, in total,
    per pool and per grant; every other operation in the ledger is a settlement of grants whose
    expiry had passed; each balance (subscription + purchased - debt) equals the client's account
    plus those settlements, per pool for the two-pool-only users;
  - per grant: ledger rows sum to remaining, 0 <= remaining <= amount, one 'void' row per voided
    grant, nothing after a void or an expiry, no expired grant ever spent, none before its start;
    pools equal the sums of their grants, debt >= 0 and within the overdraft limit in force;
  - spending order and scope: no consumption skipped a spendable grant earlier in the order or
    took debt while one was left, nor spent a grant whose scope excludes its feature
    (tests/stress/ledger_check.py has the full list);
  - each idempotency key was applied once: retries returned the identical JSON (same
    transaction_id), and the ledger has one operation per key;
  - expiration events add up to the expiration rows, per operation;
  - record_message_usage: messages/tokens per user equal the successful calls;
  - check_api_rate_limit: per user and hour, allowed = min(attempts, limit) and the stored
    request count equals it;
  - no call raised an error other than PT402 (not enough credits);
  - credit holds (0.5.0, tests/stress/holds_mix.py, on users of their own): each hold resolved
    at most once, captured + released = held, no credit spent twice or lost.
Events (0.6.0, tests/stress/events_check.py): balance rules are set on half the users before the
mix starts (their own, with thresholds around their balances; the subscribed users also get their
plan's) and on half the holds users, so many writers cross the same user's threshold at once.
The rules must fire once: each user's balance.low / balance.depleted / balance.recovered events
alternate as the rule's state machine allows (no second balance.low without a balance.recovered
between) and are exactly what the committed ledger, replayed per transaction through it,
predicts; every expiration row, voided grant, expired hold and entry into debt has exactly one
event. Meanwhile three workers of one consumer claim and acknowledge (one drops every fourth claim
as a crashed worker would): every event is acknowledged, no two claims hold an event at once, a
dropped claim's events come back only after its visibility timeout, no acknowledged event comes
back, no claim skips one of a user's events or hands out one before the user's earlier ones are
acknowledged. Afterwards, accounts made after a plan's rule was set must be covered by it too.
Prints `contention: N calls, M invariant violations`; exits 1 on any violation.

Usage: contention.py [--short | --seconds S] [--threads 32] [--users 100] [--mutate]
(connection from PGHOST/PGPORT/PGUSER/PGDATABASE)."""
import argparse
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import events_check  # noqa: E402
import holds_mix  # noqa: E402
import ledger_check  # noqa: E402
from common import (MUTATORS, Recorder, connect, ensure_roles, fmt, q, setup_users, worker)  # noqa: E402


def has_events(conn):
    return q(conn, "SELECT to_regclass('billing.events') IS NOT NULL")[0][0]


def has_holds(conn):
    return q(conn, "SELECT to_regclass('billing.credit_holds') IS NOT NULL")[0][0]


def check(conn, users, setup_calls, rec, violations, stats=None):
    def bad(msg):
        violations.append(msg)

    calls = setup_calls + rec.calls
    replay_ids = {id(c) for _, c in rec.replays}
    originals = [c for c in calls if id(c) not in replay_ids]

    # Unexpected errors and per-result sanity.
    for c in rec.unexpected:
        bad(f"{c.op} on {c.user} raised {c.sqlstate}: {c.error}")
    for c in calls:
        if c.status == "unknown":
            bad(f"{c.op} on {c.user}: connection lost ({c.error})")
        if c.status == "ok":
            for m in c.check_result():
                bad(m)

    # Idempotency: one applied operation per (user, key); every repeat returns the same JSON.
    first = {}            # (user, key) -> first successful call
    applied = []          # calls whose deltas count (distinct operations)
    for c in originals:
        if c.status != "ok" or c.op not in MUTATORS:
            continue
        if c.key is None:
            applied.append(c)
            continue
        k = (c.user, c.key)
        if k not in first:
            first[k] = c
            applied.append(c)
        elif c.result != first[k].result:
            bad(f"key {c.key}: concurrent repeat returned {c.result}, first returned {first[k].result}")
    for orig, rep in rec.replays:
        if rep.status == "fail" and rep.sqlstate not in ("PT402",):
            bad(f"retry of {orig.op} key {orig.key} raised {rep.sqlstate}: {rep.error}")
        elif rep.status == "ok":
            f = first.get((orig.user, orig.key), orig)
            if rep.result != f.result:
                bad(f"retry of {orig.op} key {orig.key} returned {rep.result}, first returned {f.result}")
            elif rep.result.get("transaction_id") != f.result.get("transaction_id"):
                bad(f"retry of key {orig.key}: transaction_id changed")

    # The ledger and the grants against the results (tests/stress/ledger_check.py).
    ulist = list(users)
    for row in q(conn, "SELECT * FROM billing.verify_ledger()"):
        bad(f"verify_ledger: {row}")
    for row in q(conn, """SELECT user_id, subscription_credits_balance, purchased_credits_balance FROM billing.accounts
                           WHERE subscription_credits_balance < 0 OR purchased_credits_balance < 0"""):
        bad(f"negative balance: {row}")
    for m in ledger_check.verify(conn, users, [(c, c.result) for c in applied], calls,
                                 classic=getattr(users, "classic", set(users)), stats=stats):
        bad(m)
    for row in q(conn, """SELECT user_id, idempotency_key, count(DISTINCT operation_id) FROM billing.credit_transactions
                           WHERE user_id = ANY(%s) AND idempotency_key IS NOT NULL AND type <> 'expiration'
                           GROUP BY 1, 2 HAVING count(DISTINCT operation_id) > 1""", (ulist,)):
        bad(f"idempotency key applied more than once: {row}")

    # Usage recording.
    msgs = defaultdict(lambda: [0, 0, 0])
    for c in calls:
        if c.op == "usage" and c.status == "ok":
            m = msgs[c.user]
            m[0] += 1
            m[1] += c.args["tin"]
            m[2] += c.args["tout"]
    got = {r[0]: [r[1], r[2], r[3]] for r in q(conn, """
        SELECT user_id, sum(messages_count)::bigint, sum(tokens_input_count)::bigint, sum(tokens_output_count)::bigint
          FROM billing.usage_metrics WHERE user_id = ANY(%s) GROUP BY 1""", (ulist,))}
    for u in users:
        if got.get(u, [0, 0, 0]) != msgs.get(u, [0, 0, 0]):
            bad(f"user {u}: usage_metrics {got.get(u)} but {msgs.get(u)} successful record_message_usage calls")

    # Rate limits: per user and hour bucket (reset_at), allowed = min(attempts, limit).
    att = defaultdict(lambda: [0, 0, None])
    for c in calls:
        if c.op == "rate" and c.status == "ok":
            a = att[(c.user, c.result["reset_at"])]
            a[0] += 1
            a[1] += 1 if c.result["allowed"] else 0
            a[2] = c.result["limit_value"]
    stored = {(r[0], r[1]): r[2] for r in q(conn, """
        SELECT user_id, bucket_start + interval '1 hour', request_count FROM billing.api_usage WHERE user_id = ANY(%s)""",
                                           (ulist,))}
    for (u, reset), (n, allowed, lim) in att.items():
        want = n if lim < 0 else min(n, lim)
        if allowed != want:
            bad(f"user {u} hour ending {reset}: {allowed} of {n} requests allowed, limit {lim} (want {want})")
        if stored.get((u, reset), 0) != allowed:
            bad(f"user {u} hour ending {reset}: api_usage.request_count {stored.get((u, reset))}, allowed {allowed}")
    return len(calls)


def run(seconds, threads=32, nusers=100, quiet=False, mutate=False):
    """Run the contention test; returns (calls, violations list). `mutate`: afterwards, check that
    the event checks find each of events_check.MUTATIONS."""
    conn = connect()
    ensure_roles(conn)
    q(conn, "SELECT billing.expose_rpc('public')")
    tag = "c" + uuid.uuid4().hex[:10]
    users, setup_calls = setup_users(conn, nusers, tag)
    rec = Recorder()
    stop = threading.Event()
    ts = [threading.Thread(target=worker, args=(None, users, stop, rec, f"{tag}-t{i}", hash((tag, i))), daemon=True)
          for i in range(threads)]
    # Credit holds (0.5.0), on users of their own, beside the main mix.
    hold_users = holds_mix.setup(conn, max(nusers // 5, 4), tag + "h") if has_holds(conn) else []
    hrec = holds_mix.HoldRecorder()
    if hold_users:
        ts += [threading.Thread(target=holds_mix.worker, args=(None, hold_users, stop, hrec, f"{tag}-h{i}", hash((tag, "h", i))),
                                daemon=True) for i in range(max(threads // 4, 2))]
    # Events (0.6.0): balance rules on the contended users; workers of one consumer deliver.
    rules = dw = None
    if has_events(conn):
        rules = events_check.set_rules(conn, users, hold_users, seed=hash(tag))
        dw = events_check.DeliveryWorkers(f"stress-{tag}")
        ts += dw.threads(None, stop, seed=hash(tag))
    t0 = time.time()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join(timeout=60)
    if any(t.is_alive() for t in ts):
        raise RuntimeError("a worker thread did not finish within 60 s of the deadline")
    elapsed = time.time() - t0
    violations = []
    stats = {}
    n = check(conn, users, setup_calls, rec, violations, stats)
    if hold_users:
        hlost, hbad = holds_mix.check(conn, hold_users, hrec.calls)
        violations += hlost + hbad
        n += len(hrec.calls)
    ev_stats, dv_stats = {}, {}
    if rules is not None:
        violations += events_check.check(conn, rules, users, hold_users, None, ev_stats)
        dw.finish(None)
        violations += events_check.check_delivery(conn, dw, dv_stats)
        violations += events_check.late_accounts_probe(conn, tag)
        if mutate:
            tried, missed = events_check.mutation_test(conn, rules, users, hold_users)
            print(f"  event checks: {tried} mutations tried, {tried - len(missed)} found"
                  + (f"; missed: {missed}" if missed else ""), flush=True)
            violations += [f"event checks missed: {m}" for m in missed]
    conn.close()
    if not quiet:
        by = defaultdict(int)
        for c in rec.calls:
            by[(c.op, c.status, c.sqlstate)] += 1
        print(f"  {fmt(n)} calls in {elapsed:.1f} s ({n / elapsed:,.0f}/s), "
              + ", ".join(f"{k[0]}:{k[1]}{'/' + k[2] if k[2] else ''}={v}" for k, v in sorted(by.items())), flush=True)
        if hold_users:
            print("  holds: " + holds_mix.stats(hrec.calls), flush=True)
        if stats.get("grants"):
            print("  grants: " + ", ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
        if rules is not None:
            print(f"  {events_check.summary(ev_stats)}", flush=True)
            print("  delivery: " + ", ".join(f"{k} {v}" for k, v in dv_stats.items()), flush=True)
        for v in violations[:30]:
            print("  VIOLATION:", v, flush=True)
    return n, violations


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="20 seconds")
    ap.add_argument("--long", action="store_true", help="5 minutes")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--mutate", action="store_true", help="afterwards, check that the event checks find planted mistakes")
    a = ap.parse_args()
    secs = a.seconds or (300 if a.long else 20)
    n, violations = run(secs, a.threads, a.users, mutate=a.mutate)
    print(f"contention: {fmt(n)} calls, {fmt(len(violations))} invariant violations", flush=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
