"""pg_dump / pg_restore keep every row of pg_billing (SPEC 1): balances, ledger, expiration
events, idempotency keys, clawbacks, webhook events and the (edited) plan catalog, for the
custom format restored with pg_restore and the plain format restored with psql."""
import os
import shutil
import subprocess
import tempfile
import uuid

from pgb_testlib import connect, expect_sqlstate, q

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")


def tool(name):
    found = shutil.which(name)
    return found or os.path.join(PGBIN, name)


def conn_args():
    args = []
    if os.environ.get("PGHOST"):
        args += ["-h", os.environ["PGHOST"]]
    if os.environ.get("PGPORT"):
        args += ["-p", os.environ["PGPORT"]]
    args += ["-U", os.environ.get("PGUSER", "postgres")]
    return args


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-4000:]}"
    return p


def drop_db(name):
    admin = connect(dbname="postgres")
    try:
        q(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


def create_db(name):
    admin = connect(dbname="postgres")
    try:
        q(admin, f'CREATE DATABASE "{name}"')
    finally:
        admin.close()


# Every table the extension owns, compared in full (all columns), in a stable order.
TABLE_QUERIES = {
    "accounts": "SELECT * FROM billing.accounts ORDER BY user_id",
    "credit_transactions": "SELECT * FROM billing.credit_transactions ORDER BY user_id, id",
    "credit_expiration_events": "SELECT * FROM billing.credit_expiration_events ORDER BY user_id, id",
    "idempotency_keys": "SELECT * FROM billing.idempotency_keys ORDER BY user_id, idempotency_key",
    "clawbacks": "SELECT * FROM billing.clawbacks ORDER BY user_id, purchase_transaction_id",
    "webhook_events": "SELECT * FROM billing.webhook_events ORDER BY event_id",
    "plans": "SELECT * FROM billing.plans ORDER BY plan_id",
    "user_credits": "SELECT * FROM billing.user_credits ORDER BY user_id",
}


def snapshot(conn):
    snap = {name: q(conn, sql) for name, sql in TABLE_QUERIES.items()}
    # Any other table registered for dumping (added by later modules) is compared too.
    extra = q(conn, """
        SELECT c.relname FROM pg_extension e, unnest(e.extconfig) AS cfg(oid)
          JOIN pg_class c ON c.oid = cfg.oid
         WHERE e.extname = 'pg_billing' AND c.relkind = 'r' ORDER BY 1""")
    for (rel,) in extra:
        if rel not in snap:
            snap[rel] = q(conn, f'SELECT * FROM billing."{rel}" ORDER BY 1, 2')
    return snap


def populate(conn):
    """Several users with every kind of credit history. Returns (users, purchase tx ids)."""
    users = [uuid.uuid4() for _ in range(5)]
    a, b, c, d, e = users
    # Plans: edit a seeded row, add one, remove one.
    q(conn, "UPDATE billing.plans SET price_monthly = 21, limits = limits || '{\"agents\": 6}' WHERE plan_id = 'pro'")
    q(conn, """INSERT INTO billing.plans (plan_id, display_name, price_monthly, monthly_credits, api_rate_limit_hourly, limits, sort_order)
               VALUES ('enterprise', 'Enterprise', 999, 50000, -1, '{"agents": -1}', 9)""")
    q(conn, "DELETE FROM billing.plans WHERE plan_id = 'premium'")

    q(conn, "SELECT billing.add_subscription_credits(%s, 100, 'monthly grant', 'sub_1', 'grant-a-1')", (a,))
    pa = q(conn, "SELECT billing.add_purchased_credits(%s, 50, 'pack', 'pi_1', 'buy-a-1')", (a,))[0][0]["transaction_id"]
    q(conn, "SELECT billing.consume_credits_v2(%s, 120, 'generation', 'img_1', 'use-a-1')", (a,))
    q(conn, "SELECT billing.refund_credits(%s, 10, 'failed job', 'img_1', 'refund-a-1')", (a,))
    q(conn, "SELECT billing.renew_subscription_credits(%s, 200, now() + interval '30 days', 'renew-a-1')", (a,))

    q(conn, "SELECT billing.add_subscription_credits(%s, 30)", (b,))
    q(conn, "SELECT billing.expire_subscription_credits(%s, 'period ended', 'exp-b-1')", (b,))
    pb = q(conn, "SELECT billing.add_purchased_credits(%s, 40, 'pack', 'pi_2')", (b,))[0][0]["transaction_id"]
    q(conn, "SELECT billing.consume_credits_v2(%s, 15)", (b,))
    claw = q(conn, "SELECT billing.clawback_credits_from_transaction(%s, 'chargeback')", (pb,))[0][0]
    assert claw["clawed_back"] == 25 and claw["shortfall"] == 15, claw

    q(conn, "SELECT billing.increment_credits_with_log(%s, 70, 'purchase', 'legacy buy')", (c,))
    q(conn, "SELECT billing.increment_credits_with_log(%s, 20, 'bonus', 'legacy bonus')", (c,))
    q(conn, "SELECT billing.decrement_credits_with_log(%s, 25)", (c,))
    q(conn, "SELECT billing.renew_subscription_credits(%s, 10)", (c,))

    q(conn, "SELECT billing.add_purchased_credits(%s, 5, 'tiny', NULL, 'buy-d-1')", (d,))
    q(conn, "SELECT billing.add_purchased_credits(%s, 5, 'tiny', NULL, 'buy-d-1')", (d,))  # replay
    q(conn, "SELECT billing.renew_subscription_credits(%s, 8, now() + interval '1 month')", (d,))
    q(conn, "SELECT billing.renew_subscription_credits(%s, 9, now() + interval '2 months')", (d,))

    q(conn, "SELECT billing.add_purchased_credits(%s, 3, 'unicode \u00e9\u2603 \U0001F600 ''quoted''')", (e,))

    for i, u in enumerate(users):
        assert q(conn, "SELECT billing.record_webhook_event(%s, %s, %s)",
                 (f"evt_{i}_{u}", "checkout.session.completed", u)) == [(True,)]
    assert q(conn, "SELECT billing.record_webhook_event(%s, 'invoice.paid')", (f"evt_global_{a}",)) == [(True,)]
    assert q(conn, "SELECT billing.record_webhook_event(%s, 'invoice.paid')", (f"evt_global_{a}",)) == [(False,)]
    # Credit holds (0.5.0): an active hold of a's (a day long) and a released one.
    if q(conn, "SELECT to_regclass('billing.credit_holds') IS NOT NULL")[0][0]:
        q(conn, "SELECT billing.reserve_credits(%s, 10, '24 hours', NULL, 'hold-a-1')", (a,))
        gone = q(conn, "SELECT billing.reserve_credits(%s, 20) ->> 'hold_id'", (a,))[0][0]
        q(conn, "SELECT billing.release_hold(%s, 'release-a-1')", (gone,))
    # Events (0.6.0): a consumer has claimed and acknowledged every event so far; then a user
    # with a balance rule runs out, so one event (balance.depleted) is pending for it.
    if q(conn, "SELECT to_regclass('billing.events') IS NOT NULL")[0][0]:
        f = EVENT_USER
        q(conn, "SELECT billing.add_purchased_credits(%s, 50)", (f,))
        q(conn, "SELECT billing.set_balance_alert(40, p_user_id := %s)", (f,))
        q(conn, "SELECT billing.consume_credits_v2(%s, 15)", (f,))
        claimed = q(conn, "SELECT id, claim_id FROM billing.claim_events('dump', 1000)")
        assert claimed, "no event to claim before the dump"
        assert q(conn, "SELECT billing.ack_events('dump', %s, %s)", (max(r[0] for r in claimed), claimed[0][1])) == [(len(claimed),)]
        q(conn, "SELECT billing.consume_credits_v2(%s, 35)", (f,))
    return users, [pa, pb]


EVENT_USER = uuid.uuid4()


def check_restored(src_snap, dst, users, purchases):
    dst_snap = snapshot(dst)
    assert set(dst_snap) == set(src_snap), (set(src_snap) ^ set(dst_snap))
    for name in src_snap:
        assert dst_snap[name] == src_snap[name], (
            f"table {name} differs after restore:\n source: {src_snap[name][:20]}\n restored: {dst_snap[name][:20]}")
    # The plan catalog: the edit survived, the added plan is there, the deleted one stayed deleted,
    # no duplicates, no re-seeding.
    plans = {r[0]: r for r in q(dst, "SELECT plan_id, price_monthly, limits->>'agents' FROM billing.plans")}
    assert sorted(plans) == ["enterprise", "free", "pro", "ultra"], sorted(plans)
    assert str(plans["pro"][1]) == "21.00" and plans["pro"][2] == "6", plans["pro"]
    assert q(dst, "SELECT count(*), count(DISTINCT plan_id) FROM billing.plans") == [(4, 4)]
    assert q(dst, "SELECT count(*) FROM billing.verify_ledger()") == [(0,)]
    # Expected balances (independent of the source snapshot).
    a, b, c, d, e = users
    bal = dict((r[0], (r[1], r[2])) for r in q(dst, "SELECT user_id, subscription_credits_balance, purchased_credits_balance FROM billing.accounts"))
    assert bal[a] == (200, 40), bal[a]
    assert bal[b] == (0, 0), bal[b]
    assert bal[c] == (10, 65), bal[c]
    assert bal[d] == (9, 5), bal[d]
    assert bal[e] == (0, 3), bal[e]

    # The restored database keeps working: identity sequences continue, no duplicate key.
    max_before = q(dst, "SELECT max(id) FROM billing.credit_transactions")[0][0]
    r = q(dst, "SELECT billing.consume_credits_v2(%s, 5, 'after restore')", (a,))[0][0]
    assert r["success"] is True and r["total_balance"] == 235, r
    r = q(dst, "SELECT billing.add_purchased_credits(%s, 7)", (uuid.uuid4(),))[0][0]
    assert r["purchased_credits_balance"] == 7, r
    q(dst, "SELECT billing.expire_subscription_credits(%s)", (c,))
    new_ids = q(dst, "SELECT id FROM billing.credit_transactions WHERE id > %s ORDER BY id", (max_before,))
    assert len(new_ids) == 3, new_ids
    exp = q(dst, "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE user_id = %s) FROM billing.credit_expiration_events", (c,))
    assert exp == [(3, 3, 1)], exp
    # Idempotency keys and clawbacks still bite after restore.
    replay = q(dst, "SELECT billing.consume_credits_v2(%s, 120, 'generation', 'img_1', 'use-a-1')", (a,))[0][0]
    assert replay["consumed"] == 120 and replay["subscription_used"] == 100, replay
    expect_sqlstate("PT409", q, dst, "SELECT billing.consume_credits_v2(%s, 121, 'generation', 'img_1', 'use-a-1')", (a,))
    again = q(dst, "SELECT billing.clawback_credits_from_transaction(%s, 'chargeback')", (purchases[1],))[0][0]
    assert again.get("clawed_back") == 25 and again.get("already_clawed_back") is True, again
    assert q(dst, "SELECT billing.record_webhook_event(%s, 'invoice.paid')", (f"evt_global_{a}",)) == [(False,)]
    assert q(dst, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts WHERE user_id = %s",
             (a,)) == [(195, 40)]
    assert q(dst, "SELECT count(*) FROM billing.verify_ledger()") == [(0,)]
    # Holds survive (0.5.0): the active one still holds and is captured once, the released one
    # replays its release.
    if q(dst, "SELECT to_regclass('billing.credit_holds') IS NOT NULL")[0][0]:
        assert q(dst, "SELECT held FROM billing.accounts WHERE user_id = %s", (a,)) == [(10,)]
        assert q(dst, "SELECT available FROM billing.get_user_credits(%s)", (a,)) == [(225,)]
        (active,) = q(dst, "SELECT hold_id FROM billing.get_active_holds(%s)", (a,))[0]
        r = q(dst, "SELECT billing.capture_hold(%s, 4)", (active,))[0][0]
        assert (r["captured"], r["released"], r["already_resolved"]) == (4, 6, False), r
        assert q(dst, "SELECT billing.capture_hold(%s, 9) ->> 'captured'", (active,)) == [("4",)]
        (released,) = q(dst, "SELECT id FROM billing.credit_holds WHERE user_id = %s AND status = 'released'", (a,))[0]
        r = q(dst, "SELECT billing.release_hold(%s, 'release-a-1')", (released,))[0][0]
        assert (r["released"], r["already_resolved"]) == (20, False), r
        assert q(dst, "SELECT held FROM billing.accounts WHERE user_id = %s", (a,)) == [(0,)]
        assert q(dst, "SELECT count(*) FROM billing.verify_ledger()") == [(0,)]
    # Events survive (0.6.0): the consumer gets exactly the one event it had not acknowledged,
    # also when the rows carry transaction ids ahead of this cluster's (a dump of another
    # cluster), and new events continue the id sequence.
    if q(dst, "SELECT to_regclass('billing.events') IS NOT NULL")[0][0]:
        f = EVENT_USER
        (depleted,) = q(dst, "SELECT id FROM billing.events WHERE user_id = %s AND type = 'balance.depleted'", (f,))[0]
        q(dst, "UPDATE billing.event_consumers SET horizon = '900000000000'")
        q(dst, "UPDATE billing.events SET tx = '900000000001' WHERE id = %s", (depleted,))
        got = q(dst, "SELECT id, user_id, type, payload->>'available' FROM billing.claim_events('dump', 1000)")
        # f's unacknowledged event, and the ones written since the restore (above: c's expiry).
        assert got[0] == (depleted, f, "balance.depleted", "0"), got
        assert all(r[0] > depleted for r in got[1:]), got
        assert [r[2] for r in got[1:]] == ["grant.expired"], got
        max_event = q(dst, "SELECT max(id) FROM billing.events")[0][0]
        q(dst, "SELECT billing.add_purchased_credits(%s, 100)", (f,))
        got = q(dst, "SELECT id, type FROM billing.events WHERE user_id = %s AND id > %s", (f, max_event))
        assert len(got) == 1 and got[0][1] == "balance.recovered" and got[0][0] > max_event, got
    # The restored extension is the real one (not plain tables): functions, RLS and grants exist.
    assert q(dst, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_billing'") == [(1,)]
    assert q(dst, "SELECT relrowsecurity FROM pg_class WHERE oid = 'billing.credit_transactions'::regclass") == [(True,)]


def check_wrappers(dst, user, n_wrappers):
    """The public wrappers of expose_rpc are dumped as ordinary objects and work after restore,
    with their grants; expose_rpc is still idempotent there."""
    from pgb_testlib import postgrest_call
    r = postgrest_call(dst, "authenticated", {"role": "authenticated", "sub": str(user)},
                       "SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s)", (user, 1))[0][0]
    assert r["total_balance"] == 2, r
    expect_sqlstate("42501", postgrest_call, dst, "authenticated", {"role": "authenticated", "sub": str(user)},
                    "SELECT public.add_purchased_credits(p_user_id := %s, p_amount := %s)", (user, 1))
    assert q(dst, "SELECT billing.expose_rpc('public')") == [(n_wrappers,)]
    assert q(dst, "SELECT count(*) FROM billing.verify_ledger()") == [(0,)]


def test_dump_restore_custom_and_plain():
    tag = uuid.uuid4().hex[:10]
    src_name, dst_c, dst_p = f"dump_src_{tag}", f"dump_dst_c_{tag}", f"dump_dst_p_{tag}"
    tmp = tempfile.mkdtemp(prefix="pgb_dump_")
    os.chmod(tmp, 0o777)
    try:
        create_db(src_name)
        src = connect(dbname=src_name)
        q(src, "CREATE EXTENSION pg_billing")
        users, purchases = populate(src)
        n_wrappers = q(src, "SELECT billing.expose_rpc('public')")[0][0]
        assert q(src, "SELECT count(*) FROM billing.verify_ledger()") == [(0,)]
        src_snap = snapshot(src)
        seq_src = q(src, "SELECT last_value FROM billing.credit_transactions_id_seq")
        src.close()
        assert len(src_snap["credit_transactions"]) >= 20
        assert len(src_snap["credit_expiration_events"]) == 2, src_snap["credit_expiration_events"]
        assert len(src_snap["clawbacks"]) == 1
        assert len(src_snap["idempotency_keys"]) >= 7

        # Custom format, restored with pg_restore.
        custom = os.path.join(tmp, "dump.custom")
        run([tool("pg_dump"), *conn_args(), "-Fc", "-f", custom, "-d", src_name])
        create_db(dst_c)
        p = run([tool("pg_restore"), *conn_args(), "--exit-on-error", "-d", dst_c, custom])
        assert "error" not in p.stderr.lower(), p.stderr
        dst = connect(dbname=dst_c)
        try:
            assert q(dst, "SELECT last_value FROM billing.credit_transactions_id_seq") == seq_src
            check_restored(src_snap, dst, users, purchases)
            check_wrappers(dst, users[4], n_wrappers)
        finally:
            dst.close()

        # Plain format, restored with psql.
        plain = os.path.join(tmp, "dump.sql")
        run([tool("pg_dump"), *conn_args(), "-Fp", "-f", plain, "-d", src_name])
        create_db(dst_p)
        p = run([tool("psql"), *conn_args(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dst_p, "-f", plain])
        assert "ERROR" not in p.stderr, p.stderr
        dst = connect(dbname=dst_p)
        try:
            check_restored(src_snap, dst, users, purchases)
            check_wrappers(dst, users[4], n_wrappers)
        finally:
            dst.close()
    finally:
        for name in (src_name, dst_c, dst_p):
            drop_db(name)
        shutil.rmtree(tmp, ignore_errors=True)


def test_pg_restore_single_transaction_and_parallel():
    """The same custom dump restored with --single-transaction and with -j 2 (parallel)."""
    tag = uuid.uuid4().hex[:10]
    src_name, dst_1, dst_j = f"dump_src_{tag}", f"dump_dst_1_{tag}", f"dump_dst_j_{tag}"
    tmp = tempfile.mkdtemp(prefix="pgb_dump_")
    os.chmod(tmp, 0o777)
    try:
        create_db(src_name)
        src = connect(dbname=src_name)
        q(src, "CREATE EXTENSION pg_billing")
        users, purchases = populate(src)
        n_wrappers = q(src, "SELECT billing.expose_rpc('public')")[0][0]
        src_snap = snapshot(src)
        src.close()
        custom = os.path.join(tmp, "dump.custom")
        run([tool("pg_dump"), *conn_args(), "-Fc", "-f", custom, "-d", src_name])
        for dst_name, flags in ((dst_1, ["--single-transaction"]), (dst_j, ["-j", "2"])):
            create_db(dst_name)
            p = run([tool("pg_restore"), *conn_args(), "--exit-on-error", *flags, "-d", dst_name, custom])
            assert "error" not in p.stderr.lower(), p.stderr
            dst = connect(dbname=dst_name)
            try:
                check_restored(src_snap, dst, users, purchases)
                check_wrappers(dst, users[4], n_wrappers)
            finally:
                dst.close()
    finally:
        for name in (src_name, dst_1, dst_j):
            drop_db(name)
        shutil.rmtree(tmp, ignore_errors=True)
