"""PostgREST-style calls through the public wrappers of billing.expose_rpc (SPEC 1, 2, 3, 4).

Every call is made exactly as PostgREST makes it: one transaction at READ COMMITTED,
set_config('role', ..., true), set_config('request.jwt.claims', ..., true), then the `public.`
wrapper with named arguments."""
import json

import psycopg2

from pgb_testlib import claims, connect, end_user_rows, expect_sqlstate, new_user, postgrest_call, q

SERVICE_ONLY_CALLS = [
    # (function, named-argument SQL, params builder(user, purchase_tx))
    ("add_purchased_credits", "p_user_id := %s, p_amount := %s", lambda u, tx: (u, 5)),
    ("add_subscription_credits", "p_user_id := %s, p_amount := %s", lambda u, tx: (u, 5)),
    ("expire_subscription_credits", "p_user_id := %s", lambda u, tx: (u,)),
    ("renew_subscription_credits", "p_user_id := %s, p_amount := %s", lambda u, tx: (u, 5)),
    ("refund_credits", "p_user_id := %s, p_amount := %s", lambda u, tx: (u, 5)),
    ("clawback_credits_from_transaction", "p_transaction_id := %s", lambda u, tx: (tx,)),
    ("increment_credits_with_log", "p_user_id := %s, p_amount := %s, p_transaction_type := %s",
     lambda u, tx: (u, 5, "purchase")),
    ("record_webhook_event", "p_event_id := %s, p_event_type := %s, p_user_id := %s",
     lambda u, tx: ("evt_" + str(u), "checkout.session.completed", u)),
]


def expose(conn):
    """expose_rpc('public') as postgres, twice: the count is stable and every API function
    has its wrapper in public."""
    n1 = q(conn, "SELECT billing.expose_rpc('public')")[0][0]
    n2 = q(conn, "SELECT billing.expose_rpc('public')")[0][0]
    assert n1 == n2, f"expose_rpc is not idempotent: {n1} then {n2}"
    catalog = {r[0] for r in q(conn, "SELECT function_name FROM billing.api_catalog()")}
    assert n1 == len(catalog), f"expose_rpc returned {n1}, catalog has {len(catalog)} functions"
    wrappers = {r[0] for r in q(conn, """
        SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace""")}
    missing = catalog - wrappers
    assert not missing, f"wrappers missing in public: {missing}"
    return n1


def balances(conn, user):
    rows = q(conn, """SELECT subscription_credits_balance, purchased_credits_balance
                        FROM billing.accounts WHERE user_id = %s""", (user,))
    return rows[0] if rows else None


def ledger_count(conn, user):
    return q(conn, "SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s", (user,))[0][0]


def funded_user(conn, sub=0, pur=0):
    u = new_user()
    if sub:
        q(conn, "SELECT billing.add_subscription_credits(%s, %s)", (u, sub))
    if pur:
        q(conn, "SELECT billing.add_purchased_credits(%s, %s)", (u, pur))
    return u


def rpc(conn, role, cl, fn, named, params):
    return postgrest_call(conn, role, cl, f"SELECT public.{fn}({named})", params)


