"""Bad-input sweep over the credit functions (SPEC 3, 4, 11): every call either succeeds or fails
with a documented SQLSTATE, never XX000, never a lost connection, and a failed call changes
nothing."""
import uuid

import psycopg2

from pgb_testlib import connect, expect_sqlstate, postgrest_call, q

# SQLSTATEs a credit function may raise (SPEC 3).
DOCUMENTED = {"22023", "22003", "P0002", "42501", "PT402", "PT409", "PT410", "PT429"}
# Raised by the casts this test writes itself (malformed literals), before the function runs.
OWN_CAST = {"22P02", "22003"}

MEGABYTE = "x" * (1024 * 1024)
MEGABYTE_MIXED = ("a\u00e9\u20ac\U0001F600" * (1024 * 1024 // 10))[: 1024 * 1024]
INJECTION = "'; DROP TABLE billing.accounts; --"

TEXT_VALUES = [
    None,
    "",
    " ",
    MEGABYTE,
    MEGABYTE_MIXED,
    INJECTION,
    "$$; DROP TABLE billing.accounts; $$",
    "\\'; SELECT pg_sleep(10); --",
    "\u202e",  # right-to-left override
    "\U0001F4A5\U0001F600\u200d\U0001F469",  # emoji, zero-width joiner
    "e\u0301\u0301\u0301",  # combining marks
    "\ufeff\u2028\u2029",
    "purchase",
]
INT_VALUES = [None, 0, -1, 1, 2147483647, -2147483648]
INT_CASTS = ["2147483648", "1e3", "abc", "1; DROP TABLE billing.accounts"]  # my own casts: 22003 / 22P02
TS_VALUES = [None, "infinity", "-infinity", "1970-01-01 00:00:00+00", "2999-12-31 23:59:59+00"]

FUNCTIONS = {
    # name: [(parameter, type)]
    "consume_credits_v2": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_description", "text"),
                           ("p_reference_id", "text"), ("p_idempotency_key", "text")],
    "add_subscription_credits": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_description", "text"),
                                 ("p_reference_id", "text"), ("p_idempotency_key", "text")],
    "add_purchased_credits": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_description", "text"),
                              ("p_reference_id", "text"), ("p_idempotency_key", "text")],
    "expire_subscription_credits": [("p_user_id", "uuid"), ("p_description", "text"), ("p_idempotency_key", "text")],
    "renew_subscription_credits": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_period_end", "timestamptz"),
                                   ("p_idempotency_key", "text")],
    "refund_credits": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_reason", "text"),
                       ("p_reference_id", "text"), ("p_idempotency_key", "text")],
    "clawback_credits_from_transaction": [("p_transaction_id", "uuid"), ("p_reason", "text")],
    "get_user_credits": [("p_user_id", "uuid")],
    "get_credit_history": [("p_user_id", "uuid"), ("p_limit", "integer"), ("p_before", "timestamptz")],
    "increment_credits_with_log": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_transaction_type", "text"),
                                   ("p_description", "text"), ("p_reference_id", "text")],
    "decrement_credits_with_log": [("p_user_id", "uuid"), ("p_amount", "integer"), ("p_transaction_type", "text"),
                                   ("p_description", "text"), ("p_reference_id", "text")],
    "record_webhook_event": [("p_event_id", "text"), ("p_event_type", "text"), ("p_user_id", "uuid")],
}
SET_RETURNING = {"get_user_credits", "get_credit_history"}
# Required parameters: NULL must give 22023 (SPEC 3).
REQUIRED = {"p_user_id", "p_amount", "p_transaction_id", "p_event_id", "p_event_type"}
OPTIONAL_USER = {("record_webhook_event", "p_user_id")}
AMOUNTS = {"p_amount"}


class Raw:
    """A literal this test casts itself (may fail with 22P02/22003 before the call)."""

    def __init__(self, text):
        self.text = text


def snapshot(conn):
    return q(conn, """
        SELECT (SELECT md5(coalesce(string_agg(a::text, ',' ORDER BY a.user_id), '')) FROM billing.accounts a),
               (SELECT count(*) FROM billing.credit_transactions),
               (SELECT coalesce(max(id), 0) FROM billing.credit_transactions),
               (SELECT count(*) FROM billing.credit_expiration_events),
               (SELECT count(*) FROM billing.idempotency_keys),
               (SELECT count(*) FROM billing.clawbacks),
               (SELECT count(*) FROM billing.webhook_events)""")[0]


