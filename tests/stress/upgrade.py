#!/usr/bin/env python3
"""Part 5 of the reliability harness: the upgrade path (SPEC 1: `ALTER EXTENSION pg_billing UPDATE`
from every released version keeps all data).

Released versions are frozen in sql/releases/pg_billing--<version>.sql (the install script exactly
as it shipped; see sql/releases/README.md); upgrade scripts are sql/pg_billing--<from>--<to>.sql.
  (a) A frozen release whose version is the current default_version must be byte-identical to the
      installed /usr/share/postgresql/15/extension/pg_billing--<version>.sql: a released version
      never changes. No frozen file for the current version prints "no frozen release yet" and
      fails only when PGB_REQUIRE_FROZEN=1 (set it once the version is released).
  (b) For every frozen release older than the current version: its script and every upgrade
      script of sql/ are copied into the extension directory (removed / restored afterwards),
      a fresh database gets `CREATE EXTENSION pg_billing VERSION '<old>'`, data is written through
      the API (grants, consumption, refund, expiry, subscription, usage, rate limit, member,
      pending profile, webhook event), `ALTER EXTENSION pg_billing UPDATE` runs, and then:
        - the version is the current default_version;
        - every row of every table that existed before is still there, unchanged (on the old
          columns); balances per user are unchanged; verify_ledger() is empty; consume still works;
        - the tables the extension fills itself (not dumped: billing.api_functions) hold exactly
          the rows of a fresh install, and expose_rpc('public') re-run after the update creates
          the wrappers a fresh install gets;
        - every upgrade script of the path runs a second time without error and changes neither
          the catalog nor any row (upgrade scripts are idempotent, SPEC 12);
        - the catalog of schema billing (pg_class, pg_attribute and defaults, pg_constraint,
          pg_index, pg_proc with bodies, settings, ACLs and comments, pg_policy, pg_type/pg_enum,
          views, sequences, extension membership and pg_extension_config_dump registration)
          equals that of a fresh `CREATE EXTENSION pg_billing` in another database, and so does
          `pg_dump --schema-only --binary-upgrade` (which writes every member object), less the
          lines that carry only OIDs;
Prints `upgrade: N upgrade paths checked, M differences`; exits 1 on any difference.

`--selftest` proves path (b) is real without a release: it freezes the installed script as a
made-up version 0.0.9 (in a temporary directory) with an empty 0.0.9--<current> upgrade script
(must give 0 differences), then with an upgrade script that changes the schema (must find the
change). The extension directory is left exactly as it was.

Usage: upgrade.py [--selftest] (connection from PGHOST/PGPORT/PGUSER/PGDATABASE)."""
import argparse
import difflib
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import psycopg2
import psycopg2.extensions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import connect, ensure_roles, fmt, q  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXT = "pg_billing"


def extension_dir():
    try:
        share = subprocess.run([os.environ.get("PG_CONFIG", "/usr/bin/pg_config"), "--sharedir"], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        share = "/usr/share/postgresql/15"
    return Path(share) / "extension"


def vkey(v):
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.\-]", v))


def script_blocks(path):
    """The install script as the multiset of pgrx's "connected objects" blocks. pgrx documents
    that the order of its blocks is driven by a dependency graph and is not stable, so the check
    compares what each block says, not where pgrx put it."""
    text = Path(path).read_text()
    return sorted(b.strip() for b in text.split("/* <begin connected objects> */") if b.strip())


def same_script(a, b):
    return filecmp.cmp(a, b, shallow=False) or script_blocks(a) == script_blocks(b)


def frozen_releases(releases_dir):
    out = {}
    for p in sorted(Path(releases_dir).glob(f"{EXT}--*.sql")):
        m = re.fullmatch(rf"{EXT}--([^-]+)\.sql", p.name)
        if m:
            out[m.group(1)] = p
    return out


def upgrade_scripts(sql_dir):
    return sorted(p for p in Path(sql_dir).glob(f"{EXT}--*--*.sql"))


def upgrade_chain(scripts, old, current):
    """The upgrade scripts ALTER EXTENSION runs from old to current, in order (the shortest chain
    by version, as PostgreSQL picks), or None when there is no path."""
    edges = {}
    for p in scripts:
        m = re.fullmatch(rf"{EXT}--([^-]+)--([^-]+)\.sql", Path(p).name)
        if m:
            edges.setdefault(m.group(1), []).append((m.group(2), Path(p)))
    paths, seen = [(old, [])], {old}
    while paths:
        nxt = []
        for v, chain in paths:
            if v == current:
                return chain
            for to, p in sorted(edges.get(v, []), key=lambda e: vkey(e[0])):
                if to not in seen:
                    seen.add(to)
                    nxt.append((to, chain + [p]))
        paths = nxt
    return None


def script_as_sql(path):
    """An extension script as plain SQL, with what CREATE EXTENSION substitutes: no \\echo guard
    lines, MODULE_PATHNAME and @extschema@ replaced."""
    text = Path(path).read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("\\echo"))
    return text.replace("MODULE_PATHNAME", f"$libdir/{EXT}").replace("@extschema@", "billing")


# ---------------------------------------------------------------------------------------------
# Files in the extension directory: every one this test adds is removed, every one it replaces
# is restored.

