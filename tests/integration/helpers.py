"""Shared helpers for integration tests: connections, PostgREST-style calls, SQLSTATE checks."""
import json
import os
import uuid

import psycopg2
import psycopg2.extras

psycopg2.extras.register_uuid()


def connect(dbname=None, autocommit=True):
    conn = psycopg2.connect(dbname=dbname or os.environ.get("PGDATABASE", "integration"))
    conn.autocommit = autocommit
    return conn


def short() -> bool:
    return os.environ.get("PGB_SHORT", "1") == "1"


def new_user() -> uuid.UUID:
    return uuid.uuid4()


def postgrest_call(conn, role, claims, sql, params=()):
    """Run `sql` the way PostgREST does: one transaction, SET LOCAL role and JWT claims via
    set_config(..., true), at READ COMMITTED. Returns all rows; raises psycopg2 errors."""
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                        (role, json.dumps(claims)))
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows
    except Exception:
        conn.rollback()
        raise
    finally:
        conn.autocommit = True


def expect_sqlstate(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except psycopg2.Error as e:
        assert e.pgcode == code, f"expected SQLSTATE {code}, got {e.pgcode}: {e.pgerror}"
        return e
    raise AssertionError(f"expected SQLSTATE {code}, but the call succeeded")


def q(conn, sql, params=()):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []
