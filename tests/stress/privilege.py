#!/usr/bin/env python3
"""Part 4 of the reliability harness: the privilege sweep.

Creates anon / authenticated / service_role when absent, exposes the API in public, gives user B
data in every billing table, and then, as end users, tries everything they must not do:
  - every function of schema billing (from pg_proc) and every public wrapper, called PostgREST-
    style (one transaction, set_config('role'), set_config('request.jwt.claims')) as anon, as
    authenticated user A on user B's id, and as authenticated user A whose JWT claims the
    service_role role; service-only functions also as A on A. Arguments come from the
    signature (uuid -> B's id / B's purchase / B's member, integer -> 1, text -> a valid value,
    ...). Each must fail with 42501, except the public reads marked 'anon' in
    billing.api_functions (active widgets only) and billing.current_user_id() (the caller's id);
  - INSERT / UPDATE / DELETE / TRUNCATE / SELECT ... FOR UPDATE on every billing table and view,
    nextval/setval on every billing sequence, and DDL on schema billing: 42501;
  - SELECT from every billing table as A: only A's rows (or the public catalog tables); as
    anon: no user's rows;
  - search_path hijack: a schema `evil` with same-named functions (now, gen_random_uuid,
    current_setting, jsonb_build_object, date_trunc, ...), an aggregate sum(bigint) and operators
    (+, -, =, <, >=, ->> ...) that log every run, put first in search_path (before pg_catalog),
    then every credit function called as a service caller and as an end user: nothing planted
    may run and the results must be right; and the same with types shadowed in pg_temp (temp
    domains named uuid, jsonb, timestamptz, ... whose CHECK logs), created by an end user;
  - checkout attacks: a JWT e-mail with U+212A (Kelvin sign) claiming kate's purchase, a
    stranger's checkout typed with a paying customer's e-mail, a later buyer's purchase of an
    e-mail someone claimed before, and an unconfirmed sign-up with a buyer's e-mail;
  - app tables (issue 11 item 1): a role with CREATE on public plants a view widget_<x>, an enum
    cast to json in a widget table, and a registered resource table swapped for a view, each
    calling its function that tries ALTER ROLE ... SUPERUSER: it must never run as a superuser;
  - events (0.6.0): A and B each hold events (balance.low, limit.reached, subscription.changed),
    a balance rule, a limit rule's state and a consumer's cursor, so the read sweep sees end users
    read only their own events (RLS) and nothing of the other event tables; the new functions
    (set_balance_alert, set_limit_alert, claim_events, ack_events, cleanup_events) are in the
    function sweep; controls: A reads their own events, service_role calls each of them;
  - grants (0.3.0): a role with no billing grants that writes request.jwt.claims (any role can)
    reads no billing table or view (42501); no column holding a claim token is readable by anon
    or authenticated (SELECT col, SELECT *, WHERE col = ...); a role with CREATE on a schema
    plants add_purchased_credits (same signature, then another overload) before expose_rpc:
    expose_rpc refuses (42501) and the planted function never becomes the wrapper; wrappers are
    the extension owner's, and the planter can neither replace nor drop them; service_role may
    run the DBA functions (verify_ledger, register_resource, register_widget_table, expose_rpc,
    unexpose_rpc); an end user calling check_api_rate_limit with 200 distinct 255-character
    endpoints leaves a bounded bucket (at most 33 keys of at most 64 characters); and
    cleanup_api_usage('0') / ('1 hour') from a service caller is 22023 and keeps this hour.
Prints `privilege: N attempts, M allowed`; exits 1 unless every attempt was refused correctly.

Usage: privilege.py (connection from PGHOST/PGPORT/PGUSER/PGDATABASE)."""
import datetime
import json
import sys
import uuid
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import claims, connect, distributed, ensure_roles, fmt, grant_sql_checks, has_grants, postgrest_call, q  # noqa: E402

PUBLIC_CATALOG = {"plans", "api_functions", "resource_types", "widget_tables"}
WIDGET_TYPE = "prvsweep"


class Sweep:
    def __init__(self):
        self.attempts = 0
        self.allowed = []       # an end user did what they must not
        self.wrong_code = []    # refused, but not with 42501
        self.notes = []         # control failures (the sweep itself would be meaningless)

    def refused(self, what, fn, ok_codes=("42501",)):
        """fn must raise 42501."""
        self.attempts += 1
        try:
            res = fn()
        except psycopg2.Error as e:
            if e.pgcode not in ok_codes:
                self.wrong_code.append(f"{what}: {e.pgcode} {(e.pgerror or '').strip().splitlines()[0] if e.pgerror else e}")
            return
        self.allowed.append(f"{what}: succeeded -> {str(res)[:200]}")


def setup(conn):
    ensure_roles(conn)
    q(conn, "SELECT billing.expose_rpc('public')")
    ctx = {"a": uuid.uuid4(), "b": uuid.uuid4()}
    a, b = ctx["a"], ctx["b"]
    ctx["email_b"] = f"b-{b.hex[:12]}@example.com"
    for u in (a, b):
        q(conn, "SELECT billing.add_subscription_credits(%s, 100, 'sweep', NULL, %s)", (u, f"sweep-sub-{u}"))
        r = q(conn, "SELECT billing.add_purchased_credits(%s, 100)", (u,))[0][0]
        q(conn, "SELECT billing.add_purchased_credits(%s, 7)", (u,))
        q(conn, "SELECT billing.consume_credits_v2(%s, 5, 'sweep', 'ref', 'sweep-consume')", (u,))
        q(conn, "SELECT billing.clawback_credits_from_transaction(%s, 'sweep')", (r["transaction_id"],))
        q(conn, "SELECT billing.expire_subscription_credits(%s)", (u,))
        q(conn, "SELECT billing.renew_subscription_credits(%s, 50)", (u,))
        q(conn, "SELECT billing.refund_credits(%s, 3)", (u,))
        q(conn, "SELECT billing.record_webhook_event(%s, 'sweep', %s)", (f"evt-sweep-{u}", u))
        q(conn, "SELECT billing.record_message_usage(%s, 10, 20)", (u,))
        q(conn, "SELECT * FROM billing.check_api_rate_limit(%s, '/sweep')", (u,))
        q(conn, """SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active',
                   p_current_period_end := now() + interval '30 days', p_event_id := %s)""", (u, f"evt-sub-{u}"))
    ctx["tx_b"] = q(conn, "SELECT billing.add_purchased_credits(%s, 11)", (b,))[0][0]["transaction_id"]
    # Events (0.6.0): A and B each have a balance rule that fired (balance.low), a limit rule that
    # fired (limit.reached, limit_alert_state), subscription.changed, and a cursor of a consumer,
    # so billing.events and the tables around it hold rows of B for the read sweep.
    ctx["events"] = bool(q(conn, "SELECT to_regclass('billing.events') IS NOT NULL")[0][0])
    if ctx["events"]:
        q(conn, "SELECT billing.set_limit_alert('tokens_input', 1, 'pro')")
        for u in (a, b):
            av = q(conn, "SELECT subscription_credits_balance + purchased_credits_balance - held - debt FROM billing.accounts "
                         "WHERE user_id = %s", (u,))[0][0]
            q(conn, "SELECT billing.set_balance_alert(%s, %s)", (av, u))
            q(conn, "SELECT billing.consume_credits_v2(%s, 1, 'sweep')", (u,))
            q(conn, "SELECT billing.record_message_usage(%s, 30000, 0)", (u,))
        q(conn, "SELECT billing.set_limit_alert('tokens_input', 1, 'pro', false)")
        q(conn, "SELECT count(*) FROM billing.claim_events('sweep-consumer', 1000)")
        kinds = {r[0] for r in q(conn, "SELECT DISTINCT type FROM billing.events WHERE user_id = %s", (b,))}
        if not {"balance.low", "limit.reached", "subscription.changed"} <= kinds:
            raise RuntimeError(f"setup: user B's events are {sorted(kinds)}")
    # Credit grants (0.4.0): A and B each hold a scoped promotion, a grant starting tomorrow, a
    # voided grant, a consumption with a feature and an overdraft limit, so credit_grants has
    # rows of B for the read sweep; p_grant_id arguments name B's (or, "on A", A's) live grant.
    ctx["grants"] = has_grants(conn)
    for u, name in ((a, "grant_a"), (b, "grant_b")):
        ctx[name] = u
        if not ctx["grants"]:
            continue
        r = q(conn, """SELECT billing.grant_credits(%s, 100, 'promotional', p_scope := '{chat}',
                                                    p_expires_at := now() + interval '14 days')""", (u,))[0][0]
        ctx[name] = uuid.UUID(str(r["grant_id"]))
        q(conn, "SELECT billing.grant_credits(%s, 10, 'purchased', p_effective_at := now() + interval '1 day')", (u,))
        v = q(conn, "SELECT billing.grant_credits(%s, 7, 'refund')", (u,))[0][0]
        q(conn, "SELECT billing.void_grant(%s, 'sweep')", (v["grant_id"],))
        q(conn, "SELECT billing.consume_credits(%s, 5, 'chat')", (u,))
        q(conn, "SELECT billing.set_overdraft_limit(%s, 20)", (u,))
    q(conn, f"""CREATE TABLE IF NOT EXISTS public.widget_{WIDGET_TYPE} (
                  id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, position integer NOT NULL,
                  is_active boolean NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
                  updated_at timestamptz NOT NULL DEFAULT now(), secret text)""")
    # end users read widget tables with their own rights (0.3.0): grant what Supabase's default
    # privileges grant on public tables
    q(conn, f"GRANT SELECT ON public.widget_{WIDGET_TYPE} TO anon, authenticated")
    q(conn, f"INSERT INTO public.widget_{WIDGET_TYPE} (user_id, position, is_active, secret) VALUES "
            "(%s, 1, true, 'public'), (%s, 2, false, 'hidden'), (%s, 1, false, 'hidden-a')", (b, b, a))
    procs = {r[0] for r in q(conn, "SELECT proname FROM pg_proc WHERE pronamespace = 'billing'::regnamespace")}
    ctx["member_b"] = b
    if "upsert_member" in procs:
        try:
            r = q(conn, "SELECT billing.upsert_member(%s, 'pro')", (ctx["email_b"],))[0][0]
            ctx["member_b"] = uuid.UUID(str(r["member_id"]))
        except psycopg2.Error as e:
            print(f"  (upsert_member for the sweep failed: {e.pgcode} {e.pgerror})")
    ctx["profile_b"] = b
    if "upsert_pending_profile" in procs:
        try:
            r = q(conn, "SELECT billing.upsert_pending_profile(%s, 'tok-secret')", (f"p-{ctx['email_b']}",))[0][0]
            ctx["profile_b"] = uuid.UUID(str(r["id"]))
        except psycopg2.Error as e:
            print(f"  (upsert_pending_profile for the sweep failed: {e.pgcode} {e.pgerror})")
    return ctx