class ExtFiles:
    def __init__(self, extdir):
        self.extdir = Path(extdir)
        self.added, self.replaced = [], []      # paths; (path, backup)
        self.tmp = Path(tempfile.mkdtemp(prefix="pgb_upgrade_backup."))

    def _run(self, args):
        pre = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run(pre + args, check=True)

    def put(self, src, name=None):
        dest = self.extdir / (name or Path(src).name)
        if dest.exists():
            if filecmp.cmp(src, dest, shallow=False):
                return
            backup = self.tmp / f"{len(self.replaced)}-{dest.name}"
            shutil.copy2(dest, backup)
            self.replaced.append((dest, backup))
        else:
            self.added.append(dest)
        self._run(["cp", str(src), str(dest)])
        self._run(["chmod", "644", str(dest)])

    def restore(self):
        for dest in reversed(self.added):
            self._run(["rm", "-f", str(dest)])
        for dest, backup in reversed(self.replaced):
            self._run(["cp", str(backup), str(dest)])
        self.added, self.replaced = [], []
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The shared library of an older release, built from the commit it shipped from.

def release_commit(version, releases_dir=None):
    """The commit a released version shipped from (sql/releases/commits.txt), or None."""
    f = Path(releases_dir or REPO / "sql" / "releases") / "commits.txt"
    if not f.exists():
        return None
    for line in f.read_text().splitlines():
        parts = line.split("#")[0].split()
        if len(parts) == 2 and parts[0] == version:
            return parts[1]
    return None


def pg_config():
    return os.environ.get("PG_CONFIG", "/usr/bin/pg_config")


def pg_major():
    """The major version of the PostgreSQL the check runs against (PG_CONFIG; 15 by default)."""
    try:
        out = subprocess.run([pg_config(), "--version"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 15
    m = re.match(r"PostgreSQL (\d+)", out.strip())
    return int(m.group(1)) if m else 15


def add_pg_feature(cargo_toml, major):
    """Adds `pg<major> = ["pgrx/pg<major>"]` to an old release's [features] (in a temporary
    copy), unless it is there already."""
    text = cargo_toml.read_text()
    line = f'pg{major} = ["pgrx/pg{major}"]'
    if re.search(rf"^pg{major}\s*=", text, re.M):
        return
    new, n = re.subn(r"^\[features\]\n", lambda m: m.group(0) + line + "\n", text, count=1, flags=re.M)
    if n != 1:
        raise RuntimeError(f"{cargo_toml} has no [features] table to add {line} to")
    cargo_toml.write_text(new)


def old_library(version, quiet=False):
    """Builds the shared library of a released version from its commit (cached in .tmp/releases/).
    Returns (path, None), or (None, reason) when the commit is not in this clone (a shallow one),
    or raises RuntimeError when the build fails."""
    commit = release_commit(version)
    if not commit:
        return None, f"no commit recorded for {version} in sql/releases/commits.txt"
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                      capture_output=True).returncode != 0:
        return None, f"the {version} commit {commit[:12]} is not in this clone"
    major = pg_major()
    # PostgreSQL 15 is the old releases' default feature; another version gets its own build.
    base = REPO / ".tmp" / "releases" / (f"{version}-{commit[:12]}" + ("" if major == 15 else f"-pg{major}"))
    so = base / f"lib{EXT}.so"
    legacy = base / "target" / "debug" / f"lib{EXT}.so"    # where builds before issue 12 left it
    for built in (so, legacy):
        if built.exists():
            return built, None
    if not quiet:
        print(f"  building the {version} library from commit {commit[:12]} (once; cached in {base.relative_to(REPO)})",
              flush=True)
    src = base / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    # One target directory per PostgreSQL version for every old release: their dependencies are
    # compiled once, not once per release; each release's library is copied out of it.
    target = REPO / ".tmp" / "releases" / f"target-pg{major}"
    env = dict(os.environ, PGRX_HOME=str(REPO / "pgrx-config"), CARGO_TARGET_DIR=str(target))
    args = ["cargo", "build", "--lib", "--locked"]
    if major != 15:
        # Releases before 0.3.0 have only the pg15 feature; their code builds unchanged for 16-18,
        # so this temporary copy gets the feature line of the running version (the line 0.3.0
        # has), and is built against the running server's own pg_config.
        add_pg_feature(src / "Cargo.toml", major)
        env["PGRX_PG_CONFIG_PATH"] = pg_config()
        args += ["--no-default-features", "--features", f"pg{major}"]
    # The releases' own crates (pg_billing, pg_billing_core) are built again from this release's
    # sources: every release calls its core crate pg_billing_core 0.1.0, and cargo would take an
    # earlier release's build of it from the shared directory as up to date (0.4.0's code needs
    # a module 0.3.0's core crate does not have).
    for pattern in (".fingerprint/pg_billing*", "deps/libpg_billing*", "deps/pg_billing*", "build/pg_billing*",
                    "incremental/pg_billing*", "libpg_billing*"):
        for stale in (target / "debug").glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    r = subprocess.run(args, cwd=src, env=env, capture_output=True, text=True)
    out = target / "debug" / f"lib{EXT}.so"
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"building the {version} library failed: {r.stderr[-3000:]}")
    shutil.copy2(out, so.with_suffix(".so.tmp"))
    os.replace(so.with_suffix(".so.tmp"), so)
    return so, None


