"""Credit grants (issue 13, 0.4.0) through PostgREST-style calls: what an end user may do with
grants, and what stays the backend's.

Every call is made as PostgREST makes it (tests/pgb_testlib.py postgrest_call): one transaction,
set_config('role'), set_config('request.jwt.claims'), then the `public.` wrapper of
billing.expose_rpc with named arguments (or, where said, the billing function itself).
  - an end user spends their own grants with consume_credits (with and without a feature), sees
    which grants paid, replays with an idempotency key, gets PT402 when short and may overdraw
    only by the limit the backend set;
  - an end user reads their own grants: get_credit_grants, balance_at, get_user_credits'
    available and debt, and SELECT on billing.credit_grants shows their rows only;
  - an end user can neither call grant_credits, void_grant nor set_overdraft_limit (42501, on
    their own account too, wrapper or billing function) nor read or spend another user's grants;
    anon gets nothing; service_role does all of it."""
import datetime
import uuid

from pgb_testlib import claims, connect, end_user_rows, expect_sqlstate, new_user, postgrest_call, q

END_USER_FUNCTIONS = ("consume_credits", "get_credit_grants", "balance_at")
SERVICE_FUNCTIONS = ("grant_credits", "void_grant", "set_overdraft_limit")


def expose(conn):
    q(conn, "SELECT billing.expose_rpc('public')")


def rpc(conn, role, cl, fn, named, params=()):
    return postgrest_call(conn, role, cl, f"SELECT public.{fn}({named})", params)


def as_user(conn, u, sql, params=()):
    return postgrest_call(conn, "authenticated", claims("authenticated", u), sql, params)


def user_with_grants(conn):
    """A user with a chat-only promotion (priority 30, 14 days), a purchase (50) and a grant
    starting tomorrow. Returns (user, {name: grant_id})."""
    u = new_user()
    g = {}
    g["promo"] = q(conn, """SELECT billing.grant_credits(%s, 30, 'promotional', p_scope := '{chat}',
                                                         p_expires_at := now() + interval '14 days')""", (u,))[0][0]["grant_id"]
    g["purchase"] = q(conn, "SELECT billing.grant_credits(%s, 50, 'purchased')", (u,))[0][0]["grant_id"]
    g["later"] = q(conn, "SELECT billing.grant_credits(%s, 20, 'purchased', p_effective_at := now() + interval '1 day')",
                   (u,))[0][0]["grant_id"]
    return u, {k: uuid.UUID(str(v)) for k, v in g.items()}


def state(conn, u):
    """What an end user must not be able to change: grants, ledger, limit and debt."""
    return (q(conn, """SELECT id, remaining, voided_at FROM billing.credit_grants WHERE user_id = %s ORDER BY id""", (u,)),
            q(conn, "SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s", (u,))[0][0],
            q(conn, "SELECT overdraft_limit, debt FROM billing.accounts WHERE user_id = %s", (u,)))


def test_grant_wrappers_privileges():
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


def test_end_user_consumes_own_grants():
    conn = connect()
    expose(conn)
    u, g = user_with_grants(conn)
    c = connect()
    cl = claims("authenticated", u)
    # A chat spending takes the chat-only promotion first (priority 30 < purchased 50), then the
    # purchase; the grant starting tomorrow is not spendable.
    r = rpc(c, "authenticated", cl, "consume_credits", "p_user_id := %s, p_amount := %s, p_feature := %s", (u, 40, "chat"))[0][0]
    assert r["consumed"] == 40 and r["feature"] == "chat" and r["debt_added"] == 0, r
    assert [(uuid.UUID(x["grant_id"]), x["category"], x["amount"]) for x in r["grants"]] == \
        [(g["promo"], "promotional", 30), (g["purchase"], "purchased", 10)], r
    # The pools count live grants only, as get_user_credits does: the grant starting tomorrow not yet.
    assert (r["purchased_credits_balance"], r["total_balance"], r["available"], r["debt"]) == (40, 40, 40, 0), r
    assert as_user(c, u, "SELECT purchased_credits_balance, total_balance, available FROM public.get_user_credits(p_user_id := %s)",
                   (u,)) == [(40, 40, 40)]
    # Without a feature only unscoped grants pay; an idempotency key replays the first result.
    args = "p_user_id := %s, p_amount := %s, p_reference_id := %s, p_idempotency_key := %s"
    r1 = rpc(c, "authenticated", cl, "consume_credits", args, (u, 15, "img-1", "grants-k1"))[0][0]
    r2 = rpc(c, "authenticated", cl, "consume_credits", args, (u, 15, "img-1", "grants-k1"))[0][0]
    assert r1 == r2 and [uuid.UUID(x["grant_id"]) for x in r1["grants"]] == [g["purchase"]] and r1["available"] == 25, (r1, r2)
    expect_sqlstate("PT409", rpc, c, "authenticated", cl, "consume_credits", args, (u, 16, "img-1", "grants-k1"))
    # Not enough (the grant of tomorrow does not count): PT402, nothing spent.
    before = state(conn, u)
    expect_sqlstate("PT402", rpc, c, "authenticated", cl, "consume_credits", "p_user_id := %s, p_amount := %s", (u, 26))
    assert state(conn, u) == before
    # The billing function itself works the same for the user's own account.
    r = as_user(c, u, "SELECT billing.consume_credits(p_user_id := %s, p_amount := %s, p_feature := 'video')", (u, 5))[0][0]
    assert r["consumed"] == 5 and r["available"] == 20, r
    # An overdraft the backend allowed: the user may go 10 below zero, and no further.
    q(conn, "SELECT billing.set_overdraft_limit(%s, 10)", (u,))
    r = rpc(c, "authenticated", cl, "consume_credits", "p_user_id := %s, p_amount := %s", (u, 28))[0][0]
    # 20 left now, 8 more as debt (the grant starting tomorrow neither pays nor counts yet)
    assert (r["debt_added"], r["debt"], r["total_balance"], r["available"]) == (8, 8, -8, -8), r
    expect_sqlstate("PT402", rpc, c, "authenticated", cl, "consume_credits", "p_user_id := %s, p_amount := %s", (u, 3))
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]