TEXT_VALUES = {"p_category": "promotional", "p_feature": "chat", "p_metric": "messages", "p_resource_type": "agents", "p_widget_type": WIDGET_TYPE,
               "p_transaction_type": "purchase", "p_plan_id": "pro", "p_status": "active", "p_schema": "public",
               "p_plan_duration": "monthly", "p_function": "x"}


def arg_value(name, typ, ctx):
    n = (name or "").lower()
    if typ == "uuid":
        if "grant" in n:
            return ctx["grant_b"]
        if "member" in n:
            return ctx["member_b"]
        if "transaction" in n:
            return ctx["tx_b"]
        if n == "p_id":
            return ctx["profile_b"]
        return ctx["b"]
    if typ in ("integer", "bigint", "smallint", "numeric"):
        return 1
    if typ == "text":
        if "email" in n:
            return ctx["email_b"]
        if "event_id" in n or "idempotency" in n:
            return f"sweep-{uuid.uuid4()}"
        return TEXT_VALUES.get(n, "x")
    if typ == "boolean":
        return False if "active" in n else True
    if typ.startswith("timestamp"):
        # an expiry must lie ahead (else 22023 could answer before the privilege check)
        later = datetime.timedelta(days=30) if "expires" in n else datetime.timedelta(0)
        return datetime.datetime.now(datetime.timezone.utc) + later
    if typ == "date":
        return datetime.date.today()
    if typ == "interval":
        return "0"
    if typ in ("jsonb", "json"):
        return "{}"
    if typ == "regclass":
        return "billing.accounts"
    if typ == "name":
        return "user_id"
    if typ in ("bigint[]", "integer[]"):
        return "{1,0,0,0,0,0,0}"   # (7 elements: the usage counters of _record_usage_on_shard)
    if typ.endswith("[]"):
        return "{x}"
    return None


def functions(conn):
    return q(conn, """
        SELECT n.nspname, p.proname, p.proretset, p.prorettype = 'trigger'::regtype, p.prokind,
               COALESCE(p.proargnames, '{}'), COALESCE(p.proargmodes::text[], '{}'),
               (SELECT COALESCE(array_agg(format_type(t, NULL) ORDER BY o), '{}')
                  FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS x(t, o)),
               f.access
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          LEFT JOIN billing.api_functions f ON f.function_name = p.proname
         WHERE (n.nspname = 'billing'
                OR (n.nspname = 'public' AND f.function_name IS NOT NULL AND p.prosrc LIKE '%%billing.%%'))
           AND p.prokind IN ('f', 'p')
         ORDER BY 1, 2""")


def call_sql(schema, name, prokind, types, is_trigger=False):
    args = ", ".join(f"%s::{t}" for t in types)
    if prokind == "p":
        return f"CALL {schema}.{name}({args})"
    if is_trigger:   # SELECT * FROM a trigger function fails at parse time, before any privilege check
        return f"SELECT {schema}.{name}({args})"
    return f"SELECT * FROM {schema}.{name}({args})"


def sweep_functions(conn_end, ctx, sw):
    a, b = ctx["a"], ctx["b"]
    personas = [
        ("anon", "anon", claims("anon")),
        ("authenticated A", "authenticated", claims("authenticated", a)),
        ("authenticated A claiming service_role", "authenticated", {"role": "service_role", "sub": str(a)}),
        ("anon claiming authenticated A", "anon", claims("authenticated", a)),
    ]
    for schema, name, retset, is_trigger, prokind, argnames, argmodes, types, access in functions(conn_end):
        if argmodes:
            innames = [nm for nm, m in zip(argnames, argmodes) if m in ("i", "b", "v")]
        else:
            innames = list(argnames[:len(types)]) + [None] * (len(types) - len(argnames))
        sql = call_sql(schema, name, prokind, types, is_trigger)
        ok_codes = ("42501", "0A000") if is_trigger else ("42501",)
        targets = [("on B", [arg_value(nm, t, ctx) for nm, t in zip(innames, types)])]
        if access not in ("rpc", "anon") and "uuid" in types:
            # service-only: refused even on the caller's own account
            own = {**ctx, "b": a, "member_b": a, "grant_b": ctx["grant_a"]}
            targets.append(("on A", [arg_value(nm, t, own) for nm, t in zip(innames, types)]))
        for label, role, cl in personas:
            for tlabel, params in targets:
                what = f"{schema}.{name} as {label} {tlabel}"
                if name == "current_user_id":
                    sw.attempts += 1
                    try:
                        got = postgrest_call(conn_end, role, cl, sql, params)[0][0]
                    except psycopg2.Error:
                        continue
                    if got not in (None, a):
                        sw.allowed.append(f"{what}: returned {got}")
                    continue
                if access == "anon" or (access == "rpc" and "uuid" not in types):
                    public_read(conn_end, role, cl, what, name, sql, params, ctx, sw)
                    continue
                sw.refused(what, lambda: postgrest_call(conn_end, role, cl, sql, params), ok_codes)


def public_read(conn, role, cl, what, name, sql, params, ctx, sw):
    """Functions anon may call: they may answer, but with public data only."""
    sw.attempts += 1
    try:
        rows = postgrest_call(conn, role, cl, sql, params)
    except psycopg2.Error as e:
        if e.pgcode not in ("42501", "22023", "P0002"):
            sw.wrong_code.append(f"{what}: {e.pgcode} {e.pgerror}")
        return
    if name == "get_user_widgets_ordered":
        for r in rows:
            data = r[4] or {}
            if r[3] is not True or data.get("secret") != "public" or data.get("user_id") != str(ctx["b"]):
                sw.allowed.append(f"{what}: returned a non-public widget {r}")


