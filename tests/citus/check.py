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
   say they consumed are exactly what left the accounts (none lost, none doubled);
5. events: balance and subscription events written on both workers, a transaction in flight
   passed by a later one, a rolled-back one, a claim not acknowledged in time (redelivered),
   two workers of one consumer claiming while two writers write, cleanup: every event handed out
   exactly once as new, each user's in order; then the same under load (4 writers, 4 workers).

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


@check("placement: every billing table is a Citus table but the app-table registries; per-user tables colocated with accounts")
def _placement():
    rows = q(c, """SELECT c.relname, p.partmethod, p.colocationid,
                          (SELECT p2.colocationid FROM pg_dist_partition AS p2 WHERE p2.logicalrelid = 'billing.accounts'::regclass)
                     FROM pg_class AS c LEFT JOIN pg_dist_partition AS p ON p.logicalrelid = c.oid
                    WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r' ORDER BY 1""")
    local = sorted(r[0] for r in rows if r[1] is None)
    # The registries of app tables name tables of the coordinator by oid: they stay local there.
    assert local == ['resource_types', 'widget_tables'], f"local tables: {local}"
    per_user = [r[0] for r in rows if r[1] == 'h' and r[0] not in ('member_emails', 'pending_profiles', 'webhook_events')]
    apart = [r[0] for r in rows if r[0] in per_user and r[2] != r[3]]
    assert not apart, f"per-user tables not colocated with accounts: {apart}"
    ref = sorted(r[0] for r in rows if r[1] == 'n')
    shards = q(c, "SELECT count(DISTINCT nodeport) FROM pg_dist_shard_placement WHERE shardid IN "
                  "(SELECT shardid FROM pg_dist_shard WHERE logicalrelid = 'billing.accounts'::regclass)")[0][0]
    return f"{len(per_user)} per-user tables on {shards} nodes, {len(ref)} reference tables, {len(local)} local"


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


def on_each_worker(first, per_node=1):
    """Users of this run, per_node of them on each worker (their accounts' shards), from user(first) on."""
    by_port, i = {}, first
    while len(by_port) < 2 or any(len(v) < per_node for v in by_port.values()):
        u = user(i)
        port = q(c, "SELECT p.nodeport FROM pg_dist_shard_placement AS p "
                    "WHERE p.shardid = get_shard_id_for_distribution_column('billing.accounts', %s::uuid)", (u,))[0][0]
        if len(by_port.setdefault(port, [])) < per_node:
            by_port[port].append(u)
        i += 1
        assert i < first + 500, by_port
    return [u for port in sorted(by_port) for u in by_port[port]]


def usage_of(u):
    """get_user_current_usage: (messages, conversations, tokens in, tokens out, api calls, documents, chunks, generations)."""
    return tuple(q(c, "SELECT * FROM billing.get_user_current_usage(%s)", (u,))[0][2:])


def events_of(u, kind):
    return [r[0] for r in q(c, "SELECT e.payload FROM billing.events AS e WHERE e.user_id = %s AND e.type = %s ORDER BY e.id", (u, kind))]


PLAN = f"citus-{RUN:08x}"   # this run's plans (a reference table: every node sees them)


@check("usage: record_message_usage, record_conversation_usage, record_document_usage on accounts on both workers")
def _usage():
    us = on_each_worker(200)
    for u in us:
        q(c, "SELECT billing.record_message_usage(%s, 10, 20)", (u,))
        q(c, "SELECT billing.record_message_usage(%s, 1, 2)", (u,))
        q(c, "SELECT billing.record_conversation_usage(%s)", (u,))
        q(c, "SELECT billing.record_document_usage(%s, 5)", (u,))
    got = [usage_of(u) for u in us]
    assert got == [(2, 1, 11, 22, 0, 1, 5, 0)] * len(us), got
    # The period is the subscription's when one covers now (current_usage_period).
    s = us[0]
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active', "
         "p_current_period_start := now() - interval '3 days', p_current_period_end := now() + interval '27 days')", (s,))
    q(c, "SELECT billing.record_message_usage(%s, 4, 5)", (s,))
    r = q(c, """SELECT u.period_start = s.current_period_start, u.period_end = s.current_period_end, u.messages_count, u.tokens_input_count
                  FROM billing.usage_metrics AS u LEFT JOIN billing.subscriptions AS s ON s.user_id = u.user_id
                 WHERE u.user_id = %s ORDER BY u.period_start = s.current_period_start DESC""", (s,))
    assert r == [(True, True, 1, 4), (False, False, 2, 11)], r   # the subscription's period starts 3 days ago
    return f"{len(us)} users on 2 workers: (messages, conversations, tokens in, tokens out, api calls, documents, chunks, generations) = {got[0]}; a subscribed user counts in its subscription's period"