def test_expose_rpc_idempotent_and_wrappers_shape():
    conn = connect()
    n = expose(conn)
    assert n >= 12, f"expected at least the 12 credit functions to be exposed, got {n}"
    # Wrappers are SECURITY INVOKER, pin search_path and mirror the billing signature exactly.
    rows = q(conn, """
        SELECT w.proname, w.prosecdef, w.proconfig,
               pg_get_function_arguments(w.oid), pg_get_function_result(w.oid),
               pg_get_function_arguments(b.oid), pg_get_function_result(b.oid)
          FROM billing.api_catalog() c
          JOIN pg_proc w ON w.proname = c.function_name AND w.pronamespace = 'public'::regnamespace
          JOIN pg_proc b ON b.proname = c.function_name AND b.pronamespace = 'billing'::regnamespace""")
    assert len(rows) == n
    for name, secdef, config, wargs, wres, bargs, bres in rows:
        assert secdef is False, f"public.{name} must be SECURITY INVOKER"
        assert config and any(c.startswith("search_path=") for c in config), f"public.{name} has no pinned search_path"
        assert wargs == bargs, f"public.{name} args {wargs!r} != billing {bargs!r}"
        assert wres == bres, f"public.{name} result {wres!r} != billing {bres!r}"
    # Wrapper grants (SPEC 2): service-only wrappers are not executable by anon/authenticated.
    for fn in ("add_purchased_credits", "refund_credits", "clawback_credits_from_transaction"):
        r = q(conn, f"""SELECT has_function_privilege('authenticated', p.oid, 'EXECUTE'),
                               has_function_privilege('anon', p.oid, 'EXECUTE'),
                               has_function_privilege('service_role', p.oid, 'EXECUTE')
                          FROM pg_proc p WHERE p.proname = %s AND p.pronamespace = 'public'::regnamespace""", (fn,))
        assert r == [(False, False, True)], f"public.{fn} grants: {r}"
    r = q(conn, """SELECT has_function_privilege('authenticated', p.oid, 'EXECUTE'),
                          has_function_privilege('anon', p.oid, 'EXECUTE')
                     FROM pg_proc p WHERE p.proname = 'consume_credits_v2' AND p.pronamespace = 'public'::regnamespace""")
    assert r == [(True, False)], f"public.consume_credits_v2 grants: {r}"
    # A third call still gives the same count, and no overloads pile up.
    assert q(conn, "SELECT billing.expose_rpc('public')")[0][0] == n
    assert q(conn, """SELECT count(*) FROM pg_proc p JOIN billing.api_catalog() c ON c.function_name = p.proname
                       WHERE p.pronamespace = 'public'::regnamespace""") == [(n,)]
    # Bad targets: 22023, nothing created.
    expect_sqlstate("22023", q, conn, "SELECT billing.expose_rpc('no_such_schema_pgb')")
    expect_sqlstate("22023", q, conn, "SELECT billing.expose_rpc('billing')")
    expect_sqlstate("22023", q, conn, "SELECT billing.expose_rpc(NULL)")


def test_own_user_consume_works():
    conn = connect()
    expose(conn)
    u = funded_user(conn, sub=4, pur=10)
    c = connect()
    rows = rpc(c, "authenticated", claims("authenticated", u), "consume_credits_v2",
               "p_user_id := %s, p_amount := %s", (u, 6))
    res = rows[0][0]
    assert res["success"] is True
    assert res["consumed"] == 6
    assert res["subscription_used"] == 4 and res["purchased_used"] == 2, res
    assert res["subscription_credits_balance"] == 0 and res["purchased_credits_balance"] == 8, res
    assert res["total_balance"] == 8
    assert balances(conn, u) == (0, 8)
    # All named parameters, including the idempotency key: a repeat replays the first result.
    args = "p_user_id := %s, p_amount := %s, p_description := %s, p_reference_id := %s, p_idempotency_key := %s"
    r1 = rpc(c, "authenticated", claims("authenticated", u), "consume_credits_v2", args, (u, 3, "gen", "img-1", "k1"))[0][0]
    r2 = rpc(c, "authenticated", claims("authenticated", u), "consume_credits_v2", args, (u, 3, "gen", "img-1", "k1"))[0][0]
    assert r1 == r2 and r1["total_balance"] == 5, (r1, r2)
    assert balances(conn, u) == (0, 5)
    expect_sqlstate("PT409", rpc, c, "authenticated", claims("authenticated", u), "consume_credits_v2", args,
                    (u, 4, "gen", "img-1", "k1"))
    assert balances(conn, u) == (0, 5)
    # Legacy alias via its wrapper returns the new total.
    total = rpc(c, "authenticated", claims("authenticated", u), "decrement_credits_with_log",
                "p_user_id := %s, p_amount := %s", (u, 2))[0][0]
    assert total == 3
    assert balances(conn, u) == (0, 3)
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,))[0][0] == 0