def sweep_tables(conn_end, conn_su, ctx, sw):
    a = ctx["a"]
    rels = q(conn_su, """SELECT c.relname, c.relkind,
                                (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum = 1),
                                EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'user_id'
                                        AND NOT a.attisdropped)
                           FROM pg_class c WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'm', 'S')
                          ORDER BY 1""")
    personas = [("anon", "anon", claims("anon")), ("authenticated A", "authenticated", claims("authenticated", a)),
                ("authenticated A claiming service_role", "authenticated", {"role": "service_role", "sub": str(a)})]
    with_b_rows = 0
    for rel, kind, col1, has_user in rels:
        t = f'billing."{rel}"'
        if kind == "S":
            for label, role, cl in personas:
                sw.refused(f"nextval({t}) as {label}", lambda: postgrest_call(conn_end, role, cl, "SELECT nextval(%s)", (t,)))
                sw.refused(f"setval({t}) as {label}", lambda: postgrest_call(conn_end, role, cl, "SELECT setval(%s, 1)", (t,)))
            continue
        if has_user and q(conn_su, f"SELECT 1 FROM {t} WHERE user_id = %s LIMIT 1", (ctx["b"],)):
            with_b_rows += 1
        for label, role, cl in personas:
            for stmt in (f"INSERT INTO {t} DEFAULT VALUES", f'UPDATE {t} SET "{col1}" = "{col1}"', f"DELETE FROM {t}",
                         f"TRUNCATE {t}", f"SELECT 1 FROM {t} FOR UPDATE", f"ALTER TABLE {t} DISABLE ROW LEVEL SECURITY",
                         f"DROP TABLE {t}" if kind == "r" else f"DROP VIEW {t}",
                         f"CREATE POLICY sweep_open ON {t} USING (true)"):
                if kind == "v" and ("ROW LEVEL" in stmt or "POLICY" in stmt or "TRUNCATE" in stmt):
                    continue
                # A view that cannot be written at all (user_credits sums grants since 0.4.0) is
                # refused by the rewriter (55000) before privileges are checked: nothing is written.
                writes = kind == "v" and stmt.split()[0] in ("INSERT", "UPDATE", "DELETE")
                sw.refused(f"{stmt} as {label}", lambda: postgrest_call(conn_end, role, cl, stmt),
                           ok_codes=("42501", "55000") if writes else ("42501",))
            # Reads: only the caller's own rows, or the public catalog.
            sw.attempts += 1
            try:
                with conn_end.cursor() as cur:
                    pass
                conn_end.autocommit = False
                with conn_end.cursor() as cur:
                    cur.execute("SELECT pg_catalog.set_config('role', %s, true), "
                                "pg_catalog.set_config('request.jwt.claims', %s, true)",
                                (role, json.dumps(cl)))
                    cur.execute(f"SELECT * FROM {t}")
                    cols = [d[0] for d in cur.description]
                    rows = cur.fetchall()
                conn_end.rollback()
            except psycopg2.Error as e:
                conn_end.rollback()
                if e.pgcode != "42501":
                    sw.wrong_code.append(f"SELECT {t} as {label}: {e.pgcode}")
                continue
            finally:
                conn_end.autocommit = True
            if rel in PUBLIC_CATALOG:
                continue
            if "user_id" in cols:
                i = cols.index("user_id")
                mine = a if role == "authenticated" else None
                leaked = [r for r in rows if r[i] != mine]
                if leaked:
                    sw.allowed.append(f"SELECT {t} as {label}: {len(leaked)} rows of other users")
            elif rows:
                sw.allowed.append(f"SELECT {t} as {label}: {len(rows)} rows of a table with no owner column")
    if with_b_rows < 5:
        sw.notes.append(f"only {with_b_rows} billing tables hold rows of user B: the read sweep is weak")
    # DDL in schema billing.
    for label, role, cl in personas:
        for stmt in ("CREATE TABLE billing.sweep_t (x int)",
                     "CREATE FUNCTION billing.sweep_f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                     "CREATE OR REPLACE FUNCTION billing.current_user_id() RETURNS uuid LANGUAGE sql AS $$SELECT NULL::uuid$$",
                     "ALTER FUNCTION billing.consume_credits_v2(uuid, integer, text, text, text) SECURITY INVOKER",
                     "ALTER FUNCTION billing.authorize_user(uuid) RESET search_path",
                     "DROP FUNCTION billing.verify_ledger(uuid)",
                     "DROP POLICY accounts_read_own ON billing.accounts",
                     "ALTER SCHEMA billing RENAME TO sweep",
                     "SET LOCAL pg_billing.end_user_roles = 'nobody'"):
            sw.refused(f"{stmt} as {label}", lambda: postgrest_call(conn_end, role, cl, stmt))


# ---------------------------------------------------------------------------------------------
# Grants (0.3.0): roles without billing grants, claim tokens, planted wrappers, the DBA functions
# for service callers, rate-limit bucket bloat, and cleanup of the current hour.

NOBODY = "sweep_nobody"
PLANTER = "sweep_planter"
PLANT_SCHEMA = "sweep_plant"
TOKEN_COLUMN = r"(^|_)token(_|$)"
ENDPOINT_KEYS_MAX, ENDPOINT_KEY_CHARS = 33, 64     # 32 endpoints by name + "(other)"


def login(conn):
    """NOLOGIN, or LOGIN on a Citus cluster: Citus opens its worker connections as the current
    role, so a role that reads distributed tables directly must be able to log in (README)."""
    return "LOGIN" if distributed(conn) else "NOLOGIN"


def ensure_role(conn, role):
    q(conn, f"""DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}')
                THEN CREATE ROLE {role} {login(conn)}; END IF; END $$""")
    q(conn, f"ALTER ROLE {role} {login(conn)}")


def plant(su, sql):
    """Run sql as PLANTER (a role with CREATE on PLANT_SCHEMA only)."""
    q(su, f"SET ROLE {PLANTER}")
    try:
        q(su, sql)
    finally:
        q(su, "RESET ROLE")


def plant_state(su):
    """{signature: (owner, is a wrapper of billing)} of every API-named function in PLANT_SCHEMA."""
    return {sig: (owner, wrapper) for sig, owner, wrapper in q(su, f"""
        SELECT p.oid::regprocedure::text, p.proowner::regrole::text, p.prosrc LIKE '%%billing.%%'
          FROM pg_proc p JOIN billing.api_functions f ON f.function_name = p.proname
         WHERE p.pronamespace = '{PLANT_SCHEMA}'::regnamespace""")}


