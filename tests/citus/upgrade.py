#!/usr/bin/env python3
"""The upgrade of a distributed pg_billing (issue 17), run by scripts/citus-check.sh.

For every released version that has billing.distribute() and is older than the installed one:
a database on the coordinator and both workers gets that release with its own library (built
from the commit it shipped from, as tests/stress/upgrade.py does), billing.distribute(), and data
written through the API for users on both workers. Then the current library is installed,
`ALTER EXTENSION pg_billing UPDATE` runs on the coordinator (Citus runs it on the workers too),
then billing.distribute() again, and:
  - every node has the current version, and every node has the same billing functions (name,
    arguments, body, settings) as the coordinator: a delegated function runs on the workers;
  - every shard of every Citus table has its table's columns (name, type, NOT NULL) and as many
    constraints of each kind: an upgrade script's ALTER TABLE must reach the shards;
  - every row of every billing table that existed before is still there, unchanged (on the old
    columns); balances per user are unchanged; verify_ledger() is empty;
  - distribute() after the update delegates what the new release delegates, and a second call
    changes nothing;
  - the API works: a debit for a user on each worker (pushed down where the release delegates
    it), a new user's purchase and debit, verify_ledger() empty.
Prints one line per path and `upgrade on the cluster: N paths checked, M differences`; exits 1 on
any difference. Environment: COORD_PORT, W1_PORT, W2_PORT, PGHOST, PG_CONFIG (the cluster's)."""
import json
import os
import re
import sys
import uuid
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "stress"))
import upgrade as up  # noqa: E402  (the single-node upgrade check: releases, libraries, files)
sys.path.append(str(Path(__file__).resolve().parent))   # after tests/stress: this file is upgrade.py too
from cluster import COORD, HOST, NODES, W1, W2, connect, q, worker_of  # noqa: E402


def current_version():
    text = (up.extension_dir() / "pg_billing.control").read_text()
    return re.search(r"default_version\s*=\s*'([^']+)'", text).group(1)


