"""Events out (issue 15, 0.6.0) through PostgREST-style calls, and the Supabase Realtime
precondition.

Every call is made as PostgREST makes it (tests/pgb_testlib.py postgrest_call): one transaction,
set_config('role', ..., true), set_config('request.jwt.claims', ..., true), then the call with
named arguments (the billing function itself, and the `public.` wrapper of billing.expose_rpc).
  - an authenticated end user SELECTs only their own rows of billing.events (RLS), whatever they
    filter on; anon sees none; service_role sees all;
  - end users and anon calling claim_events, ack_events, cleanup_events, set_balance_alert or
    set_limit_alert get 42501 and change nothing; service_role may call each;
  - Supabase Realtime's postgres_changes needs the table in the publication supabase_realtime and
    row security to filter what each subscriber receives: the table can be added, and its policy
    shows a user their own rows only.
  - NOTIFY wake-ups (pg_billing.notify_events): a LISTENing connection receives each event's id
    at commit, nothing when the GUC is off or the change is rolled back."""
import select
import time
import uuid

from pgb_testlib import claims, connect, end_user_rows, expect_sqlstate, new_user, postgrest_call, q

SERVICE_ONLY = {
    # function: (named-argument SQL, params builder(user), whether it returns a set)
    "claim_events": ("p_consumer := %s, p_limit := %s", lambda u: ("supabase_test", 10), True),
    "ack_events": ("p_consumer := %s, p_up_to_id := %s", lambda u: ("supabase_test", 0), False),
    "cleanup_events": ("p_older_than := %s", lambda u: ("7 days",), False),
    "set_balance_alert": ("p_threshold := %s, p_user_id := %s", lambda u: (10, u), False),
    "set_limit_alert": ("p_metric := %s, p_percent := %s", lambda u: ("messages", 80), False),
}


def expose(conn):
    q(conn, "SELECT billing.expose_rpc('public')")


def user_with_events(conn, n_low=1):
    """A user with 100 credits, a rule at 50 and n_low balance.low events (consume 60, add 60)."""
    u = new_user()
    q(conn, "SELECT billing.add_purchased_credits(%s, 100)", (u,))
    q(conn, "SELECT billing.set_balance_alert(p_threshold := 50, p_user_id := %s, p_hysteresis := 0)", (u,))
    for _ in range(n_low):
        q(conn, "SELECT billing.consume_credits_v2(%s, 60)", (u,))
        q(conn, "SELECT billing.add_purchased_credits(%s, 60)", (u,))
    return u


def stored_events(conn, u):
    return q(conn, "SELECT id, type FROM billing.events WHERE user_id = %s ORDER BY id", (u,))


def call(conn, role, cl, fn, schema, u):
    named, params, setof = SERVICE_ONLY[fn]
    sql = (f"SELECT * FROM {schema}.{fn}({named})" if setof else f"SELECT {schema}.{fn}({named})")
    return postgrest_call(conn, role, cl, sql, params(u))


def rule_state(conn):
    return (q(conn, "SELECT * FROM billing.user_balance_alerts ORDER BY user_id"),
            q(conn, "SELECT * FROM billing.plan_balance_alerts ORDER BY plan_id"),
            q(conn, "SELECT * FROM billing.limit_alerts ORDER BY 1, 2, 3"),
            q(conn, "SELECT * FROM billing.event_consumers ORDER BY consumer"),
            q(conn, "SELECT user_id, consumer, acked_id, claim_id FROM billing.event_cursors ORDER BY 1, 2"),
            q(conn, "SELECT count(*) FROM billing.events")[0][0])


