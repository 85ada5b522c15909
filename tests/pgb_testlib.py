"""The helpers every Python test of pg_billing shares (tests/integration under pytest and the
stress harness in tests/stress): connections, PostgREST-style calls, JWT claims, Supabase's
roles, SQLSTATE checks. Each exists here once; tests/stress/common.py re-exports them.

Connections take PGHOST/PGPORT/PGUSER/PGDATABASE from the environment (libpq), as scripts/test.sh
and scripts/stress.sh set them. The driver is psycopg2 (Debian's python3-psycopg2, installed by
scripts/lib.sh ensure_deps)."""
import json
import os
import uuid
from pathlib import Path

import psycopg2
import psycopg2.extras

psycopg2.extras.register_uuid()

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# Supabase's roles (anon, authenticated, service_role and the LOGIN role PostgREST connects as),
# created when absent; scripts/test.sh and scripts/stress.sh run the same file with psql.
ROLES_SQL = TESTS / "roles.sql"


def connect(dsn=None, autocommit=True, **params):
    """A connection to the database of the environment (or `dsn`, or libpq keywords such as
    dbname=..., user=...)."""
    conn = psycopg2.connect(dsn or "", connect_timeout=10, **params)
    conn.autocommit = autocommit
    return conn


def q(conn, sql, params=()):
    """Run one statement; its rows (an empty list when it returns none)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def claims(role, sub=None):
    """The JWT claims PostgREST puts in request.jwt.claims: a role and, for a user, its id."""
    c = {"role": role}
    if sub is not None:
        c["sub"] = str(sub)
    return c


def postgrest_call(conn, role, cl, sql, params=()):
    """Run `sql` as PostgREST does: one transaction at READ COMMITTED, role and JWT claims set
    with set_config(..., true). Returns the rows; raises psycopg2 errors. Works on a connection
    that may die under the call (the crash test): no rollback is tried on a closed one."""
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_catalog.set_config('role', %s, true), "
                        "pg_catalog.set_config('request.jwt.claims', %s, true)",
                        (role, json.dumps(cl)))
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows
    except Exception:
        if not conn.closed:
            try:
                conn.rollback()
            except psycopg2.Error:
                pass
        raise
    finally:
        if not conn.closed:
            try:
                conn.autocommit = True
            except psycopg2.Error:
                pass


def ensure_roles(conn):
    """Create Supabase's roles when absent (tests/roles.sql) and, when pg_billing is installed,
    re-apply its grants to them."""
    q(conn, ROLES_SQL.read_text())
    if q(conn, "SELECT 1 FROM pg_extension WHERE extname = 'pg_billing'"):
        q(conn, "SELECT billing.apply_grants()")


def expect_sqlstate(code, fn, *args, **kwargs):
    """fn(*args, **kwargs) must raise a database error with SQLSTATE `code`; returns it."""
    try:
        fn(*args, **kwargs)
    except psycopg2.Error as e:
        assert e.pgcode == code, f"expected SQLSTATE {code}, got {e.pgcode}: {e.pgerror}"
        return e
    raise AssertionError(f"expected SQLSTATE {code}, but the call succeeded")


def new_user() -> uuid.UUID:
    return uuid.uuid4()


def short() -> bool:
    """The short variants (make test) unless PGB_SHORT=0."""
    return os.environ.get("PGB_SHORT", "1") == "1"


def fmt(n):
    return f"{n:,}"


def distributed(conn):
    """True when pg_billing's tables are distributed by Citus (billing.distribute())."""
    if not q(conn, "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus'"):
        return False
    return q(conn, "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'billing.accounts'::regclass")[0][0] == 1


def end_user_rows(conn, rows, none=None):
    """What an end user's direct read of a billing table or view returns: `rows` on one node. On a
    Citus cluster the row policy is evaluated on the workers, where PostgREST's transaction-local
    request.jwt.claims (set_config) does not reach, so the read fails closed: `none` ([] unless
    given, e.g. [(0,)] for a count). README, Scale-out on Citus."""
    if distributed(conn):
        return [] if none is None else none
    return rows