class Library:
    """Swaps the installed shared library. Every swap is an atomic rename, so a running backend
    keeps the file it mapped (overwriting a mapped library in place can crash it); a new
    connection loads whatever is installed when it first calls a pg_billing function."""

    def __init__(self):
        try:
            libdir = subprocess.run([os.environ.get("PG_CONFIG", "/usr/bin/pg_config"), "--pkglibdir"], check=True, capture_output=True,
                                    text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            libdir = "/usr/lib/postgresql/15/lib"
        self.path = Path(libdir) / f"{EXT}.so"
        self.tmp = Path(tempfile.mkdtemp(prefix="pgb_upgrade_lib."))
        self.backup = None

    def _run(self, args):
        pre = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run(pre + args, check=True)

    def _put(self, src):
        staged = self.path.with_name(f".{self.path.name}.pgb_upgrade")
        self._run(["cp", str(src), str(staged)])
        self._run(["chmod", "755", str(staged)])
        self._run(["mv", "-f", str(staged), str(self.path)])

    def install(self, so):
        if self.backup is None:
            self.backup = self.tmp / self.path.name
            shutil.copy2(self.path, self.backup)
        self._put(so)

    def installed_inode(self):
        return os.stat(self.path).st_ino

    def mapped_by(self, conn):
        """The inodes of pg_billing libraries the connection's backend has mapped (from
        /proc/<pid>/maps), or None when that cannot be read."""
        pid = q(conn, "SELECT pg_backend_pid()")[0][0]
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            return None
        return {int(f[4]) for f in (line.split() for line in lines) if len(f) >= 6 and f[5].endswith(f"/{EXT}.so")}

    def restore(self):
        if self.backup is not None:
            self._put(self.backup)
            self.backup = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The catalog of schema billing, as sorted lines of text.

CATALOG_QUERIES = {
    "relation": """
        SELECT format('%s kind=%s persistence=%s rls=%s force_rls=%s options=%s acl=%s comment=%s member=%s',
                      c.relname, c.relkind, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity,
                      c.reloptions, c.relacl, obj_description(c.oid, 'pg_class'),
                      EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                              AND d.deptype = 'e'))
          FROM pg_class c WHERE c.relnamespace = 'billing'::regnamespace""",
    "column": """
        SELECT format('%s.%s #%s %s notnull=%s default=%s identity=%s generated=%s collation=%s acl=%s comment=%s',
                      c.relname, a.attname,
                      row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), format_type(a.atttypid, a.atttypmod),
                      a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
                      a.attcollation::regcollation, a.attacl, col_description(c.oid, a.attnum))
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
         WHERE c.relnamespace = 'billing'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'p', 'v', 'm', 'c', 'f')""",
    "constraint": """
        SELECT format('%s on %s: %s deferrable=%s', con.conname, con.conrelid::regclass, pg_get_constraintdef(con.oid),
                      con.condeferrable)
          FROM pg_constraint con WHERE con.connamespace = 'billing'::regnamespace""",
    "index": """
        SELECT pg_get_indexdef(i.indexrelid) || format(' primary=%s unique=%s', i.indisprimary, i.indisunique)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace = 'billing'::regnamespace""",
    "function": """
        SELECT format('%s(%s) returns %s lang=%s kind=%s volatile=%s secdef=%s strict=%s leakproof=%s parallel=%s '
                      'cost=%s rows=%s config=%s acl=%s bin=%s src=%s comment=%s member=%s',
                      p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), l.lanname, p.prokind,
                      p.provolatile, p.prosecdef, p.proisstrict, p.proleakproof, p.proparallel, p.procost, p.prorows,
                      p.proconfig, p.proacl, p.probin, md5(p.prosrc), obj_description(p.oid, 'pg_proc'),
                      EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e'))
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'billing'::regnamespace""",
    "policy": """
        SELECT format('%s on %s: cmd=%s permissive=%s roles=%s using=%s check=%s', pol.polname, pol.polrelid::regclass,
                      pol.polcmd, pol.polpermissive,
                      (SELECT array_agg(CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END ORDER BY 1)
                         FROM unnest(pol.polroles) r),
                      pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid))
          FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid
         WHERE c.relnamespace = 'billing'::regnamespace""",
    "type": """
        SELECT format('%s typtype=%s acl=%s enum=%s member=%s', t.typname, t.typtype, t.typacl,
                      (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid),
                      EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
                              AND d.deptype = 'e'))
          FROM pg_type t
         WHERE t.typnamespace = 'billing'::regnamespace AND t.typtype IN ('e', 'd', 'b', 'r', 'm')""",
    "view": """
        SELECT format('%s: %s', c.relname, md5(pg_get_viewdef(c.oid)))
          FROM pg_class c WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('v', 'm')""",
    "sequence": """
        SELECT format('%s %s start=%s inc=%s max=%s min=%s cycle=%s', c.relname, format_type(s.seqtypid, NULL),
                      s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcycle)
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = 'billing'::regnamespace""",
    "trigger": """
        SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'billing'::regnamespace AND NOT t.tgisinternal""",
    "config_dump": """
        SELECT format('%s where=%s', cfg.oid::regclass, cond)
          FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS x(oid, cond), LATERAL (SELECT x.oid) cfg
         WHERE e.extname = 'pg_billing'""",
    "extension": """
        SELECT format('schema=%s relocatable=%s', extnamespace::regnamespace, extrelocatable)
          FROM pg_extension WHERE extname = 'pg_billing'""",
    "schema": """
        SELECT format('billing owner=%s acl=%s comment=%s', nspowner::regrole, nspacl, obj_description(oid, 'pg_namespace'))
          FROM pg_namespace WHERE nspname = 'billing'""",
}


def schema_dump(dbname):
    """`pg_dump --schema-only --binary-upgrade` of a database: in binary-upgrade mode pg_dump writes
    every member object of an extension, not just CREATE EXTENSION. The lines that only carry OIDs
    and relfilenodes, sequence positions, the frozen transaction ids and the dump's random \\restrict key (which differ
    between any two databases) are left out; the extension's version and its dump registrations
    are compared elsewhere."""
    bindir = subprocess.run([os.environ.get("PG_CONFIG", "/usr/bin/pg_config"), "--bindir"], check=True, capture_output=True, text=True).stdout.strip()
    r = subprocess.run([f"{bindir}/pg_dump", "--schema-only", "--binary-upgrade", "-d", dbname],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pg_dump of {dbname} failed: {r.stderr.strip()}")
    skip = re.compile(r"^(SELECT pg_catalog\.binary_upgrade_(set_next_|create_empty_extension)"   # OIDs
                      r"|SET relfrozenxid = |WHERE oid = '\d+';$"         # transaction ids of a toast table
                      r"|SELECT pg_catalog\.setval\("                     # sequence positions (data)
                      r"|\\(un)?restrict )")                             # a random key per dump
    return [line for line in r.stdout.splitlines() if not skip.match(line)]


def catalog(conn):
    lines = set()
    for kind, sql in CATALOG_QUERIES.items():
        with conn.cursor() as cur:
            cur.execute(sql)        # no parameters: the format() strings hold '%s'
            for (line,) in cur.fetchall():
                lines.add(f"{kind}: {line}")
    return lines


# ---------------------------------------------------------------------------------------------
# Data written through the API under the old version, and its check after the update.

def write_data(conn, tag):
    """Returns (users, list of problems)."""
    problems = []
    u1, u2, u3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    email = f"up-{tag}@example.com"
    steps = [
        ("SELECT billing.add_subscription_credits(%s, 100, 'grant', 'ref-1', 'k1')", (u1,)),
        ("SELECT billing.add_purchased_credits(%s, 250, 'pack', 'pi_1', 'k2')", (u1,)),
        ("SELECT billing.consume_credits_v2(%s, 120, 'use', 'r', 'k3')", (u1,)),
        ("SELECT billing.refund_credits(%s, 5, 'refund')", (u1,)),
        ("SELECT billing.add_subscription_credits(%s, 40)", (u2,)),
        ("SELECT billing.expire_subscription_credits(%s)", (u2,)),
        ("SELECT billing.renew_subscription_credits(%s, 60)", (u2,)),
        ("""SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := 'pro', p_status := 'active',
                   p_current_period_end := now() + interval '30 days', p_event_id := %s)""", (u3, f"evt-up-{tag}")),
        ("SELECT billing.record_message_usage(%s, 10, 20)", (u1,)),
        ("SELECT billing.record_conversation_usage(%s)", (u1,)),
        ("SELECT * FROM billing.check_api_rate_limit(%s, '/up')", (u1,)),
        ("SELECT billing.record_webhook_event(%s, 'invoice.paid', %s)", (f"wh-up-{tag}", u1)),
        ("SELECT billing.upsert_member(%s, 'pro', NULL, %s)", (email, f"mem-up-{tag}")),
        ("SELECT billing.upsert_pending_profile(%s, 'tok-up')", (f"pend-{tag}@example.com",)),
        # Registries (0.3.0 keeps the relation's oid, kind and owner: the update resolves the
        # stored names; a registered table that was dropped must stay refused).
        ("CREATE TABLE public.up_agents (id bigint, user_id uuid NOT NULL)", ()),
        ("CREATE INDEX ON public.up_agents (user_id)", ()),
        ("INSERT INTO public.up_agents VALUES (1, %s)", (u1,)),
        ("SELECT billing.register_resource('up_agents', 'public.up_agents')", ()),
        ("CREATE TABLE public.up_gone (id bigint, user_id uuid NOT NULL)", ()),
        ("CREATE INDEX ON public.up_gone (user_id)", ()),
        ("SELECT billing.register_resource('up_gone', 'public.up_gone')", ()),
        ("DROP TABLE public.up_gone", ()),
        ("CREATE SCHEMA up_app", ()),
        ("""CREATE TABLE up_app.cards (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL,
                is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now(), label text)""", ()),
        ("INSERT INTO up_app.cards (id, user_id, position, label) VALUES (gen_random_uuid(), %s, 1, 'up')", (u1,)),
        ("SELECT billing.register_widget_table('upcards', 'up_app.cards')", ()),
    ]
    for sql, params in steps:
        try:
            q(conn, sql, params)
        except psycopg2.Error as e:
            problems.append(f"writing data under the old version: {sql.split('(')[0]} failed: {e.pgcode} {e.pgerror}")
    try:
        member = q(conn, "SELECT (billing.upsert_member(%s, 'pro'))->>'member_id'", (email,))[0][0]
        q(conn, "SELECT billing.add_credits(%s, 7, %s)", (member, f"ac-up-{tag}"))
        q(conn, "SELECT billing.consume_generation(%s, 3)", (member,))
    except psycopg2.Error as e:
        problems.append(f"writing member data under the old version: {e.pgcode} {e.pgerror}")
    return [u1, u2, u3], problems


def table_rows(conn):
    """{table: (columns, sorted rows as text)} for every table of schema billing."""
    out = {}
    for (t,) in q(conn, "SELECT relname FROM pg_class WHERE relnamespace = 'billing'::regnamespace AND relkind = 'r'"):
        cols = [r[0] for r in q(conn, """SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0
                                          AND NOT attisdropped ORDER BY attnum""", (f'billing."{t}"',))]
        out[t] = (cols, None)
    return out


def content_tables(conn):
    """Tables of the extension that pg_dump does not dump (not in extconfig): filled by the
    install and upgrade scripts themselves, such as billing.api_functions."""
    return [r[0] for r in q(conn, """
        SELECT c.relname FROM pg_class c
         WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
           AND c.oid <> ALL (COALESCE((SELECT extconfig FROM pg_extension WHERE extname = 'pg_billing'), '{}'))
         ORDER BY 1""")]


def rows_on(conn, table, cols):
    sel = ", ".join(f'"{c}"::text' for c in cols)
    return sorted(q(conn, f'SELECT {sel} FROM billing."{table}"'), key=lambda r: tuple("" if x is None else x for x in r))


def balances(conn, users):
    return {u: q(conn, "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.get_user_credits(%s)", (u,))
            for u in users}


# ---------------------------------------------------------------------------------------------

class Outcome:
    def __init__(self):
        self.paths = 0
        self.old_libraries = 0
        self.differences = []
        self.notes = []

    def line(self):
        libs = f" (data written by the old release's own library on {fmt(self.old_libraries)})" if self.old_libraries else ""
        s = f"upgrade: {fmt(self.paths)} upgrade paths checked{libs}, {fmt(len(self.differences))} differences"
        return s + (f" ({'; '.join(self.notes)})" if self.notes else "")


def make_db(admin, name):
    q(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    q(admin, f"CREATE DATABASE {name}")
    return psycopg2.extensions.make_dsn(admin.dsn, dbname=name)


def check_path(admin, old, current, out, label=None, quiet=False, chain=None, old_lib=None):
    """CREATE EXTENSION VERSION old, data, UPDATE; compare with a fresh install. The files must be
    in the extension directory already. With `chain` (the upgrade scripts of the path), each is
    then run a second time and must change nothing: upgrade scripts are idempotent (SPEC 12).
    With `old_lib` (the old release's shared library), the old version is installed and its data
    written by that library; the current library is put back before the UPDATE, as a DBA does.
    Returns the list of differences of this path."""
    label = label or f"{old} -> {current}"
    diffs = []
    tag = uuid.uuid4().hex[:8]
    db_old, db_new = f"pgb_upgrade_old_{os.getpid()}", f"pgb_upgrade_new_{os.getpid()}"
    lib = Library() if old_lib else None
    try:
        dsn_old = make_db(admin, db_old)
        if lib:
            lib.install(old_lib)
            old_inode = lib.installed_inode()
        c_old = connect(dsn_old)
        try:
            q(c_old, "CREATE EXTENSION pg_billing VERSION %s", (old,))
        except psycopg2.Error as e:
            diffs.append(f"{label}: CREATE EXTENSION pg_billing VERSION '{old}' failed: {e.pgcode} {e.pgerror}")
            return diffs
        users, problems = write_data(c_old, tag)
        diffs += [f"{label}: {p}" for p in problems]
        before_tables = table_rows(c_old)
        before = {t: rows_on(c_old, t, cols) for t, (cols, _) in before_tables.items()}
        before_bal = balances(c_old, users)
        if lib:
            mapped = lib.mapped_by(c_old)
            if mapped is not None and mapped != {old_inode}:
                diffs.append(f"{label}: the data was not written by the old library (mapped {mapped}, old {old_inode})")
            c_old.close()
            lib.restore()
            lib = None
            new_inode = os.stat(Library().path).st_ino
            c_old = connect(dsn_old)
            q(c_old, "SELECT billing.is_end_user()")     # a C function: loads the library
            mapped = Library().mapped_by(c_old)
            if mapped is not None and mapped != {new_inode}:
                diffs.append(f"{label}: the update did not run with the current library (mapped {mapped}, current {new_inode})")
        try:
            q(c_old, "ALTER EXTENSION pg_billing UPDATE")
        except psycopg2.Error as e:
            diffs.append(f"{label}: ALTER EXTENSION pg_billing UPDATE failed: {e.pgcode} {e.pgerror}")
            return diffs
        ver = q(c_old, "SELECT extversion FROM pg_extension WHERE extname = 'pg_billing'")[0][0]
        if ver != current:
            diffs.append(f"{label}: after UPDATE the version is {ver}, not {current} (no upgrade path?)")
        after_tables = table_rows(c_old)
        for t, (cols, _) in before_tables.items():
            if t not in after_tables:
                diffs.append(f"{label}: table billing.{t} is gone after the update")
                continue
            missing = [c for c in cols if c not in after_tables[t][0]]
            if missing:
                diffs.append(f"{label}: billing.{t} lost columns {missing}")
                continue
            after = rows_on(c_old, t, cols)
            lost = Counter(before[t]) - Counter(after)
            if lost:
                diffs.append(f"{label}: billing.{t}: {sum(lost.values())} of {len(before[t])} rows lost or changed by "
                             f"the update, e.g. {next(iter(lost))}")
        if balances(c_old, users) != before_bal:
            diffs.append(f"{label}: balances changed by the update: {before_bal} -> {balances(c_old, users)}")
        bad = q(c_old, "SELECT count(*) FROM billing.verify_ledger()")[0][0]
        if bad:
            diffs.append(f"{label}: verify_ledger lists {bad} users after the update")
        try:
            r = q(c_old, "SELECT billing.consume_credits_v2(%s, 1)", (users[0],))[0][0]
            if r.get("success") is not True:
                diffs.append(f"{label}: consume after the update returned {r}")
        except psycopg2.Error as e:
            diffs.append(f"{label}: consume after the update failed: {e.pgcode} {e.pgerror}")
        # 0.4.0 turned the pools into grants: the purchase written by the old version can still be
        # clawed back by its transaction id, from its own grant. users[0] bought 250, spent 20 of
        # them (after 100 subscription credits), was refunded 5 and spent 1 more after the update
        # (above): 234 come back, 16 short. (Data the current library wrote, as in the self-test,
        # or a release with grants (0.4.0 on) wrote, keeps the refund in a grant of its own: then
        # only the purchase's own 250 must add up.)
        # (In a transaction that is rolled back: the rows compared below stay as the update left them.)
        if q(c_old, "SELECT to_regclass('billing.credit_grants') IS NOT NULL")[0][0]:
            try:
                with c_old.cursor() as cur:
                    cur.execute("BEGIN")
                    cur.execute("""SELECT billing.clawback_credits_from_transaction(t.operation_id)
                                     FROM billing.credit_transactions AS t
                                    WHERE t.user_id = %s AND t.type = 'purchase' AND t.reference_id = 'pi_1'""", (users[0],))
                    row = cur.fetchone()
                    r = row[0] if row else None     # (the self-test's planted scripts write no data)
                    cur.execute("SELECT count(*) FROM billing.verify_ledger()")
                    bad_after = cur.fetchone()[0]
                    cur.execute("ROLLBACK")
                if r is not None and not ((r.get("clawed_back"), r.get("shortfall"), bad_after) == (234, 16, 0)
                                          or ((not old_lib or vkey(old) >= vkey("0.4.0")) and r.get("clawed_back", 0) > 0
                                              and r.get("clawed_back", 0) + r.get("shortfall", 0) == 250 and bad_after == 0)):
                    diffs.append(f"{label}: a clawback of the old purchase after the update gave {r} "
                                 f"(verify_ledger then lists {bad_after} users), not 234 back and 16 short")
            except psycopg2.Error as e:
                q(c_old, "ROLLBACK")
                diffs.append(f"{label}: a clawback of the old purchase after the update failed: {e.pgcode} {e.pgerror}")
        # The registries written by the old version still work, by oid (0.3.0), and a registered
        # table that was dropped before the update is refused.
        for sql, expected in (("SELECT current_count FROM billing.check_resource_limit(%s, 'up_agents')", [(1,)]),
                              ("SELECT data ->> 'label' FROM billing.get_user_widgets_ordered(%s)", [("up",)]),
                              ("SELECT current_count FROM billing.check_resource_limit(%s, 'up_gone')", "P0002")):
            try:
                got = q(c_old, sql, (users[0],))
            except psycopg2.Error as e:
                got = e.pgcode
            if got != expected:
                diffs.append(f"{label}: after the update {sql.split('(')[0]}... gave {got}, not {expected}")
        # The app's objects are not the extension's: out of the schema dump comparison.
        q(c_old, "DROP SCHEMA IF EXISTS up_app CASCADE")
        q(c_old, "DROP TABLE IF EXISTS public.up_agents")
        c_new = connect(make_db(admin, db_new))
        q(c_new, "CREATE EXTENSION pg_billing")
        # SPEC 1: expose_rpc is re-run after an upgrade and gives the wrappers of a fresh install.
        wrappers = {}
        for name, conn in (("upgraded", c_old), ("fresh", c_new)):
            try:
                q(conn, "SELECT billing.expose_rpc('public')")
                with conn.cursor() as cur:
                    cur.execute("""     -- no parameters: the format() string holds '%s'
                        SELECT format('%s(%s) returns %s secdef=%s config=%s acl=%s', p.proname,
                                      pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prosecdef,
                                      p.proconfig, p.proacl)
                          FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace""")
                    wrappers[name] = {r[0] for r in cur.fetchall()}
            except psycopg2.Error as e:
                diffs.append(f"{label}: expose_rpc('public') failed on the {name} install: {e.pgcode} {e.pgerror}")
        if len(wrappers) == 2:
            for line in sorted(wrappers["fresh"] ^ wrappers["upgraded"]):
                side = "a fresh install" if line in wrappers["fresh"] else "the upgraded install"
                diffs.append(f"{label}: public wrapper only in {side}: {line[:300]}")
        cat_old, cat_new = catalog(c_old), catalog(c_new)
        # Tables the extension fills itself (not registered with pg_extension_config_dump, so not
        # user data): their rows must be those of a fresh install.
        for t in content_tables(c_new):
            cols = [r[0] for r in q(c_new, """SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0
                                               AND NOT attisdropped ORDER BY attnum""", (f'billing."{t}"',))]
            try:
                upgraded, fresh = rows_on(c_old, t, cols), rows_on(c_new, t, cols)
            except psycopg2.Error as e:
                diffs.append(f"{label}: extension content billing.{t} cannot be read after the update: {e.pgcode} {e.pgerror}")
                continue
            for r in sorted(set(fresh) - set(upgraded), key=str):
                diffs.append(f"{label}: billing.{t} (extension content): only in a fresh install: {r}")
            for r in sorted(set(upgraded) - set(fresh), key=str):
                diffs.append(f"{label}: billing.{t} (extension content): only in the upgraded install: {r}")
        if chain:
            rows_before_rerun = {t: rows_on(c_old, t, cols) for t, (cols, _) in table_rows(c_old).items()}
            for script in chain:
                sql = script_as_sql(script)
                if not re.sub(r"--[^\n]*", "", sql).strip():
                    continue        # comments only (a new release's script before its first change)
                try:
                    with c_old.cursor() as cur:
                        cur.execute(sql)
                except psycopg2.Error as e:
                    diffs.append(f"{label}: {script.name} is not idempotent: a second run failed: {e.pgcode} {e.pgerror}")
            cat_rerun = catalog(c_old)
            for line in sorted(cat_rerun ^ cat_old):
                diffs.append(f"{label}: a second run of the upgrade scripts changed the catalog: {line[:400]}")
            rows_after_rerun = {t: rows_on(c_old, t, cols) for t, (cols, _) in table_rows(c_old).items()}
            if rows_after_rerun != rows_before_rerun:
                changed = sorted(t for t in rows_after_rerun if rows_after_rerun[t] != rows_before_rerun.get(t))
                diffs.append(f"{label}: a second run of the upgrade scripts changed rows of {changed}")
        for line in sorted(cat_new - cat_old):
            diffs.append(f"{label}: catalog: only in a fresh install:     {line[:400]}")
        for line in sorted(cat_old - cat_new):
            diffs.append(f"{label}: catalog: only in the upgraded install: {line[:400]}")
        # The same question asked of pg_dump: the schema dumps of both databases are identical.
        dump_new = []
        try:
            dump_old, dump_new = schema_dump(db_old), schema_dump(db_new)
            if dump_old != dump_new:
                delta = list(difflib.unified_diff(dump_new, dump_old, "fresh install", "upgraded install", n=1, lineterm=""))
                diffs.append(f"{label}: pg_dump --schema-only --binary-upgrade differs ({len(delta)} diff lines): "
                             + " | ".join(delta[2:12])[:1500])
        except (RuntimeError, OSError) as e:
            diffs.append(f"{label}: {e}")
        if not quiet:
            rerun = f"; {len(chain)} upgrade scripts run twice" if chain else ""
            print(f"  {label}: {len(before)} tables, {sum(len(v) for v in before.values())} rows kept; "
                  f"{len(cat_new)} catalog entries, {len(wrappers.get('fresh', ()))} public wrappers and "
                  f"{len(dump_new)} lines of schema dump compared{rerun}; "
                  f"{len(diffs)} differences", flush=True)
        c_old.close()
        c_new.close()
    finally:
        if lib:
            lib.restore()
        for db in (db_old, db_new):
            q(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    return diffs


def run(releases_dir=None, sql_dir=None, quiet=False, old_libraries=True):
    """The check on the repository's sql/releases and sql/. With old_libraries, each older
    release's data is written by that release's own library, built from its commit; when the
    commit is not in this clone the current library writes it and the figure line says so
    (PGB_REQUIRE_OLD_LIBRARY=1 makes that a difference: scripts/test.sh and the long stress run
    set it, so make test fails instead of falling back). Returns an Outcome."""
    releases_dir = Path(releases_dir or REPO / "sql" / "releases")
    sql_dir = Path(sql_dir or REPO / "sql")
    out = Outcome()
    extdir = extension_dir()
    admin = connect()
    ensure_roles(admin)
    current = q(admin, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_billing'")[0][0]
    frozen = frozen_releases(releases_dir)
    # (a) the current version, once released, never changes.
    if current in frozen:
        installed = extdir / f"{EXT}--{current}.sql"
        if not installed.exists():
            out.differences.append(f"{installed} is not installed")
        elif not same_script(frozen[current], installed):
            out.differences.append(f"released {current}: the installed {installed.name} differs from the frozen "
                                   f"{frozen[current].relative_to(REPO) if REPO in frozen[current].parents else frozen[current]}: "
                                   "a released version must never change (bump the version and add an upgrade script)")
        elif not quiet:
            print(f"  released {current}: the installed script is identical to the frozen one", flush=True)
    else:
        out.notes.append(f"no frozen release yet of {current}")
        if not quiet:
            print(f"  no frozen release yet of the current version {current} (sql/releases/{EXT}--{current}.sql)", flush=True)
        if os.environ.get("PGB_REQUIRE_FROZEN") == "1":
            out.differences.append(f"PGB_REQUIRE_FROZEN=1 but sql/releases/{EXT}--{current}.sql is missing")
    for v in frozen:
        if vkey(v) > vkey(current):
            out.differences.append(f"frozen release {v} is newer than the current version {current}")
    # (b) every older release upgrades to the current version.
    older = sorted((v for v in frozen if vkey(v) < vkey(current)), key=vkey)
    if not older:
        if not quiet:
            print("  no release older than the current version: no upgrade path to check yet", flush=True)
    files = ExtFiles(extdir)
    scripts = upgrade_scripts(sql_dir)
    try:
        if older:
            for s in scripts:
                files.put(s)
        for v in older:
            chain = upgrade_chain(scripts, v, current)
            if chain is None:
                out.differences.append(f"no upgrade path from the released {v} to {current}: add sql/{EXT}--{v}--{current}.sql")
                continue
            files.put(frozen[v])
            lib = None
            if old_libraries:
                try:
                    lib, reason = old_library(v, quiet=quiet)
                except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                    out.differences.append(f"{v}: {e}")
                    continue
                if lib is None:
                    out.notes.append(f"{v} data written by the current library: {reason}")
                    if os.environ.get("PGB_REQUIRE_OLD_LIBRARY") == "1":
                        out.differences.append(f"PGB_REQUIRE_OLD_LIBRARY=1 but {reason}")
                else:
                    out.old_libraries += 1
            out.differences += check_path(admin, v, current, out, quiet=quiet, chain=chain, old_lib=lib,
                                          label=f"{v} -> {current}" + (f" ({v} library)" if lib else ""))
            out.paths += 1
    finally:
        files.restore()
        admin.close()
    return out


def selftest(quiet=False):
    """Fakes a release 0.0.9 from the installed script; an empty upgrade script must give no
    difference, a schema-changing one must be found. Returns a list of problems (empty = good)."""
    problems = []
    extdir = extension_dir()
    admin = connect()
    ensure_roles(admin)
    current = q(admin, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_billing'")[0][0]
    fake = "0.0.9"
    if vkey(fake) >= vkey(current):
        return [f"selftest: the fake version {fake} is not older than {current}"]
    for name in (f"{EXT}--{fake}.sql", f"{EXT}--{fake}--{current}.sql"):
        if (extdir / name).exists():
            return [f"selftest: {extdir / name} exists already; refusing to touch it"]
    listing = sorted(os.listdir(extdir))
    tmp = Path(tempfile.mkdtemp(prefix="pgb_upgrade_selftest."))
    try:
        rel, sqld = tmp / "releases", tmp / "sql"
        rel.mkdir()
        sqld.mkdir()
        shutil.copy2(extdir / f"{EXT}--{current}.sql", rel / f"{EXT}--{fake}.sql")
        for case, script, want_diff in [
            ("no-op upgrade", "-- selftest: 0.0.9 is the same schema\n", False),
            ("schema-changing upgrade",
             "ALTER TABLE billing.plans ADD COLUMN selftest_extra integer;\n"
             "COMMENT ON FUNCTION billing.verify_ledger(uuid) IS 'selftest';\n", True),
        ]:
            (sqld / f"{EXT}--{fake}--{current}.sql").write_text(script)
            files = ExtFiles(extdir)
            try:
                files.put(rel / f"{EXT}--{fake}.sql")
                files.put(sqld / f"{EXT}--{fake}--{current}.sql")
                diffs = check_path(admin, fake, current, None, label=f"selftest {fake} -> {current} ({case})", quiet=quiet)
            finally:
                files.restore()
            if want_diff:
                wanted = [d for d in diffs if "selftest_extra" in d] and [d for d in diffs if "selftest" in d and "function" in d]
                if not wanted:
                    problems.append(f"selftest ({case}): the changed column and comment were not reported: {diffs[:5]}")
                elif not quiet:
                    print(f"  selftest ({case}): found as expected: {len(diffs)} differences, e.g. {diffs[0][:160]}", flush=True)
            elif diffs:
                problems.append(f"selftest ({case}): {len(diffs)} differences, first: {diffs[:5]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        admin.close()
    if sorted(os.listdir(extdir)) != listing:
        problems.append("selftest: the extension directory was not left as it was")
    return problems


# Mistakes an upgrade script could make; the check must find each one in the real scripts.
MUTATIONS = [
    ("grants left out", r"^(REVOKE [^\n]*|SELECT billing\.apply_grants\(\);)\n", True),
    ("an index left out", r"^CREATE INDEX [^\n]*\n", False),
    ("not idempotent (no IF NOT EXISTS)", r"(?<=^CREATE INDEX )IF NOT EXISTS ", False),
    ("API catalog rows left out", r"^INSERT INTO billing\.api_functions.*?;\n", False),
    ("a comment left out", r"^COMMENT ON TABLE [^\n]*\n", False),
]


def mutation_test(quiet=False):
    """Each mutation of each real upgrade script (sql/) must give at least one difference.
    Returns (mutations tried, list of problems)."""
    problems, tried = [], 0
    extdir = extension_dir()
    admin = connect()
    ensure_roles(admin)
    current = q(admin, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_billing'")[0][0]
    frozen = frozen_releases(REPO / "sql" / "releases")
    scripts = upgrade_scripts(REPO / "sql")
    tmp = Path(tempfile.mkdtemp(prefix="pgb_upgrade_mutations."))
    try:
        for old in sorted((v for v in frozen if vkey(v) < vkey(current)), key=vkey):
            chain = upgrade_chain(scripts, old, current)
            if not chain:
                continue
            for name, pattern, every in MUTATIONS:
                for i, script in enumerate(chain):
                    text = script.read_text()
                    flags = re.M | re.S
                    mutated = re.sub(pattern, "", text, count=0 if every else 1, flags=flags)
                    if mutated == text:
                        continue
                    tried += 1
                    (tmp / script.name).write_text(mutated)
                    files = ExtFiles(extdir)
                    try:
                        files.put(frozen[old])
                        for other in chain:
                            files.put(tmp / other.name if other == script else other)
                        mutated_chain = [tmp / c.name if c == script else c for c in chain]
                        diffs = check_path(admin, old, current, None, label=f"mutation '{name}' of {script.name}",
                                           quiet=True, chain=mutated_chain)
                    finally:
                        files.restore()
                    if not diffs:
                        problems.append(f"mutation '{name}' of {script.name} was not found")
                    elif not quiet:
                        print(f"  mutation '{name}' of {script.name}: found ({len(diffs)} differences, "
                              f"e.g. {diffs[0][:140]})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        admin.close()
    return tried, problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--long", action="store_true")
    a = ap.parse_args()
    if a.selftest:
        problems = selftest()
        tried, more = mutation_test()
        problems += more
        print(f"  {tried} mutations of the real upgrade scripts tried")
        for p in problems:
            print("  PROBLEM:", p)
        print(f"upgrade selftest: {'ok' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    out = run()
    for d in out.differences:
        print("  DIFFERENCE:", d, flush=True)
    print(out.line(), flush=True)
    return 1 if out.differences else 0


if __name__ == "__main__":
    sys.exit(main())