def sweep_grants(ctx, sw):
    su, end = connect(), connect()
    a, b = ctx["a"], ctx["b"]
    owner = q(su, "SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'pg_billing'")[0][0]
    for role in (NOBODY, PLANTER):
        ensure_role(su, role)
    service = [("postgres", None, None), ("service_role", "service_role", claims("service_role"))]

    def as_service(who, role, cl, sql, params=()):
        return postgrest_call(end, role, cl, sql, params) if role else q(su, sql, params)

    rels = q(su, """SELECT format('billing.%%I', c.relname) FROM pg_class c
                     WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm') ORDER BY 1""")
    # 1. A role with no billing grants, claiming to be B (then A): no billing table or view at all.
    for (t,) in rels:
        for who in (b, a):
            sw.refused(f"SELECT * FROM {t} as {NOBODY} claiming authenticated {who}",
                       lambda: postgrest_call(end, NOBODY, claims("authenticated", who), f"SELECT * FROM {t} LIMIT 5"))
    # 2. Claim tokens: never readable by end users, not even in a WHERE clause.
    try:
        q(su, "SELECT billing.upsert_pending_profile(%s, 'tok-sweep-a')", (f"a-{a.hex[:12]}@example.com",))
        q(su, "SELECT billing.claim_pending_profile(%s, %s, 'tok-sweep-a')", (a, f"a-{a.hex[:12]}@example.com"))
    except psycopg2.Error as e:
        print(f"  (a claimed profile for the token sweep failed: {e.pgcode} {e.pgerror})")
    token_cols = q(su, """SELECT format('billing.%%I', c.relname), quote_ident(a.attname)
                            FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
                             AND a.attname ~ %s""", (TOKEN_COLUMN,))
    for t, col in token_cols:
        for label, role, cl in (("anon", "anon", claims("anon")), ("authenticated A", "authenticated", claims("authenticated", a)),
                                ("authenticated B", "authenticated", claims("authenticated", b))):
            for stmt in (f"SELECT {col} FROM {t}", f"SELECT * FROM {t}", f"SELECT count(*) FROM {t} WHERE {col} LIKE 'tok%%'"):
                sw.refused(f"{stmt} as {label}", lambda: postgrest_call(end, role, cl, stmt))
    # 3. A planted "wrapper": CREATE on the target schema, add_purchased_credits created first.
    q(su, f"DROP SCHEMA IF EXISTS {PLANT_SCHEMA} CASCADE")
    q(su, f"CREATE SCHEMA {PLANT_SCHEMA}")
    q(su, f"GRANT USAGE, CREATE ON SCHEMA {PLANT_SCHEMA} TO {PLANTER}")
    args, ident = q(su, """SELECT pg_get_function_arguments(p.oid), pg_get_function_identity_arguments(p.oid) FROM pg_proc p
                            WHERE p.pronamespace = 'billing'::regnamespace AND p.proname = 'add_purchased_credits'""")[0]
    plants = [
        ("the same signature", f"CREATE FUNCTION {PLANT_SCHEMA}.add_purchased_credits({args}) RETURNS jsonb "
                               "LANGUAGE sql AS $f$ SELECT '{\"minted\": 1000000}'::jsonb $f$"),
        ("another overload", f"CREATE FUNCTION {PLANT_SCHEMA}.consume_credits_v2(p_user_id uuid, p_amount integer) RETURNS jsonb "
                             "LANGUAGE sql AS $f$ SELECT '{\"minted\": 1000000}'::jsonb $f$"),
    ]
    for label, ddl in plants:
        plant(su, ddl)
        for who, role, cl in service:
            sw.refused(f"expose_rpc('{PLANT_SCHEMA}') as {who} over a planted function ({label})",
                       lambda: as_service(who, role, cl, "SELECT billing.expose_rpc(%s)", (PLANT_SCHEMA,)))
            for sig, (own, wrapper) in plant_state(su).items():
                sw.attempts += 1
                if own != owner and wrapper:
                    sw.allowed.append(f"expose_rpc as {who} left {sig} a wrapper owned by {own} ({label})")
        q(su, f"SELECT billing.unexpose_rpc('{PLANT_SCHEMA}')")
        q(su, f"DROP ROUTINE IF EXISTS {PLANT_SCHEMA}.add_purchased_credits, {PLANT_SCHEMA}.consume_credits_v2")
    # 4. The DBA functions for service callers (SPEC 2): service_role may run them.
    q(su, "CREATE TABLE IF NOT EXISTS public.sweep_things (id bigint PRIMARY KEY, user_id uuid NOT NULL)")
    q(su, "CREATE INDEX IF NOT EXISTS sweep_things_user_idx ON public.sweep_things (user_id)")
    dba_calls = [("verify_ledger", "SELECT count(*) FROM billing.verify_ledger()", ()),
                 ("register_resource", "SELECT billing.register_resource('sweep_things', 'public.sweep_things')", ()),
                 ("register_widget_table", "SELECT billing.register_widget_table(%s, %s)", (WIDGET_TYPE, f"public.widget_{WIDGET_TYPE}")),
                 ("expose_rpc", "SELECT billing.expose_rpc(%s)", (PLANT_SCHEMA,))]
    for name, sql, params in dba_calls:
        try:
            postgrest_call(end, "service_role", claims("service_role"), sql, params)
        except psycopg2.Error as e:
            sw.notes.append(f"control: service_role could not run the DBA function {name}: {e.pgcode} {e.pgerror}")
    # The wrappers service_role created are the extension owner's; the planter can neither
    # replace nor drop them.
    for sig, (own, wrapper) in plant_state(su).items():
        sw.attempts += 1
        if own != owner:
            sw.allowed.append(f"expose_rpc as service_role left {sig} owned by {own}")
    if not plant_state(su):
        sw.notes.append(f"control: expose_rpc('{PLANT_SCHEMA}') as service_role created no wrapper")
    for ddl in (f"CREATE OR REPLACE FUNCTION {PLANT_SCHEMA}.add_purchased_credits({args}) RETURNS jsonb "
                "LANGUAGE sql AS $f$ SELECT NULL::jsonb $f$",
                f"DROP FUNCTION {PLANT_SCHEMA}.add_purchased_credits({ident})"):
        sw.refused(f"{ddl[:60]}... as {PLANTER} over a wrapper", lambda: plant(su, ddl))
    try:
        postgrest_call(end, "service_role", claims("service_role"), "SELECT billing.unexpose_rpc(%s)", (PLANT_SCHEMA,))
    except psycopg2.Error as e:
        sw.notes.append(f"control: service_role could not run the DBA function unexpose_rpc: {e.pgcode} {e.pgerror}")
    q(su, f"DROP SCHEMA {PLANT_SCHEMA} CASCADE")
    q(su, "DELETE FROM billing.resource_types WHERE resource_type = 'sweep_things'")
    q(su, "DELETE FROM billing.widget_tables WHERE widget_type = %s", (WIDGET_TYPE,))
    q(su, "DROP TABLE public.sweep_things")
    # 5. Rate-limit bucket bloat: an end user with many long, distinct endpoints.
    c = uuid.uuid4()
    q(su, """SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'ultra', p_status := 'active',
             p_current_period_end := now() + interval '30 days')""", (c,))
    sw.attempts += 1
    try:
        postgrest_call(end, "authenticated", claims("authenticated", c), """
            SELECT count(*) FROM generate_series(1, 200) AS g
             CROSS JOIN LATERAL billing.check_api_rate_limit(%s, '/sweep/' || g || '/' || repeat('x', 240)) AS r""", (c,))
        keys, longest = q(su, """SELECT (SELECT count(*) FROM jsonb_object_keys(endpoint_counts)),
                                        (SELECT max(length(k)) FROM jsonb_object_keys(endpoint_counts) AS k)
                                   FROM billing.api_usage WHERE user_id = %s""", (c,))[0]
        if keys > ENDPOINT_KEYS_MAX or longest > ENDPOINT_KEY_CHARS:
            sw.allowed.append(f"200 distinct endpoints grew one rate-limit bucket to {keys} keys of up to {longest} characters")
    except (psycopg2.Error, IndexError) as e:
        sw.notes.append(f"control: the rate-limit bloat attempt failed: {e}")
    # 6. cleanup_api_usage shorter than a day would reset everyone's current hour.
    for who, role, cl in service:
        for interval in ("0", "1 hour"):
            sw.refused(f"cleanup_api_usage('{interval}') as {who}",
                       lambda: as_service(who, role, cl, "SELECT billing.cleanup_api_usage(%s)", (interval,)), ("22023",))
    sw.attempts += 1
    if not q(su, """SELECT 1 FROM billing.api_usage WHERE user_id = %s
                     AND bucket_start = date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'""", (c,)):
        sw.allowed.append("cleanup_api_usage deleted the current hour's rate-limit bucket")
    end.close()
    for role in (NOBODY, PLANTER):
        try:
            q(su, f"DROP ROLE IF EXISTS {role}")
        except psycopg2.Error as e:   # still holding privileges in another database: keep it
            print(f"  (could not drop role {role}: {e.pgcode})")
    su.close()


# ---------------------------------------------------------------------------------------------
# search_path hijack

