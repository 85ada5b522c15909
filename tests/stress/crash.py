#!/usr/bin/env python3
"""Part 2 of the reliability harness: crash.

Starts its own throwaway PostgreSQL 15 cluster (fsync = on, synchronous_commit = on), creates a
database with pg_billing and Supabase's roles, and runs the contention mix with every credit
mutator keyed by a unique idempotency key. After a few seconds it SIGKILLs the server's main
process (its pid is the first line of postmaster.pid; never by name), lets every client see its
connection die, restarts the server (pg_ctl start; crash recovery), and checks every call the
client made:
  - committed (the call and its COMMIT returned): its idempotency row exists with the very
    response the client got, and its ledger rows (its transaction_id) add up to that response,
    in total, per pool and per grant (the mix includes the credit grants, voids, consume_credits
    with features and overdraft, as in the contention part);
  - failed (the server raised an error): no idempotency row, no ledger rows;
  - in flight (the connection died before the result came back): all or nothing: either the
    idempotency row and ledger rows matching it, or neither;
  - the ledger holds no row the client did not cause (but settlements of expired grants);
    verify_ledger() is empty; no balance is negative; the grant invariants of
    tests/stress/ledger_check.py hold; usage counters and rate-limit buckets lie between the
    committed calls and the committed plus in-flight ones; the overdraft limit is the last set.
Credit holds (0.5.0, tests/stress/holds_mix.py) run beside the mix on users of their own: after
the restart every hold resolved at most once, captured + released = held, every committed
reservation, capture and release is there, and no credit is spent twice or lost.
Events (0.6.0, tests/stress/events_check.py): before the mix starts, balance rules are set on
half of its users (their own; the subscribed users also get their plan's) and on half the holds
users, and a probe thread crosses the threshold of users of its own in transactions that never
commit (ROLLBACK, an error, ROLLBACK TO SAVEPOINT; or killed in flight). After the restart the
committed ledger of each user with a rule, replayed per transaction through the rule's state
machine, must predict exactly the balance.* events recovery left (type, order, writing
transaction, available balance); every expiration row, voided grant, expired hold and entry into
debt has exactly one grant.expired / grant.voided / hold.expired / overdraft.entered event of its
transaction, none more; no event exists of a probe transaction; and a fresh consumer claiming
until nothing is left gets every event once, each user's in id order.
Prints `crash: N committed calls, M lost`; exits 1 on any loss or violation.

Usage: crash.py [--short (one kill) | --long (several kill cycles)] [--cycles N] [--threads 16] [--mutate]"""
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
from common import (MUTATORS, Call, Cluster, Recorder, connect, ensure_roles, fmt, q, setup_users, worker)  # noqa: E402