def test_events_privileges():
    """The catalog: every new function is service-only, SECURITY DEFINER, search_path pinned; the
    table is readable by the end-user roles (RLS filters it) and writable by none of them."""
    conn = connect()
    expose(conn)
    for fn in SERVICE_ONLY:
        assert q(conn, "SELECT access FROM billing.api_functions WHERE function_name = %s", (fn,)) == [("service",)], fn
        rows = q(conn, """SELECT p.prosecdef, p.proconfig,
                                 has_function_privilege('authenticated', p.oid, 'EXECUTE'),
                                 has_function_privilege('anon', p.oid, 'EXECUTE'),
                                 has_function_privilege('service_role', p.oid, 'EXECUTE')
                            FROM pg_proc p WHERE p.proname = %s AND p.pronamespace = 'billing'::regnamespace""", (fn,))
        assert len(rows) == 1, (fn, rows)
        secdef, config, auth, anon, service = rows[0]
        assert secdef, f"billing.{fn} is not SECURITY DEFINER"
        assert config and any(c.startswith("search_path=") for c in config), f"billing.{fn}: search_path not pinned: {config}"
        assert (auth, anon, service) == (False, False, True), f"billing.{fn} EXECUTE (authenticated, anon, service_role): {(auth, anon, service)}"
        wrapper = q(conn, """SELECT has_function_privilege('authenticated', p.oid, 'EXECUTE'),
                                    has_function_privilege('anon', p.oid, 'EXECUTE'),
                                    has_function_privilege('service_role', p.oid, 'EXECUTE')
                               FROM pg_proc p WHERE p.proname = %s AND p.pronamespace = 'public'::regnamespace""", (fn,))
        assert wrapper == [(False, False, True)], f"public.{fn}: {wrapper}"
    for role in ("authenticated", "anon", "service_role"):
        assert q(conn, "SELECT has_table_privilege(%s, 'billing.events', 'SELECT'), "
                       "has_table_privilege(%s, 'billing.events', 'INSERT'), "
                       "has_table_privilege(%s, 'billing.events', 'UPDATE'), "
                       "has_table_privilege(%s, 'billing.events', 'DELETE')", (role,) * 4) == [(True, False, False, False)], role
    # the delivery state and the rules are not end users' business
    for table in ("event_consumers", "event_cursors", "user_balance_alerts", "plan_balance_alerts", "limit_alerts"):
        assert q(conn, f"SELECT has_table_privilege('authenticated', 'billing.{table}', 'SELECT'), "
                       f"has_table_privilege('anon', 'billing.{table}', 'SELECT')") == [(False, False)], table


def test_end_user_reads_own_events_only():
    conn = connect()
    expose(conn)
    u1 = user_with_events(conn, 2)
    u2 = user_with_events(conn, 1)
    own1 = stored_events(conn, u1)
    assert [t for _, t in own1] == ["balance.low", "balance.recovered", "balance.low", "balance.recovered"], own1
    c = connect()
    cl1 = claims("authenticated", u1)
    # everything they may see: their own rows, all of them
    rows = postgrest_call(c, "authenticated", cl1, "SELECT id, type, user_id FROM billing.events ORDER BY id")
    assert [(i, t) for i, t, _ in rows] == end_user_rows(conn, own1), rows
    assert {r[2] for r in rows} == set(end_user_rows(conn, [u1]))
    # asking for another user's rows by id or by user: none
    assert postgrest_call(c, "authenticated", cl1, "SELECT count(*) FROM billing.events WHERE user_id = %s", (u2,)) == [(0,)]
    other_ids = [i for i, _ in stored_events(conn, u2)]
    assert postgrest_call(c, "authenticated", cl1, "SELECT count(*) FROM billing.events WHERE id = ANY(%s)", (other_ids,)) == [(0,)]
    # the payload carries what a banner needs without a second query
    # The payload as the user reads it (on a cluster, where that read returns nothing, as the owner
    # reads it: its content is checked either way).
    first_low = "SELECT payload FROM billing.events WHERE user_id = %s AND type = 'balance.low' ORDER BY id LIMIT 1"
    mine = postgrest_call(c, "authenticated", cl1, first_low, (u1,))
    assert len(mine) == len(end_user_rows(conn, [1])), mine
    payload = (mine or q(conn, first_low, (u1,)))[0][0]
    assert payload["user_id"] == str(u1) and payload["threshold"] == 50 and payload["available"] == 40, payload
    assert payload["rule"] == "user", payload
    # u2 sees their own only
    rows2 = postgrest_call(c, "authenticated", claims("authenticated", u2), "SELECT user_id, count(*) FROM billing.events GROUP BY 1")
    assert rows2 == end_user_rows(conn, [(u2, 2)]), rows2
    # anon (Supabase's anon key: no sub claim) sees none, and neither does a request as anon that
    # claims a sub (the policy refuses anon whatever it claims)
    assert postgrest_call(c, "anon", {"role": "anon"}, "SELECT count(*) FROM billing.events") == [(0,)]
    assert postgrest_call(c, "anon", claims("anon", u1), "SELECT count(*) FROM billing.events") == [(0,)]
    assert postgrest_call(c, "authenticated", claims("anon", u1), "SELECT count(*) FROM billing.events") == [(0,)]
    # authenticated without a sub: none
    assert postgrest_call(c, "authenticated", {"role": "authenticated"}, "SELECT count(*) FROM billing.events") == [(0,)]
    # service_role sees every user's
    n = postgrest_call(c, "service_role", {"role": "service_role"},
                       "SELECT count(*) FROM billing.events WHERE user_id IN (%s, %s)", (u1, u2))
    assert n == [(6,)], n
    # nobody writes the table directly through PostgREST
    for role, cl in (("authenticated", cl1), ("anon", {"role": "anon"}), ("service_role", {"role": "service_role"})):
        expect_sqlstate("42501", postgrest_call, c, role, cl,
                        "INSERT INTO billing.events (user_id, type, payload) VALUES (%s, 'balance.low', '{}')", (u1,))
        expect_sqlstate("42501", postgrest_call, c, role, cl, "DELETE FROM billing.events WHERE user_id = %s", (u1,))
    assert stored_events(conn, u1) == own1