@check("batch: record_usage_batch over both workers (keys once, within and across batches; occurred_at in its period)")
def _batch():
    import json
    a, b = on_each_worker(260)
    ev = [{"user_id": str(a), "metric": "messages", "value": 2, "idempotency_key": "k1"},
          {"user_id": str(b), "metric": "tokens_input", "value": 500, "idempotency_key": "k1"},
          {"user_id": str(a), "metric": "messages", "value": 2, "idempotency_key": "k1"},
          {"user_id": str(b), "metric": "generations", "value": 3},
          {"user_id": str(a), "metric": "minutes"}]
    r = q(c, "SELECT billing.record_usage_batch(%s::jsonb)", (json.dumps(ev),))[0][0]
    st = [x["status"] for x in r]
    assert st == ["applied", "applied", "duplicate", "applied", "error"], r
    assert r[4]["sqlstate"] == "22023", r
    month = q(c, "SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC'), 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]
    assert r[0]["period_start"] == month and r[2]["first"] == {"status": "applied", "period_start": month}, (r, month)
    # Again: every key is a duplicate of its first result; the event without a key counts again.
    r2 = q(c, "SELECT billing.record_usage_batch(%s::jsonb)", (json.dumps(ev[:4]),))[0][0]
    assert [x["status"] for x in r2] == ["duplicate", "duplicate", "duplicate", "applied"], r2
    # An event of last month counts in last month's row (a subscribed user: its period's row).
    last = q(c, "SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 second', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
                "to_char(date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0]
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active', "
         "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (b,))
    q(c, "INSERT INTO billing.usage_metrics (user_id, period_start, period_end) "
         "VALUES (%s, (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month') AT TIME ZONE 'UTC', "
         "date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')", (b,))
    r3 = q(c, "SELECT billing.record_usage_batch(%s::jsonb)",
           (json.dumps([{"user_id": str(a), "metric": "messages", "occurred_at": last[0]},
                        {"user_id": str(b), "metric": "messages", "occurred_at": last[0]}]),))[0][0]
    assert [x["period_start"] for x in r3] == [last[1], last[1]], (r3, last)
    got = (usage_of(a), q(c, "SELECT messages_count, tokens_input_count, generations_count FROM billing.usage_metrics "
                             "WHERE user_id = %s AND period_start = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'", (b,)))
    assert got == ((2, 0, 0, 0, 0, 0, 0, 0), [(0, 500, 6)]), got
    old = q(c, "SELECT user_id = %s, messages_count FROM billing.usage_metrics WHERE user_id IN (%s, %s) "
               "AND period_start = (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month') AT TIME ZONE 'UTC' ORDER BY 1",
            (a, a, b))
    assert old == [(False, 1), (True, 1)], old
    return "statuses applied, applied, duplicate, applied, error; again: duplicate x3, applied; last month's events in last month's rows"


@check("rate limits: check_api_rate_limit allows exactly the plan's hourly limit, on both workers; rate_limit.exceeded once")
def _rate():
    q(c, "INSERT INTO billing.plans (plan_id, display_name, api_rate_limit_hourly) VALUES (%s, 'rate', 3), (%s, 'unlimited', -1), (%s, 'none', 0)",
      (PLAN + "-r", PLAN + "-u", PLAN + "-z"))
    us = on_each_worker(300)
    out = []
    for u in us:
        q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
             "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (u, PLAN + "-r"))
        got = [q(c, "SELECT allowed, limit_value, remaining, reset_at = date_trunc('hour', now()) + interval '1 hour' "
                    "FROM billing.check_api_rate_limit(%s, %s)", (u, ep))[0] for ep in ("/a", "/b", "/a", "/a", "/c")]
        assert got == [(True, 3, 2, True), (True, 3, 1, True), (True, 3, 0, True), (False, 3, 0, True), (False, 3, 0, True)], got
        b = q(c, "SELECT request_count, endpoint_counts, exceeded_at IS NOT NULL FROM billing.api_usage WHERE user_id = %s", (u,))
        assert b == [(3, {"/a": 2, "/b": 1}, True)], b
        assert usage_of(u)[4] == 3, usage_of(u)
        ex = events_of(u, "rate_limit.exceeded")
        assert len(ex) == 1 and ex[0]["request_count"] == 3 and ex[0]["limit_value"] == 3 and ex[0]["endpoint"] == "/a", ex
        out.append(got)
    u = us[0]
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
         "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (u, PLAN + "-u"))
    got = q(c, "SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit(%s)", (u,))
    assert got == [(True, -1, -1)], got
    assert q(c, "SELECT request_count, endpoint_counts FROM billing.api_usage WHERE user_id = %s", (u,)) == [(4, {"/a": 2, "/b": 1, "*": 1})]
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
         "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (u, PLAN + "-z"))
    got = q(c, "SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit(%s)", (u,))
    assert got == [(False, 0, 0)], got
    # More than 32 endpoints in a bucket: the rest count under (other).
    v = on_each_worker(340)[1]
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
         "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (v, PLAN + "-u"))
    for i in range(34):
        q(c, "SELECT * FROM billing.check_api_rate_limit(%s, %s)", (v, f"/e{i}"))
    ec = q(c, "SELECT endpoint_counts FROM billing.api_usage WHERE user_id = %s", (v,))[0][0]
    assert len(ec) == 33 and ec["(other)"] == 2, ec
    return f"{len(us)} users on 2 workers, limit 3: allowed, allowed, allowed, refused, refused (remaining 2, 1, 0, 0, 0); one rate_limit.exceeded each; unlimited -1; limit 0 refused; 34 endpoints: 32 named + (other) 2"


@check("limit rules: a monthly limit rule fires limit.reached from record_message_usage on both workers")
def _limit_rules():
    q(c, "INSERT INTO billing.plans (plan_id, display_name, limits) VALUES (%s, 'limited', '{\"messages_per_month\": 2}')", (PLAN + "-l",))
    q(c, "SELECT billing.set_limit_alert('messages', 100, %s)", (PLAN + "-l",))
    try:
        us = on_each_worker(380)
        for u in us:
            q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
                 "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (u, PLAN + "-l"))
            q(c, "SELECT billing.record_message_usage(%s, 1, 1)", (u,))
            assert events_of(u, "limit.reached") == [], u
            q(c, "SELECT billing.record_message_usage(%s, 1, 1)", (u,))
            q(c, "SELECT billing.record_message_usage(%s, 1, 1)", (u,))
            ev = events_of(u, "limit.reached")
            assert len(ev) == 1 and (ev[0]["current_usage"], ev[0]["limit_value"], ev[0]["plan_id"]) == (2, 2, PLAN + "-l"), ev
    finally:
        q(c, "SELECT billing.set_limit_alert('messages', 100, %s, false)", (PLAN + "-l",))
    return f"{len(us)} users on 2 workers: limit.reached once at 2 of 2 messages"


@check("plan-wide balance rule: set_balance_alert(p_plan_id) arms every account of the plan on both workers; it fires")
def _plan_rule():
    plan = PLAN + "-b"
    q(c, "INSERT INTO billing.plans (plan_id, display_name) VALUES (%s, 'balance')", (plan,))
    us = on_each_worker(420, per_node=2)   # on each worker: one above the threshold, one below
    for i, u in enumerate(us):
        q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
             "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (u, plan))
        q(c, "SELECT billing.add_purchased_credits(%s, %s, 'rule')", (u, 500 if i % 2 == 0 else 50))
    r = q(c, "SELECT billing.set_balance_alert(100, p_plan_id := %s)", (plan,))[0][0]
    assert r["rearm_at"] == 110 and r["accounts"] >= len(us), r
    r = q(c, "SELECT billing.set_balance_alert(200, p_plan_id := %s, p_hysteresis := 0.5)", (plan,))[0][0]
    assert r["rearm_at"] == 300 and r["accounts"] == len(us), r   # every other account was synced by the first call
    st = [q(c, "SELECT alert_threshold, alert_rearm, alert_state FROM billing.accounts WHERE user_id = %s", (u,))[0] for u in us]
    assert st == [(200, 300, 0), (200, 300, 1)] * 2, st
    for u in us[0::2]:
        q(c, "SELECT billing.consume_credits_v2(%s, 350)", (u,))     # 500 -> 150: below 200
    for u in us[1::2]:
        q(c, "SELECT billing.consume_credits_v2(%s, 50)", (u,))      # 50 -> 0: depleted
    fired = [(len(events_of(u, "balance.low")), len(events_of(u, "balance.depleted"))) for u in us]
    assert fired == [(1, 0), (0, 1)] * 2, fired
    low = events_of(us[0], "balance.low")[0]
    assert (low["rule"], low["plan_id"], low["threshold"], low["available"]) == ("plan", plan, 200, 150), low
    q(c, "SELECT billing.add_purchased_credits(%s, 200, 'back')", (us[0],))   # 150 -> 350 >= 300
    assert len(events_of(us[0], "balance.recovered")) == 1
    r = q(c, "SELECT billing.set_balance_alert(NULL, p_plan_id := %s)", (plan,))[0][0]
    assert r["accounts"] == len(us), r
    st = [q(c, "SELECT alert_threshold, alert_rearm FROM billing.accounts WHERE user_id = %s", (u,))[0] for u in us]
    assert st == [(None, None)] * len(us), st
    return f"{len(us)} accounts on 2 workers armed (2 above, 2 below); balance.low and balance.depleted fired, balance.recovered; rule removed from {r['accounts']}"


@check("reset_monthly_usage: one multi-shard statement opens the current period of every user whose period ended, on both workers")
def _reset():
    us = on_each_worker(460)
    s = us[1]
    q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active', "
         "p_current_period_start := now() - interval '2 days', p_current_period_end := now() + interval '28 days')", (s,))
    for u in us:
        q(c, "INSERT INTO billing.usage_metrics (user_id, period_start, period_end, messages_count) "
             "VALUES (%s, now() - interval '40 days', now() - interval '2 days', 9)", (u,))
    n = q(c, "SELECT billing.reset_monthly_usage()")[0][0]
    assert n == len(us), n
    assert q(c, "SELECT billing.reset_monthly_usage()")[0][0] == 0
    got = [usage_of(u) for u in us]
    assert got == [(0, 0, 0, 0, 0, 0, 0, 0)] * len(us), got
    per = q(c, """SELECT u.period_start = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                         u.period_start = s.current_period_start AND u.period_end = s.current_period_end
                    FROM billing.usage_metrics AS u LEFT JOIN billing.subscriptions AS s ON s.user_id = u.user_id
                   WHERE u.user_id IN (%s, %s) AND u.messages_count = 0 ORDER BY u.user_id = %s""", (us[0], s, s))
    assert per == [(True, None), (False, True)], per
    return f"opened {n} periods (a calendar month; a subscription's period), then 0; counters zero"


@check("app tables: register_resource with a table of the coordinator and a distributed one; check_resource_limit")
def _resources():
    plan, local, dist = PLAN + "-a", f"public.citus_agents_{RUN:08x}", f"public.citus_docs_{RUN:08x}"
    q(c, "INSERT INTO billing.plans (plan_id, display_name, limits) VALUES (%s, 'resources', '{\"agents\": 1, \"documents\": 2}')", (plan,))
    q(c, f"CREATE TABLE {local} (id serial PRIMARY KEY, user_id uuid NOT NULL)")
    q(c, f"CREATE INDEX ON {local} (user_id)")
    q(c, f"CREATE TABLE {dist} (id bigserial, user_id uuid NOT NULL, PRIMARY KEY (user_id, id))")
    q(c, "SELECT create_distributed_table(%s, 'user_id')", (dist,))
    try:
        q(c, "SELECT billing.register_resource(%s, %s::regclass, 'user_id', 'agents')", (f"agents_{RUN:08x}", local))
        q(c, "SELECT billing.register_resource(%s, %s::regclass, 'user_id', 'documents')", (f"docs_{RUN:08x}", dist))
        seen = []
        for u in on_each_worker(600):
            q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
                 "p_current_period_start := now() - interval '1 day', p_current_period_end := now() + interval '29 days')", (u, plan))
            lim = "SELECT * FROM billing.check_resource_limit(%s, %s)"
            for n in range(3):
                a = q(c, lim, (u, f"agents_{RUN:08x}"))[0]
                d = q(c, lim, (u, f"docs_{RUN:08x}"))[0]
                seen.append((tuple(a[:3]), tuple(d[:3])))
                q(c, f"INSERT INTO {local} (user_id) VALUES (%s)", (u,))
                q(c, f"INSERT INTO {dist} (user_id) VALUES (%s)", (u,))
        want = [((True, 0, 1), (True, 0, 2)), ((False, 1, 1), (True, 1, 2)), ((False, 2, 1), (False, 2, 2))] * 2
        assert seen == want, seen
    finally:
        q(c, "DELETE FROM billing.resource_types WHERE resource_type IN (%s, %s)", (f"agents_{RUN:08x}", f"docs_{RUN:08x}"))
        q(c, f"DROP TABLE IF EXISTS {local}, {dist}")
    return "a user on each worker: agents (a coordinator table, limit 1) and documents (distributed, limit 2) counted exactly"


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


