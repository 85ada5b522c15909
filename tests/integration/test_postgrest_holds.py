"""Credit holds (issue 14, 0.5.0) through PostgREST-style calls: what an end user may do with
holds, and what stays the backend's.

Every call is made as PostgREST makes it (tests/pgb_testlib.py postgrest_call): one transaction,
set_config('role'), set_config('request.jwt.claims'), then the `public.` wrapper of
billing.expose_rpc with named arguments (or, where said, the billing function itself).
  - an end user reserves on their own account only (reserve_credits), replays with a key, gets
    PT402 when the credits are held or short; their reads (get_user_credits, the view) show
    available less the holds, and their spending cannot take held credits;
  - an end user sees their own holds only: get_active_holds, SELECT on billing.credit_holds;
  - an end user cannot capture, release, extend or increase any hold (their own included: they
    would pay 0 for a finished job), nor cap holds, nor clean up, nor write the table (42501);
    anon gets nothing; service_role does all of it and the hold resolves once."""
import uuid

from pgb_testlib import claims, connect, end_user_rows, expect_sqlstate, new_user, postgrest_call, q

END_USER_FUNCTIONS = ("reserve_credits", "get_active_holds")
SERVICE_FUNCTIONS = ("capture_hold", "release_hold", "extend_hold", "increase_hold", "set_max_active_holds", "cleanup_holds")


def expose(conn):
    q(conn, "SELECT billing.expose_rpc('public')")


def rpc(conn, role, cl, fn, named, params=()):
    return postgrest_call(conn, role, cl, f"SELECT public.{fn}({named})", params)


def user_with_credits(conn, n=100):
    u = new_user()
    q(conn, "SELECT billing.add_purchased_credits(%s, %s)", (u, n))
    return u


def state(conn, u):
    """What an end user must not be able to change: holds, ledger, held sum, cap."""
    return (q(conn, "SELECT id, amount, status, expires_at, captured_amount FROM billing.credit_holds WHERE user_id = %s ORDER BY id", (u,)),
            q(conn, "SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s", (u,))[0][0],
            q(conn, "SELECT held, max_active_holds, purchased_credits_balance FROM billing.accounts WHERE user_id = %s", (u,)))


def test_hold_wrappers_privileges():
    conn = connect()
    expose(conn)
    for fn in END_USER_FUNCTIONS + SERVICE_FUNCTIONS:
        r = q(conn, """SELECT has_function_privilege('authenticated', p.oid, 'EXECUTE'),
                              has_function_privilege('anon', p.oid, 'EXECUTE'),
                              has_function_privilege('service_role', p.oid, 'EXECUTE')
                         FROM pg_proc p WHERE p.proname = %s AND p.pronamespace = 'public'::regnamespace""", (fn,))
        want = (fn in END_USER_FUNCTIONS, False, True)
        assert r == [want], f"public.{fn} EXECUTE for (authenticated, anon, service_role): {r}, want {want}"
        access = q(conn, "SELECT access FROM billing.api_functions WHERE function_name = %s", (fn,))
        assert access == [("rpc" if fn in END_USER_FUNCTIONS else "service",)], f"{fn}: {access}"
    assert q(conn, "SELECT has_table_privilege('authenticated', 'billing.credit_holds', 'SELECT'), "
                   "has_table_privilege('authenticated', 'billing.credit_holds', 'UPDATE'), "
                   "has_table_privilege('service_role', 'billing.credit_holds', 'SELECT')") == [(True, False, True)]


def test_end_user_reserves_on_own_account():
    conn = connect()
    expose(conn)
    u = user_with_credits(conn)
    c = connect()
    cl = claims("authenticated", u)
    r = rpc(c, "authenticated", cl, "reserve_credits", "p_user_id := %s, p_amount := %s, p_ttl := %s", (u, 60, "2 minutes"))[0][0]
    assert (r["held"], r["available"], r["user_id"]) == (60, 40, str(u)), r
    hold = uuid.UUID(r["hold_id"])
    # Reads show the balance and, apart, what is available.
    assert postgrest_call(c, "authenticated", cl, """SELECT purchased_credits_balance, total_balance, available
                                                      FROM public.get_user_credits(p_user_id := %s)""", (u,)) == [(100, 100, 40)]
    assert postgrest_call(c, "authenticated", cl, "SELECT user_id, available FROM billing.user_credits") == end_user_rows(conn, [(u, 40)])
    # Held credits cannot be spent by the user, on any path.
    for fn, named in (("consume_credits_v2", "p_user_id := %s, p_amount := 41"),
                      ("consume_credits", "p_user_id := %s, p_amount := 41"),
                      ("decrement_credits_with_log", "p_user_id := %s, p_amount := 41"),
                      ("reserve_credits", "p_user_id := %s, p_amount := 41")):
        expect_sqlstate("PT402", rpc, c, "authenticated", cl, fn, named, (u,))
    # A keyed repeat replays the first hold; other arguments with that key are PT409.
    args = "p_user_id := %s, p_amount := %s, p_idempotency_key := %s"
    r1 = rpc(c, "authenticated", cl, "reserve_credits", args, (u, 10, "job-42"))[0][0]
    r2 = rpc(c, "authenticated", cl, "reserve_credits", args, (u, 10, "job-42"))[0][0]
    assert r1 == r2 and r1["held"] == 10, (r1, r2)
    expect_sqlstate("PT409", rpc, c, "authenticated", cl, "reserve_credits", args, (u, 11, "job-42"))
    # The billing function itself works the same for the user's own account.
    r = postgrest_call(c, "authenticated", cl, "SELECT billing.reserve_credits(p_user_id := %s, p_amount := 5)", (u,))[0][0]
    assert r["available"] == 25, r
    # The backend charges the job: 45 of the 60, 15 come back.
    r = q(conn, "SELECT billing.capture_hold(%s, 45, 'render')", (hold,))[0][0]
    assert (r["captured"], r["released"], r["available"], r["already_resolved"]) == (45, 15, 40, False), r
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]