def test_end_users_cannot_consume_or_set_rules():
    conn = connect()
    expose(conn)
    u = user_with_events(conn, 1)
    before = rule_state(conn)
    c = connect()
    for fn in SERVICE_ONLY:
        for schema in ("billing", "public"):
            for role, cl in (("authenticated", claims("authenticated", u)), ("anon", {"role": "anon"}),
                             ("anon", claims("anon", u))):
                e = expect_sqlstate("42501", call, c, role, cl, fn, schema, u)
                assert "XX000" not in (e.pgerror or ""), e.pgerror
    assert rule_state(conn) == before


def test_service_role_may():
    conn = connect()
    expose(conn)
    u = user_with_events(conn, 1)
    c = connect()
    svc = ("service_role", {"role": "service_role"})
    consumer = "supabase_svc_" + uuid.uuid4().hex[:8]
    # a rule
    r = postgrest_call(c, *svc, "SELECT billing.set_balance_alert(p_threshold := %s, p_user_id := %s, p_hysteresis := %s)",
                       (30, u, 0.5))[0][0]
    assert (r["threshold"], r["rearm_at"]) == (30, 45), r
    r = postgrest_call(c, *svc, "SELECT public.set_balance_alert(p_threshold := %s, p_user_id := %s)", (None, u))[0][0]
    assert r["threshold"] is None, r
    r = postgrest_call(c, *svc, "SELECT public.set_limit_alert(p_metric := %s, p_percent := %s, p_plan_id := %s)",
                       ("messages", 90, "pro"))[0][0]
    assert r is not None
    assert q(conn, "SELECT count(*) FROM billing.limit_alerts WHERE metric = 'messages' AND percent = 90 AND plan_id = 'pro'") == [(1,)]
    postgrest_call(c, *svc, "SELECT billing.set_limit_alert(p_metric := %s, p_percent := %s, p_plan_id := %s, p_enabled := false)",
                   ("messages", 90, "pro"))
    assert q(conn, "SELECT count(*) FROM billing.limit_alerts WHERE metric = 'messages' AND percent = 90 AND plan_id = 'pro'") == [(0,)]
    # a consumer: claims every retained event (this user's among them), acknowledges them
    got = postgrest_call(c, *svc, "SELECT claim_id, id, user_id, type FROM public.claim_events(p_consumer := %s, p_limit := %s)",
                         (consumer, 10000))
    mine = [(i, t) for _, i, uu, t in got if uu == u]
    assert mine == stored_events(conn, u), (mine, stored_events(conn, u))
    claim_ids = {cid for cid, _, _, _ in got}
    assert len(claim_ids) == 1, claim_ids
    n = postgrest_call(c, *svc, "SELECT public.ack_events(p_consumer := %s, p_up_to_id := %s, p_claim_id := %s)",
                       (consumer, max(i for _, i, _, _ in got), claim_ids.pop()))[0][0]
    assert n == len(got), (n, len(got))
    assert postgrest_call(c, *svc, "SELECT count(*) FROM billing.claim_events(p_consumer := %s)", (consumer,)) == [(0,)]
    assert postgrest_call(c, *svc, "SELECT billing.cleanup_events(p_older_than := %s)", ("7 days",))[0][0] >= 0
    expect_sqlstate("22023", postgrest_call, c, *svc, "SELECT billing.cleanup_events(p_older_than := %s)", ("1 minute",))
    expect_sqlstate("P0002", postgrest_call, c, *svc, "SELECT billing.ack_events(p_consumer := %s, p_up_to_id := %s)",
                    ("never_claimed_" + uuid.uuid4().hex[:8], 1))
    # drain it for the other tests (cleanup needs every consumer to acknowledge)
    q(conn, "DELETE FROM billing.event_cursors WHERE consumer = %s", (consumer,))
    q(conn, "DELETE FROM billing.event_consumers WHERE consumer = %s", (consumer,))