def test_end_user_reads_own_grants():
    conn = connect()
    expose(conn)
    u, g = user_with_grants(conn)
    other, og = user_with_grants(conn)
    q(conn, "SELECT billing.void_grant(%s, 'chargeback')", (g["purchase"],))
    c = connect()
    cl = claims("authenticated", u)
    rows = postgrest_call(c, "authenticated", cl, """SELECT grant_id, category, amount, remaining, status, scope
                                                      FROM public.get_credit_grants(p_user_id := %s)""", (u,))
    got = {r[0]: r[1:] for r in rows}
    assert got == {g["promo"]: ("promotional", 30, 30, "active", ["chat"]),
                   g["later"]: ("purchased", 20, 20, "scheduled", None)}, rows
    rows = postgrest_call(c, "authenticated", cl, """SELECT grant_id, status FROM public.get_credit_grants(
                                                         p_user_id := %s, p_include_spent := true)""", (u,))
    assert dict(rows).get(g["purchase"]) == "voided", rows
    # balance_at now and before the void, from the ledger.
    voided_at = q(conn, "SELECT voided_at FROM billing.credit_grants WHERE id = %s", (g["purchase"],))[0][0]
    now = rpc(c, "authenticated", cl, "balance_at", "p_user_id := %s, p_at := %s", (u, voided_at + datetime.timedelta(seconds=1)))[0][0]
    assert now["user_id"] == str(u) and now["purchased_credits_balance"] == 30 and now["debt"] == 0, now
    then = rpc(c, "authenticated", cl, "balance_at", "p_user_id := %s, p_at := %s", (u, voided_at - datetime.timedelta(microseconds=1)))[0][0]
    assert {uuid.UUID(x["grant_id"]): x["remaining"] for x in then["grants"]}.get(g["purchase"]) == 50, then
    # get_user_credits and the view: available (unscoped credits spendable now: the chat-only
    # promotion is not).
    row = postgrest_call(c, "authenticated", cl, """SELECT purchased_credits_balance, total_balance, available
                                                      FROM public.get_user_credits(p_user_id := %s)""", (u,))
    assert row == [(30, 30, 0)], row
    assert postgrest_call(c, "authenticated", cl, "SELECT user_id, available FROM billing.user_credits") == end_user_rows(conn, [(u, 0)])
    # The table itself, under row security: the user's own grants only.
    mine = postgrest_call(c, "authenticated", cl, "SELECT user_id, id FROM billing.credit_grants")
    assert sorted(r[1] for r in mine) == sorted(end_user_rows(conn, list(g.values()))), mine
    assert {r[0] for r in mine} == set(end_user_rows(conn, [u])), mine
    assert postgrest_call(c, "authenticated", cl, "SELECT count(*) FROM billing.credit_grants WHERE user_id = %s",
                          (other,)) == [(0,)]
    assert postgrest_call(c, "authenticated", cl, "SELECT count(*) FROM billing.credit_grants WHERE id = %s",
                          (og["promo"],)) == [(0,)]
    # Ledger rows name their grant, and the user sees their own.
    ids = postgrest_call(c, "authenticated", cl, "SELECT DISTINCT grant_id FROM billing.credit_transactions WHERE grant_id IS NOT NULL")
    assert {r[0] for r in ids} == set(end_user_rows(conn, list(g.values()))), ids