def test_end_user_sees_own_holds_only():
    conn = connect()
    expose(conn)
    u, other = user_with_credits(conn), user_with_credits(conn)
    mine = uuid.UUID(q(conn, "SELECT billing.reserve_credits(%s, 7) ->> 'hold_id'", (u,))[0][0])
    theirs = uuid.UUID(q(conn, "SELECT billing.reserve_credits(%s, 9) ->> 'hold_id'", (other,))[0][0])
    c = connect()
    cl = claims("authenticated", u)
    rows = postgrest_call(c, "authenticated", cl, "SELECT hold_id, amount FROM public.get_active_holds(p_user_id := %s)", (u,))
    assert rows == [(mine, 7)], rows
    assert postgrest_call(c, "authenticated", cl, "SELECT user_id, id, amount FROM billing.credit_holds") == end_user_rows(conn, [(u, mine, 7)])
    assert postgrest_call(c, "authenticated", cl, "SELECT count(*) FROM billing.credit_holds WHERE id = %s", (theirs,)) == [(0,)]
    for role, cl2 in (("authenticated", cl), ("anon", {"role": "anon"}), ("anon", claims("anon", other))):
        expect_sqlstate("42501", postgrest_call, c, role, cl2, "SELECT * FROM public.get_active_holds(p_user_id := %s)", (other,))
        expect_sqlstate("42501", rpc, c, role, cl2, "reserve_credits", "p_user_id := %s, p_amount := %s", (other, 1))
        expect_sqlstate("42501", postgrest_call, c, role, cl2,
                        "SELECT billing.reserve_credits(p_user_id := %s, p_amount := %s)", (other, 1))


def test_end_user_cannot_resolve_holds():
    conn = connect()
    expose(conn)
    u, other = user_with_credits(conn), user_with_credits(conn)
    mine = uuid.UUID(q(conn, "SELECT billing.reserve_credits(%s, 50, '1 minute') ->> 'hold_id'", (u,))[0][0])
    theirs = uuid.UUID(q(conn, "SELECT billing.reserve_credits(%s, 50) ->> 'hold_id'", (other,))[0][0])
    c = connect()
    cl = claims("authenticated", u)
    before, before_other = state(conn, u), state(conn, other)
    attempts = []
    for h in (mine, theirs):
        attempts += [
            ("capture_hold", "p_hold_id := %s, p_amount := %s", (h, 0)),
            ("capture_hold", "p_hold_id := %s, p_amount := %s, p_over := %s", (h, 1, "available")),
            ("release_hold", "p_hold_id := %s", (h,)),
            ("extend_hold", "p_hold_id := %s, p_ttl := %s", (h, "24 hours")),
            ("increase_hold", "p_hold_id := %s, p_delta := %s", (h, 1)),
        ]
    attempts += [("set_max_active_holds", "p_user_id := %s, p_max := %s", (u, None)),
                 ("cleanup_holds", "p_older_than := %s", ("1 day",))]
    for fn, named, params in attempts:
        expect_sqlstate("42501", rpc, c, "authenticated", cl, fn, named, params)
        expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, f"SELECT billing.{fn}({named})", params)
        # A JWT claiming service_role for an authenticated request changes nothing.
        expect_sqlstate("42501", rpc, c, "authenticated", {"role": "service_role", "sub": str(u)}, fn, named, params)
        expect_sqlstate("42501", rpc, c, "anon", {"role": "anon"}, fn, named, params)
    for stmt, params in (("UPDATE billing.credit_holds SET status = 'released' WHERE user_id = %s", (u,)),
                         ("UPDATE billing.credit_holds SET expires_at = now() WHERE user_id = %s", (u,)),
                         ("DELETE FROM billing.credit_holds WHERE user_id = %s", (u,)),
                         ("UPDATE billing.accounts SET held = 0 WHERE user_id = %s", (u,)),
                         ("INSERT INTO billing.credit_holds (user_id, id, amount, expires_at) VALUES (%s, gen_random_uuid(), 1, now())", (u,))):
        expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, stmt, params)
    assert state(conn, u) == before and state(conn, other) == before_other
    # service_role resolves it, once.
    svc = connect()
    sc = {"role": "service_role"}
    r = rpc(svc, "service_role", sc, "capture_hold", "p_hold_id := %s, p_amount := %s", (mine, 20))[0][0]
    assert (r["captured"], r["released"], r["already_resolved"]) == (20, 30, False), r
    r = rpc(svc, "service_role", sc, "release_hold", "p_hold_id := %s", (mine,))[0][0]
    assert (r["status"], r["captured"], r["already_resolved"]) == ("captured", 20, True), r
    assert q(conn, "SELECT purchased_credits_balance, held FROM billing.accounts WHERE user_id = %s", (u,)) == [(80, 0)]
