#!/usr/bin/env python3
"""pg_billing on a Citus cluster (issue 17), run by scripts/citus-check.sh after billing.distribute():

1. placement: every billing table is a Citus table, per-user tables colocated with accounts;
2. a tour of the API through the coordinator (one call of each kind of write and read, checked),
   and the cross-user maintenance functions;
3. identity: PostgREST-style calls (role and request.jwt.claims set in the transaction, named
   arguments) as authenticated act only on the caller's own account, anon is refused,
   service_role may act on anyone;
4. contention: concurrent consumes, grants and purchases on a few accounts spread over the shards,
   then every account's pools equal its grants and ledger, and the credits the successful calls
   say they consumed are exactly what left the accounts (none lost, none doubled).

Prints one line per check and `N passed, N failed`; exits non-zero on any failure.
Environment: COORD_PORT (and PGHOST, PGUSER), CITUS_DB (default regression)."""
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests"))
from pgb_testlib import claims, connect, postgrest_call, q  # noqa: E402

import psycopg2  # noqa: E402

DB = os.environ.get("CITUS_DB", "regression")
PORT = int(os.environ["COORD_PORT"])
results = []


def coord():
    return connect(host=os.environ.get("PGHOST", "127.0.0.1"), port=PORT, dbname=DB, user="postgres")


def check(name):
    def wrap(fn):
        t0 = time.time()
        try:
            detail = fn()
            results.append((name, True, detail or ""))
            print(f"ok   {name} ({time.time() - t0:.1f} s){': ' + detail if detail else ''}", flush=True)
        except Exception as e:  # noqa: BLE001 (every failure is reported, the run goes on)
            results.append((name, False, str(e)))
            print(f"FAIL {name}: {e}", flush=True)
            traceback.print_exc()
        return fn
    return wrap


RUN = random.randrange(1 << 32)   # users of this run only: the check can run again on the same cluster


def user(i):
    return uuid.UUID(f"{RUN:08x}-0000-4000-8000-{i:012x}")


c = coord()


@check("placement: every billing table is a Citus table; per-user tables colocated with accounts")
def _placement():
    rows = q(c, """SELECT c.relname, p.partmethod, p.colocationid,
                          (SELECT p2.colocationid FROM pg_dist_partition AS p2 WHERE p2.logicalrelid = 'billing.accounts'::regclass)
                     FROM pg_class AS c LEFT JOIN pg_dist_partition AS p ON p.logicalrelid = c.oid
                    WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r' ORDER BY 1""")
    missing = [r[0] for r in rows if r[1] is None]
    assert not missing, f"not Citus tables: {missing}"
    per_user = [r[0] for r in rows if r[1] == 'h' and r[0] not in ('member_emails', 'pending_profiles', 'webhook_events')]
    apart = [r[0] for r in rows if r[0] in per_user and r[2] != r[3]]
    assert not apart, f"per-user tables not colocated with accounts: {apart}"
    ref = sorted(r[0] for r in rows if r[1] == 'n')
    shards = q(c, "SELECT count(DISTINCT nodeport) FROM pg_dist_shard_placement WHERE shardid IN "
                  "(SELECT shardid FROM pg_dist_shard WHERE logicalrelid = 'billing.accounts'::regclass)")[0][0]
    return f"{len(per_user)} per-user tables on {shards} nodes, {len(ref)} reference tables"


@check("tour: purchase, grant, consume (fast and general path), insufficient credits, hold, reads")
def _tour():
    u = user(1)
    r = q(c, "SELECT billing.add_purchased_credits(%s, 100, 'tour')", (u,))[0][0]
    assert r["purchased_credits_balance"] == 100, r
    r = q(c, "SELECT billing.grant_credits(p_user_id := %s, p_amount := 50, p_category := 'promotional')", (u,))[0][0]
    assert r["total_balance"] == 150, r
    r = q(c, "SELECT billing.consume_credits_v2(%s, 10)", (u,))[0][0]
    assert r["total_balance"] == 140, r
    r = q(c, "SELECT billing.consume_credits_v2(%s, 60)", (u,))[0][0]
    assert r["total_balance"] == 80, r
    try:
        q(c, "SELECT billing.consume_credits_v2(%s, 1000)", (u,))
        raise AssertionError("consuming 1000 of 80 succeeded")
    except psycopg2.Error as e:
        assert e.pgcode == "PT402", (e.pgcode, str(e))
    h = q(c, "SELECT billing.reserve_credits(%s, 30)", (u,))[0][0]
    r = q(c, "SELECT billing.capture_hold(%s::uuid, 20)", (h["hold_id"],))[0][0]
    assert r["total_balance"] == 60, r
    r = q(c, "SELECT * FROM billing.get_user_credits(%s)", (u,))
    assert r and r[0][2] == 60 or r[0][-1] == 60, r
    return "balances as on one node"


@check("maintenance: the cross-user functions run as multi-shard statements")
def _maintenance():
    u = user(4)
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'canceled', "
         "p_current_period_start := now() - interval '60 days', p_current_period_end := now() - interval '30 days')", (u,))
    n = q(c, "SELECT billing.process_expired_subscriptions()")[0][0]
    assert n >= 1, n
    st = q(c, "SELECT status, plan_id FROM billing.subscriptions WHERE user_id = %s", (u,))
    assert st == [("expired", "free")], st
    out = {}
    for fn in ("cleanup_idempotency_keys", "cleanup_webhook_events", "cleanup_events", "cleanup_holds", "cleanup_api_usage"):
        out[fn] = q(c, f"SELECT billing.{fn}()")[0][0]
    return f"process_expired_subscriptions expired {n}; " + ", ".join(f"{k} {v}" for k, v in out.items())


@check("identity: authenticated acts only on itself, anon is refused, service_role acts on anyone")
def _identity():
    me, other = user(2), user(3)
    for u in (me, other):
        q(c, "SELECT billing.add_purchased_credits(%s, 100, 'identity')", (u,))
    a = coord()
    r = postgrest_call(a, "authenticated", claims("authenticated", me),
                       "SELECT billing.consume_credits_v2(p_user_id := %s, p_amount := 1)", (me,))[0][0]
    assert r["total_balance"] == 99, r
    for role, cl, target in [("authenticated", claims("authenticated", me), other), ("anon", claims("anon"), me),
                             ("anon", claims("anon", me), me)]:
        try:
            postgrest_call(a, role, cl, "SELECT billing.consume_credits_v2(p_user_id := %s, p_amount := 1)", (target,))
            raise AssertionError(f"{role} with {cl} consumed from {target}")
        except psycopg2.Error as e:
            assert e.pgcode in ("42501", "P0001", "28000"), (role, e.pgcode, str(e))
    r = postgrest_call(a, "service_role", claims("service_role"),
                       "SELECT billing.consume_credits_v2(p_user_id := %s, p_amount := 1)", (other,))[0][0]
    assert r["total_balance"] == 99, r
    left = [x[0] for x in q(c, "SELECT total_balance FROM billing.get_user_credits(%s)", (me,))]
    assert left == [99], left
    return "3 refusals, 2 allowed"