def test_other_users_id_refused():
    conn = connect()
    expose(conn)
    me = funded_user(conn, pur=10)
    other = funded_user(conn, pur=10)
    c = connect()
    cl = claims("authenticated", me)
    before = ledger_count(conn, other)
    expect_sqlstate("42501", rpc, c, "authenticated", cl, "consume_credits_v2", "p_user_id := %s, p_amount := %s", (other, 1))
    expect_sqlstate("42501", rpc, c, "authenticated", cl, "decrement_credits_with_log", "p_user_id := %s, p_amount := %s", (other, 1))
    expect_sqlstate("42501", postgrest_call, c, "authenticated", cl,
                    "SELECT * FROM public.get_user_credits(p_user_id := %s)", (other,))
    expect_sqlstate("42501", postgrest_call, c, "authenticated", cl,
                    "SELECT * FROM public.get_credit_history(p_user_id := %s)", (other,))
    # Calling the billing function directly is refused the same way.
    expect_sqlstate("42501", postgrest_call, c, "authenticated", cl,
                    "SELECT billing.consume_credits_v2(p_user_id := %s, p_amount := %s)", (other, 1))
    # An authenticated request with no sub claim has no identity.
    expect_sqlstate("42501", rpc, c, "authenticated", {"role": "authenticated"}, "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (other, 1))
    assert balances(conn, other) == (0, 10)
    assert ledger_count(conn, other) == before


def test_anon_refused():
    conn = connect()
    expose(conn)
    u = funded_user(conn, pur=10)
    c = connect()
    e = expect_sqlstate("42501", rpc, c, "anon", {"role": "anon"}, "add_purchased_credits",
                        "p_user_id := %s, p_amount := %s", (u, 100))
    assert e is not None
    expect_sqlstate("42501", rpc, c, "anon", {"role": "anon"}, "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (u, 1))
    expect_sqlstate("42501", postgrest_call, c, "anon", {"role": "anon"},
                    "SELECT * FROM public.get_user_credits(p_user_id := %s)", (u,))
    # anon with a forged sub is still anon: no rpc on that user.
    expect_sqlstate("42501", rpc, c, "anon", claims("anon", u), "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (u, 1))
    expect_sqlstate("42501", postgrest_call, c, "anon", {"role": "anon"},
                    "SELECT billing.add_purchased_credits(p_user_id := %s, p_amount := %s)", (u, 100))
    assert balances(conn, u) == (0, 10)
    # anon sees no account rows through RLS.
    assert postgrest_call(c, "anon", {"role": "anon"}, "SELECT count(*) FROM billing.accounts")[0][0] == 0


def test_authenticated_service_only_refused():
    conn = connect()
    expose(conn)
    u = new_user()
    tx = q(conn, "SELECT billing.add_purchased_credits(%s, 10)", (u,))[0][0]["transaction_id"]
    c = connect()
    cl = claims("authenticated", u)
    for fn, named, mk in SERVICE_ONLY_CALLS:
        expect_sqlstate("42501", rpc, c, "authenticated", cl, fn, named, mk(u, tx))
        # The billing function itself is refused too.
        expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, f"SELECT billing.{fn}({named})", mk(u, tx))
    for fn in ("expose_rpc", "unexpose_rpc", "apply_grants"):
        arg = "" if fn == "apply_grants" else "'public'"
        expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, f"SELECT billing.{fn}({arg})")
    expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, "SELECT * FROM billing.verify_ledger()")
    assert balances(conn, u) == (0, 10)
    assert ledger_count(conn, u) == 1
    assert q(conn, "SELECT count(*) FROM billing.clawbacks WHERE user_id = %s", (u,))[0][0] == 0
    assert q(conn, "SELECT count(*) FROM billing.webhook_events WHERE event_id = %s", ("evt_" + str(u),))[0][0] == 0
    # No direct writes to billing tables either.
    expect_sqlstate("42501", postgrest_call, c, "authenticated", cl,
                    "UPDATE billing.accounts SET purchased_credits_balance = 1000000 WHERE user_id = %s", (u,))
    expect_sqlstate("42501", postgrest_call, c, "authenticated", cl,
                    "INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after) "
                    "VALUES (%s, gen_random_uuid(), 'purchase', 'purchased', 5, 15)", (u,))
    assert balances(conn, u) == (0, 10)