PUSHED = "pushing down function call in a multi-statement transaction"


def assert_delegated(fn):
    """`fn` is a force-delegated Citus function, distributed by its first argument, colocated with
    billing.accounts."""
    rows = q(c, """SELECT o.force_delegation, o.distribution_argument_index,
                          o.colocationid = (SELECT p.colocationid FROM pg_dist_partition AS p WHERE p.logicalrelid = 'billing.accounts'::regclass)
                     FROM pg_dist_object AS o WHERE o.classid = 'pg_proc'::regclass AND o.objid = %s::regprocedure""", (fn,))
    assert rows == [(True, 0, True)], f"{fn} as a Citus function: {rows}"


def consume_traced(conn, u, amount, role=None, cl=None, key=None):
    """consume_credits_v2 with Citus's DEBUG1 messages on: (its result, whether Citus pushed
    billing._consume_on_shard down to a worker)."""
    conn.notices.clear()
    if role is None:
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL client_min_messages = debug1")
                cur.execute("SELECT billing.consume_credits_v2(%s, %s, p_idempotency_key := %s)", (u, amount, key))
                r = cur.fetchall()[0][0]
            conn.commit()
        except Exception:
            conn.rollback()
            raise
    else:
        r = postgrest_call(conn, role, cl, "SELECT set_config('client_min_messages', 'debug1', true), "
                           "billing.consume_credits_v2(p_user_id := %s, p_amount := %s, p_idempotency_key := %s)",
                           (u, amount, key))[0][1]
    return r, any(PUSHED in n for n in conn.notices)


@check("delegation: consume_credits_v2's fast path runs on the worker that holds the user, after the caller is checked "
       "on the coordinator; the general path, balance rules and pg_billing.citus_delegation = off stay on the coordinator")
def _delegation():
    assert_delegated("billing._consume_on_shard(uuid, integer, bigint, text[])")
    conn = coord()
    us = on_each_worker(900)
    pushed = 0
    for u in us:
        q(c, "SELECT billing.add_purchased_credits(%s, 100, 'delegation')", (u,))
        # The first debit records the spending head (general path, on the coordinator); the next
        # ones take the fast path on the worker.
        r, p = consume_traced(conn, u, 10)
        assert r["total_balance"] == 90, r
        r, p = consume_traced(conn, u, 5)
        assert r["total_balance"] == 85 and r["purchased_used"] == 5, r
        assert p, f"the second debit of {u} was not pushed down: {conn.notices[-5:]}"
        pushed += p
        # As PostgREST calls: the end user on their own account is pushed down too.
        r, p = consume_traced(conn, u, 5, "authenticated", claims("authenticated", u))
        assert r["total_balance"] == 80 and p, (r, p)
        pushed += p
        # On another's account: refused on the coordinator, before any push-down.
        other = us[0] if u != us[0] else us[1]
        try:
            consume_traced(conn, other, 1, "authenticated", claims("authenticated", u))
            raise AssertionError(f"{u} consumed from {other}")
        except psycopg2.Error as e:
            assert e.pgcode == "42501", (e.pgcode, str(e))
            assert not any(PUSHED in n for n in conn.notices), conn.notices[-5:]
        # More than the balance: the worker declines (nothing changed), the coordinator says PT402.
        try:
            consume_traced(conn, u, 1000)
            raise AssertionError("consumed 1000 of 80")
        except psycopg2.Error as e:
            assert e.pgcode == "PT402", (e.pgcode, str(e))
        # A balance rule: the worker declines, the coordinator debits and writes the event.
        q(c, "SELECT billing.set_balance_alert(p_threshold := 50, p_user_id := %s)", (u,))
        r, _ = consume_traced(conn, u, 40)
        assert r["total_balance"] == 40, r
        assert len(events_of(u, "balance.low")) == 1, events_of(u, "balance.low")
        q(c, "SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := %s)", (u,))
        r, p = consume_traced(conn, u, 1)
        assert r["total_balance"] == 39 and p, (r, p)
        pushed += p
        # An idempotency key: claimed and stored on the worker, replayed there; reused for another
        # amount: PT409 from the worker, as on one node.
        k = f"delegation-{u}"
        r, p = consume_traced(conn, u, 2, key=k)
        assert r["total_balance"] == 37 and p, (r, p)
        again, p = consume_traced(conn, u, 2, key=k)
        assert again == r and p, (again, r, p)
        pushed += 2
        try:
            consume_traced(conn, u, 3, key=k)
            raise AssertionError("a key reused for another amount was accepted")
        except psycopg2.Error as e:
            assert e.pgcode == "PT409", (e.pgcode, str(e))
        # The end user's keys are another namespace: the same key debits again.
        r, p = consume_traced(conn, u, 2, "authenticated", claims("authenticated", u), key=k)
        assert r["total_balance"] == 35 and p, (r, p)
        again, p = consume_traced(conn, u, 2, "authenticated", claims("authenticated", u), key=k)
        assert again == r and p, (again, r, p)
        pushed += 2
        # Turned off: the same debit on the coordinator.
        conn.autocommit = True
        q(conn, "SET pg_billing.citus_delegation = off")
        r, p = consume_traced(conn, u, 1)
        assert r["total_balance"] == 34 and not p, (r, p)
        conn.autocommit = True
        q(conn, "RESET pg_billing.citus_delegation")
        total, ledger = q(c, """SELECT a.purchased_credits_balance + a.subscription_credits_balance,
                                       (SELECT sum(t.amount) FROM billing.credit_transactions AS t WHERE t.user_id = a.user_id)
                                  FROM billing.accounts AS a WHERE a.user_id = %s""", (u,))[0]
        assert total == ledger == 34, (total, ledger)
    conn.close()
    return (f"{pushed} debits (keyless and keyed, as the service and as the end user) run on the worker of their account, "
            f"{len(us)} accounts (one on each worker); refusals before any push-down; declines, PT402, PT409 and the "
            "balance rule's event on the coordinator; balances and ledgers exact")


def traced(conn, sql, params, role=None, cl=None):
    """One call in a transaction of its own with Citus's DEBUG1 messages on (as PostgREST makes
    it when role is given): (its first row, whether Citus pushed a function call down)."""
    conn.notices.clear()
    debug = "SELECT pg_catalog.set_config('client_min_messages', 'debug1', true)"
    if role is None:
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                cur.execute(debug)
                cur.execute(sql, params)
                r = cur.fetchall()[0]
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            conn.autocommit = True
    else:
        # (two statements in one: the rows are the second's)
        r = postgrest_call(conn, role, cl, f"{debug}; {sql}", params)[0]
    return r, any(PUSHED in n for n in conn.notices)