@check("contention: 8 workers over 16 accounts on every shard; no credit lost or doubled")
def _contention():
    users = [user(100 + i) for i in range(16)]
    for u in users:
        q(c, "SELECT billing.add_purchased_credits(%s, 1000, 'seed')", (u,))
    consumed = {u: 0 for u in users}
    added = {u: 1000 for u in users}
    lock = threading.Lock()
    errors = []
    deadline = time.time() + float(os.environ.get("CITUS_CONTENTION_SECONDS", "20"))

    def worker(seed):
        rnd = random.Random(seed)
        conn = coord()
        n = 0
        while time.time() < deadline:
            u = rnd.choice(users)
            k = rnd.random()
            try:
                if k < 0.75:
                    amt = rnd.randint(1, 40)
                    r = q(conn, "SELECT billing.consume_credits_v2(%s, %s)", (u, amt))[0][0]
                    with lock:
                        consumed[u] += r["consumed"]
                elif k < 0.9:
                    r = q(conn, "SELECT billing.grant_credits(p_user_id := %s, p_amount := 25, p_category := 'promotional')", (u,))[0][0]
                    with lock:
                        added[u] += 25
                else:
                    r = q(conn, "SELECT billing.add_purchased_credits(%s, 30, 'top-up')", (u,))[0][0]
                    with lock:
                        added[u] += 30
                n += 1
            except psycopg2.Error as e:
                if e.pgcode != "PT402":
                    with lock:
                        errors.append(f"{e.pgcode}: {e}")
                conn.rollback() if not conn.autocommit else None
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} unexpected errors, e.g. {errors[:3]}"
    bad = []
    for u in users:
        total, ledger, grants = q(c, """
            SELECT a.subscription_credits_balance + a.purchased_credits_balance - a.debt,
                   (SELECT COALESCE(sum(t.amount), 0) FROM billing.credit_transactions AS t WHERE t.user_id = a.user_id AND t.pool <> 'debt')
                     - a.debt,
                   (SELECT COALESCE(sum(g.remaining), 0) FROM billing.credit_grants AS g WHERE g.user_id = a.user_id) - a.debt
              FROM billing.accounts AS a WHERE a.user_id = %s""", (u,))[0]
        want = added[u] - consumed[u]
        if not (total == ledger == grants == want):
            bad.append((str(u), total, ledger, grants, want))
    assert not bad, f"accounts off (user, stored, ledger, grants, expected): {bad[:4]}"
    calls = sum(consumed.values())
    return f"{calls:,} credits consumed and {sum(added.values()) - 16000:,} added, all accounted for"


FIG_USERS = 1000


def pgbench_tps(port, db, seconds):
    out = subprocess.run([os.path.join(os.environ.get("PGBIN", ""), "pgbench"), "-n", "-M", "prepared", "-c", "4", "-j", "2",
                          "-T", str(seconds), "-D", f"users={FIG_USERS}", "-f", str(REPO / "benches" / "consume_rust.sql"),
                          "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                         capture_output=True, text=True, env=dict(os.environ, PGOPTIONS="-c synchronous_commit=off"))
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench on :{port} failed: {out.stdout[-800:]} {out.stderr[-800:]}")
    return float(m.group(1))


if os.environ.get("PLAIN_PORT"):
    @check("figures: consume_credits_v2 calls/s on one node beside the coordinator of 3 (4 clients, 1,000 users, same run)")
    def _figures():
        targets = {"one node (PostgreSQL, no Citus)": (int(os.environ["PLAIN_PORT"]), "bench"),
                   "Citus coordinator + 2 workers": (PORT, DB)}
        for port, db in targets.values():
            conn = connect(host="127.0.0.1", port=port, dbname=db, user="postgres")
            q(conn, """SELECT count(billing.add_purchased_credits(('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
                                                                  1000000000))
                         FROM generate_series(1, %s) AS i""", (FIG_USERS,))
            conn.close()
        rounds = int(os.environ.get("CITUS_BENCH_ROUNDS", "3"))
        seconds = int(os.environ.get("CITUS_BENCH_SECONDS", "10"))
        tps = {k: [] for k in targets}
        for _ in range(rounds):
            for k, (port, db) in targets.items():
                tps[k].append(pgbench_tps(port, db, seconds))
        med = {k: statistics.median(v) for k, v in tps.items()}
        a, b = med.values()
        return "; ".join(f"{k}: {med[k]:,.0f} calls/s (rounds {', '.join(f'{x:,.0f}' for x in v)})" for k, v in tps.items()) \
            + f"; coordinator / one node: {b / a:.2f}x"


print(f"{sum(ok for _, ok, _ in results)} passed, {sum(not ok for _, ok, _ in results)} failed")
sys.exit(0 if results and all(ok for _, ok, _ in results) else 1)