def test_service_role_acts_on_any_user():
    conn = connect()
    expose(conn)
    u = new_user()
    c = connect()
    cl = {"role": "service_role"}
    r = rpc(c, "service_role", cl, "add_purchased_credits",
            "p_user_id := %s, p_amount := %s, p_description := %s", (u, 25, "pack"))[0][0]
    assert r["success"] is True and r["added"] == 25 and r["purchased_credits_balance"] == 25, r
    r = rpc(c, "service_role", cl, "add_subscription_credits", "p_user_id := %s, p_amount := %s", (u, 5))[0][0]
    assert r["subscription_credits_balance"] == 5 and r["total_balance"] == 30, r
    r = rpc(c, "service_role", cl, "consume_credits_v2", "p_user_id := %s, p_amount := %s", (u, 7))[0][0]
    assert (r["subscription_used"], r["purchased_used"], r["total_balance"]) == (5, 2, 23), r
    rows = postgrest_call(c, "service_role", cl, "SELECT * FROM public.get_user_credits(p_user_id := %s)", (u,))
    assert rows == [(u, 0, 23, 23, 23)], rows  # ..., total_balance, available (0.4.0)
    hist = postgrest_call(c, "service_role", cl,
                          "SELECT amount FROM public.get_credit_history(p_user_id := %s)", (u,))
    assert [h[0] for h in hist] == [-2, -5, 5, 25], hist
    assert balances(conn, u) == (0, 23)
    # service_role with a sub claim of someone else is still a service caller.
    other = new_user()
    r = rpc(c, "service_role", claims("service_role", other), "add_purchased_credits",
            "p_user_id := %s, p_amount := %s", (u, 1))[0][0]
    assert r["purchased_credits_balance"] == 24, r


def test_reads_return_only_own_data():
    conn = connect()
    expose(conn)
    me = funded_user(conn, sub=3, pur=7)
    other = funded_user(conn, sub=100, pur=200)
    q(conn, "SELECT billing.consume_credits_v2(%s, 1, 'mine')", (me,))
    c = connect()
    cl = claims("authenticated", me)
    rows = postgrest_call(c, "authenticated", cl, "SELECT * FROM public.get_user_credits(p_user_id := %s)", (me,))
    assert rows == [(me, 2, 7, 9, 9)], rows  # ..., total_balance, available (0.4.0)
    hist = postgrest_call(c, "authenticated", cl,
                          "SELECT user_id, pool, amount, balance_after, description FROM public.get_credit_history(p_user_id := %s, p_limit := %s)",
                          (me, 10))
    assert [tuple(h) for h in hist] == [(me, "subscription", -1, 2, "mine"), (me, "purchased", 7, 7, None),
                                        (me, "subscription", 3, 3, None)], hist
    hist1 = postgrest_call(c, "authenticated", cl,
                           "SELECT amount FROM public.get_credit_history(p_user_id := %s, p_limit := %s)", (me, 1))
    assert hist1 == [(-1,)]
    # A user with no account yet gets zeros, not another user's data.
    fresh = new_user()
    rows = postgrest_call(c, "authenticated", claims("authenticated", fresh),
                          "SELECT * FROM public.get_user_credits(p_user_id := %s)", (fresh,))
    assert rows == [(fresh, 0, 0, 0, 0)], rows  # ..., total_balance, available (0.4.0)
    assert postgrest_call(c, "authenticated", claims("authenticated", fresh),
                          "SELECT count(*) FROM public.get_credit_history(p_user_id := %s)", (fresh,)) == [(0,)]