@check("delegation of usage and rate limits (0.9.0): the record_*_usage functions and check_api_rate_limit run on the worker "
       "that holds the user; under a limit rule or at the reached limit they decline there and the coordinator finishes the "
       "call; pg_billing.citus_delegation = off is not pushed down")
def _delegation_usage():
    for fn in ("billing._record_usage_on_shard(uuid, bigint[])", "billing._rate_limit_on_shard(uuid, text)"):
        assert_delegated(fn)
    plan = f"dlg-{RUN:x}"
    q(c, "INSERT INTO billing.plans (plan_id, display_name, api_rate_limit_hourly) VALUES (%s, 'delegation', 3)", (plan,))
    conn = coord()
    us = on_each_worker(950)
    pushed = 0
    rate = "SELECT r.allowed, r.remaining FROM billing.check_api_rate_limit(p_user_id := %s, p_endpoint := '/v1/x') AS r"
    for u in us:
        q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active', "
             "p_current_period_start := now(), p_current_period_end := now() + interval '30 days')", (u, plan))
        for sql, params in (("SELECT billing.record_message_usage(%s, 10, 20)", (u,)),
                            ("SELECT billing.record_conversation_usage(%s)", (u,)),
                            ("SELECT billing.record_document_usage(%s, 5)", (u,))):
            _, p = traced(conn, sql, params)
            assert p, f"{sql} was not pushed down: {conn.notices[-5:]}"
            pushed += 1
        counts = q(c, """SELECT messages_count, conversations_count, tokens_input_count, tokens_output_count,
                                documents_processed_count, chunks_stored_count FROM billing.usage_metrics WHERE user_id = %s""", (u,))
        assert counts == [(1, 1, 10, 20, 1, 5)], counts
        # 3 requests an hour: allowed 3 times on the worker (as the service and as the end user),
        # the 4th declined there and refused on the coordinator, which writes its event.
        for i, role in enumerate((None, "authenticated", None)):
            r, p = traced(conn, rate, (u,), role, claims("authenticated", u) if role else None)
            assert r == (True, 2 - i) and p, (r, p, conn.notices[-5:])
            pushed += 1
        r, _ = traced(conn, rate, (u,))
        assert r == (False, 0), r
        assert len(events_of(u, "rate_limit.exceeded")) == 1, events_of(u, "rate_limit.exceeded")
        n = q(c, """SELECT a.request_count, m.api_calls_count FROM billing.api_usage AS a, billing.usage_metrics AS m
                     WHERE a.user_id = %s AND m.user_id = %s""", (u, u))
        assert n == [(3, 3)], n
        # Another's account: refused on the coordinator, before any push-down.
        other = us[0] if u != us[0] else us[1]
        try:
            traced(conn, rate, (other,), "authenticated", claims("authenticated", u))
            raise AssertionError(f"{u} counted a request of {other}")
        except psycopg2.Error as e:
            assert e.pgcode == "42501" and not any(PUSHED in x for x in conn.notices), (e.pgcode, conn.notices[-5:])
    # A limit rule (of any plan): the recorder is pushed down and declines on the worker (limit.*
    # events are numbered on the coordinator), which records: counted once, not twice, not never.
    # Without it, recorded on the worker again. Off: not pushed down.
    messages = "SELECT messages_count FROM billing.usage_metrics WHERE user_id = %s"
    q(c, "SELECT billing.set_limit_alert('messages', 100, %s)", (plan,))
    try:
        _, p = traced(conn, "SELECT billing.record_message_usage(%s, 1, 1)", (us[0],))
        assert p and q(c, messages, (us[0],)) == [(2,)], (p, q(c, messages, (us[0],)))
    finally:
        q(c, "SELECT billing.set_limit_alert('messages', 100, %s, false)", (plan,))
    _, p = traced(conn, "SELECT billing.record_message_usage(%s, 1, 1)", (us[0],))
    assert p, "not pushed down once the rule is gone"
    q(conn, "SET pg_billing.citus_delegation = off")
    _, p = traced(conn, "SELECT billing.record_message_usage(%s, 1, 1)", (us[0],))
    assert not p, "pushed down with pg_billing.citus_delegation = off"
    q(conn, "RESET pg_billing.citus_delegation")
    counts = q(c, "SELECT messages_count FROM billing.usage_metrics WHERE user_id = %s", (us[0],))
    assert counts == [(4,)], counts
    conn.close()
    return (f"{pushed} calls (usage of 3 kinds; rate-limit checks as the service and as the end user) run on the worker of "
            f"their user, {len(us)} users (one on each worker); counters exact; the reached limit declined there, refused with "
            "its event on the coordinator; refusals before any push-down; under a limit rule the recorder declined on the worker "
            "and counted once on the coordinator; delegation off: not pushed down")


@check("delegation of grants (0.10.0): add_purchased_credits, add_subscription_credits and refund_credits run on the worker "
       "that holds the user; a new account, a balance rule or a grant due to expire decline there and the coordinator "
       "finishes the call; pg_billing.citus_delegation = off is not pushed down")
def _delegation_grants():
    fn = "billing._grant_on_shard(uuid, integer, bigint[], text[])"
    assert_delegated(fn)
    conn = coord()
    us = on_each_worker(970)
    pushed = 0
    total = "SELECT (%s ->> 'total_balance')::bigint"

    def add(fn, u, amount, role=None, key=None):
        r, p = traced(conn, f"SELECT billing.{fn}(p_user_id := %s, p_amount := %s, p_idempotency_key := %s)", (u, amount, key),
                      role, claims(role, u) if role else None)
        return r[0], p

    for u in us:
        # A new account: pushed down and declined (the account is made on the coordinator, whose
        # balance rules it looks up); granted there.
        r, p = add("add_purchased_credits", u, 100)
        assert r["total_balance"] == 100, r
        # Then on the worker: a purchase (as the service, direct and PostgREST-style), a
        # subscription grant, a refund.
        for fn, amount, role, want in (("add_purchased_credits", 50, None, 150), ("add_purchased_credits", 10, "service_role", 160),
                                       ("add_subscription_credits", 30, None, 190), ("refund_credits", 5, None, 195)):
            r, p = add(fn, u, amount, role)
            assert r["total_balance"] == want and p, (fn, r, p, conn.notices[-5:])
            pushed += 1
        # A key: claimed and stored on the worker, replayed there (the same transaction id);
        # reused for another amount: declined there, PT409 from the coordinator.
        k = f"grant-{u}"
        r, p = add("add_purchased_credits", u, 7, key=k)
        again, p2 = add("add_purchased_credits", u, 7, key=k)
        assert r["total_balance"] == 202 and again == r and p and p2, (r, again, p, p2)
        pushed += 2
        try:
            add("add_purchased_credits", u, 8, key=k)
            raise AssertionError("a key reused for another amount was accepted")
        except psycopg2.Error as e:
            assert e.pgcode == "PT409", (e.pgcode, str(e))
        # The end user may not add credits: refused on the coordinator, before any push-down.
        try:
            add("add_purchased_credits", u, 1, "authenticated")
            raise AssertionError(f"{u} added credits to itself")
        except psycopg2.Error as e:
            assert e.pgcode == "42501" and not any(PUSHED in x for x in conn.notices), (e.pgcode, conn.notices[-5:])
        # A balance rule: declined on the worker; the coordinator grants and writes balance.recovered.
        q(c, "SELECT billing.set_balance_alert(p_threshold := 500, p_user_id := %s)", (u,))
        r, p = add("add_purchased_credits", u, 400)
        assert r["total_balance"] == 602 and p, (r, p)
        assert len(events_of(u, "balance.recovered")) == 1, events_of(u, "balance.recovered")
        q(c, "SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := %s)", (u,))
        # A grant past its expiry: declined on the worker (its grant.expired event); the
        # coordinator settles it and grants. (The expiry passes between two transactions.)
        q(c, "SELECT billing.grant_credits(%s, 3, 'promotional', p_expires_at := clock_timestamp() + interval '1 second')", (u,))
        time.sleep(1.2)
        r, p = add("add_purchased_credits", u, 1)
        assert r["total_balance"] == 603 and p, (r, p)
        assert len(events_of(u, "grant.expired")) == 1, events_of(u, "grant.expired")
        # Debt repaid on the worker: the grant's three ledger rows take the coordinator's ids.
        q(c, "SELECT billing.set_overdraft_limit(%s, 100)", (u,))
        q(c, "SELECT billing.consume_credits_v2(%s, 650)", (u,))
        r, p = add("add_purchased_credits", u, 60)
        assert r["total_balance"] == 13 and p, (r, p)
        pushed += 3
        rows = q(c, """SELECT t.type::text, t.pool::text, t.amount FROM billing.credit_transactions AS t
                        WHERE t.user_id = %s ORDER BY t.created_at DESC, t.id DESC LIMIT 3""", (u,))
        assert sorted(rows) == sorted([("purchase", "purchased", 60), ("debt_repayment", "purchased", -47),
                                       ("debt_repayment", "debt", 47)]), rows
        # Off: on the coordinator.
        q(conn, "SET pg_billing.citus_delegation = off")
        r, p = add("add_purchased_credits", u, 1)
        assert r["total_balance"] == 14 and not p, (r, p)
        q(conn, "RESET pg_billing.citus_delegation")
        t, ledger, debt = q(c, """SELECT a.purchased_credits_balance + a.subscription_credits_balance - a.debt,
                                         (SELECT sum(t.amount) FROM billing.credit_transactions AS t
                                           WHERE t.user_id = a.user_id AND t.pool <> 'debt'), a.debt
                                    FROM billing.accounts AS a WHERE a.user_id = %s""", (u,))[0]
        assert t == 14 and ledger == 14 and debt == 0, (t, ledger, debt)
        assert q(c, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]
    # Every ledger id once (a worker's own sequence would repeat the coordinator's).
    dup = q(c, """SELECT count(*) - count(DISTINCT t.id) FROM billing.credit_transactions AS t""")
    assert dup == [(0,)], dup
    conn.close()
    return (f"{pushed} grants (purchases, subscription grants, refunds; keyed and keyless; as the service, direct and "
            f"PostgREST-style) run on the worker of their account, {len(us)} accounts (one on each worker); the new account, "
            "the balance rule (balance.recovered) and the expired grant (grant.expired) finished on the coordinator; "
            "PT409 and the end user's 42501 from the coordinator; debt repaid on the worker with the coordinator's ledger "
            "ids; off: not pushed down; balances, ledgers and verify_ledger exact, no ledger id twice")