def check(conn, users, calls):
    """Returns (committed count, lost list, violations list)."""
    lost, bad = [], []
    ulist = list(users)
    keys = {(r[0], r[1]): r[2] for r in q(conn, """SELECT user_id, idempotency_key, response FROM billing.idempotency_keys
                                                    WHERE user_id = ANY(%s)""", (ulist,))}
    keyed_rows = defaultdict(int)     # (user, key) -> ledger rows carrying the key
    for u, k, n in q(conn, """SELECT user_id, idempotency_key, count(*) FROM billing.credit_transactions
                               WHERE user_id = ANY(%s) AND idempotency_key IS NOT NULL GROUP BY 1, 2""", (ulist,)):
        keyed_rows[(u, k)] = n
    committed = sum(c.status == "ok" for c in calls)
    by_key = defaultdict(list)
    applied = []          # (call, result): the operations that must be in the ledger
    for c in calls:
        if c.op in MUTATORS and c.key is None and c.status == "ok":
            applied.append((c, c.result))     # setup's subscriptions (upsert_subscription has no key)
        elif c.op in MUTATORS:
            by_key[(c.user, c.key)].append(c)
    for k, cs in by_key.items():
        stored = keys.get(k)
        oks = [c for c in cs if c.status == "ok"]
        unknown = [c for c in cs if c.status == "unknown"]
        if oks:
            c = oks[0]
            if stored is None:
                lost.append(f"committed {c.op} key {c.key}: no idempotency row after the crash")
                continue
            for o in oks:
                if stored != o.result:
                    lost.append(f"committed {c.op} key {c.key}: stored response {stored} != returned {o.result}")
            applied.append((c, c.result))
        elif unknown:  # in flight when the server died: all or nothing
            c = unknown[0]
            if stored is None:
                if keyed_rows.get(k):
                    bad.append(f"in-flight {c.op} key {c.key}: {keyed_rows[k]} ledger rows without its idempotency row")
            else:
                probe = Call(c.op, c.user, c.args, c.key)
                probe.status, probe.result, probe.t1 = "ok", stored, c.t1
                for m in probe.check_result():
                    bad.append(f"in-flight {c.op} key {c.key}: {m}")
                applied.append((probe, stored))
        else:  # every call with this key failed: nothing may be left
            c = cs[0]
            if stored is not None or keyed_rows.get(k):
                bad.append(f"failed {c.op} key {c.key} ({c.sqlstate}) left rows: {stored}, {keyed_rows.get(k)} ledger rows")
    # Every applied operation's ledger rows against its result, the grants, the overdraft, the
    # client's account (tests/stress/ledger_check.py). A committed call missing from the ledger
    # shows up here as a mismatch of its operation.
    committed_ops = {str(r.get("transaction_id")) for c, r in applied if c.status == "ok" and r.get("transaction_id")}
    for m in ledger_check.verify(conn, users, applied, calls, classic=getattr(users, "classic", set(users))):
        words = m.split()
        (lost if len(words) > 1 and words[1] in committed_ops else bad).append(m)
    for row in q(conn, "SELECT * FROM billing.verify_ledger()"):
        bad.append(f"verify_ledger: {row}")
    for row in q(conn, """SELECT user_id FROM billing.accounts
                           WHERE subscription_credits_balance < 0 OR purchased_credits_balance < 0"""):
        bad.append(f"negative balance: {row}")
    # Usage and rate limits: between committed and committed + in flight.
    lo, hi = defaultdict(int), defaultdict(int)
    rlo, rhi = defaultdict(int), defaultdict(int)
    for c in calls:
        if c.op == "usage":
            hi[c.user] += c.status in ("ok", "unknown")
            lo[c.user] += c.status == "ok"
        elif c.op == "rate":
            if c.status == "ok" and c.result["allowed"]:
                rlo[c.user] += 1
            if c.status == "unknown" or (c.status == "ok" and c.result["allowed"]):
                rhi[c.user] += 1
    got = dict(q(conn, """SELECT user_id, sum(messages_count)::bigint FROM billing.usage_metrics
                           WHERE user_id = ANY(%s) GROUP BY 1""", (ulist,)))
    gotr = dict(q(conn, """SELECT user_id, sum(request_count)::bigint FROM billing.api_usage
                            WHERE user_id = ANY(%s) GROUP BY 1""", (ulist,)))
    for u in users:
        if not lo[u] <= got.get(u, 0) <= hi[u]:
            (lost if got.get(u, 0) < lo[u] else bad).append(
                f"user {u}: {got.get(u, 0)} messages recorded, client saw {lo[u]} committed, {hi[u] - lo[u]} in flight")
        if not rlo[u] <= gotr.get(u, 0) <= rhi[u]:
            (lost if gotr.get(u, 0) < rlo[u] else bad).append(
                f"user {u}: {gotr.get(u, 0)} API requests counted, client saw {rlo[u]} allowed, {rhi[u] - rlo[u]} in flight")
    return committed, lost, bad


