#!/usr/bin/env python3
"""Part 3 of the reliability harness: the bad-input sweep over EVERY function of schema billing.

Works in a database of its own (created next to PGDATABASE, dropped at the end), so nothing it
does — expose_rpc, registering tables, importing legacy balances — touches other tests.

Every function of schema billing is read from pg_proc (the API and the internal helpers, which
the owner may call too; the trigger function billing.handle_new_user is driven through a real
trigger on a users table). Its arguments are generated from the argument types and names:
  uuid         a user with an account, a user without one, a user whose balance is near 2^63-1,
               a member / purchase / pending profile (by parameter name), a random uuid, NULL
  integer      NULL, 0, -1, 1, 2147483647, -2147483648 (a balance near 2^63-1 makes sums overflow)
  bigint       NULL, 0, -1, 1, 2^31, 2^63-1, -2^63 (p_threshold, p_up_to_id: a valid one first)
  numeric      NULL, 0, 10, just above 10, -0.1, NaN, +-Infinity, 1e1000, 1e-1000 (p_hysteresis: 0.1 first)
  text         NULL, '', 1 MB, SQL-injection strings, U+202E, emoji, combining marks, and the
               plausible values (plans, metrics, resource and widget types, statuses, schemas,
               e-mails, ...) so the deeper code paths run
  timestamptz/date  NULL, infinity, -infinity, now()±, the type's extremes
  interval     NULL, '-1 day', '100 years', the type's extremes (p_ttl, p_visibility_timeout: a valid one first)
  boolean      NULL, true, false
  regclass/oid a real table, a table whose name holds quotes and SQL, a view, a catalog, an
               index, an oid that names no relation, NULL
  name         a real column, a missing column, quotes and SQL, '', 63+ characters
  jsonb/text[] NULL, {}, [], scalars, wrong-typed limits, ...
One argument varies at a time from a valid baseline (a function with two ways to be called, such
as set_balance_alert for a user or for a plan, from each), plus all-NULL calls (the long variant
adds more values and random two-argument combinations). Every call runs as the service caller
(postgres), in autocommit, one statement, with a statement timeout.

Each call must end in success or a documented SQLSTATE (README's error table: 22023, 22003,
P0002, 42501, PT402, PT409, PT429; PostgreSQL's own 42P01 for a dropped table) — never XX000,
never a crashed backend, never a timeout — and a failed call writes nothing: the row count and a
content checksum of every billing table (billing.accounts' balances included) are compared
before and after each failed call. After every call the backend must still answer SELECT 1.
Prints `bad inputs: N tried, M XX000, K writes, J undocumented SQLSTATEs`; exits 1 on any
finding.

Usage: bad_input.py [--short | --long] (connection from PGHOST/PGPORT/PGUSER/PGDATABASE)."""
import argparse
import datetime
import os
import random
import sys
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extensions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import connect, ensure_roles, fmt, grant_sql_checks, has_grants, q  # noqa: E402

DOCUMENTED = {"22023", "22003", "P0002", "42501", "PT402", "PT409", "PT410", "PT429"}
# PostgreSQL's own errors that README lets pass through: a regclass argument naming no relation
# any more (a registered table that was dropped is pg_billing's own P0002 since 0.3.0).
PASS_THROUGH = {"42P01"}
ALLOWED = DOCUMENTED | PASS_THROUGH
# Codes one function documents beside those (README, Errors): billing.distribute() refuses with
# 0A000 where Citus is absent, as in this sweep.
FUNCTION_EXTRA = {"distribute": ("0A000",)}
STATEMENT_TIMEOUT_MS = 10000