@check("delegation of holds (0.10.0): reserve_credits runs on the worker that holds the user, after the caller is checked "
       "on the coordinator; not enough credits, the cap on active holds, a reused key, a balance rule and a hold due to expire "
       "decline there and the coordinator finishes the call; pg_billing.citus_delegation = off is not pushed down")
def _delegation_holds():
    fn = "billing._reserve_on_shard(uuid, integer, bigint, text[])"
    assert_delegated(fn)
    conn = coord()
    us = on_each_worker(990)
    pushed = 0

    def reserve(u, amount, role=None, as_user=None, key=None, ttl="1 minute", partial=False):
        r, p = traced(conn, "SELECT billing.reserve_credits(p_user_id := %s, p_amount := %s, p_ttl := %s::interval, "
                            "p_idempotency_key := %s, p_allow_partial := %s)", (u, amount, ttl, key, partial),
                      role, claims(role, as_user or u) if role else None)
        return r[0], p

    def held(u):
        return q(c, "SELECT a.held, (SELECT count(*) FROM billing.credit_holds AS h WHERE h.user_id = a.user_id AND h.status = 'active') "
                    "FROM billing.accounts AS a WHERE a.user_id = %s", (u,))[0]

    for u in us:
        q(c, "SELECT billing.add_purchased_credits(%s, 100)", (u,))
        # As the service and, PostgREST-style, as the end user on their own account: on the worker.
        r, p = reserve(u, 30)
        assert r["held"] == 30 and r["available"] == 70 and p, (r, p, conn.notices[-5:])
        r, p = reserve(u, 20, "authenticated")
        assert r["held"] == 20 and r["available"] == 50 and p, (r, p)
        pushed += 2
        # On another's account: refused on the coordinator, before any push-down.
        other = us[0] if u != us[0] else us[1]
        try:
            reserve(other, 1, "authenticated", as_user=u)
            raise AssertionError(f"{u} reserved credits of {other}")
        except psycopg2.Error as e:
            assert e.pgcode == "42501" and not any(PUSHED in x for x in conn.notices), (e.pgcode, conn.notices[-5:])
        # More than is free: declined on the worker, PT402 from the coordinator; partial: what is free.
        try:
            reserve(u, 60)
            raise AssertionError("reserved 60 of 50 free")
        except psycopg2.Error as e:
            assert e.pgcode == "PT402", (e.pgcode, str(e))
        r, p = reserve(u, 60, partial=True)
        assert r["held"] == 50 and p, (r, p)
        pushed += 1
        assert held(u) == (100, 3), held(u)
        # A hold made on the worker is captured on the coordinator as any other.
        hold = r["hold_id"]
        cap = q(c, "SELECT billing.capture_hold(%s, 40)", (hold,))[0][0]
        assert cap["captured"] == 40 and cap["total_balance"] == 60, cap
        # The cap on active holds: declined on the worker, PT429 from the coordinator.
        q(c, "SELECT billing.set_max_active_holds(%s, 2)", (u,))
        try:
            reserve(u, 1)
            raise AssertionError("a hold past the cap")
        except psycopg2.Error as e:
            assert e.pgcode == "PT429", (e.pgcode, str(e))
        q(c, "SELECT billing.set_max_active_holds(%s, NULL)", (u,))
        # Keys: stored on the worker and replayed there; reused for another amount: PT409; the end
        # user's keys are another namespace.
        k = f"hold-{u}"
        r, p = reserve(u, 2, key=k)
        again, p2 = reserve(u, 2, key=k)
        assert again == r and p and p2, (r, again, p, p2)
        pushed += 2
        try:
            reserve(u, 3, key=k)
            raise AssertionError("a key reused for another amount was accepted")
        except psycopg2.Error as e:
            assert e.pgcode == "PT409", (e.pgcode, str(e))
        r2, p = reserve(u, 2, "authenticated", key=k)
        assert r2["hold_id"] != r["hold_id"] and p, (r2, r, p)
        pushed += 1
        # A balance rule: declined on the worker, the hold made on the coordinator.
        q(c, "SELECT billing.set_balance_alert(p_threshold := 5, p_user_id := %s)", (u,))
        r, p = reserve(u, 1)
        assert r["held"] == 1 and p, (r, p)
        q(c, "SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := %s)", (u,))
        # A hold past its expiry: declined on the worker (its hold.expired event), settled on the
        # coordinator. (The expiry passes between two transactions.)
        reserve(u, 1, ttl="1 second")
        time.sleep(1.2)
        r, p = reserve(u, 1)
        assert r["held"] == 1 and p, (r, p)
        assert len(events_of(u, "hold.expired")) == 1, events_of(u, "hold.expired")
        # Off: on the coordinator.
        q(conn, "SET pg_billing.citus_delegation = off")
        r, p = reserve(u, 1)
        assert r["held"] == 1 and not p, (r, p)
        q(conn, "RESET pg_billing.citus_delegation")
        # held = the sum of the active holds: 30 + 20 (+ the captured 50 gone) + 2 + 2 + 1 + 1 + 1.
        h = q(c, "SELECT a.held, (SELECT sum(h.amount) FROM billing.credit_holds AS h WHERE h.user_id = a.user_id AND h.status = 'active') "
                 "FROM billing.accounts AS a WHERE a.user_id = %s", (u,))[0]
        assert h == (57, 57), h
        assert q(c, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]
    conn.close()
    return (f"{pushed} holds (keyless and keyed, partial, as the service and as the end user) made on the worker of their "
            f"account, {len(us)} accounts (one on each worker); the refusal (42501) before any push-down; PT402, PT429 and "
            "PT409 from the coordinator after the worker declined; the balance rule and the expired hold (hold.expired) "
            "finished on the coordinator; a hold made on a worker captured on the coordinator; off: not pushed down; held "
            "sums exact")


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


EV_USERS = 12


@check("events: written on both workers, claimed by 2 workers of one consumer across shards, in flight, rolled back, "
       "redelivered, acknowledged and cleaned up; none lost, none handed out twice")