def make_db(name):
    """A database with Citus on the three nodes, the workers added."""
    for port in NODES:
        admin = connect(port, "postgres")
        q(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        q(admin, f'CREATE DATABASE "{name}"')
        admin.close()
        conn = connect(port, name)
        q(conn, "SET client_min_messages = warning")
        q(conn, "CREATE EXTENSION citus")
        conn.close()
    conn = connect(COORD, name)
    q(conn, "SELECT citus_set_coordinator_host(%s, %s)", (HOST, COORD))
    for port in (W1, W2):
        q(conn, "SELECT citus_add_node(%s, %s)", (HOST, port))
    return conn


def drop_db(name):
    for port in NODES:
        admin = connect(port, "postgres")
        q(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def users_on_both_workers(conn, n=6):
    """n users, at least two on each worker."""
    users, per = [], {W1: 0, W2: 0}
    while len(users) < n or min(per.values()) < 2:
        u = uuid.uuid4()
        w = worker_of(conn, u)
        if per[w] < max(2, n // 2):
            per[w] += 1
            users.append(u)
    return users


def has_function(conn, name):
    return q(conn, "SELECT count(*) FROM pg_proc WHERE pronamespace = 'billing'::regnamespace AND proname = %s", (name,))[0][0] > 0


def write_data(conn, users, tag):
    """Data written through the API of the old release; returns what failed there (0.6.0 had
    functions that fail on a cluster, fixed in 0.7.0: noted, not a difference of the upgrade)."""
    problems = []
    steps = []
    for i, u in enumerate(users):
        steps += [
            ("SELECT billing.add_subscription_credits(%s, 100, 'grant', %s, %s)", (u, f"ref-{i}", f"k1-{i}")),
            ("SELECT billing.add_purchased_credits(%s, 250, 'pack', %s, %s)", (u, f"pi-{i}", f"k2-{i}")),
            ("SELECT billing.consume_credits_v2(%s, 120, 'use', 'r', %s)", (u, f"k3-{i}")),
            ("SELECT billing.consume_credits_v2(%s, 3)", (u,)),
            ("SELECT billing.refund_credits(%s, 5, 'refund')", (u,)),
            ("SELECT billing.record_message_usage(%s, 10, 20)", (u,)),
            ("SELECT * FROM billing.check_api_rate_limit(%s, '/up')", (u,)),
        ]
        if has_function(conn, "grant_credits"):
            steps.append(("SELECT billing.grant_credits(p_user_id := %s, p_amount := 40, p_category := 'promotional')", (u,)))
        if has_function(conn, "reserve_credits") and i % 2 == 0:
            steps.append(("SELECT billing.reserve_credits(%s, 30)", (u,)))
    u = users[0]
    steps += [
        ("SELECT billing.expire_subscription_credits(%s)", (users[1],)),
        ("SELECT billing.renew_subscription_credits(%s, 60)", (users[1],)),
        ("""SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active',
                   p_current_period_end := now() + interval '30 days', p_event_id := %s)""", (users[2], f"evt-up-{tag}")),
        ("SELECT billing.record_webhook_event(%s, 'invoice.paid', %s)", (f"wh-up-{tag}", u)),
        ("SELECT billing.upsert_member(%s, 'pro', NULL, %s)", (f"up-{tag}@example.com", f"mem-up-{tag}")),
        ("SELECT billing.upsert_pending_profile(%s, 'tok-up')", (f"pend-{tag}@example.com",)),
    ]
    for sql, params in steps:
        try:
            q(conn, sql, params)
        except psycopg2.Error as e:
            problems.append(f"{sql.split('(')[0].strip()} failed under it on the cluster ({e.pgcode})")
    return sorted(set(problems))


def balances(conn, users):
    return {u: q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.get_user_credits(%s)", (u,))
            for u in users}


def tables(conn):
    return [r[0] for r in q(conn, "SELECT relname FROM pg_class WHERE relnamespace = 'billing'::regnamespace AND relkind = 'r' ORDER BY 1")]


def columns(conn, table):
    return [r[0] for r in q(conn, """SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0
                                      AND NOT attisdropped ORDER BY attnum""", (f'billing."{table}"',))]


# (run_command_on_placements puts each placement's name where %1$s is)
SHAPE = """SELECT (SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || CASE WHEN attnotnull THEN ' not null' ELSE '' END,
                                     ', ' ORDER BY attnum)
                     FROM pg_attribute WHERE attrelid = '%1$s'::regclass AND attnum > 0 AND NOT attisdropped)
            || ' | ' || COALESCE((SELECT string_agg(contype || '=' || n, ' ' ORDER BY contype)
                                    FROM (SELECT contype::text, count(*) AS n FROM pg_constraint
                                           WHERE conrelid = '%1$s'::regclass GROUP BY contype) AS k), '')"""


def shard_shapes(conn):
    """Differences between each Citus table and its shards: columns (name, type, NOT NULL) and
    the number of constraints of each kind."""
    out = []
    for (rel,) in q(conn, """SELECT logicalrelid::regclass::text FROM pg_dist_partition
                              WHERE logicalrelid::regclass::text LIKE 'billing.%%' ORDER BY 1"""):
        want = q(conn, SHAPE.replace("%1$s", rel))[0][0]
        for port, ok, got in q(conn, "SELECT nodeport, success, result FROM run_command_on_placements(%s, %s)", (rel, SHAPE)):
            if not ok or got != want:
                out.append(f"{rel} on :{port}: {got} (the table: {want})")
    return out


FUNCTIONS = """SELECT md5(string_agg(p.oid::regprocedure::text || ' ' || md5(p.prosrc) || ' ' || p.prosecdef || ' '
                                     || COALESCE(array_to_string(p.proconfig, ','), ''), ';' ORDER BY p.oid::regprocedure::text)),
                      count(*)
                 FROM pg_proc AS p WHERE p.pronamespace = 'billing'::regnamespace"""


def check_path(old, current, so):
    """Returns (differences, notes) of the upgrade old -> current on the cluster."""
    diffs, notes = [], []
    db = f"upgrade_{old.replace('.', '_')}"
    chain = up.upgrade_chain(up.upgrade_scripts(REPO / "sql"), old, current)
    if chain is None:
        return [f"{old}: no upgrade path to {current}"], notes
    files, lib = up.ExtFiles(up.extension_dir()), up.Library()
    try:
        files.put(up.frozen_releases(REPO / "sql" / "releases")[old])
        for s in chain:
            files.put(s)
        lib.install(so)
        conn = make_db(db)
        q(conn, f"CREATE EXTENSION pg_billing VERSION '{old}'")
        first = q(conn, "SELECT billing.distribute()")[0][0]
        users = users_on_both_workers(conn)
        notes += [f"{old}: {p}" for p in write_data(conn, users, old)]
        before_bal = balances(conn, users)
        before_rows = {t: (columns(conn, t), up.rows_on(conn, t, columns(conn, t))) for t in tables(conn)}
        assert not q(conn, "SELECT * FROM billing.verify_ledger()"), "the old release's ledger does not verify"
        conn.close()

        # The current library for every new backend (the old one stays mapped where it was loaded).
        lib.restore()
        conn = connect(COORD, db)
        q(conn, "SET client_min_messages = warning")
        q(conn, "ALTER EXTENSION pg_billing UPDATE")
        for port in NODES:
            v = q(connect(port, db), "SELECT extversion FROM pg_extension WHERE extname = 'pg_billing'")
            if v != [(current,)]:
                diffs.append(f"{old}: node :{port} is at {v} after the update, not {current}")
        fn = [q(connect(port, db), FUNCTIONS)[0] for port in NODES]
        for port, f in zip(NODES[1:], fn[1:]):
            if f != fn[0]:
                diffs.append(f"{old}: the billing functions of node :{port} ({f[1]}) differ from the coordinator's ({fn[0][1]})")
        second = q(conn, "SELECT billing.distribute()")[0][0]
        third = q(conn, "SELECT billing.distribute()")[0][0]
        changes = {k: v for k, v in third.items() if k in ("functions_delegated", "policies_rewritten",
                                                            "reference_tables_created", "distributed_tables_created") and v}
        if changes:
            diffs.append(f"{old}: a second distribute() after the update changed something: {third}")
        shapes = shard_shapes(conn)
        diffs += [f"{old}: shard {s}" for s in shapes]
        for t, (cols, rows) in before_rows.items():
            if t not in tables(conn):
                diffs.append(f"{old}: table {t} is gone")
                continue
            missing = set(cols) - set(columns(conn, t))
            if missing:
                diffs.append(f"{old}: {t} lost columns {sorted(missing)}")
                continue
            if up.rows_on(conn, t, cols) != rows:
                diffs.append(f"{old}: the rows of {t} changed")
        if balances(conn, users) != before_bal:
            diffs.append(f"{old}: balances changed: {before_bal} -> {balances(conn, users)}")
        bad = q(conn, "SELECT * FROM billing.verify_ledger()")
        if bad:
            diffs.append(f"{old}: verify_ledger after the update: {bad[:3]}")

        # The API after the update: a debit for each user (on both workers), a new user.
        for u in users:
            (sub, pur), = before_bal[u]
            r = q(conn, "SELECT billing.consume_credits_v2(%s, 2)", (u,))[0][0]
            if r["total_balance"] != sub + pur - 2:
                diffs.append(f"{old}: a debit after the update gave {r}, from {sub}+{pur}")
        new = uuid.uuid4()
        q(conn, "SELECT billing.add_purchased_credits(%s, 10)", (new,))
        r = q(conn, "SELECT billing.consume_credits_v2(%s, 4)", (new,))[0][0]
        if r["total_balance"] != 6:
            diffs.append(f"{old}: a new user's debit after the update gave {r}")
        bad = q(conn, "SELECT * FROM billing.verify_ledger()")
        if bad:
            diffs.append(f"{old}: verify_ledger after the debits: {bad[:3]}")
        delegated = q(conn, """SELECT count(*) FROM pg_dist_object
                                WHERE classid = 'pg_proc'::regclass AND force_delegation
                                  AND objid IN (SELECT oid FROM pg_proc WHERE pronamespace = 'billing'::regnamespace)""")[0][0]
        notes.append(f"{old} -> {current}: {len(users)} users on both workers, {len(before_rows)} tables kept, "
                     f"{len(shapes)} shard differences, functions on 3 nodes {'equal' if len(set(fn)) == 1 else 'DIFFER'} "
                     f"({fn[0][1]}); distribute() before {first.get('distributed_tables_created')} tables, "
                     f"after the update delegated {second.get('functions_delegated')} function(s) ({delegated} force-delegated), "
                     f"then {json.dumps(changes) if changes else 'nothing changed'}")
        conn.close()
    except (psycopg2.Error, AssertionError, RuntimeError, KeyError, IndexError) as e:
        diffs.append(f"{old}: {type(e).__name__}: {e}")
    finally:
        lib.restore()
        files.restore()
        try:
            drop_db(db)
        except psycopg2.Error:
            pass
    return diffs, notes


def main():
    current = current_version()
    releases = up.frozen_releases(REPO / "sql" / "releases")
    olds = [v for v, p in sorted(releases.items(), key=lambda kv: up.vkey(kv[0]))
            if up.vkey(v) < up.vkey(current) and "FUNCTION billing.distribute(" in p.read_text()]
    total, paths = [], 0
    for old in olds:
        so, why = up.old_library(old)
        if so is None:
            total.append(f"{old}: its library cannot be built ({why})")
            continue
        diffs, notes = check_path(old, current, so)
        paths += 1
        for n in notes:
            print(f"  {n}", flush=True)
        for d in diffs:
            print(f"  DIFFERENCE {d}", flush=True)
        total += diffs
    print(f"upgrade on the cluster: {paths} paths checked ({', '.join(olds) or 'none'} -> {current}, each written by its own library), "
          f"{len(total)} differences", flush=True)
    return 1 if total or not olds else 0


if __name__ == "__main__":
    sys.exit(main())