def run(cycles=1, run_seconds=4.0, threads=16, nusers=100, quiet=False, mutate=False):
    cl = Cluster()
    try:
        su = connect(cl.dsn())
        q(su, "CREATE DATABASE crash")
        su.close()
        dsn = cl.dsn("crash")
        conn = connect(dsn)
        q(conn, "CREATE EXTENSION pg_billing")
        ensure_roles(conn)
        q(conn, "SELECT billing.expose_rpc('public')")
        tag = "k" + uuid.uuid4().hex[:8]
        users, setup_calls = setup_users(conn, nusers, tag)
        # Credit holds (0.5.0), on users of their own, beside the main mix.
        hold_users = holds_mix.setup(conn, max(nusers // 5, 4), tag + "h")
        hold_calls = []
        # Events (0.6.0): balance rules on the mix's users, and the rollback probe.
        rules = events_check.set_rules(conn, users, hold_users, seed=hash(tag))
        probe = events_check.RollbackProbe(conn, 4, tag + "p")
        conn.close()
        all_calls = list(setup_calls)
        unexpected = []
        kills = 0
        for cycle in range(cycles):
            rec = Recorder()
            stop = threading.Event()
            dead = threading.Event()
            ts = [threading.Thread(target=worker,
                                   args=(dsn, users, stop, rec, f"{tag}{cycle}-t{i}", hash((tag, cycle, i)), 1.0,
                                         dead.is_set),
                                   daemon=True) for i in range(threads)]
            hrec = holds_mix.HoldRecorder()
            ts += [threading.Thread(target=holds_mix.worker,
                                    args=(dsn, hold_users, stop, hrec, f"{tag}{cycle}-h{i}", hash((tag, cycle, "h", i)), dead.is_set),
                                    daemon=True) for i in range(max(threads // 4, 2))]
            ts.append(threading.Thread(target=probe.run, args=(dsn, stop, dead.is_set, hash((tag, cycle, "p"))), daemon=True))
            for t in ts:
                t.start()
            time.sleep(run_seconds)
            pid = cl.kill_postmaster()
            dead.set()
            kills += 1
            time.sleep(0.5)
            stop.set()
            for t in ts:
                t.join(timeout=120)
            if any(t.is_alive() for t in ts):
                raise RuntimeError("a client thread hung after the kill")
            cl.start()
            all_calls.extend(rec.calls)
            unexpected.extend(rec.unexpected)
            conn = connect(dsn)
            committed, lost, bad = check(conn, users, all_calls)
            hold_calls.extend(hrec.calls)
            hlost, hbad = holds_mix.check(conn, hold_users, hold_calls, crashed=True)
            lost += hlost
            bad += hbad
            committed += sum(c.status == "ok" for c in hold_calls)
            ev_stats = {}
            bad += events_check.check(conn, rules, users, hold_users, probe, ev_stats)
            delivered, dbad = events_check.check_drain(conn, f"crash-check-{cycle}")
            bad += dbad
            if mutate:
                tried, missed = events_check.mutation_test(conn, rules, users, hold_users, probe)
                print(f"    event checks: {tried} mutations tried, {tried - len(missed)} found"
                      + (f"; missed: {missed}" if missed else ""), flush=True)
                bad += [f"event checks missed: {m}" for m in missed]
            conn.close()
            n_unknown = sum(c.status == "unknown" for c in rec.calls)
            if not quiet:
                print(f"  cycle {cycle + 1}: killed postmaster {pid} after {run_seconds:.0f} s; "
                      f"{fmt(sum(c.status == 'ok' for c in rec.calls))} committed, "
                      f"{fmt(sum(c.status == 'fail' for c in rec.calls))} failed, {n_unknown} in flight; "
                      f"{len(lost)} lost, {len(bad)} violations", flush=True)
                print(f"    {events_check.summary(ev_stats)}; {probe.summary()}; a fresh consumer drained "
                      f"{fmt(delivered)} events", flush=True)
            if lost or bad:
                break
        for c in unexpected:
            bad.append(f"{c.op} raised {c.sqlstate}: {c.error}")
        if not quiet:
            for m in (lost + bad)[:30]:
                print("  VIOLATION:", m, flush=True)
        return committed, lost, bad, kills
    finally:
        cl.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--cycles", type=int)
    ap.add_argument("--seconds", type=float, help="mix time before each kill")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--mutate", action="store_true", help="after each check, check that the event checks find planted mistakes")
    a = ap.parse_args()
    cycles = a.cycles or (8 if a.long else 1)
    secs = a.seconds or (20 if a.long else 4)
    committed, lost, bad, kills = run(cycles, secs, a.threads, mutate=a.mutate)
    print(f"crash: {fmt(committed)} committed calls, {fmt(len(lost))} lost"
          + (f", {fmt(len(bad))} other violations" if bad else "") + f" ({kills} SIGKILLs)", flush=True)
    return 1 if (lost or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