def call(conn, fn, args):
    """args: list of (parameter, type, value). Named arguments, as PostgREST sends them."""
    parts, params = [], []
    for name, typ, val in args:
        if isinstance(val, Raw):
            parts.append(f"{name} := (%s)::{typ}")
            params.append(val.text)
        else:
            parts.append(f"{name} := (%s)::{typ}")
            params.append(val)
    sql = (f"SELECT * FROM billing.{fn}({', '.join(parts)})" if fn in SET_RETURNING
           else f"SELECT billing.{fn}({', '.join(parts)})")
    return q(conn, sql, params)


def values_for(typ):
    if typ == "uuid":
        return [None, uuid.uuid4(), uuid.UUID(int=0), Raw("not-a-uuid"), Raw(INJECTION)]
    if typ == "integer":
        return INT_VALUES + [Raw(v) for v in INT_CASTS]
    if typ == "timestamptz":
        return TS_VALUES
    return TEXT_VALUES


def label(v):
    if isinstance(v, Raw):
        return f"raw:{v.text[:30]!r}"
    if isinstance(v, str) and len(v) > 40:
        return f"<{len(v)} chars>"
    return repr(v)


def expected_codes(fn, param, typ, value):
    """The outcomes allowed for one bad argument: 'ok' or SQLSTATEs. Stricter than DOCUMENTED
    where SPEC 3 says exactly what happens."""
    if isinstance(value, Raw):
        return OWN_CAST
    if value == uuid.UUID(int=0):  # the nil uuid may be a real account after other calls
        return DOCUMENTED | {"ok"}
    if value is None and param in REQUIRED and (fn, param) not in OPTIONAL_USER:
        return {"22023"}
    if param in AMOUNTS and value is not None and value <= 0:
        return {"22023"}
    if param == "p_transaction_id" and isinstance(value, uuid.UUID):
        return {"P0002"}
    if param == "p_user_id" and isinstance(value, uuid.UUID) and fn == "refund_credits":
        return {"P0002"}
    if param == "p_user_id" and isinstance(value, uuid.UUID) and fn in ("consume_credits_v2", "decrement_credits_with_log"):
        return {"P0002", "PT402"}
    if param == "p_limit" and value is not None and value <= 0:
        return {"22023"}
    if param == "p_event_id" and value in ("", " "):
        return {"22023", "ok"}
    return DOCUMENTED | {"ok"}


def run_one(conn, fn, args, allowed, where):
    before = snapshot(conn)
    try:
        rows = call(conn, fn, args)
        outcome, err = "ok", None
    except psycopg2.OperationalError as e:  # lost connection
        raise AssertionError(f"{where}: connection lost: {e}") from e
    except psycopg2.Error as e:
        outcome, err = e.pgcode, e
        rows = None
    assert not conn.closed, f"{where}: connection closed"
    assert q(conn, "SELECT 1") == [(1,)], f"{where}: connection unusable"
    assert outcome != "XX000", f"{where}: XX000 internal error: {err.pgerror if err else ''}"
    assert outcome in allowed, (
        f"{where}: got {outcome} ({err.pgerror.strip()[:300] if err else rows!r:.300}), allowed {sorted(allowed)}")
    if outcome != "ok":
        after = snapshot(conn)
        assert after == before, f"{where}: failed with {outcome} but changed data: {before} -> {after}"
    return outcome, rows