def test_realtime_precondition():
    """Supabase Realtime (postgres_changes) streams a table's changes from the publication
    supabase_realtime and, per subscriber, keeps the rows that subscriber's RLS lets them SELECT.
    So billing.events must be addable to that publication, have row security on, and a SELECT
    policy that shows an end user exactly their own rows."""
    conn = connect()
    existed = q(conn, "SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime'")
    if not existed:
        q(conn, "CREATE PUBLICATION supabase_realtime")
    try:
        q(conn, "ALTER PUBLICATION supabase_realtime ADD TABLE billing.events")
        assert q(conn, """SELECT schemaname, tablename FROM pg_publication_tables
                           WHERE pubname = 'supabase_realtime' AND tablename = 'events'""") == [("billing", "events")]
        # inserts are what Realtime streams; the primary key is the replica identity
        assert q(conn, "SELECT relreplident FROM pg_class WHERE oid = 'billing.events'::regclass") == [("d",)]
        assert q(conn, """SELECT count(*) FROM pg_index WHERE indrelid = 'billing.events'::regclass AND indisprimary""") == [(1,)]
        assert q(conn, "SELECT pubinsert FROM pg_publication WHERE pubname = 'supabase_realtime'") == [(True,)]
        q(conn, "ALTER PUBLICATION supabase_realtime DROP TABLE billing.events")
    finally:
        if not existed:
            q(conn, "DROP PUBLICATION supabase_realtime")
    assert q(conn, "SELECT relrowsecurity FROM pg_class WHERE oid = 'billing.events'::regclass") == [(True,)]
    policies = q(conn, """SELECT policyname, cmd, permissive, roles::text[], qual FROM pg_policies
                           WHERE schemaname = 'billing' AND tablename = 'events'""")
    # a SELECT policy on the user's own rows ...
    assert any(cmd in ("SELECT", "ALL") and permissive == "PERMISSIVE" and "user_id" in (qual or "") and "current_user_id" in (qual or "")
               for _, cmd, permissive, _, qual in policies), policies
    # ... and no permissive policy that lets end users see more
    for name, cmd, permissive, roles, qual in policies:
        if permissive == "PERMISSIVE" and set(roles) & {"public", "authenticated", "anon"}:
            assert "current_user_id" in (qual or ""), (name, roles, qual)
    # what the policy does, for a subscriber: own rows only
    u1 = user_with_events(conn, 1)
    u2 = user_with_events(conn, 1)
    c = connect()
    for u in (u1, u2):
        got = postgrest_call(c, "authenticated", claims("authenticated", u), "SELECT DISTINCT user_id FROM billing.events")
        assert got == end_user_rows(conn, [(u,)]), got


def test_notify_wakeups():
    """pg_billing.notify_events on: NOTIFY pg_billing_events '<id>' for every event, delivered at
    commit to a LISTENing connection; off: nothing; rolled back: nothing."""
    conn = connect()
    listener = connect()
    q(listener, "LISTEN pg_billing_events")

    def heard(wait=1.0):
        got, end = [], time.time() + wait
        while time.time() < end:
            if select.select([listener], [], [], 0.1)[0]:
                listener.poll()
                while listener.notifies:
                    n = listener.notifies.pop(0)
                    got.append((n.channel, int(n.payload)))
        return got

    u = new_user()
    q(conn, "SELECT billing.add_purchased_credits(%s, 100)", (u,))
    q(conn, "SELECT billing.set_balance_alert(p_threshold := 50, p_user_id := %s, p_hysteresis := 0)", (u,))
    heard(0.3)
    # off by default
    assert q(conn, "SHOW pg_billing.notify_events") == [("off",)]
    q(conn, "SELECT billing.consume_credits_v2(%s, 60)", (u,))
    assert stored_events(conn, u)[-1][1] == "balance.low"
    assert [p for _, p in heard() if p in {i for i, _ in stored_events(conn, u)}] == []
    # on: the ids of the events, in order
    q(conn, "SET pg_billing.notify_events = on")
    q(conn, "SELECT billing.add_purchased_credits(%s, 20)", (u,))   # 60: recovered
    q(conn, "SELECT billing.consume_credits_v2(%s, 60)", (u,))      # 0: low, depleted
    ids = [i for i, _ in stored_events(conn, u)][-3:]
    assert [t for _, t in stored_events(conn, u)][-3:] == ["balance.recovered", "balance.low", "balance.depleted"]
    got = heard()
    assert got == [("pg_billing_events", i) for i in ids], (got, ids)
    # at commit only
    conn.autocommit = False
    q(conn, "SELECT billing.add_purchased_credits(%s, 50)", (u,))   # 50: recovered
    assert heard(0.5) == []
    conn.commit()
    assert heard() == [("pg_billing_events", stored_events(conn, u)[-1][0])]
    # rolled back: nothing, and no event
    n_before = len(stored_events(conn, u))
    q(conn, "SELECT billing.consume_credits_v2(%s, 50)", (u,))      # 0: low, depleted
    conn.rollback()
    conn.autocommit = True
    assert heard() == []
    assert len(stored_events(conn, u)) == n_before
    q(conn, "SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := %s)", (u,))
    listener.close()
    conn.close()