MEGABYTE = "x" * (1024 * 1024)
MEGABYTE_MIXED = ("a\u00e9\u20ac\U0001F600" * (1024 * 1024 // 10))[: 1024 * 1024]
INJECTIONS = [
    "'; DROP TABLE billing.accounts; --",
    "$$; DROP TABLE billing.accounts; $$",
    "\\'; SELECT pg_sleep(30); --",
    "x' OR '1'='1",
    "\"; DROP SCHEMA billing CASCADE; --",
    "%s%s%s%n",
    "public; DROP TABLE billing.accounts",
]
UNICODE = [
    "\u202e",                                   # right-to-left override
    "\U0001F4A5\U0001F600\u200d\U0001F469",     # emoji, zero-width joiner
    "e\u0301\u0301\u0301",                      # combining marks
    "\ufeff\u2028\u2029\u00a0",
    "\u0130",                                   # İ: lower() makes it longer
]
GENERIC_TEXT = [None, "", " ", MEGABYTE] + INJECTIONS[:4] + UNICODE[:3]
GENERIC_TEXT_LONG = [None, "", " ", MEGABYTE, MEGABYTE_MIXED, "x" * 256, "x" * 1001] + INJECTIONS + UNICODE

INT_SHORT = [None, 0, -1, 1, 2147483647, -2147483648]
INT_LONG = INT_SHORT + [2, 7, 100, 1000, 1001, 1000000, 2147483646, -2147483647]


class Raw:
    """A value passed as an SQL expression of the test's own (never from user data)."""

    def __init__(self, sql):
        self.sql = sql

    def __repr__(self):
        return f"({self.sql})"


def ts(delta_days=0):
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=delta_days)


class Ctx(dict):
    pass


def setup(conn, tag):
    """Data for the deeper code paths; returns the context of known ids."""
    c = Ctx()
    c["user"] = uuid.uuid4()           # an account with both pools
    c["noacc"] = uuid.uuid4()          # never given an account (by setup)
    c["rich"] = uuid.uuid4()           # an account near 2^63-1
    c["email"] = f"bi-{tag}@example.com"
    c["email2"] = f"bi2-{tag}@example.com"
    q(conn, "SELECT billing.add_subscription_credits(%s, 1000000)", (c["user"],))
    c["purchase"] = uuid.UUID(str(q(conn, "SELECT billing.add_purchased_credits(%s, 1000000, 'bi')", (c["user"],))[0][0]["transaction_id"]))
    c["consume_tx"] = uuid.UUID(str(q(conn, "SELECT billing.consume_credits_v2(%s, 1)", (c["user"],))[0][0]["transaction_id"]))
    q(conn, """SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active',
               p_current_period_end := now() + interval '30 days', p_event_id := %s)""", (c["user"], f"bi-sub-{tag}"))
    q(conn, "SELECT billing.record_message_usage(%s, 10, 20)", (c["user"],))
    # A balance near bigint's maximum, written directly with its ledger row, so verify_ledger
    # still holds and grants overflow the balance.
    big = 9223372036854775000
    # (Since 0.4.0 every credit belongs to a grant: the balance is one purchased grant.)
    q(conn, "INSERT INTO billing.accounts (user_id, purchased_credits_balance) VALUES (%s, %s)", (c["rich"], big))
    if has_grants(conn):
        # 0.4.0: every credit belongs to a grant, and the ledger row names it
        q(conn, """WITH g AS (INSERT INTO billing.credit_grants (user_id, id, category, amount, remaining, priority, effective_at, pool)
                              VALUES (%s, gen_random_uuid(), 'purchased', %s, %s, 50, now(), 'purchased') RETURNING user_id, id)
                   INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, grant_id)
                   SELECT g.user_id, gen_random_uuid(), 'migration', 'purchased', %s, %s, 'bad-input sweep', g.id FROM g""",
          (c["rich"], big, big, big, big))
    else:
        q(conn, """INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description)
                   VALUES (%s, gen_random_uuid(), 'migration', 'purchased', %s, %s, 'bad-input sweep')""", (c["rich"], big, big))
    # Credit grants (0.4.0): a live grant and a voided one of `user` (p_grant_id), and a user who
    # may overdraw by 1000 with 10 credits left (the debt paths).
    c["grant"] = c["voided"] = c["od"] = None
    if has_grants(conn):
        c["grant"] = uuid.UUID(str(q(conn, """SELECT billing.grant_credits(%s, 500, 'promotional',
                                               p_expires_at := now() + interval '14 days')""", (c["user"],))[0][0]["grant_id"]))
        c["voided"] = uuid.UUID(str(q(conn, "SELECT billing.grant_credits(%s, 20, 'purchased', p_scope := '{chat}')",
                                      (c["user"],))[0][0]["grant_id"]))
        q(conn, "SELECT billing.void_grant(%s, 'bad-input sweep')", (c["voided"],))
        c["od"] = uuid.uuid4()
        q(conn, "SELECT billing.add_purchased_credits(%s, 10)", (c["od"],))
        q(conn, "SELECT billing.set_overdraft_limit(%s, 1000)", (c["od"],))
    # Credit holds (0.5.0): an active hold of `user` and a released one (p_hold_id).
    c["hold"] = c["hold_done"] = None
    if q(conn, "SELECT to_regclass('billing.credit_holds') IS NOT NULL")[0][0]:
        c["hold"] = uuid.UUID(str(q(conn, "SELECT billing.reserve_credits(%s, 100, '24 hours')", (c["user"],))[0][0]["hold_id"]))
        c["hold_done"] = uuid.UUID(str(q(conn, "SELECT billing.reserve_credits(%s, 10)", (c["user"],))[0][0]["hold_id"]))
        q(conn, "SELECT billing.release_hold(%s)", (c["hold_done"],))
    # Events (0.6.0): a balance rule on `user` (crossed by the sweep's consumptions), a consumer
    # with a claim in flight (p_consumer, p_claim_id).
    c["claim"] = None
    if q(conn, "SELECT to_regclass('billing.events') IS NOT NULL")[0][0]:
        q(conn, "SELECT billing.set_balance_alert(1500000, %s)", (c["user"],))
        q(conn, "SELECT billing.consume_credits_v2(%s, 600000)", (c["user"],))
        q(conn, "SELECT billing.add_purchased_credits(%s, 600000)", (c["user"],))
        rows = q(conn, "SELECT claim_id FROM billing.claim_events('bi-consumer', 2)")
        c["claim"] = rows[0][0] if rows else None
    c["member"] = uuid.UUID(str(q(conn, "SELECT billing.upsert_member(%s, 'pro')", (c["email"],))[0][0]["member_id"]))
    c["profile"] = uuid.UUID(str(q(conn, "SELECT billing.upsert_pending_profile(%s, 'tok')", (c["email2"],))[0][0]["id"]))
    # Tables an app would register.
    q(conn, "CREATE TABLE public.bi_agents (id bigint GENERATED ALWAYS AS IDENTITY, user_id uuid NOT NULL)")
    q(conn, "CREATE INDEX ON public.bi_agents (user_id)")
    q(conn, "INSERT INTO public.bi_agents (user_id) VALUES (%s), (%s)", (c["user"], c["user"]))
    q(conn, "SELECT billing.register_resource('agents', 'public.bi_agents'::regclass)")
    q(conn, "CREATE TABLE public.bi_gone (id bigint, user_id uuid)")
    q(conn, "CREATE INDEX ON public.bi_gone (user_id)")
    q(conn, "SELECT billing.register_resource('bi_gone', 'public.bi_gone'::regclass, 'user_id', 'agents')")
    q(conn, "DROP TABLE public.bi_gone")
    q(conn, """CREATE TABLE public.widget_bi (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
               position integer NOT NULL, is_active boolean NOT NULL DEFAULT true,
               created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), body text)""")
    q(conn, "INSERT INTO public.widget_bi (user_id, position, body) VALUES (%s, 1, %s), (%s, 2147483647, 'max')",
      (c["user"], INJECTIONS[0], c["user"]))
    weird = 'bi"weird\'; DROP TABLE billing.accounts; --'
    q(conn, f"""CREATE TABLE public.{quote_ident(weird)} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
               position integer NOT NULL DEFAULT 0, is_active boolean NOT NULL DEFAULT true, balance integer,
               created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
               {quote_ident('col"; --')} text)""")
    q(conn, f"CREATE INDEX ON public.{quote_ident(weird)} (user_id)")
    q(conn, f"INSERT INTO public.{quote_ident(weird)} (user_id, balance) VALUES (%s, 5)", (uuid.uuid4(),))
    # Legacy single-pool tables (migrate_single_pool).
    q(conn, "CREATE TABLE public.bi_legacy (user_id uuid PRIMARY KEY, balance integer, credits numeric, note text)")
    q(conn, "CREATE TABLE public.bi_purchases (user_id uuid, amount integer, type text)")
    legacy = [uuid.uuid4() for _ in range(3)]
    q(conn, "INSERT INTO public.bi_legacy VALUES (%s, 100, 10.7, 'a'), (%s, 2147483647, -5, 'b'), (%s, NULL, NULL, 'c')",
      tuple(legacy))
    q(conn, "INSERT INTO public.bi_purchases VALUES (%s, 50, 'purchase'), (%s, 2147483647, 'purchase'), (%s, -3, 'purchase')",
      tuple(legacy))
    q(conn, "CREATE VIEW public.bi_view AS SELECT * FROM public.bi_agents")
    q(conn, "CREATE SCHEMA IF NOT EXISTS bi_exposed")
    # A users table with the sign-up trigger.
    q(conn, "CREATE SCHEMA IF NOT EXISTS bi_auth")
    q(conn, "CREATE TABLE bi_auth.users (id uuid, email text)")
    q(conn, "CREATE TRIGGER on_auth_user_created AFTER INSERT ON bi_auth.users "
            "FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user()")
    oids = dict(q(conn, """SELECT 'accounts', 'billing.accounts'::regclass::oid UNION ALL
                           SELECT 'agents', 'public.bi_agents'::regclass::oid UNION ALL
                           SELECT 'widget', 'public.widget_bi'::regclass::oid UNION ALL
                           SELECT 'legacy', 'public.bi_legacy'::regclass::oid UNION ALL
                           SELECT 'purchases', 'public.bi_purchases'::regclass::oid UNION ALL
                           SELECT 'view', 'public.bi_view'::regclass::oid UNION ALL
                           SELECT 'catalog', 'pg_catalog.pg_class'::regclass::oid UNION ALL
                           SELECT 'index', 'billing.accounts_pkey'::regclass::oid UNION ALL
                           SELECT 'sequence', (SELECT pg_get_serial_sequence('public.bi_agents', 'id'))::regclass::oid"""))
    oids["weird"] = q(conn, "SELECT %s::regclass::oid", (f"public.{quote_ident(weird)}",))[0][0]
    oids["none"] = 4000000000            # an oid no relation has
    c["oids"] = oids
    return c


def quote_ident(s):
    return '"' + s.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------
# Values per parameter: the first is the baseline.

NAMED_TEXT = {
    "p_metric": ["messages", "conversations", "tokens_input", "tokens_output", "documents", "api_calls",
                 "generations", "MESSAGES", "agents"],
    "p_resource_type": ["agents", "documents", "products", "bi_gone", "widgets", "links", "Agents", "x" * 64],
    "p_widget_type": ["bi", "links", "gallery", "BI", "bi_gone"],
    "p_transaction_type": ["purchase", "usage", "bonus", "subscription", "Purchase"],
    "p_plan_id": ["pro", "free", "premium", "ultra", "enterprise", "PRO"],
    "p_status": ["active", "free", "trialing", "past_due", "canceled", "paused", "expired", "pending", "bogus"],
    "p_schema": ["bi_exposed", "public", "billing", "pg_catalog", "information_schema", "pg_temp", "no_such_schema"],
    "p_plan_duration": ["monthly", "yearly", "weekly", "lifetime"],
    "p_token": ["tok", "other-token"],
    "p_provider": ["stripe", "whop"],
    "p_provider_user_id": ["cus_1"],
    "p_provider_membership_id": ["mem_1"],
    "p_provider_subscription_id": ["sub_1"],
    "p_endpoint": ["/api/x", "/api/y"],
    "p_event_type": ["invoice.paid", "customer.subscription.updated"],
    "p_function": ["billing.sweep"],
    "p_name": ["p_amount"],
    "p_key": ["agents", "messages_per_month", "no_such_limit"],
    "p_limit_key": [None, "agents", "no_such_limit"],
    "p_description": [None, "sweep"],
    "p_reason": [None, "sweep"],
    "p_reference_id": [None, "ref-1"],
    "p_category": ["promotional", "subscription", "purchased", "rollover", "refund", "PROMOTIONAL", " refund", "bogus"],
    "p_feature": [None, "chat", "image", "x" * 256],
    "p_consumer": ["bi-consumer", "bi-other", "webhooks:v1", "a" * 100, "a" * 101, "bad consumer"],
}
# Parameters whose baseline differs by function: set_balance_alert's rule is a user's (p_plan_id
# NULL); ALT_BASELINES varies it from a plan's rule too.
FN_TEXT = {("set_balance_alert", "p_plan_id"): [None, "pro", "free", "PRO", "no_such_plan"]}
ALT_BASELINES = {"set_balance_alert": [{"p_user_id": None, "p_plan_id": "pro"}]}
NAMED_BIGINT = {
    "p_threshold": [100, 1, 1500000],
    "p_up_to_id": [9223372036854775807, 1],
}
BIGINT_SHORT = [None, 0, -1, 1, 2147483648, 9223372036854775807, -9223372036854775808]
NAMED_INT = {
    "p_amount": [1, 2, 1000000, 2000000],
    "p_limit": [5, 1, 1000, 1001],
    "p_count": [1, 2, 1000000],
    "p_credits": [10, 1000],
    "p_chunks": [1, 1000],
    "p_tokens_input": [10],
    "p_tokens_output": [10],
    "p_value": [5],
    "p_min": [0],
    "p_max": [10],
    "p_priority": [30, 0, 100, 101],
}
EMAIL_VALUES = ["bi-new-{n}@example.com", "{email}", "{email2}", "{EMAIL}", "no-at-sign", "a@b", "\u0130@example.com",
                "x@" + "y" * 300 + ".com", "<script>@example.com"]


class Gen:
    def __init__(self, ctx, long):
        self.ctx, self.long, self.n = ctx, long, 0

    def fresh(self, prefix):
        self.n += 1
        return f"{prefix}-{self.n}-{uuid.uuid4().hex[:8]}"

    def text_values(self, fn, name):
        c = self.ctx
        generic = GENERIC_TEXT_LONG if self.long else GENERIC_TEXT
        if name in ("p_event_id", "p_idempotency_key"):
            reused = "bi-reused-key"
            return [Raw("'" + self.fresh("bi-evt") + "'"), reused] + generic
        if "email" in name:
            vals = [v.format(n=self.fresh("m"), email=c["email"], email2=c["email2"], EMAIL=c["email"].upper())
                    for v in EMAIL_VALUES]
            return vals + generic
        if name in ("p_user_column", "p_balance_column"):
            return []    # 'name' typed; see name_values
        named = FN_TEXT.get((fn, name), NAMED_TEXT.get(name))
        if named is not None:
            return named + [v for v in generic if v not in named]
        return ["x"] + generic

    def int_values(self, name):
        base = NAMED_INT.get(name, [1])
        rest = INT_LONG if self.long else INT_SHORT
        return base + [v for v in rest if v not in base]

    def uuid_values(self, fn, name):
        c = self.ctx
        if "grant" in name:
            vals = [v for v in (c["grant"], c["voided"]) if v is not None] + [c["user"]]
        elif "claim" in name:
            vals = ([c["claim"]] if c.get("claim") else []) + [c["user"]]
        elif "hold" in name:
            vals = [v for v in (c.get("hold"), c.get("hold_done")) if v is not None] + [c["user"]]
        elif "member" in name:
            vals = [c["member"], c["user"]]
        elif "transaction" in name:
            vals = [c["purchase"], c["consume_tx"]]
        elif name == "p_id":
            vals = [c["profile"], c["user"]]
        else:
            vals = [c["user"], c["noacc"], c["rich"], c["member"]] + ([c["od"]] if c.get("od") else [])
        return vals + [uuid.uuid4(), uuid.UUID(int=0), None]

    def regclass_values(self, fn, name):
        o = self.ctx["oids"]
        if name == "p_purchases":
            first = [o["purchases"], None]
        elif fn in ("register_widget_table",):
            first = [o["widget"], o["weird"]]
        elif fn in ("register_resource",):
            first = [o["agents"], o["weird"]]
        else:
            first = [o["legacy"], o["weird"]]
        rest = [o[k] for k in ("accounts", "agents", "widget", "legacy", "purchases", "view", "catalog", "index",
                               "sequence", "weird", "none")]
        return first + [v for v in rest if v not in first] + [None]

    def name_values(self, fn, name):
        if name == "p_balance_column":
            first = ["balance", "credits", "note"]
        else:
            first = ["user_id"]
        return first + ["no_such_column", "user_id", "balance", 'col"; --', "", "x" * 80,
                        INJECTIONS[0], "id", "purchased_credits_balance", None]

    def values(self, fn, name, typ):
        """Baseline first, then the bad ones."""
        if typ == "uuid":
            return self.uuid_values(fn, name)
        if typ == "integer":
            return self.int_values(name)
        if typ == "bigint":
            base = NAMED_BIGINT.get(name, [1])
            return base + [v for v in BIGINT_SHORT if v not in base]
        if typ == "numeric":
            vals = [Decimal("0.1") if name == "p_hysteresis" else Decimal(1), Decimal(0), Decimal(10), Decimal("10.0000000001"),
                    Decimal("-0.1"), Raw("'NaN'::numeric"), Raw("'Infinity'::numeric"), Raw("'-Infinity'::numeric"),
                    Raw("'1e1000'::numeric"), Raw("'1e-1000'::numeric"), None]
            if self.long:
                vals += [Decimal("9.99999999999999999999"), Decimal("10.000000000000000000001"), Decimal("1e-20")]
            return vals
        if typ == "text":
            return self.text_values(fn, name)
        if typ in ("timestamp with time zone", "timestamptz"):
            vals = [None if name in ("p_before", "p_period_end", "p_trial_ends_at", "p_current_period_end",
                                     "p_billing_cycle_end", "p_event_created_at", "p_expires_at") else ts(),
                    ts(), ts(-1), ts(30), ts(-400), ts(36500), Raw("'infinity'::timestamptz"),
                    Raw("'-infinity'::timestamptz"), None]
            if self.long:
                vals += [Raw("'294276-12-31 23:59:59+00'::timestamptz"), Raw("'4713-11-24 00:00:00+00 BC'::timestamptz"),
                         Raw("'1970-01-01'::timestamptz"), Raw("'2000-02-29'::timestamptz")]
            return vals
        if typ == "date":
            vals = [datetime.date.today(), None, Raw("'infinity'::date"), Raw("'-infinity'::date"),
                    datetime.date.today() + datetime.timedelta(days=400), datetime.date(2000, 1, 31),
                    Raw("'5874897-12-31'::date"), Raw("'4713-11-24 BC'::date")]
            if self.long:
                vals += [datetime.date(2024, 2, 29), datetime.date(1, 1, 1), datetime.date(9999, 12, 31)]
            return vals
        if typ == "interval":
            # (A hold's TTL is 1 second to 24 hours: its baseline is a valid one.)
            first = {"p_ttl": "5 minutes", "p_visibility_timeout": "30 seconds"}.get(name)
            vals = ([Raw(f"'{first}'::interval")] if first else []) + [Raw("'7 days'::interval"), None, Raw("'-1 day'::interval"), Raw("'0'::interval"),
                    Raw("'100 years'::interval"), Raw("'-100 years'::interval"), Raw("'178000000 years'::interval"),
                    Raw("'-178000000 years'::interval")]
            if self.long:
                vals += [Raw("'1 microsecond'::interval"), Raw("'2147483647 days'::interval"),
                         Raw("'-2147483648 months'::interval"), Raw("'1 day'::interval"), Raw("'1 day 1 microsecond'::interval"),
                         Raw("'1 month'::interval"), Raw("'999999 microseconds'::interval")]
            return vals
        if typ == "boolean":
            return [True, False, None]
        if typ in ("regclass", "oid"):
            vals = self.regclass_values(fn, name)
            if typ == "oid":
                vals = vals + [0]
            return vals
        if typ == "name":
            return self.name_values(fn, name)
        if typ in ("jsonb", "json"):
            vals = ['{"agents": 5, "messages_per_month": -1}', None, "{}", "[]", '"agents"', "null", "1e300",
                    '{"agents": "x"}', '{"agents": 1e30}', '{"agents": -2}', '{"agents": null}', '{"agents": [1]}']
            return vals
        if typ == "text[]":
            return [["a", "b"], None, [], [None], [""], ["chat", None], ["x" * 1000] * 3, [INJECTIONS[0]]]
        if typ == "bigint[]":
            # (7 elements: the usage counters of _record_usage_on_shard)
            return [[1, 0, 0, 0, 0, 0, 0], None, [], [None], [1, 0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0, 0, None], [1] * 100]
        return [None]


# ---------------------------------------------------------------------------------------------
# The sweep


class Result:
    def __init__(self):
        self.tried = 0
        self.outcomes = Counter()
        self.xx000 = []
        self.writes = []
        self.undocumented = []
        self.crashes = []
        self.timeouts = []
        self.checks = []           # other findings (verify_ledger, ...)
        self.by_fn = Counter()     # (function, 'ok' | 'failed') -> calls

    @property
    def findings(self):
        return self.xx000 + self.writes + self.undocumented + self.crashes + self.timeouts + self.checks

    def line(self):
        s = (f"bad inputs: {fmt(self.tried)} tried, {fmt(len(self.xx000))} XX000, {fmt(len(self.writes))} writes, "
             f"{fmt(len(self.undocumented))} undocumented SQLSTATEs")
        if self.crashes:
            s += f", {fmt(len(self.crashes))} crashed backends"
        if self.timeouts:
            s += f", {fmt(len(self.timeouts))} timeouts"
        if self.checks:
            s += f", {fmt(len(self.checks))} other findings"
        return s


def label(v):
    if isinstance(v, str):
        if len(v) > 40:
            return f"<{len(v)} chars>"
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(label(x) for x in v)[:60] + "]"
    return repr(v)


class Sweeper:
    def __init__(self, dsn, res, verbose=False):
        self.dsn, self.res, self.verbose = dsn, res, verbose
        self.conn = None
        self.reconnect()
        self.tables = [r[0] for r in q(self.conn, """SELECT c.relname FROM pg_class c
                                                     WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
                                                     ORDER BY 1""")]
        self.snap_sql = " UNION ALL ".join(
            f"SELECT {i}, count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM billing.{quote_ident(t)} t"
            for i, t in enumerate(self.tables))
        self.state = self.snapshot()

    def reconnect(self, wait=60):
        deadline = time.time() + wait
        while True:
            try:
                self.conn = connect(self.dsn)
                q(self.conn, f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
                return
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def snapshot(self):
        rows = q(self.conn, self.snap_sql)
        return {self.tables[i]: (n, h) for i, n, h in rows}

    def call(self, where, sql, params, allowed_extra=()):
        """Run one statement; classify its outcome. Returns the SQLSTATE or 'ok'."""
        self.res.tried += 1
        err = None
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                rows = cur.fetchall() if cur.description else []
            outcome = "ok"
            for bad in negative_balances(rows):
                self.res.checks.append(f"{where}: succeeded with a negative balance in its result: {bad}")
        except psycopg2.Error as e:
            err = e
            outcome = e.pgcode or "connection lost"
        alive = False
        if not self.conn.closed:
            try:
                alive = q(self.conn, "SELECT 1") == [(1,)]
            except psycopg2.Error:
                alive = False
        msg = ""
        if err is not None:
            msg = ((err.pgerror or str(err)).strip().splitlines() or [""])[0][:300]
        if not alive or outcome == "connection lost" or (outcome[:2] in ("08", "57") and outcome != "57014"):
            self.res.crashes.append(f"{where}: backend lost ({outcome}: {msg})")
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
            self.reconnect()
            self.state = self.snapshot()
            self.res.outcomes["crash"] += 1
            return "crash"
        self.res.outcomes[outcome] += 1
        if where.startswith("billing."):
            self.res.by_fn[(where[8:].split("(")[0], "ok" if outcome == "ok" else "failed")] += 1
        if outcome == "ok":
            self.state = self.snapshot()
            return outcome
        if outcome == "XX000":
            self.res.xx000.append(f"{where}: XX000 {msg}")
        elif outcome == "57014":
            self.res.timeouts.append(f"{where}: no answer within {STATEMENT_TIMEOUT_MS} ms")
        elif outcome not in ALLOWED and outcome not in allowed_extra \
                and outcome not in FUNCTION_EXTRA.get(where[8:].split("(")[0] if where.startswith("billing.") else "", ()):
            self.res.undocumented.append(f"{where}: {outcome} {msg}")
        after = self.snapshot()
        if after != self.state:
            changed = sorted(t for t in after if after[t] != self.state.get(t))
            self.res.writes.append(f"{where}: failed with {outcome} but changed {', '.join(changed)}")
            self.state = after
        if self.verbose:
            print(f"    {where}: {outcome} {msg[:120]}")
        return outcome


def negative_balances(rows):
    """Balance fields (keys containing 'balance') below zero anywhere in a result: a wrapped
    (overflowed) or corrupt figure."""
    out = []

    def walk(v, key=""):
        if isinstance(v, dict):
            # An account in overdraft (0.4.0): total_balance and available are below zero by the
            # debt; total_balance must still be subscription + purchased - debt.
            debt = v.get("debt") if isinstance(v.get("debt"), int) else 0
            if debt > 0 and "total_balance" in v and "subscription_credits_balance" in v:
                want = v["subscription_credits_balance"] + v["purchased_credits_balance"] - debt
                if v["total_balance"] != want:
                    out.append(f"total_balance = {v['total_balance']}, subscription + purchased - debt = {want}")
            for k, x in v.items():
                if debt > 0 and k in ("total_balance", "available"):
                    continue
                walk(x, k)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, key)
        elif "balance" in key and isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            out.append(f"{key} = {v}")
    for r in rows:
        walk(list(r))
    return out


def functions(conn):
    return q(conn, """
        SELECT p.proname, p.proretset, p.prorettype = 'trigger'::regtype, p.prokind,
               COALESCE(p.proargnames, '{}'), COALESCE(p.proargmodes::text[], '{}'),
               (SELECT COALESCE(array_agg(format_type(t, NULL) ORDER BY o), '{}')
                  FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS x(t, o))
          FROM pg_proc p
         WHERE p.pronamespace = 'billing'::regnamespace AND p.prokind IN ('f', 'p')
         ORDER BY 1""")


def param_sql(typ, v):
    if isinstance(v, Raw):
        return v.sql, []
    t = {"timestamp with time zone": "timestamptz"}.get(typ, typ)
    return f"%s::{t}", [v]


def call_sql(fn, names, types, values, prokind):
    parts, params = [], []
    for n, t, v in zip(names, types, values):
        s, p = param_sql(t, v)
        parts.append(f"{n} := {s}" if n else s)
        params += p
    head = "CALL" if prokind == "p" else "SELECT * FROM"
    return f"{head} billing.{quote_ident(fn)}({', '.join(parts)})", params


def sweep(sw, ctx, long, rnd):
    gen = Gen(ctx, long)
    for fn, _retset, is_trigger, prokind, argnames, argmodes, types in functions(sw.conn):
        if is_trigger:
            continue
        if argmodes:
            names = [nm for nm, m in zip(argnames, argmodes) if m in ("i", "b", "v")]
        else:
            names = list(argnames[:len(types)]) + [None] * (len(types) - len(argnames))
        names = [n or None for n in names]
        if not types:
            for i in range(3 if long else 2):
                sql, params = call_sql(fn, [], [], [], prokind)
                sw.call(f"billing.{fn}() #{i + 1}", sql, params)
            continue
        valsets = [gen.values(fn, n or "", t) for n, t in zip(names, types)]
        base = [vs[0] if vs else None for vs in valsets]

        def fresh_base():
            # A new event id / idempotency key per call, so each call does real work.
            out = []
            for n, b in zip(names, base):
                if n in ("p_event_id", "p_idempotency_key"):
                    out.append(Raw("'" + gen.fresh("bi-evt") + "'"))
                else:
                    out.append(b)
            return out

        sql, params = call_sql(fn, names, types, fresh_base(), prokind)
        sw.call(f"billing.{fn}(baseline)", sql, params)
        for i, (n, t) in enumerate(zip(names, types)):
            for v in valsets[i][1:]:
                args = fresh_base()
                args[i] = v
                sql, params = call_sql(fn, names, types, args, prokind)
                sw.call(f"billing.{fn}({n} := {label(v)})", sql, params)
        for alt in ALT_BASELINES.get(fn, []):
            def alt_base():
                return [alt[n] if n in alt else b for n, b in zip(names, fresh_base())]
            desc = ", ".join(f"{k} := {label(v)}" for k, v in alt.items())
            sql, params = call_sql(fn, names, types, alt_base(), prokind)
            sw.call(f"billing.{fn}({desc}) (baseline)", sql, params)
            for i, (n, t) in enumerate(zip(names, types)):
                if n in alt and alt[n] is None:
                    continue
                for v in valsets[i][1:]:
                    args = alt_base()
                    args[i] = v
                    sql, params = call_sql(fn, names, types, args, prokind)
                    sw.call(f"billing.{fn}({desc}, {n} := {label(v)})", sql, params)
        sql, params = call_sql(fn, names, types, [None] * len(types), prokind)
        sw.call(f"billing.{fn}(all NULL)", sql, params)
        # Sums that overflow a balance: the account near 2^63-1 with large amounts.
        uidx = [i for i, (n, t) in enumerate(zip(names, types)) if t == "uuid" and n == "p_user_id"]
        iidx = [i for i, t in enumerate(types) if t == "integer"]
        if uidx and iidx:
            for amount in (1000, 2147483647):
                for i in iidx:
                    args = fresh_base()
                    args[uidx[0]] = ctx["rich"]
                    args[i] = amount
                    sql, params = call_sql(fn, names, types, args, prokind)
                    sw.call(f"billing.{fn}(p_user_id := <near 2^63-1>, {names[i]} := {amount})", sql, params)
        if long and len(types) >= 2:
            for _ in range(12 * len(types)):
                args = fresh_base()
                picked = rnd.sample(range(len(types)), 2)
                desc = []
                for i in picked:
                    if valsets[i]:
                        args[i] = rnd.choice(valsets[i])
                        desc.append(f"{names[i]} := {label(args[i])}")
                sql, params = call_sql(fn, names, types, args, prokind)
                sw.call(f"billing.{fn}({', '.join(desc)})", sql, params)


def sweep_trigger(sw, ctx, long):
    """billing.handle_new_user through a real AFTER INSERT trigger on a users table."""
    emails = [None, "", f"bi-signup-{uuid.uuid4().hex[:8]}@example.com", ctx["email2"], ctx["email2"].upper(), ctx["email"],
              MEGABYTE, "no-at-sign", "\u0130@example.com"] + INJECTIONS[:3] + UNICODE[:2]
    ids = [uuid.uuid4(), None, ctx["user"], ctx["rich"], uuid.UUID(int=0)]
    for e in emails:
        sw.call(f"INSERT INTO users(id := new, email := {label(e)}) [handle_new_user]",
                "INSERT INTO bi_auth.users (id, email) VALUES (%s, %s)", (uuid.uuid4(), e))
    for u in ids:
        sw.call(f"INSERT INTO users(id := {label(u)}) [handle_new_user]",
                "INSERT INTO bi_auth.users (id, email) VALUES (%s, %s)", (u, f"bi-su-{uuid.uuid4().hex[:8]}@example.com"))
    if long:
        for u in ids:
            for e in emails:
                sw.call(f"INSERT INTO users(id := {label(u)}, email := {label(e)}) [handle_new_user]",
                        "INSERT INTO bi_auth.users (id, email) VALUES (%s, %s)", (u, e))
    # A direct call is refused by PostgreSQL's parser (0A000), before pg_billing runs.
    sw.call("SELECT billing.handle_new_user() [direct]", "SELECT billing.handle_new_user()", (), allowed_extra=("0A000",))


def final_checks(sw, res):
    bad = q(sw.conn, "SELECT user_id FROM billing.verify_ledger()")
    if bad:
        res.checks.append(f"verify_ledger lists {len(bad)} users after the sweep: {[str(r[0]) for r in bad[:5]]}")
    neg = q(sw.conn, "SELECT count(*) FROM billing.accounts WHERE subscription_credits_balance < 0 OR purchased_credits_balance < 0")[0][0]
    if neg:
        res.checks.append(f"{neg} negative balances after the sweep")
    for m in grant_sql_checks(sw.conn):
        res.checks.append(f"after the sweep: {m}")
    if q(sw.conn, "SELECT to_regclass('billing.accounts') IS NOT NULL AND to_regnamespace('billing') IS NOT NULL") != [(True,)]:
        res.checks.append("schema billing or billing.accounts is gone after the injection strings")


def run(long=False, verbose=False, quiet=False, seed=1):
    """Creates its own database next to PGDATABASE, sweeps, drops it. Returns a Result.
    PGB_BAD_INPUT_DB names a database made for it instead (pg_billing installed, nothing else
    in it; kept): scripts/citus-check.sh makes one on the cluster, distributed."""
    res = Result()
    admin = connect()
    ensure_roles(admin)
    given = os.environ.get("PGB_BAD_INPUT_DB")
    db = given or f"pgb_bad_input_{os.getpid()}"
    if not given:
        q(admin, f"DROP DATABASE IF EXISTS {db}")
        q(admin, f"CREATE DATABASE {db}")
    dsn = psycopg2.extensions.make_dsn(admin.dsn, dbname=db)
    t0 = time.time()
    try:
        c = connect(dsn)
        if not given:
            q(c, "CREATE EXTENSION pg_billing")
        q(c, "SELECT billing.apply_grants()")
        ctx = setup(c, uuid.uuid4().hex[:8])
        c.close()
        sw = Sweeper(dsn, res, verbose)
        sweep(sw, ctx, long, random.Random(seed))
        sweep_trigger(sw, ctx, long)
        final_checks(sw, res)
        sw.conn.close()
    finally:
        if os.environ.get("PGB_KEEP_DB") != "1" and not given:
            q(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()
    if not quiet:
        print(f"  {fmt(res.tried)} calls in {time.time() - t0:.1f} s; outcomes: "
              + ", ".join(f"{k} {v}" for k, v in sorted(res.outcomes.items(), key=lambda kv: -kv[1])), flush=True)
        fns = ("set_balance_alert", "set_limit_alert", "claim_events", "ack_events", "cleanup_events")
        if any(res.by_fn[(f, "ok")] + res.by_fn[(f, "failed")] for f in fns):
            print("  events functions (0.6.0): " + ", ".join(
                f"{f} {res.by_fn[(f, 'ok')] + res.by_fn[(f, 'failed')]} ({res.by_fn[(f, 'ok')]} ok)" for f in fns), flush=True)
        for f in res.findings[:60]:
            print("  FINDING:", f, flush=True)
        if len(res.findings) > 60:
            print(f"  ... and {len(res.findings) - 60} more", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--short", action="store_true")
    g.add_argument("--long", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    res = run(long=a.long, verbose=a.verbose)
    print(res.line(), flush=True)
    return 1 if res.findings else 0


if __name__ == "__main__":
    sys.exit(main())