def test_bad_input_sweep():
    conn = connect()
    calls = 0
    outcomes = {}
    for fn, params in FUNCTIONS.items():
        # A fresh user per function, so one function's grants cannot push another's integer
        # result out of range.
        user = uuid.uuid4()
        q(conn, "SELECT billing.add_subscription_credits(%s, 1000000)", (user,))
        purchase = q(conn, "SELECT billing.add_purchased_credits(%s, 1000000, 'sweep')", (user,))[0][0]["transaction_id"]
        base_values = {
            ("uuid", "p_user_id"): user,
            ("uuid", "p_transaction_id"): uuid.UUID(purchase),
            ("integer", "p_amount"): 1,
            ("integer", "p_limit"): 5,
            ("timestamptz", "p_period_end"): None,
            ("timestamptz", "p_before"): None,
            ("text", "p_transaction_type"): "usage",
            ("text", "p_event_type"): "invoice.paid",
        }
        for i, (param, typ) in enumerate(params):
            for value in values_for(typ):
                args = []
                for j, (p2, t2) in enumerate(params):
                    if j == i:
                        args.append((p2, t2, value))
                    elif p2 == "p_event_id":
                        args.append((p2, t2, f"evt_sweep_{uuid.uuid4()}"))
                    else:
                        args.append((p2, t2, base_values.get((t2, p2))))
                where = f"billing.{fn}({param} := {label(value)})"
                outcome, rows = run_one(conn, fn, args, expected_codes(fn, param, typ, value), where)
                outcomes.setdefault(outcome, 0)
                outcomes[outcome] += 1
                calls += 1
                # Text stored verbatim (the injection strings are data, not SQL).
                if (outcome == "ok" and fn == "add_purchased_credits" and param in ("p_description", "p_reference_id")
                        and isinstance(value, str)):
                    col = param[2:]
                    stored = q(conn, f"SELECT {col} FROM billing.credit_transactions WHERE user_id = %s "
                                     "AND operation_id = %s", (user, uuid.UUID(rows[0][0]["transaction_id"])))
                    # An empty reference is normalised to NULL (like an empty key); anything else verbatim.
                    ok_values = [[(value,)], [(None,)]] if (param == "p_reference_id" and value == "") else [[(value,)]]
                    assert stored in ok_values, f"{where}: stored {col} differs: {str(stored)[:100]}"
    assert calls > 300, calls
    assert outcomes.get("ok", 0) > 50 and outcomes.get("22023", 0) > 20, outcomes
    # The tables are still there and consistent.
    assert q(conn, "SELECT to_regclass('billing.accounts') IS NOT NULL") == [(True,)]
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger()") == [(0,)]
    r = q(conn, "SELECT billing.consume_credits_v2(%s, 1)", (user,))[0][0]
    assert r["success"] is True
    # The legacy integer aliases were really exercised (not all 22003).
    assert outcomes.get("22003", 0) < 20, outcomes


def test_bad_input_through_postgrest_wrappers():
    """The same kind of bad input from an end user through the public wrappers."""
    conn = connect()
    q(conn, "SELECT billing.expose_rpc('public')")
    user = uuid.uuid4()
    q(conn, "SELECT billing.add_purchased_credits(%s, 100)", (user,))
    c = connect()
    cl = {"role": "authenticated", "sub": str(user)}
    cases = [
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s)", (None, 1), {"22023", "42501"}),
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s)", (user, None), {"22023"}),
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s)", (user, 0), {"22023"}),
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s)", (user, -1), {"22023"}),
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s)", (user, 2147483647), {"PT402"}),
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s, p_idempotency_key := %s)",
         (user, 1, MEGABYTE), {"22023", "ok"}),
        ("SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s, p_description := %s)",
         (user, 1, INJECTION), {"ok"}),
        ("SELECT public.decrement_credits_with_log(p_user_id := %s, p_amount := %s, p_transaction_type := %s)",
         (user, 1, None), {"22023", "ok"}),
        ("SELECT * FROM public.get_credit_history(p_user_id := %s, p_limit := %s)", (user, -1), {"22023"}),
        ("SELECT * FROM public.get_credit_history(p_user_id := %s, p_limit := %s)", (user, 2147483647), {"22023", "ok"}),
        ("SELECT * FROM public.get_user_credits(p_user_id := %s)", (None,), {"22023", "42501"}),
        ("SELECT * FROM public.get_user_credits(p_user_id := %s::uuid)", ("not-a-uuid",), {"22P02"}),
    ]
    for sql, params, allowed in cases:
        before = snapshot(conn)
        try:
            postgrest_call(c, "authenticated", cl, sql, params)
            outcome = "ok"
        except psycopg2.OperationalError as e:
            raise AssertionError(f"{sql} {params!r:.80}: connection lost") from e
        except psycopg2.Error as e:
            outcome = e.pgcode
        assert outcome in allowed, f"{sql} {params!r:.80}: got {outcome}, allowed {sorted(allowed)}"
        if outcome != "ok":
            assert snapshot(conn) == before, f"{sql}: failed but changed data"
        assert q(c, "SELECT current_user") == [("postgres",)]
    sub, pur = q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts "
                       "WHERE user_id = %s", (user,))[0]
    assert sub == 0 and 97 <= pur <= 99, (sub, pur)
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (user,)) == [(0,)]