def _events():
    consumer = f"events-{RUN:08x}"
    users = [user(10000 + i) for i in range(EV_USERS)]   # (users of their own: no other check's events)
    x, y, z, w = user(10100), user(10101), user(10102), user(10103)   # in flight; committed later; rolled back; cleanup
    nodes = q(c, """SELECT count(DISTINCT p.nodeport) FROM unnest(%s::uuid[]) AS u
                      JOIN pg_dist_shard_placement AS p ON p.shardid = get_shard_id_for_distribution_column('billing.events', u)""",
              (users,))[0][0]
    assert nodes == 2, f"the users live on {nodes} worker(s), not 2"

    def claim(conn, limit=10000, timeout="30 seconds"):
        return q(conn, "SELECT claim_id, id, user_id, type, deliveries FROM billing.claim_events(%s, %s, %s::interval)",
                 (consumer, limit, timeout))

    def ack(conn, rows):
        return q(conn, "SELECT billing.ack_events(%s, %s, %s)", (consumer, max(r[1] for r in rows), rows[0][0]))[0][0]

    # The consumer starts with every retained event (the checks above wrote some): hand them out
    # and acknowledge them, so what follows counts only this check's events.
    baseline = set()
    while True:
        rows = claim(c)
        if not rows:
            break
        assert all(r[4] == 1 for r in rows), rows[:3]
        baseline |= {r[1] for r in rows}
        assert ack(c, rows) == len(rows)
    first = {}          # event id -> user, every first delivery after the baseline
    dup = []

    def delivered(rows):
        for r in rows:
            if r[4] == 1:
                if r[1] in first or r[1] in baseline:
                    dup.append(r[1])
                first[r[1]] = r[2]

    # 1. Rules on accounts on both workers: balance.low, .depleted, .recovered; subscription.changed.
    for u in users + [x, y, z, w]:
        q(c, "SELECT billing.add_purchased_credits(%s, 100, 'events')", (u,))
        q(c, "SELECT billing.set_balance_alert(50, p_user_id => %s)", (u,))
    for i, u in enumerate(users):
        q(c, "SELECT billing.consume_credits_v2(%s, 60)", (u,))
        q(c, "SELECT billing.consume_credits_v2(%s, 40)", (u,))
        q(c, "SELECT billing.add_purchased_credits(%s, 100, 'events')", (u,))
        if i < 4:
            q(c, "SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active', "
                 "p_current_period_start := now(), p_current_period_end := now() + interval '30 days')", (u,))
    written = q(c, "SELECT user_id, id, type FROM billing.events WHERE user_id = ANY (%s) ORDER BY id", (users,))
    per_user = {u: [t for (w, _, t) in written if w == u] for u in users}
    want = ["balance.low", "balance.depleted", "balance.recovered"]
    bad = {str(u): t for i, (u, t) in enumerate(per_user.items()) if t != want + (["subscription.changed"] if i < 4 else [])}
    assert not bad and len(written) == 40, f"{len(written)} events written; off: {bad}"

    # 2. An event of a transaction still in flight (x, id a) is passed by a later committed one
    #    (y, id b > a) and must still be delivered once it commits; a rolled-back one (z) never.
    a_conn, z_conn = coord(), coord()
    a_conn.autocommit = z_conn.autocommit = False
    q(a_conn, "SELECT billing.consume_credits_v2(%s, 60)", (x,))
    a_id = q(a_conn, "SELECT max(id) FROM billing.events WHERE user_id = %s", (x,))[0][0]
    q(z_conn, "SELECT billing.consume_credits_v2(%s, 60)", (z,))
    z_id = q(z_conn, "SELECT max(id) FROM billing.events WHERE user_id = %s", (z,))[0][0]
    z_conn.rollback()
    q(c, "SELECT billing.consume_credits_v2(%s, 60)", (y,))
    b_id = q(c, "SELECT max(id) FROM billing.events WHERE user_id = %s", (y,))[0][0]
    assert a_id is not None and z_id is not None and a_id < z_id < b_id, (a_id, z_id, b_id)
    rows = claim(c)
    delivered(rows)
    ids = sorted(r[1] for r in rows)
    assert ids == sorted([e[1] for e in written] + [b_id]), f"claimed {len(ids)}: {ids[:5]}..., want the 40 and {b_id}"
    assert [r[1] for r in rows] == ids, "a claim's events are not in id order"
    assert ack(c, rows) == 41
    assert claim(c) == [], "something was claimed while the only pending event is in flight"
    a_conn.commit()
    rows = claim(c)
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [(a_id, x, "balance.low", 1)], rows
    delivered(rows)
    assert ack(c, rows) == 1
    a_conn.close(); z_conn.close()

    # 3. Not acknowledged within the visibility timeout: handed out again, deliveries 2.
    for u in users[6:]:     # (no subscription: 100 credits)
        q(c, "SELECT billing.consume_credits_v2(%s, 60)", (u,))   # 100 -> 40: balance.low
    rows = claim(c, timeout="2 seconds")
    assert len(rows) == 6 and all(r[3] == "balance.low" and r[4] == 1 for r in rows), rows
    delivered(rows)
    assert claim(c) == [], "events in a live claim were handed out again"
    time.sleep(2.5)
    again = claim(c)
    assert [(r[1], r[4]) for r in again] == [(r[1], 2) for r in rows], (rows, again)
    assert q(c, "SELECT billing.ack_events(%s, %s, %s)", (consumer, max(r[1] for r in rows), rows[0][0]))[0][0] == 0, \
        "the timed-out claim acknowledged events"
    assert ack(c, again) == 6

    # 4. Two workers of the consumer claim (7 at a time) and acknowledge while two writers make
    #    events on every account; then they drain.
    after3 = q(c, "SELECT max(id) FROM billing.events")[0][0]
    for u in users[6:]:
        q(c, "SELECT billing.add_purchased_credits(%s, 60, 'events')", (u,))   # back to 100: recovered
    lock = threading.Lock()
    seq = []            # (order, id, user, deliveries)
    errors = []
    stop_writing = threading.Event()

    def claimer():
        conn = coord()
        empty = 0
        while empty < 3:
            try:
                rows = claim(conn, limit=7)
            except psycopg2.Error as e:
                with lock:
                    errors.append(f"claim {e.pgcode}: {e}")
                continue
            if not rows:
                empty = empty + 1 if stop_writing.is_set() else 0
                time.sleep(0.05)
                continue
            with lock:
                for r in rows:
                    seq.append((len(seq), r[1], r[2], r[4]))
            try:
                n = ack(conn, rows)
                if n != len(rows):
                    with lock:
                        errors.append(f"ack acknowledged {n} of {len(rows)}")
            except psycopg2.Error as e:
                with lock:
                    errors.append(f"ack {e.pgcode}: {e}")
        conn.close()

    def writer(seed):
        rnd = random.Random(seed)
        conn = coord()
        for _ in range(20):
            u = rnd.choice(users)
            try:
                q(conn, "SELECT billing.consume_credits_v2(%s, 60)", (u,))
                q(conn, "SELECT billing.add_purchased_credits(%s, 60, 'events')", (u,))
            except psycopg2.Error as e:
                if e.pgcode != "PT402":
                    with lock:
                        errors.append(f"write {e.pgcode}: {e}")
        conn.close()

    writers = [threading.Thread(target=writer, args=(RUN + i,)) for i in range(2)]
    claimers = [threading.Thread(target=claimer) for _ in range(2)]
    for t in writers + claimers:
        t.start()
    for t in writers:
        t.join()
    stop_writing.set()
    for t in claimers:
        t.join()
    assert not errors, f"{len(errors)} errors, e.g. {errors[:3]}"
    delivered([(None, i, u, None, d) for (_, i, u, d) in seq])
    phase4 = q(c, "SELECT id, user_id FROM billing.events WHERE id > %s ORDER BY id", (after3,))
    got = sorted(i for (_, i, _, _) in seq)
    assert got == [i for i, _ in phase4], f"{len(got)} handed out, {len(phase4)} written"
    assert all(d == 1 for (_, _, _, d) in seq), "an event was handed out twice"
    out_of_order = [u for u in users if [i for (_, i, w, _) in sorted(seq) if w == u] != [i for i, w in phase4 if w == u]]
    assert not out_of_order, f"users whose events came out of order: {out_of_order[:3]}"

    # Every event written since the baseline was handed out exactly once as a first delivery.
    table = {i for (i,) in q(c, "SELECT id FROM billing.events")} - baseline
    assert not dup, f"handed out twice as new: {dup[:5]}"
    assert set(first) == table, f"lost: {sorted(table - set(first))[:5]}; unknown: {sorted(set(first) - table)[:5]}"
    assert z_id not in table

    # 5. cleanup_events: our acknowledged events, made 2 hours old, go; one not acknowledged stays.
    q(c, "SELECT billing.consume_credits_v2(%s, 60)", (w,))   # 100 -> 40: balance.low, pending
    ours = [x, y, z, w] + users
    old = q(c, "SELECT now() - interval '2 hours'")[0][0]   # (Citus: no STABLE expression over a column in UPDATE)
    q(c, "UPDATE billing.events SET created_at = %s WHERE user_id = ANY (%s)", (old, ours))
    n_ours = q(c, "SELECT count(*) FROM billing.events WHERE user_id = ANY (%s)", (ours,))[0][0]
    others = q(c, "SELECT count(*) FROM billing.events WHERE user_id <> ALL (%s) AND created_at < now() - interval '1 hour'", (ours,))[0][0]
    consumers = [k for (k,) in q(c, "SELECT consumer FROM billing.event_consumers")]
    deleted = q(c, "SELECT billing.cleanup_events('1 hour')")[0][0]
    left = q(c, "SELECT type FROM billing.events WHERE user_id = ANY (%s)", (ours,))
    if consumers == [consumer] and others == 0:
        assert deleted == n_ours - 1 and left == [("balance.low",)], (deleted, n_ours, left)
    else:
        # (a cluster kept from an earlier run: its consumers have not acknowledged these events)
        assert len(left) == n_ours, (len(left), n_ours, consumers)
    return (f"{len(table)} events on 2 workers, each handed out once ({len(seq)} by 2 concurrent workers with 2 writers), "
            f"the in-flight one after a later one, the rolled-back one never; 6 redelivered (deliveries 2); cleanup deleted {deleted}")