def test_end_user_cannot_manage_grants():
    conn = connect()
    expose(conn)
    u, g = user_with_grants(conn)
    other, og = user_with_grants(conn)
    c = connect()
    cl = claims("authenticated", u)
    before, before_other = state(conn, u), state(conn, other)
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    attempts = [
        ("grant_credits", "p_user_id := %s, p_amount := %s, p_category := %s", (u, 1000, "promotional")),
        ("grant_credits", "p_user_id := %s, p_amount := %s, p_category := %s, p_expires_at := %s", (u, 5, "refund", future)),
        ("grant_credits", "p_user_id := %s, p_amount := %s, p_category := %s", (other, 1000, "purchased")),
        ("void_grant", "p_grant_id := %s", (g["purchase"],)),
        ("void_grant", "p_grant_id := %s, p_reason := %s", (og["purchase"],  "mine now")),
        ("set_overdraft_limit", "p_user_id := %s, p_limit := %s", (u, 1000000)),
        ("set_overdraft_limit", "p_user_id := %s, p_limit := %s", (other, 0)),
    ]
    for fn, named, params in attempts:
        expect_sqlstate("42501", rpc, c, "authenticated", cl, fn, named, params)
        expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, f"SELECT billing.{fn}({named})", params)
        # A JWT claiming service_role for an authenticated request changes nothing.
        expect_sqlstate("42501", rpc, c, "authenticated", {"role": "service_role", "sub": str(u)}, fn, named, params)
    # No direct writes to the grants table either.
    for stmt, params in (("UPDATE billing.credit_grants SET remaining = amount WHERE user_id = %s", (u,)),
                         ("UPDATE billing.accounts SET overdraft_limit = 1000000 WHERE user_id = %s", (u,)),
                         ("DELETE FROM billing.credit_grants WHERE user_id = %s", (u,)),
                         ("INSERT INTO billing.credit_grants (user_id, id, category, amount, remaining, priority, effective_at) "
                          "VALUES (%s, gen_random_uuid(), 'promotional', 1000, 1000, 0, now())", (u,))):
        expect_sqlstate("42501", postgrest_call, c, "authenticated", cl, stmt, params)
    assert state(conn, u) == before and state(conn, other) == before_other


def test_other_users_grants_refused():
    conn = connect()
    expose(conn)
    u, _ = user_with_grants(conn)
    other, og = user_with_grants(conn)
    c = connect()
    before = state(conn, other)
    for role, cl in (("authenticated", claims("authenticated", u)), ("anon", {"role": "anon"}),
                     ("anon", claims("anon", other))):
        expect_sqlstate("42501", rpc, c, role, cl, "consume_credits", "p_user_id := %s, p_amount := %s, p_feature := %s",
                        (other, 1, "chat"))
        expect_sqlstate("42501", postgrest_call, c, role, cl,
                        "SELECT * FROM public.get_credit_grants(p_user_id := %s, p_include_spent := true)", (other,))
        expect_sqlstate("42501", rpc, c, role, cl, "balance_at", "p_user_id := %s, p_at := now()", (other,))
        expect_sqlstate("42501", postgrest_call, c, role, cl,
                        "SELECT billing.consume_credits(p_user_id := %s, p_amount := %s)", (other, 1))
        for fn, named, params in (("grant_credits", "p_user_id := %s, p_amount := %s, p_category := %s", (other, 1, "refund")),
                                  ("void_grant", "p_grant_id := %s", (og["promo"],)),
                                  ("set_overdraft_limit", "p_user_id := %s, p_limit := %s", (other, 5))):
            expect_sqlstate("42501", rpc, c, role, cl, fn, named, params)
    # anon reads no grant at all (row security).
    assert postgrest_call(c, "anon", {"role": "anon"}, "SELECT count(*) FROM billing.credit_grants") == [(0,)]
    assert state(conn, other) == before


def test_service_role_manages_grants():
    conn = connect()
    expose(conn)
    u, g = user_with_grants(conn)
    c = connect()
    sr = claims("service_role")
    r = rpc(c, "service_role", sr, "grant_credits",
            "p_user_id := %s, p_amount := %s, p_category := %s, p_priority := %s, p_idempotency_key := %s",
            (u, 7, "refund", 5, "grants-sr-1"))[0][0]
    assert (r["amount"], r["category"], r["priority"]) == (7, "refund", 5), r
    assert rpc(c, "service_role", sr, "grant_credits",
               "p_user_id := %s, p_amount := %s, p_category := %s, p_priority := %s, p_idempotency_key := %s",
               (u, 7, "refund", 5, "grants-sr-1"))[0][0] == r
    v = rpc(c, "service_role", sr, "void_grant", "p_grant_id := %s::uuid, p_reason := %s", (r["grant_id"], "chargeback"))[0][0]
    assert (v["voided_amount"], v["already_voided"], v["user_id"]) == (7, False, str(u)), v
    v2 = rpc(c, "service_role", sr, "void_grant", "p_grant_id := %s::uuid", (r["grant_id"],))[0][0]
    assert (v2["voided_amount"], v2["already_voided"]) == (7, True), v2
    lim = rpc(c, "service_role", sr, "set_overdraft_limit", "p_user_id := %s, p_limit := %s", (u, 50))[0][0]
    assert (lim["overdraft_limit"], lim["debt"]) == (50, 0), lim
    # service_role reads any user's grants and may spend for them.
    assert len(postgrest_call(c, "service_role", sr, "SELECT * FROM public.get_credit_grants(p_user_id := %s)", (u,))) == 3
    r = rpc(c, "service_role", sr, "consume_credits", "p_user_id := %s, p_amount := %s, p_feature := %s", (u, 35, "chat"))[0][0]
    assert r["consumed"] == 35 and uuid.UUID(r["grants"][0]["grant_id"]) == g["promo"], r
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]