def test_forged_service_role_claim_refused():
    """SET ROLE authenticated with a JWT claiming role=service_role: the database role has no
    EXECUTE on service-only functions, so the claim cannot escalate."""
    conn = connect()
    expose(conn)
    u = new_user()
    tx = q(conn, "SELECT billing.add_purchased_credits(%s, 10)", (u,))[0][0]["transaction_id"]
    c = connect()
    forged = claims("service_role", u)
    for fn, named, mk in SERVICE_ONLY_CALLS:
        expect_sqlstate("42501", rpc, c, "authenticated", forged, fn, named, mk(u, tx))
        expect_sqlstate("42501", postgrest_call, c, "authenticated", forged, f"SELECT billing.{fn}({named})", mk(u, tx))
    # Nor does it let an end user act on another user's account through an rpc function.
    victim = funded_user(conn, pur=9)
    expect_sqlstate("42501", rpc, c, "authenticated", forged, "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (victim, 9))
    expect_sqlstate("42501", postgrest_call, c, "authenticated", forged,
                    "SELECT * FROM public.get_credit_history(p_user_id := %s)", (victim,))
    assert balances(conn, victim) == (0, 9)
    forged_no_sub = {"role": "service_role"}
    expect_sqlstate("42501", rpc, c, "authenticated", forged_no_sub, "add_purchased_credits",
                    "p_user_id := %s, p_amount := %s", (u, 1000))
    expect_sqlstate("42501", rpc, c, "anon", forged_no_sub, "add_purchased_credits",
                    "p_user_id := %s, p_amount := %s", (u, 1000))
    # The legacy per-claim GUC is no way around it either.
    def with_claim_sub():
        c.autocommit = False
        try:
            with c.cursor() as cur:
                cur.execute("SELECT set_config('role', 'authenticated', true), "
                            "set_config('request.jwt.claims', %s, true), set_config('request.jwt.claim.role', 'service_role', true)",
                            (json.dumps(forged),))
                cur.execute("SELECT public.add_purchased_credits(p_user_id := %s, p_amount := %s)", (u, 1000))
        finally:
            c.rollback()
            c.autocommit = True
    expect_sqlstate("42501", with_claim_sub)
    assert balances(conn, u) == (0, 10)
    assert ledger_count(conn, u) == 1


def test_service_role_with_end_user_claim_is_end_user():
    """The request's role is the JWT role claim when present (SPEC 2): role=authenticated in the
    claims makes the call an end user's even if the session role could do more."""
    conn = connect()
    expose(conn)
    me = funded_user(conn, pur=5)
    other = funded_user(conn, pur=5)
    c = connect()
    expect_sqlstate("42501", rpc, c, "service_role", claims("authenticated", me), "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (other, 1))
    assert balances(conn, other) == (0, 5)
    r = rpc(c, "service_role", claims("authenticated", me), "consume_credits_v2",
            "p_user_id := %s, p_amount := %s", (me, 1))[0][0]
    assert r["total_balance"] == 4


def test_authenticator_login_role_flow():
    conn = connect()
    expose(conn)
    me = funded_user(conn, sub=2, pur=8)
    other = funded_user(conn, pur=8)
    a = connect(user="authenticator")
    try:
        assert q(a, "SELECT current_user, session_user") == [("authenticator", "authenticator")]
        cl = claims("authenticated", me)
        r = rpc(a, "authenticated", cl, "consume_credits_v2", "p_user_id := %s, p_amount := %s", (me, 3))[0][0]
        assert (r["subscription_used"], r["purchased_used"], r["total_balance"]) == (2, 1, 7), r
        # After the transaction the role is back to authenticator (SET LOCAL semantics).
        assert q(a, "SELECT current_user") == [("authenticator",)]
        expect_sqlstate("42501", rpc, a, "authenticated", cl, "consume_credits_v2",
                        "p_user_id := %s, p_amount := %s", (other, 1))
        expect_sqlstate("42501", rpc, a, "authenticated", cl, "add_purchased_credits",
                        "p_user_id := %s, p_amount := %s", (me, 100))
        expect_sqlstate("42501", rpc, a, "anon", {"role": "anon"}, "add_purchased_credits",
                        "p_user_id := %s, p_amount := %s", (me, 100))
        expect_sqlstate("PT402", rpc, a, "authenticated", cl, "consume_credits_v2",
                        "p_user_id := %s, p_amount := %s", (me, 1000))
        rows = postgrest_call(a, "authenticated", cl, "SELECT * FROM public.get_user_credits(p_user_id := %s)", (me,))
        assert rows == [(me, 0, 7, 7, 7)], rows  # ..., total_balance, available (0.4.0)
        n = postgrest_call(a, "authenticated", cl, "SELECT count(*), count(*) FILTER (WHERE user_id = %s) "
                                                   "FROM billing.credit_transactions", (me,))
        assert n == end_user_rows(conn, [(4, 4)], none=[(0, 0)]), n
        # service_role through authenticator acts on anyone.
        r = rpc(a, "service_role", {"role": "service_role"}, "add_purchased_credits",
                "p_user_id := %s, p_amount := %s", (other, 2))[0][0]
        assert r["purchased_credits_balance"] == 10, r
        r = rpc(a, "service_role", {"role": "service_role"}, "consume_credits_v2",
                "p_user_id := %s, p_amount := %s", (other, 10))[0][0]
        assert r["total_balance"] == 0, r
        # authenticator itself (no SET ROLE) holds no EXECUTE: NOINHERIT.
        expect_sqlstate("42501", q, a, "SELECT billing.add_purchased_credits(%s, 1)", (me,))
    finally:
        a.close()
    assert balances(conn, me) == (0, 7)
    assert balances(conn, other) == (0, 0)
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger()")[0][0] == 0


def test_pt402_through_wrapper():
    conn = connect()
    expose(conn)
    u = funded_user(conn, sub=3, pur=4)
    c = connect()
    e = expect_sqlstate("PT402", rpc, c, "authenticated", claims("authenticated", u), "consume_credits_v2",
                        "p_user_id := %s, p_amount := %s", (u, 8))
    assert e.pgcode == "PT402" and e.pgcode != "XX000"
    assert e.diag.message_detail and "8" in e.diag.message_detail and "7" in e.diag.message_detail, e.diag.message_detail
    expect_sqlstate("PT402", rpc, c, "authenticated", claims("authenticated", u), "decrement_credits_with_log",
                    "p_user_id := %s, p_amount := %s", (u, 8))
    expect_sqlstate("PT402", rpc, c, "service_role", {"role": "service_role"}, "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (u, 2147483647))
    # Nothing consumed.
    assert balances(conn, u) == (3, 4)
    assert ledger_count(conn, u) == 2
    # Bad argument through the wrapper: 22023, not XX000.
    expect_sqlstate("22023", rpc, c, "authenticated", claims("authenticated", u), "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (u, 0))
    expect_sqlstate("22023", rpc, c, "authenticated", claims("authenticated", u), "consume_credits_v2",
                    "p_user_id := %s, p_amount := %s", (u, -5))
    assert balances(conn, u) == (3, 4)


def test_rls_ledger_only_own_rows():
    conn = connect()
    expose(conn)
    me = funded_user(conn, sub=1, pur=2)
    other = funded_user(conn, sub=50, pur=60)
    q(conn, "SELECT billing.expire_subscription_credits(%s)", (me,))
    q(conn, "SELECT billing.expire_subscription_credits(%s)", (other,))
    c = connect()
    cl = claims("authenticated", me)
    rows = postgrest_call(c, "authenticated", cl, "SELECT * FROM billing.credit_transactions")
    assert len(rows) == len(end_user_rows(conn, [1, 2, 3])), rows
    assert {r[0] for r in rows} == set(end_user_rows(conn, [me]))
    own_total = q(conn, "SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s", (me,))[0][0]
    assert own_total == 3
    rows = postgrest_call(c, "authenticated", cl, "SELECT user_id, subscription_credits_balance, purchased_credits_balance FROM billing.accounts")
    assert rows == end_user_rows(conn, [(me, 0, 2)]), rows
    rows = postgrest_call(c, "authenticated", cl, "SELECT * FROM billing.user_credits")
    assert rows == end_user_rows(conn, [(me, 0, 2, 2, 2)]), rows  # ..., total_balance, available (0.4.0)
    rows = postgrest_call(c, "authenticated", cl, "SELECT user_id, expired_amount FROM billing.credit_expiration_events")
    assert rows == end_user_rows(conn, [(me, 1)]), rows
    # webhook_events: no end-user access at all (no grant or no policy), never another user's rows.
    try:
        assert postgrest_call(c, "authenticated", cl, "SELECT count(*) FROM billing.webhook_events") == [(0,)]
    except psycopg2.Error as e:
        assert e.pgcode == "42501", e.pgerror
    # Asking for the other user's rows explicitly returns nothing.
    assert postgrest_call(c, "authenticated", cl,
                          "SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s", (other,)) == [(0,)]
    # anon and authenticated-without-sub see no ledger rows.
    assert postgrest_call(c, "anon", {"role": "anon"}, "SELECT count(*) FROM billing.credit_transactions") == [(0,)]
    assert postgrest_call(c, "authenticated", {"role": "authenticated"},
                          "SELECT count(*) FROM billing.credit_transactions") == [(0,)]


def test_unexpose_then_reexpose():
    conn = connect()
    n = expose(conn)
    u = funded_user(conn, pur=5)
    c = connect()
    try:
        removed = q(conn, "SELECT billing.unexpose_rpc('public')")[0][0]
        assert removed == n, f"unexpose removed {removed}, expose created {n}"
        left = q(conn, """SELECT count(*) FROM pg_proc p JOIN billing.api_catalog() c ON c.function_name = p.proname
                           WHERE p.pronamespace = 'public'::regnamespace""")[0][0]
        assert left == 0, f"{left} wrappers left in public"
        assert q(conn, "SELECT billing.unexpose_rpc('public')")[0][0] == 0
        expect_sqlstate("42883", rpc, c, "authenticated", claims("authenticated", u), "consume_credits_v2",
                        "p_user_id := %s, p_amount := %s", (u, 1))
        # The billing functions themselves are untouched.
        r = q(conn, "SELECT billing.consume_credits_v2(%s, 1)", (u,))[0][0]
        assert r["total_balance"] == 4
        # An unrelated user function in public survives unexpose.
        q(conn, "CREATE OR REPLACE FUNCTION public.pgb_test_keep_me() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        q(conn, "SELECT billing.expose_rpc('public')")
        q(conn, "SELECT billing.unexpose_rpc('public')")
        assert q(conn, "SELECT public.pgb_test_keep_me()") == [(1,)]
        q(conn, "DROP FUNCTION public.pgb_test_keep_me()")
    finally:
        again = q(conn, "SELECT billing.expose_rpc('public')")[0][0]
    assert again == n
    r = rpc(c, "authenticated", claims("authenticated", u), "consume_credits_v2",
            "p_user_id := %s, p_amount := %s", (u, 1))[0][0]
    assert r["total_balance"] == 3
    expect_sqlstate("42501", rpc, c, "authenticated", claims("authenticated", u), "add_purchased_credits",
                    "p_user_id := %s, p_amount := %s", (u, 1))
    # End users cannot unexpose/expose.
    expect_sqlstate("42501", postgrest_call, c, "authenticated", claims("authenticated", u),
                    "SELECT billing.unexpose_rpc('public')")
    expose(conn)


def test_expose_into_another_schema_is_independent():
    conn = connect()
    n = expose(conn)
    q(conn, "DROP SCHEMA IF EXISTS pgb_api CASCADE")
    q(conn, "CREATE SCHEMA pgb_api")
    try:
        assert q(conn, "SELECT billing.expose_rpc('pgb_api')") == [(n,)]
        q(conn, "GRANT USAGE ON SCHEMA pgb_api TO authenticated")
        u = funded_user(conn, pur=3)
        c = connect()
        r = postgrest_call(c, "authenticated", claims("authenticated", u),
                           "SELECT pgb_api.consume_credits_v2(p_user_id := %s, p_amount := %s)", (u, 1))[0][0]
        assert r["total_balance"] == 2
        assert q(conn, "SELECT billing.unexpose_rpc('pgb_api')") == [(n,)]
        # public's wrappers are untouched.
        assert q(conn, """SELECT count(*) FROM pg_proc p JOIN billing.api_catalog() c ON c.function_name = p.proname
                           WHERE p.pronamespace = 'public'::regnamespace""") == [(n,)]
        r = rpc(c, "authenticated", claims("authenticated", u), "consume_credits_v2",
                "p_user_id := %s, p_amount := %s", (u, 1))[0][0]
        assert r["total_balance"] == 1
    finally:
        q(conn, "DROP SCHEMA IF EXISTS pgb_api CASCADE")