@check("events under load: 4 writers (some transactions held open, half of those rolled back) and 4 workers of one "
       "consumer claiming 1 to 50 at a time, some never acknowledging; none lost, none handed out twice as new, in order")
def _events_load():
    consumer = f"events-load-{RUN:08x}"
    users = [user(11000 + i) for i in range(40)]
    for u in users:
        q(c, "SELECT billing.add_purchased_credits(%s, 100, 'events')", (u,))
        q(c, "SELECT billing.set_balance_alert(50, p_user_id => %s)", (u,))
    baseline = set()
    while True:   # what the checks above wrote, handed out and acknowledged first
        rows = q(c, "SELECT claim_id, id FROM billing.claim_events(%s, 10000)", (consumer,))
        if not rows:
            break
        baseline |= {r[1] for r in rows}
        q(c, "SELECT billing.ack_events(%s, %s, %s)", (consumer, max(r[1] for r in rows), rows[0][0]))
    lock = threading.Lock()
    seq, errors, unacked = [], [], [0]
    stop = threading.Event()

    def writer(seed):
        rnd = random.Random(seed)
        conn = coord()
        while not stop.is_set():
            u = rnd.choice(users)
            try:
                if rnd.random() < 0.1:   # held open a while, then committed or rolled back
                    conn.autocommit = False
                    q(conn, "SELECT billing.consume_credits_v2(%s, 60)", (u,))
                    time.sleep(rnd.random() * 0.2)
                    (conn.commit if rnd.random() < 0.5 else conn.rollback)()
                    conn.autocommit = True
                else:
                    q(conn, "SELECT billing.consume_credits_v2(%s, 60)", (u,))
                q(conn, "SELECT billing.add_purchased_credits(%s, 60, 'events')", (u,))
            except psycopg2.Error as e:
                if not conn.autocommit:
                    conn.rollback()
                    conn.autocommit = True
                if e.pgcode != "PT402":
                    with lock:
                        errors.append(f"write {e.pgcode}: {e}")
        conn.close()

    def claimer(seed):
        rnd = random.Random(seed)
        conn = coord()
        empty = 0
        while empty < 5:
            try:
                rows = q(conn, "SELECT claim_id, id, user_id, deliveries FROM billing.claim_events(%s, %s, '1 second')",
                         (consumer, rnd.randint(1, 50)))
            except psycopg2.Error as e:
                with lock:
                    errors.append(f"claim {e.pgcode}: {e}")
                continue
            if not rows:
                empty = empty + 1 if stop.is_set() else 0
                time.sleep(0.3 if stop.is_set() else 0.02)
                continue
            empty = 0
            with lock:
                seq.extend([(len(seq) + k, r[1], r[2], r[3]) for k, r in enumerate(rows)])
            if rnd.random() < 0.05:   # a worker that dies: handed out again after 1 s
                with lock:
                    unacked[0] += 1
                continue
            try:
                n = q(conn, "SELECT billing.ack_events(%s, %s, %s)", (consumer, max(r[1] for r in rows), rows[0][0]))[0][0]
                if n != len(rows):
                    with lock:
                        errors.append(f"ack_events acknowledged {n} of {len(rows)}")
            except psycopg2.Error as e:
                with lock:
                    errors.append(f"ack {e.pgcode}: {e}")
        conn.close()

    threads = [threading.Thread(target=writer, args=(RUN + i,)) for i in range(4)] + \
              [threading.Thread(target=claimer, args=(RUN + 100 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(float(os.environ.get("CITUS_EVENTS_SECONDS", "15")))
    stop.set()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} errors, e.g. {errors[:3]}"
    table = {i for (i,) in q(c, "SELECT id FROM billing.events WHERE user_id = ANY (%s)", (users,))}
    first = [(o, i, u) for (o, i, u, d) in seq if d == 1]
    ids = [i for (_, i, _) in first]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events handed out twice as new"
    assert set(ids) - baseline == table, f"lost {sorted(table - set(ids))[:5]}, unknown {sorted(set(ids) - baseline - table)[:5]}"
    bad = [u for u in users if [i for (_, i, w) in sorted(first) if w == u] != sorted(i for (_, i, w) in first if w == u)]
    assert not bad, f"users whose events came out of order: {bad[:3]}"
    again = sum(1 for x in seq if x[3] > 1)
    assert (again > 0) == (unacked[0] > 0), (again, unacked[0])
    return f"{len(table):,} events, each handed out once as new; {unacked[0]} claims left unacknowledged, {again} events handed out again"


FIG_USERS = 1000


def pgbench(port, db, clients, options="", seconds=None, calls=None):
    """pgbench of benches/consume_rust.sql (consume_credits_v2 of 1 credit, a random user of
    FIG_USERS): (calls per second, its stderr)."""
    out = subprocess.run([os.path.join(os.environ.get("PGBIN", ""), "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
                          "-j", str(min(clients, 2))] + (["-T", str(seconds)] if seconds else ["-t", str(calls)]) +
                         ["-D", f"users={FIG_USERS}", "-f", str(REPO / "benches" / "consume_rust.sql"),
                          "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                         capture_output=True, text=True, env=dict(os.environ, PGOPTIONS="-c synchronous_commit=off " + options))
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench on :{port} failed: {out.stdout[-800:]} {out.stderr[-800:]}")
    return float(m.group(1)), out.stderr


def cpu_seconds(pid):
    """CPU time (user + system) of a process of this machine, in seconds."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_call(delegation, calls, call="SELECT billing.consume_credits_v2($1, 1)"):
    """One session's calls (a prepared statement of one user argument: by default
    consume_credits_v2 of 1 credit; the FIG_USERS in turn): (calls/s, CPU microseconds per call of
    its coordinator backend, of its worker backends).
    Every node runs on this machine, so /proc has them all; a worker backend of the session is
    the one whose application_name carries the session's global pid."""
    conn = coord()
    q(conn, "SET pg_billing.citus_delegation = " + ("on" if delegation else "off"))
    pid, gpid = q(conn, "SELECT pg_backend_pid(), citus_backend_gpid()")[0]
    q(conn, "PREPARE fig_consume(uuid) AS " + call)
    users = [uuid.UUID(f"00000000-0000-4000-8000-{i:012x}") for i in range(1, FIG_USERS + 1)]
    for u in users[:50]:   # the session's worker connections are open from here on
        q(conn, "EXECUTE fig_consume(%s)", (u,))
    workers = []
    for (port,) in q(conn, "SELECT nodeport FROM pg_dist_node WHERE groupid > 0 ORDER BY 1"):
        w = connect(host="127.0.0.1", port=port, dbname=DB, user="postgres")
        workers += [r[0] for r in q(w, "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s", (f"%gpid={gpid}%",))]
        w.close()
    assert workers, "no worker backend of the session found"
    c0, w0, t0 = cpu_seconds(pid), sum(cpu_seconds(p) for p in workers), time.time()
    for i in range(calls):
        q(conn, "EXECUTE fig_consume(%s)", (users[i % FIG_USERS],))
    t = time.time() - t0
    c1, w1 = cpu_seconds(pid), sum(cpu_seconds(p) for p in workers)
    conn.close()
    return calls / t, 1e6 * (c1 - c0) / calls, 1e6 * (w1 - w0) / calls


CGROUP = Path("/sys/fs/cgroup/cpu")   # cgroup v1's cpu controller (where this machine has one)


def coordinator_pids():
    """The coordinator's postmaster and its children (backends, Citus's daemons)."""
    conn = coord()
    pid = q(conn, "SELECT pg_backend_pid()")[0][0]
    conn.close()
    postmaster = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    pids = [postmaster]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(d.name))
            except (OSError, ValueError):
                pass
    return pids


def capped_coordinator_rates(targets, rounds, seconds, quota=0.25):
    """consume_credits_v2 calls/s through the coordinator, delegated and not (4 clients,
    alternating rounds), with the coordinator's processes in a cgroup capped at `quota` of one
    CPU: a cluster whose coordinator is the bottleneck, as one with many workers would be. Says
    so when this machine has no writable cgroup."""
    if not (CGROUP / "cpu.cfs_quota_us").exists() or not os.access(CGROUP, os.W_OK):
        return "coordinator capped: not measured (no writable cgroup v1 cpu controller here)"
    group = CGROUP / f"pgb_coordinator_{RUN:x}"
    group.mkdir()
    pids = coordinator_pids()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
        for pid in pids:
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass   # a backend that has exited meanwhile
        keys = [k for k in targets if k.startswith("coordinator")]
        tps = {k: [] for k in keys}
        for _ in range(rounds):
            for k in keys:
                port, db, options = targets[k]
                tps[k].append(pgbench(port, db, 4, options, seconds=seconds)[0])
        med = {k: statistics.median(v) for k, v in tps.items()}
        d, n = (med[k] for k in keys)
        return (f"coordinator capped at {quota:.0%} of one CPU, 4 clients: "
                + "; ".join(f"{k} {med[k]:,.0f} calls/s (rounds {', '.join(f'{x:,.0f}' for x in v)})" for k, v in tps.items())
                + f"; delegated / not delegated {d / n:.2f}x")
    finally:
        # Back to the root group, the postmaster first (a backend it forks meanwhile starts in
        # the capped group: moved on the next pass), until the group is empty.
        for _ in range(100):
            left = [int(x) for x in (group / "cgroup.procs").read_text().split()]
            if not left:
                break
            for pid in sorted(left, key=lambda p: p != pids[0]):
                try:
                    (CGROUP / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass   # exited meanwhile
            time.sleep(0.05)
        group.rmdir()


if os.environ.get("PLAIN_PORT"):
    @check("figures: consume_credits_v2 calls/s on one node beside the coordinator of 3, with and without delegation "
           "(4 clients and 1 client, 1,000 users, same run); CPU per call of one session, with and without delegation, "
           "of consume_credits_v2, check_api_rate_limit, record_message_usage, add_purchased_credits and reserve_credits; "
           "calls/s with the coordinator's CPU capped (a coordinator-bound cluster)")
    def _figures():
        off = "-c pg_billing.citus_delegation=off"
        targets = {"one node (PostgreSQL, no Citus)": (int(os.environ["PLAIN_PORT"]), "bench", ""),
                   "coordinator, delegated": (PORT, DB, ""),
                   "coordinator, not delegated": (PORT, DB, off)}
        for port, db in sorted({(p, d) for p, d, _ in targets.values()}):
            conn = connect(host="127.0.0.1", port=port, dbname=db, user="postgres")
            # Every user's first debit records its spending head (the general path): done here,
            # so that the rounds measure the fast path, the one delegated.
            q(conn, """SELECT count(billing.add_purchased_credits(u, 1000000000)), count(billing.consume_credits_v2(u, 1))
                         FROM (SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid AS u
                                 FROM generate_series(1, %s) AS i) AS s""", (FIG_USERS,))
            conn.close()
        # Citus says each push-down at DEBUG1: every call of the delegated target, none of the other.
        for options, want in (("", 20), (off, 0)):
            _, err = pgbench(PORT, DB, 1, options + " -c client_min_messages=debug1", calls=20)
            n = err.count(PUSHED)
            assert n == want, f"{n} of 20 calls pushed down with options {options!r}, expected {want}"
        rounds = int(os.environ.get("CITUS_BENCH_ROUNDS", "3"))
        seconds = int(os.environ.get("CITUS_BENCH_SECONDS", "10"))
        out = []
        for clients in (4, 1):
            tps = {k: [] for k in targets}
            for _ in range(rounds):
                for k, (port, db, options) in targets.items():
                    tps[k].append(pgbench(port, db, clients, options, seconds=seconds)[0])
            med = {k: statistics.median(v) for k, v in tps.items()}
            a, b, n = med.values()
            out.append(f"{clients} client{'s' if clients > 1 else ''}: "
                       + "; ".join(f"{k} {med[k]:,.0f} calls/s (rounds {', '.join(f'{x:,.0f}' for x in v)})" for k, v in tps.items())
                       + f"; delegated / not delegated {b / n:.2f}x, coordinator / one node {b / a:.2f}x delegated, {n / a:.2f}x not")
        # A coordinator-bound cluster: the coordinator's processes capped at a quarter of one CPU
        # (a cgroup's CPU quota; new backends inherit it), the workers and the clients on the rest.
        out.append(capped_coordinator_rates(targets, rounds, seconds))
        # Where the CPU goes, per call of one session (alternating, 2 rounds of each).
        cpu = {True: [], False: []}
        for _ in range(2):
            for d in (True, False):
                cpu[d].append(cpu_per_call(d, int(os.environ.get("CITUS_CPU_CALLS", "2000"))))
        for d in (True, False):
            rate, co, wo = (statistics.mean(x[i] for x in cpu[d]) for i in range(3))
            out.append(f"one session, {'delegated' if d else 'not delegated'}: {rate:,.0f} calls/s, CPU per call "
                       f"{co:,.0f} us on the coordinator and {wo:,.0f} us on the workers")
        # The same for the calls 0.9.0 and 0.10.0 delegate (the free plan's 50 requests an hour
        # are not reached: a few calls per user).
        for name, call in (("check_api_rate_limit", "SELECT * FROM billing.check_api_rate_limit($1, '/fig')"),
                           ("record_message_usage", "SELECT billing.record_message_usage($1, 10, 20)"),
                           ("add_purchased_credits", "SELECT billing.add_purchased_credits($1, 1)"),
                           ("reserve_credits", "SELECT billing.reserve_credits($1, 1)")):
            cpu = {True: [], False: []}
            for _ in range(2):
                for d in (True, False):
                    cpu[d].append(cpu_per_call(d, int(os.environ.get("CITUS_CPU_CALLS", "2000")) // 2, call))
            for d in (True, False):
                rate, co, wo = (statistics.mean(x[i] for x in cpu[d]) for i in range(3))
                out.append(f"{name}, one session, {'delegated' if d else 'not delegated'}: {rate:,.0f} calls/s, CPU per call "
                           f"{co:,.0f} us on the coordinator and {wo:,.0f} us on the workers")
        return " | ".join(out)


print(f"{sum(ok for _, ok, _ in results)} passed, {sum(not ok for _, ok, _ in results)} failed")
sys.exit(0 if results and all(ok for _, ok, _ in results) else 1)