def test_integer_overflow_of_legacy_results():
    """Balances are bigint; the legacy aliases return integer. A total above 2^31-1 must give
    22003 (numeric_value_out_of_range) and change nothing, never XX000; consume keeps working."""
    conn = connect()
    u = uuid.uuid4()
    for i in range(3):
        r = q(conn, "SELECT billing.add_purchased_credits(%s, 2147483647)", (u,))[0][0]
        assert r["purchased_credits_balance"] == 2147483647 * (i + 1), r
    for i in range(2):
        r = q(conn, "SELECT billing.add_subscription_credits(%s, 2147483647)", (u,))[0][0]
    assert r["total_balance"] == 2147483647 * 5, r
    total = 2147483647 * 5
    ledger = q(conn, "SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s", (u,))[0][0]
    assert ledger == 5

    def state():
        return q(conn, "SELECT subscription_credits_balance, purchased_credits_balance, "
                       "(SELECT count(*) FROM billing.credit_transactions WHERE user_id = %s) "
                       "FROM billing.accounts WHERE user_id = %s", (u, u))[0]

    st = state()
    for sql, params in [
        ("SELECT billing.increment_credits_with_log(%s, %s, %s)", (u, 1, "purchase")),
        ("SELECT billing.increment_credits_with_log(%s, %s, %s)", (u, 2147483647, "bonus")),
        ("SELECT billing.decrement_credits_with_log(%s, %s)", (u, 1)),
    ]:
        e = expect_sqlstate("22003", q, conn, sql, params)
        assert e.pgcode != "XX000"
        assert state() == st, f"{sql}: failed with 22003 but changed the balances/ledger"
    # consume (jsonb result) still works with the large balance.
    r = q(conn, "SELECT billing.consume_credits_v2(%s, 2147483647)", (u,))[0][0]
    assert r["success"] is True and r["subscription_used"] == 2147483647 and r["purchased_used"] == 0, r
    assert r["total_balance"] == total - 2147483647, r
    r = q(conn, "SELECT billing.consume_credits_v2(%s, 5)", (u,))[0][0]
    assert r["total_balance"] == total - 2147483647 - 5, r
    assert q(conn, "SELECT * FROM billing.get_user_credits(%s)", (u,)) == [
        (u, 2147483647 - 5, 2147483647 * 3, total - 2147483647 - 5, total - 2147483647 - 5)]  # + available (0.4.0)
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]
    # Once the total fits an integer again, the legacy aliases work.
    q(conn, "SELECT billing.consume_credits_v2(%s, 2147483647)", (u,))
    q(conn, "SELECT billing.consume_credits_v2(%s, 2147483647)", (u,))
    q(conn, "SELECT billing.consume_credits_v2(%s, 2147483647)", (u,))
    left = q(conn, "SELECT subscription_credits_balance + purchased_credits_balance FROM billing.accounts WHERE user_id = %s", (u,))[0][0]
    assert left == 2147483647 - 5, left
    assert q(conn, "SELECT billing.decrement_credits_with_log(%s, 1)", (u,)) == [(left - 1,)]
    assert q(conn, "SELECT billing.increment_credits_with_log(%s, 1, 'purchase')", (u,)) == [(left,)]
    assert q(conn, "SELECT count(*) FROM billing.verify_ledger(%s)", (u,)) == [(0,)]