EVIL_FUNCS = [
    # (name, args, returns, body expression using pg_catalog)
    ("now", "", "timestamptz", "pg_catalog.now()"),
    ("statement_timestamp", "", "timestamptz", "pg_catalog.statement_timestamp()"),
    ("clock_timestamp", "", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("gen_random_uuid", "", "uuid", "pg_catalog.gen_random_uuid()"),
    ("current_setting", "text", "text", "pg_catalog.current_setting($1)"),
    ("current_setting", "text, boolean", "text", "pg_catalog.current_setting($1, $2)"),
    ("set_config", "text, text, boolean", "text", "pg_catalog.set_config($1, $2, $3)"),
    ("lower", "text", "text", "pg_catalog.lower($1)"),
    ("upper", "text", "text", "pg_catalog.upper($1)"),
    ("length", "text", "integer", "pg_catalog.length($1)"),
    ("left", "text, integer", "text", "pg_catalog.left($1, $2)"),
    ("format", "text", "text", "pg_catalog.format($1)"),
    ("format", "text, text", "text", "pg_catalog.format($1, $2)"),
    ("quote_literal", "text", "text", "pg_catalog.quote_literal($1)"),
    ("jsonb_build_object", "text, bigint", "jsonb", "pg_catalog.jsonb_build_object($1, $2)"),
    ("jsonb_build_object", "text, text", "jsonb", "pg_catalog.jsonb_build_object($1, $2)"),
    ("jsonb_build_object", "text, uuid", "jsonb", "pg_catalog.jsonb_build_object($1, $2)"),
    ("jsonb_build_object", "text, boolean", "jsonb", "pg_catalog.jsonb_build_object($1, $2)"),
    ("to_jsonb", "anyelement", "jsonb", "pg_catalog.to_jsonb($1)"),
    ("jsonb_typeof", "jsonb", "text", "pg_catalog.jsonb_typeof($1)"),
    ("date_trunc", "text, timestamptz", "timestamptz", "pg_catalog.date_trunc($1, $2)"),
    ("abs", "bigint", "bigint", "pg_catalog.abs($1)"),
    ("md5", "text", "text", "pg_catalog.md5($1)"),
    ("row_number", "", "bigint", "1::bigint"),
]
EVIL_OPS = [
    # (operator, left, right, returns, body)
    ("+", "bigint", "bigint", "bigint", "$1 OPERATOR(pg_catalog.+) $2"),
    ("-", "bigint", "bigint", "bigint", "$1 OPERATOR(pg_catalog.-) $2"),
    ("+", "integer", "integer", "integer", "$1 OPERATOR(pg_catalog.+) $2"),
    ("-", "integer", "integer", "integer", "$1 OPERATOR(pg_catalog.-) $2"),
    ("+", "bigint", "integer", "bigint", "$1 OPERATOR(pg_catalog.+) $2"),
    ("-", "bigint", "integer", "bigint", "$1 OPERATOR(pg_catalog.-) $2"),
    ("=", "uuid", "uuid", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
    ("=", "text", "text", "boolean", "$1 OPERATOR(pg_catalog.=) $2"),
    ("<", "bigint", "bigint", "boolean", "$1 OPERATOR(pg_catalog.<) $2"),
    (">=", "bigint", "bigint", "boolean", "$1 OPERATOR(pg_catalog.>=) $2"),
    ("<", "timestamptz", "timestamptz", "boolean", "$1 OPERATOR(pg_catalog.<) $2"),
    ("->>", "jsonb", "text", "text", "$1 OPERATOR(pg_catalog.->>) $2"),
    ("||", "text", "text", "text", "$1 OPERATOR(pg_catalog.||) $2"),
]


def plant_evil(conn):
    q(conn, "DROP SCHEMA IF EXISTS evil CASCADE")
    q(conn, "CREATE SCHEMA evil")
    q(conn, "CREATE TABLE evil.hits (who text, what text, at timestamptz DEFAULT pg_catalog.now())")
    q(conn, "GRANT USAGE ON SCHEMA evil TO PUBLIC; GRANT INSERT, SELECT ON evil.hits TO PUBLIC")
    for i, (name, args, ret, body) in enumerate(EVIL_FUNCS):
        named = ", ".join(f"a{j} {t.strip()}" for j, t in enumerate(args.split(","))) if args else ""
        q(conn, f"""CREATE FUNCTION evil."{name}"({named}) RETURNS {ret} LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
                    BEGIN INSERT INTO evil.hits (who, what) VALUES (CURRENT_USER, '{name}({args})');
                          RETURN {body.replace('$1', 'a0').replace('$2', 'a1').replace('$3', 'a2')}; END $f$""")
    for i, (op, l, r, ret, body) in enumerate(EVIL_OPS):
        q(conn, f"""CREATE FUNCTION evil.op{i}(a0 {l}, a1 {r}) RETURNS {ret} LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
                    BEGIN INSERT INTO evil.hits (who, what) VALUES (CURRENT_USER, 'operator {op}({l},{r})');
                          RETURN {body.replace('$1', 'a0').replace('$2', 'a1')}; END $f$""")
        q(conn, f"CREATE OPERATOR evil.{op} (LEFTARG = {l}, RIGHTARG = {r}, FUNCTION = evil.op{i})")
    q(conn, """CREATE FUNCTION evil.sum_step(s bigint, v bigint) RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
               BEGIN INSERT INTO evil.hits (who, what) VALUES (CURRENT_USER, 'aggregate sum(bigint)');
                     RETURN COALESCE(s, 0) OPERATOR(pg_catalog.+) COALESCE(v, 0); END $f$;
               CREATE AGGREGATE evil.sum(bigint) (SFUNC = evil.sum_step, STYPE = bigint)""")
    q(conn, "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA evil TO PUBLIC")


def hits(conn):
    return q(conn, "SELECT who, what FROM evil.hits")


HIJACK_PATHS = ["evil, pg_catalog, public", "evil, public", "evil, pg_temp, pg_catalog, public"]


def credit_calls(u, tag, grants=False):
    """(label, sql, params, check(result) -> error or None) for the credit functions on user u,
    starting from balances (100 subscription, 0 purchased). Run in order."""
    return [
        ("add_subscription_credits", "SELECT billing.add_subscription_credits(%s, 100, 'h', 'r', %s)", (u, f"{tag}-1"),
         lambda r: None if r["subscription_credits_balance"] == 200 else r),
        ("add_purchased_credits", "SELECT billing.add_purchased_credits(%s, 50, 'h', 'r', %s)", (u, f"{tag}-2"),
         lambda r: None if r["purchased_credits_balance"] == 50 else r),
        ("consume_credits_v2", "SELECT billing.consume_credits_v2(%s, 210, 'h', 'r', %s)", (u, f"{tag}-3"),
         lambda r: None if (r["subscription_used"], r["purchased_used"], r["total_balance"]) == (200, 10, 40) else r),
        ("consume_credits_v2 replay", "SELECT billing.consume_credits_v2(%s, 210, 'h', 'r', %s)", (u, f"{tag}-3"),
         lambda r: None if r["total_balance"] == 40 else r),
        ("refund_credits", "SELECT billing.refund_credits(%s, 5, 'h', 'r', %s)", (u, f"{tag}-4"),
         lambda r: None if r["purchased_credits_balance"] == 45 else r),
        ("renew_subscription_credits", "SELECT billing.renew_subscription_credits(%s, 30, %s, %s)",
         (u, datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30), f"{tag}-5"), lambda r: None if r["subscription_credits_balance"] == 30 else r),
        ("expire_subscription_credits", "SELECT billing.expire_subscription_credits(%s, 'h', %s)", (u, f"{tag}-6"),
         lambda r: None if r["expired_amount"] == 30 else r),
        ("increment_credits_with_log", "SELECT billing.increment_credits_with_log(%s, 5, 'purchase')", (u,),
         lambda r: None if r == 50 else r),
        ("decrement_credits_with_log", "SELECT billing.decrement_credits_with_log(%s, 5)", (u,),
         lambda r: None if r == 45 else r),
        ("get_user_credits", "SELECT total_balance FROM billing.get_user_credits(%s)", (u,),
         lambda r: None if r == 45 else r),
        ("get_credit_history", "SELECT count(*) FROM billing.get_credit_history(%s, 100)", (u,),
         lambda r: None if r >= 8 else r),
        ("check_api_rate_limit", "SELECT allowed FROM billing.check_api_rate_limit(%s, '/h')", (u,),
         lambda r: None if r is True else r),
        ("check_monthly_limit", "SELECT allowed FROM billing.check_monthly_limit(%s, 'messages')", (u,), lambda r: None),
        ("get_user_dashboard_stats", "SELECT total_credits FROM billing.get_user_dashboard_stats(%s)", (u,),
         lambda r: None if r == 45 else r),
        ("get_effective_plan", "SELECT billing.get_effective_plan(%s)", (u,), lambda r: None),
        ("get_user_limits", "SELECT billing.get_user_limits(%s)", (u,), lambda r: None),
        ("get_user_current_usage", "SELECT messages_count FROM billing.get_user_current_usage(%s)", (u,), lambda r: None),
        ("verify_ledger", "SELECT count(*) FROM billing.verify_ledger(%s)", (u,), lambda r: None if r == 0 else r),
    ] + (grant_calls(u, tag) if grants else [])


def grant_calls(u, tag):
    """The credit-grant functions (0.4.0), continuing credit_calls from (0 subscription, 45
    purchased). The test's own SQL names pg_catalog's operators: it runs under the hijacked path too."""
    return [
        ("grant_credits", "SELECT billing.grant_credits(%s, 20, 'promotional', p_scope := '{chat}', p_idempotency_key := %s)",
         (u, f"{tag}-g1"), lambda r: None if (r["priority"], r["purchased_credits_balance"]) == (30, 65) else r),
        ("consume_credits", "SELECT billing.consume_credits(%s, 25, 'chat', p_idempotency_key := %s)", (u, f"{tag}-g2"),
         lambda r: None if ([int(g["amount"]) for g in r["grants"]], r["total_balance"]) == ([20, 5], 40) else r),
        ("set_overdraft_limit", "SELECT billing.set_overdraft_limit(%s, 10)", (u,),
         lambda r: None if r["overdraft_limit"] == 10 else r),
        ("consume_credits into debt", "SELECT billing.consume_credits(%s, 45)", (u,),
         lambda r: None if (r["debt_added"], r["debt"], r["total_balance"]) == (5, 5, -5) else r),
        ("grant_credits repaying debt", "SELECT billing.grant_credits(%s, 8, 'refund')", (u,),
         lambda r: None if (r["debt_repaid"], r["debt"], r["total_balance"]) == (5, 0, 3) else r),
        # (the grant found through get_credit_grants, not a subquery on billing.credit_grants: on
        # Citus a call whose argument reads one shard is sent to that shard's worker, which refuses)
        ("void_grant", "SELECT billing.void_grant((SELECT g.grant_id FROM billing.get_credit_grants(%s, true) AS g "
                       "WHERE g.category::pg_catalog.text OPERATOR(pg_catalog.=) 'refund'::pg_catalog.text "
                       "ORDER BY g.created_at DESC LIMIT 1), 'h')", (u,),
         lambda r: None if (r["voided_amount"], r["total_balance"]) == (3, 0) else r),
        ("get_credit_grants", "SELECT count(*) FROM billing.get_credit_grants(%s, true)", (u,),
         lambda r: None if r >= 4 else r),
        ("balance_at", "SELECT billing.balance_at(%s, pg_catalog.now())", (u,),
         lambda r: None if r["total_balance"] == 0 else r),
        ("get_user_credits available", "SELECT available FROM billing.get_user_credits(%s)", (u,),
         lambda r: None if r == 0 else r),
        ("verify_ledger after grants", "SELECT count(*) FROM billing.verify_ledger(%s)", (u,), lambda r: None if r == 0 else r),
    ]


def end_user_calls(u, grants=False):
    return [
        ("consume_credits_v2", "SELECT public.consume_credits_v2(p_user_id := %s, p_amount := 1)", (u,),
         lambda r: None if r["consumed"] == 1 else r),
        ("billing.consume_credits_v2", "SELECT billing.consume_credits_v2(%s, 1)", (u,), lambda r: None),
        ("decrement_credits_with_log", "SELECT public.decrement_credits_with_log(p_user_id := %s, p_amount := 1)", (u,),
         lambda r: None),
        ("get_user_credits", "SELECT total_balance FROM public.get_user_credits(p_user_id := %s)", (u,), lambda r: None),
        ("get_credit_history", "SELECT count(*) FROM public.get_credit_history(p_user_id := %s)", (u,), lambda r: None),
        ("check_api_rate_limit", "SELECT allowed FROM public.check_api_rate_limit(p_user_id := %s)", (u,), lambda r: None),
        ("check_monthly_limit", "SELECT allowed FROM public.check_monthly_limit(p_user_id := %s, p_metric := 'tokens_input')",
         (u,), lambda r: None),
        ("get_user_dashboard_stats", "SELECT plan FROM public.get_user_dashboard_stats(p_user_id := %s)", (u,), lambda r: None),
        ("get_user_subscription", "SELECT plan_name FROM public.get_user_subscription(p_user_id := %s)", (u,), lambda r: None),
        ("get_user_widgets_ordered", "SELECT count(*) FROM public.get_user_widgets_ordered(p_user_id := %s)", (u,),
         lambda r: None),
        ("get_next_widget_position", "SELECT public.get_next_widget_position(p_user_id := %s)", (u,), lambda r: None),
        ("count_user_widgets_by_type", "SELECT public.count_user_widgets_by_type(p_user_id := %s, p_widget_type := %s)",
         (u, WIDGET_TYPE), lambda r: None),
        ("service-only add_purchased_credits", "SELECT public.add_purchased_credits(p_user_id := %s, p_amount := 1)", (u,),
         "42501"),
    ] + ([
        ("consume_credits", "SELECT public.consume_credits(p_user_id := %s, p_amount := 1)", (u,),
         lambda r: None if r["consumed"] == 1 else r),
        ("get_credit_grants", "SELECT count(*) FROM public.get_credit_grants(p_user_id := %s)", (u,), lambda r: None),
        ("balance_at", "SELECT public.balance_at(p_user_id := %s, p_at := pg_catalog.now())", (u,), lambda r: None),
        ("service-only grant_credits", "SELECT billing.grant_credits(%s, 1, 'promotional')", (u,), "42501"),
        ("service-only set_overdraft_limit", "SELECT billing.set_overdraft_limit(%s, 1000)", (u,), "42501"),
    ] if grants else [])


def run_hijacked(conn, label, calls, sw, before=None, role=None, cl=None):
    for name, sql, params, check in calls:
        what = f"{label}: {name}"
        sw.attempts += 1
        try:
            if role:
                rows = postgrest_call(conn, role, cl, sql, params)
            else:
                rows = q(conn, sql, params)
            res = rows[0][0] if rows else None
        except psycopg2.Error as e:
            if check == "42501" and e.pgcode == "42501":
                pass
            else:
                sw.allowed.append(f"{what}: raised {e.pgcode} {(e.pgerror or '').strip()[:300]}")
        else:
            if check == "42501":
                sw.allowed.append(f"{what}: a service-only function succeeded for an end user")
            else:
                err = check(res)
                if err is not None:
                    sw.allowed.append(f"{what}: wrong result under a hijacked search_path: {err}")
        h = hits(conn) if before is None else before(conn)
        if h:
            sw.allowed.append(f"{what}: planted objects ran inside pg_billing: {sorted(set(h))[:6]}")
            q_clear(conn)


def q_clear(conn):
    su = connect()
    q(su, "DELETE FROM evil.hits")
    su.close()


def sweep_hijack(ctx, sw):
    su = connect()
    plant_evil(su)
    # The trap is armed: with evil first, an unqualified call runs the planted function.
    for path in HIJACK_PATHS:
        if not path.startswith("evil, pg"):
            continue   # pg_catalog is searched first when not named: nothing to arm
        c = connect()
        q(c, f"SET search_path = {path}")
        q(c, "SELECT now(), 1::bigint + 2::bigint")
        if not hits(c):
            sw.notes.append(f"control: the planted now()/+ did not run with search_path = {path}")
        q_clear(c)
        c.close()
    # Service callers.
    for i, path in enumerate(HIJACK_PATHS):
        u = uuid.uuid4()
        q(su, "SELECT billing.add_subscription_credits(%s, 100)", (u,))
        c = connect()
        q(c, f"SET search_path = {path}")
        run_hijacked(c, f"service caller, search_path = {path}", credit_calls(u, f"hj{i}-{u}", ctx["grants"]), sw)
        sw.attempts += 1
        try:
            q(c, "SELECT billing.expose_rpc('public')")
        except psycopg2.Error as e:
            sw.allowed.append(f"expose_rpc under search_path = {path}: {e.pgcode} {e.pgerror}")
        if hits(c):
            sw.allowed.append(f"expose_rpc under search_path = {path}: planted objects ran: {hits(c)[:5]}")
            q_clear(c)
        c.close()
    # End users (PostgREST-style), search_path set for the session by the caller.
    for path in HIJACK_PATHS:
        c = connect()
        q(c, f"SET search_path = {path}")
        run_hijacked(c, f"end user, search_path = {path}", end_user_calls(ctx["a"], ctx["grants"]), sw,
                     role="authenticated", cl=claims("authenticated", ctx["a"]))
        c.close()
    # Types shadowed in pg_temp (searched first for types even with search_path = ''), planted by
    # an end user: a temp domain per common type whose CHECK logs who runs it.
    types = ["uuid", "jsonb", "json", "text", "bigint", "integer", "int4", "int8", "boolean", "bool", "timestamptz",
             "timestamp", "interval", "numeric", "date", "name", "regclass", "varchar"]
    c = connect()
    q(c, "SET ROLE authenticated")
    q(c, "SELECT set_config('request.jwt.claims', %s, false)", (json.dumps(claims("authenticated", ctx["a"])),))
    q(c, """CREATE FUNCTION pg_temp.spy(t text) RETURNS boolean LANGUAGE sql SET search_path = pg_catalog AS
            $f$ INSERT INTO evil.hits (who, what) VALUES (CURRENT_USER, 'pg_temp domain check: ' || t) RETURNING true $f$""")
    base = {"bigint": "int8", "integer": "int4", "boolean": "bool"}
    for t in types:
        q(c, f"CREATE DOMAIN pg_temp.{t} AS pg_catalog.{base.get(t, t)} "
             f"CHECK (pg_temp.spy('{t}:' OPERATOR(pg_catalog.||) VALUE::pg_catalog.text))")
    armed = q(c, "SELECT '1'::int8")
    if not hits(su):
        sw.notes.append("control: the pg_temp domain trap did not fire in the planting session")
    q(su, "DELETE FROM evil.hits")
    del armed
    # Arguments go as untyped literals (str, not uuid.UUID, whose adapter writes '...'::uuid): the
    # caller's own casts would resolve to its own domains, which is no hijack of pg_billing.
    run_hijacked(c, "end user with types shadowed in pg_temp", end_user_calls(str(ctx["a"]), ctx["grants"]), sw,
                 before=lambda _c: hits(su))
    # The same session calling the billing functions directly with its own (PostgREST) claims.
    for name, sql, params, check in credit_calls(str(ctx["a"]), f"tmp-{uuid.uuid4()}")[2:3] + \
            credit_calls(str(ctx["a"]), "x")[9:18]:
        sw.attempts += 1
        try:
            q(c, sql, params)
        except psycopg2.Error:
            pass
        h = hits(su)
        if h:
            sw.allowed.append(f"end user with types shadowed in pg_temp: billing.{name}: planted code ran as "
                              f"{sorted({w for w, _ in h})} ({sorted({x for _, x in h})[:4]})")
            q(su, "DELETE FROM evil.hits")
    c.close()
    q(su, "DROP SCHEMA evil CASCADE")
    su.close()


def sweep_app_tables(ctx, sw):
    """Issue 11 item 1: a role with CREATE on public plants code in app tables pg_billing reads
    (a) a view public.widget_<x> calling its function, (b) a trusted-looking plain table with an
    enum column whose cast to json is its function, (c) a registered resource table replaced by a
    view calling its function. Its function tries ALTER ROLE ... SUPERUSER and logs who ran it;
    after anon, authenticated and service calls the role must not be a superuser and the log must
    show no superuser."""
    su = connect()
    a = ctx["a"]
    att = "prv_attacker"
    q(su, f"DROP ROLE IF EXISTS {att}")
    q(su, f"CREATE ROLE {att} {login(su)}")
    q(su, f"GRANT CREATE ON SCHEMA public TO {att}")
    q(su, "CREATE TABLE public.prv_attack_log (who text, was_superuser boolean)")
    q(su, "GRANT INSERT ON public.prv_attack_log TO PUBLIC")
    q(su, f"SET ROLE {att}")
    q(su, f"""CREATE FUNCTION public.prv_evil() RETURNS boolean LANGUAGE plpgsql AS $f$
              BEGIN
                  BEGIN EXECUTE 'ALTER ROLE {att} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                  INSERT INTO public.prv_attack_log VALUES (current_user,
                      (SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user));
                  RETURN true;
              END $f$""")
    q(su, f"""CREATE VIEW public.widget_prvevil AS SELECT gen_random_uuid() AS id, '{a}'::uuid AS user_id, 1 AS position,
              public.prv_evil() AS is_active, now() AS created_at, now() AS updated_at""")
    q(su, "CREATE TYPE public.prv_mood AS ENUM ('x')")
    q(su, """CREATE FUNCTION public.prv_mood_json(p public.prv_mood) RETURNS json LANGUAGE plpgsql AS
              $f$ BEGIN PERFORM public.prv_evil(); RETURN to_json(p::text); END $f$""")
    q(su, "CREATE CAST (public.prv_mood AS json) WITH FUNCTION public.prv_mood_json(public.prv_mood)")
    q(su, """CREATE TABLE public.widget_prvmood (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
              position integer NOT NULL DEFAULT 1, is_active boolean NOT NULL DEFAULT true,
              created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), mood public.prv_mood)""")
    q(su, "INSERT INTO public.widget_prvmood (user_id, mood) VALUES (%s, 'x')", (a,))
    q(su, "CREATE TABLE public.prv_things (id bigint, user_id uuid NOT NULL)")
    q(su, "CREATE INDEX ON public.prv_things (user_id)")
    q(su, "GRANT SELECT ON public.widget_prvevil, public.widget_prvmood, public.prv_things TO PUBLIC")
    q(su, "RESET ROLE")
    q(su, "SELECT billing.register_resource('prv_things', 'public.prv_things', 'user_id', 'agents')")
    q(su, f"SET ROLE {att}")
    q(su, "DROP TABLE public.prv_things")
    q(su, f"CREATE VIEW public.prv_things AS SELECT 1::bigint AS id, '{a}'::uuid AS user_id WHERE public.prv_evil()")
    q(su, "GRANT SELECT ON public.prv_things TO PUBLIC")
    q(su, "RESET ROLE")
    calls = [
        ("anon", claims("anon"), "SELECT count(*) FROM public.get_user_widgets_ordered(p_user_id := %s)"),
        ("anon", claims("anon"), "SELECT public.count_user_widgets_by_type(p_user_id := %s, p_widget_type := 'prvmood')"),
        ("authenticated", claims("authenticated", a), "SELECT count(*) FROM public.get_user_widgets_ordered(p_user_id := %s, p_active_only := false)"),
        ("authenticated", claims("authenticated", a), "SELECT * FROM public.check_resource_limit(p_user_id := %s, p_resource_type := 'prv_things')"),
        ("authenticated", claims("authenticated", a), "SELECT resources FROM public.get_user_dashboard_stats(p_user_id := %s)"),
        ("service_role", claims("service_role"), "SELECT count(*) FROM public.get_user_widgets_ordered(p_user_id := %s, p_active_only := false)"),
        ("service_role", claims("service_role"), "SELECT public.get_next_widget_position(p_user_id := %s)"),
    ]
    end = connect()
    for role, cl, sql in calls:
        sw.attempts += 1
        try:
            postgrest_call(end, role, cl, sql, (a,))
        except psycopg2.Error as e:
            if e.pgcode not in ("42501", "22023", "P0002"):
                sw.wrong_code.append(f"app tables: {role}: {sql}: {e.pgcode} {e.pgerror}")
        for (who, sup) in q(su, "SELECT who, was_superuser FROM public.prv_attack_log"):
            if sup:
                sw.allowed.append(f"app tables: {role}: {sql}: the attacker's function ran as superuser {who}")
        q(su, "DELETE FROM public.prv_attack_log")
        if q(su, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (att,))[0][0]:
            sw.allowed.append(f"app tables: {role}: {sql}: {att} became a superuser")
            q(su, f"ALTER ROLE {att} NOSUPERUSER")
    end.close()
    q(su, "DELETE FROM billing.resource_types WHERE resource_type = 'prv_things'")
    q(su, "DROP VIEW public.prv_things, public.widget_prvevil")
    q(su, "DROP TABLE public.widget_prvmood, public.prv_attack_log")
    q(su, "DROP CAST (public.prv_mood AS json)")
    q(su, "DROP FUNCTION public.prv_mood_json(public.prv_mood), public.prv_evil()")
    q(su, "DROP TYPE public.prv_mood")
    q(su, f"REVOKE CREATE ON SCHEMA public FROM {att}")
    q(su, f"DROP ROLE {att}")
    su.close()


def static_checks(conn, sw):
    """Every function in billing and every wrapper pins search_path."""
    for schema, name, conf in q(conn, """
            SELECT n.nspname, p.oid::regprocedure::text, p.proconfig
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              LEFT JOIN billing.api_functions f ON f.function_name = p.proname
             WHERE n.nspname = 'billing' OR (n.nspname = 'public' AND f.function_name IS NOT NULL)"""):
        sw.attempts += 1
        if not conf or not any(x.startswith("search_path=") for x in conf):
            sw.allowed.append(f"{name} does not pin search_path ({conf})")
    # End-user roles hold no write privilege on any billing table, view or sequence, and no
    # EXECUTE on a function that is not part of their API.
    for role in ("anon", "authenticated"):
        for rel, priv in q(conn, """
                SELECT c.oid::regclass::text, p
                  FROM pg_class c, unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p
                 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'm')
                   AND has_table_privilege(%s, c.oid, p)""", (role,)):
            sw.allowed.append(f"{role} holds {priv} on {rel}")
        for (fn,) in q(conn, """
                SELECT p.oid::regprocedure::text FROM pg_proc p
                  LEFT JOIN billing.api_functions f ON f.function_name = p.proname
                 WHERE p.pronamespace = 'billing'::regnamespace AND p.proname <> 'current_user_id'
                   AND NOT (f.access = 'anon' OR (f.access = 'rpc' AND %s = 'authenticated'))
                   AND has_function_privilege(%s, p.oid, 'EXECUTE')""", (role, role)):
            sw.allowed.append(f"{role} holds EXECUTE on {fn}")
        sw.attempts += 2


def sweep_checkout(end, su, sw):
    """Issue 10 item 3 and issue 11 items 2, 3, 8a: attacks on purchases made at checkout.
    Each is one attempt; it counts as allowed when the attacker got what they wanted."""
    procs = {r[0] for r in q(su, "SELECT proname FROM pg_proc WHERE pronamespace = 'billing'::regnamespace")}
    if "upsert_pending_profile" not in procs:
        return
    tag = uuid.uuid4().hex[:10]
    victim, a_user, b_user = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def state(u):
        return q(su, """SELECT a.subscription_credits_balance, s.plan_id, s.current_period_end
                          FROM billing.accounts AS a LEFT JOIN billing.subscriptions AS s USING (user_id)
                         WHERE a.user_id = %s""", (u,))

    # 11.8a: a JWT e-mail with U+212A KELVIN SIGN must not claim kate's purchase.
    kate = f"kate-{tag}@example.com"
    q(su, "SELECT billing.upsert_pending_profile(%s, %s, 'pro')", (kate, f"tok-{tag}"))
    cl = dict(claims("authenticated", a_user), email="\u212A" + kate[1:])
    sw.refused("claim_pending_profile with a U+212A (Kelvin sign) JWT e-mail for kate's purchase",
               lambda: postgrest_call(end, "authenticated", cl, "SELECT billing.claim_pending_profile(%s, %s, %s)",
                                      (a_user, kate, f"tok-{tag}")))
    # 11.2: a stranger's checkout typed with a paying customer's e-mail.
    v_email = f"victim-{tag}@example.com"
    q(su, """SELECT billing.upsert_pending_profile(%s, %s, 'ultra', 'stripe', %s,
             p_billing_cycle_start => now() + interval '1 day')""", (v_email, f"tok-v-{tag}", f"cus_v_{tag}"))
    q(su, "SELECT billing.claim_pending_profile(%s, %s, %s)", (victim, v_email, f"tok-v-{tag}"))
    before = state(victim)
    sw.attempts += 1
    r = q(su, """SELECT billing.upsert_pending_profile(p_email := %s, p_plan_id := 'pro', p_provider := 'stripe',
                 p_provider_user_id := %s, p_credits := 0)""", (v_email.upper(), f"cus_other_{tag}"))[0][0]
    if state(victim) != before:
        sw.allowed.append(f"a stranger's checkout with a customer's e-mail changed the account: {before} -> {state(victim)} ({r})")
    # 11.3: B's later purchase of an e-mail A claimed must not reach A, and B can claim it.
    shared = f"shared-{tag}@corp.com"
    q(su, "SELECT billing.upsert_pending_profile(%s, %s, 'pro', 'stripe', %s)", (shared, f"tok-a-{tag}", f"cus_a_{tag}"))
    q(su, "SELECT billing.claim_pending_profile(%s, %s, %s)", (a_user, shared, f"tok-a-{tag}"))
    before = state(a_user)
    sw.attempts += 1
    q(su, "SELECT billing.upsert_pending_profile(%s, %s, 'premium', 'stripe', %s)", (shared, f"tok-b-{tag}", f"cus_b_{tag}"))
    cl = dict(claims("authenticated", b_user), email=shared)
    got = postgrest_call(end, "authenticated", cl, "SELECT billing.claim_pending_profile(%s, %s, %s)",
                         (b_user, shared, f"tok-b-{tag}"))[0][0]
    if state(a_user) != before or got.get("success") is not True:
        sw.allowed.append(f"a later purchase of a claimed e-mail went to the first claimer: {before} -> {state(a_user)}; "
                          f"its buyer's claim: {got}")
    # 10.3: an unconfirmed sign-up with a buyer's e-mail claims nothing.
    buyer = f"buyer-{tag}@example.com"
    q(su, "SELECT billing.upsert_pending_profile(%s, %s, 'premium')", (buyer, f"tok-buyer-{tag}"))
    q(su, """CREATE TABLE IF NOT EXISTS public.prvsweep_users (id uuid PRIMARY KEY, email text, email_confirmed_at timestamptz);
             DROP TRIGGER IF EXISTS prvsweep_on_user ON public.prvsweep_users;
             CREATE TRIGGER prvsweep_on_user AFTER INSERT OR UPDATE OF email_confirmed_at ON public.prvsweep_users
                 FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user()""")
    sw.attempts += 1
    q(su, "INSERT INTO public.prvsweep_users (id, email) VALUES (%s, %s)", (uuid.uuid4(), buyer))
    if q(su, "SELECT bool_or(claimed) FROM billing.pending_profiles WHERE email = %s", (buyer,))[0][0]:
        sw.allowed.append("an unconfirmed sign-up with a buyer's e-mail claimed the buyer's purchase")
    q(su, "DROP TABLE public.prvsweep_users")


def run(quiet=False):
    su = connect()
    ctx = setup(su)
    sw = Sweep()
    end = connect()
    # Controls: the sweep means something only if permitted calls do succeed.
    try:
        postgrest_call(end, "authenticated", claims("authenticated", ctx["a"]),
                       "SELECT public.consume_credits_v2(p_user_id := %s, p_amount := 1)", (ctx["a"],))
        postgrest_call(end, "service_role", claims("service_role"),
                       "SELECT public.add_purchased_credits(p_user_id := %s, p_amount := 1)", (ctx["b"],))
    except psycopg2.Error as e:
        sw.notes.append(f"control call refused: {e.pgcode} {e.pgerror}")
    if ctx["grants"]:
        # ... and so do the grant functions an end user may call on their own account, and the
        # service ones for service_role.
        for role, who, sql, params in [
                ("authenticated", ctx["a"], "SELECT public.consume_credits(p_user_id := %s, p_amount := 1, p_feature := 'chat')", (ctx["a"],)),
                ("authenticated", ctx["a"], "SELECT count(*) FROM public.get_credit_grants(p_user_id := %s)", (ctx["a"],)),
                ("authenticated", ctx["a"], "SELECT public.balance_at(p_user_id := %s, p_at := now())", (ctx["a"],)),
                ("service_role", None, "SELECT public.grant_credits(p_user_id := %s, p_amount := 1, p_category := 'refund')", (ctx["b"],)),
                ("service_role", None, "SELECT public.set_overdraft_limit(p_user_id := %s, p_limit := 20)", (ctx["b"],))]:
            try:
                postgrest_call(end, role, claims(role, who), sql, params)
            except psycopg2.Error as e:
                sw.notes.append(f"control call refused: {sql}: {e.pgcode} {e.pgerror}")
    if ctx["events"]:
        # ... and so do reading one's own events (RLS) and the service's event functions.
        try:
            mine, others = postgrest_call(end, "authenticated", claims("authenticated", ctx["a"]),
                                          "SELECT count(*) FILTER (WHERE user_id = %s), count(*) FILTER (WHERE user_id <> %s) "
                                          "FROM billing.events", (ctx["a"], ctx["a"]))[0]
            # (on a Citus cluster an end user's direct read returns no rows: the claims do not
            # reach the workers, so it fails closed; README)
            if (mine < 3 and not distributed(end)) or (mine and distributed(end)) or others:
                sw.notes.append(f"control: end user A reads {mine} of their own events and {others} of others")
            for sql, params in [("SELECT count(*) FROM public.claim_events(p_consumer := 'sweep-service', p_limit := 10)", ()),
                                ("SELECT public.set_balance_alert(p_threshold := 5, p_user_id := %s)", (ctx["b"],)),
                                ("SELECT public.set_limit_alert(p_metric := 'messages', p_percent := 80, p_enabled := false)", ()),
                                ("SELECT public.ack_events(p_consumer := 'sweep-service', p_up_to_id := 0)", ()),
                                ("SELECT public.cleanup_events(p_older_than := '7 days')", ())]:
                postgrest_call(end, "service_role", claims("service_role"), sql, params)
        except psycopg2.Error as e:
            sw.notes.append(f"control call refused: {e.pgcode} {e.pgerror}")
    static_checks(su, sw)
    sweep_functions(end, ctx, sw)
    sweep_tables(end, su, ctx, sw)
    sweep_grants(ctx, sw)
    sweep_hijack(ctx, sw)
    sweep_checkout(end, su, sw)
    sweep_app_tables(ctx, sw)
    for row in q(su, "SELECT * FROM billing.verify_ledger()"):
        sw.allowed.append(f"verify_ledger after the sweep: {row}")
    for m in grant_sql_checks(su):
        sw.allowed.append(f"after the sweep: {m}")
    q(su, f"DROP TABLE IF EXISTS public.widget_{WIDGET_TYPE}")
    end.close()
    su.close()
    if not quiet:
        for m in sw.allowed[:40]:
            print("  ALLOWED:", m, flush=True)
        for m in sw.wrong_code[:40]:
            print("  WRONG SQLSTATE:", m, flush=True)
        for m in sw.notes:
            print("  NOTE:", m, flush=True)
    return sw


def main():
    sw = run()
    line = f"privilege: {fmt(sw.attempts)} attempts, {fmt(len(sw.allowed))} allowed"
    if sw.wrong_code:
        line += f", {fmt(len(sw.wrong_code))} refused with a SQLSTATE other than 42501"
    print(line, flush=True)
    return 1 if (sw.allowed or sw.wrong_code or sw.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