def test_idempotency_key_reuse_conflicts_change_nothing():
    """A key reused with other arguments (or by another function) is PT409 and changes nothing."""
    conn = connect()
    u = uuid.uuid4()
    first = q(conn, "SELECT billing.add_purchased_credits(%s, 10, 'pack', 'pi_9', 'k-conflict')", (u,))[0][0]
    assert first["purchased_credits_balance"] == 10
    replay = q(conn, "SELECT billing.add_purchased_credits(%s, 10, 'pack', 'pi_9', 'k-conflict')", (u,))[0][0]
    assert replay == first
    for sql, params in [
        ("SELECT billing.add_purchased_credits(%s, 11, 'pack', 'pi_9', 'k-conflict')", (u,)),
        ("SELECT billing.add_purchased_credits(%s, 10, 'other', 'pi_9', 'k-conflict')", (u,)),
        ("SELECT billing.add_purchased_credits(%s, 10, 'pack', 'pi_10', 'k-conflict')", (u,)),
        ("SELECT billing.add_subscription_credits(%s, 10, 'pack', 'pi_9', 'k-conflict')", (u,)),
        ("SELECT billing.consume_credits_v2(%s, 10, 'pack', 'pi_9', 'k-conflict')", (u,)),
        ("SELECT billing.refund_credits(%s, 10, 'pack', 'pi_9', 'k-conflict')", (u,)),
        ("SELECT billing.expire_subscription_credits(%s, 'pack', 'k-conflict')", (u,)),
        ("SELECT billing.renew_subscription_credits(%s, 10, NULL, 'k-conflict')", (u,)),
    ]:
        before = snapshot(conn)
        expect_sqlstate("PT409", q, conn, sql, params)
        assert snapshot(conn) == before, f"{sql}: PT409 but data changed"
    assert q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts "
                   "WHERE user_id = %s", (u,)) == [(0, 10)]
    # The same key for another user is independent.
    other = uuid.uuid4()
    r = q(conn, "SELECT billing.add_purchased_credits(%s, 11, 'pack', 'pi_9', 'k-conflict')", (other,))[0][0]
    assert r["purchased_credits_balance"] == 11 and r["transaction_id"] != first["transaction_id"]


def test_clawback_of_a_non_purchase_is_refused():
    conn = connect()
    u = uuid.uuid4()
    grant = q(conn, "SELECT billing.add_subscription_credits(%s, 10)", (u,))[0][0]["transaction_id"]
    q(conn, "SELECT billing.add_purchased_credits(%s, 10)", (u,))
    use = q(conn, "SELECT billing.consume_credits_v2(%s, 12)", (u,))[0][0]["transaction_id"]
    refund = q(conn, "SELECT billing.refund_credits(%s, 3)", (u,))[0][0]["transaction_id"]
    for tx in (grant, use, refund):
        before = snapshot(conn)
        try:
            q(conn, "SELECT billing.clawback_credits_from_transaction(%s)", (tx,))
            raise AssertionError(f"clawback of non-purchase {tx} succeeded")
        except psycopg2.Error as e:
            assert e.pgcode in ("22023", "P0002"), f"clawback of non-purchase: {e.pgcode} {e.pgerror}"
        assert snapshot(conn) == before
    assert q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts "
                   "WHERE user_id = %s", (u,)) == [(0, 11)]


def test_legacy_increment_accepts_any_transaction_type():
    """SPEC 4: increment_credits_with_log's type 'purchase' goes to the purchased pool, anything
    else to the subscription pool. Legacy callers pass free-form types."""
    conn = connect()
    failures = []
    for ty in ("bonus", "admin-grant", "Bonus", "subscription renewal", "promo:2024", "r\u00e9compense"):
        u = uuid.uuid4()
        try:
            total = q(conn, "SELECT billing.increment_credits_with_log(%s, 7, %s)", (u, ty))[0][0]
            bal = q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts "
                          "WHERE user_id = %s", (u,))
            if total != 7 or bal != [(7, 0)]:
                failures.append(f"{ty!r}: total {total}, balances {bal}")
        except psycopg2.Error as e:
            assert e.pgcode != "XX000", e.pgerror
            failures.append(f"{ty!r}: {e.pgcode} {e.pgerror.strip()}")
    u = uuid.uuid4()
    assert q(conn, "SELECT billing.increment_credits_with_log(%s, 5, 'purchase')", (u,)) == [(5,)]
    assert q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts "
                   "WHERE user_id = %s", (u,)) == [(0, 5)]
    assert not failures, "increment_credits_with_log refused legacy transaction types: " + "; ".join(failures)
