#!/usr/bin/env python3
"""The catalog signature of every function in schema billing, pinned in tests/signatures.txt
(issue 10 item 10), and what ties the hand-written `LANGUAGE c` declarations to the Rust bodies.

A Rust body reads its arguments by position (`a.uuid(0)`, `a.text(3)`, ...) with nothing to
check them against the SQL declaration, so a drift between sql/*.sql and src/ would go unseen
until a call reads the wrong datum. tests/integration/test_signatures.py checks:
  - the catalog of a fresh `CREATE EXTENSION pg_billing` equals tests/signatures.txt, one line per
    function ordered by name and identity arguments: name, arguments with names, types and
    defaults, return type, language, volatility, strictness, SECURITY DEFINER, proconfig
    (search_path) and, for C functions, the C symbol;
  - every C symbol a declaration names (sql/*.sql, the frozen releases sql/releases/*.sql and the
    installed catalog) is exported by the installed library (nm -D), with its pg_finfo_ record;
  - every `billing_fn!` in src/ has a declaration, each argument its body reads by position
    (following helpers it hands the arguments to) is declared at that position with that type,
    and each declared argument is read.

Regenerate the list after a deliberate signature change, and read its diff:
    make signatures          (scripts/signatures.sh: build, install, fresh cluster, write the file)
Usage: signatures.py --write | --check   (connection from PGHOST/PGPORT/PGUSER/PGDATABASE; it
creates and drops a database of its own)."""
import argparse
import re
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgb_testlib import REPO, connect, ensure_roles, q  # noqa: E402

PINNED = REPO / "tests" / "signatures.txt"
HEADER = """\
# The catalog signature of every function in schema billing after CREATE EXTENSION pg_billing,
# one line per function ordered by name and identity arguments. Checked by
# tests/integration/test_signatures.py; regenerate with `make signatures` (read the diff: a
# change here is a change of the API, and a C function's arguments must match its Rust body).
"""

SIGNATURE_QUERY = """
SELECT format('%s(%s) returns %s lang=%s volatility=%s strict=%s secdef=%s config=%s%s',
              p.proname, pg_catalog.pg_get_function_arguments(p.oid), pg_catalog.pg_get_function_result(p.oid),
              l.lanname, p.provolatile, p.proisstrict, p.prosecdef, p.proconfig,
              CASE WHEN l.lanname = 'c' THEN ' symbol=' || p.prosrc ELSE '' END)
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'billing'::regnamespace
 ORDER BY p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid)"""


class FreshDatabase:
    """A database of its own with a fresh CREATE EXTENSION pg_billing (dropped on exit)."""

    def __enter__(self):
        self.admin = connect(dbname="postgres")
        ensure_roles(self.admin)
        self.name = f"pgb_signatures_{uuid.uuid4().hex[:8]}"
        q(self.admin, f"CREATE DATABASE {self.name}")
        self.conn = connect(dbname=self.name)
        q(self.conn, "CREATE EXTENSION pg_billing")
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()
        q(self.admin, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        self.admin.close()


def catalog_lines(conn):
    with conn.cursor() as cur:
        cur.execute(SIGNATURE_QUERY)        # no parameters: the format() string holds '%s'
        return [r[0] for r in cur.fetchall()]


def pinned_lines(path=PINNED):
    return [line for line in Path(path).read_text().splitlines() if line and not line.startswith("#")]


def write(lines, path=PINNED):
    Path(path).write_text(HEADER + "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# C symbols

def declared_symbols(paths):
    """{symbol: [files]} of every `AS 'MODULE_PATHNAME', 'pgb_...'` in the given scripts."""
    out = {}
    for p in paths:
        for sym in re.findall(r"MODULE_PATHNAME'\s*,\s*'(\w+)'", Path(p).read_text()):
            out.setdefault(sym, []).append(Path(p).relative_to(REPO).as_posix())
    return out


def library_path():
    import os
    libdir = subprocess.run([os.environ.get("PG_CONFIG", "/usr/bin/pg_config"), "--pkglibdir"], check=True,
                            capture_output=True, text=True).stdout.strip()
    return Path(libdir) / "pg_billing.so"


def exported_symbols(so):
    """The dynamic symbols the library defines (nm -D --defined-only)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], check=True, capture_output=True, text=True).stdout
    return {f[-1] for f in (line.split() for line in out.splitlines()) if len(f) >= 2}


# ---------------------------------------------------------------------------------------------
# Rust bodies: which argument each reads, by position and type

# Args getters (src/boundary.rs) and the helpers that read one argument by position.
GETTERS = {"uuid": "uuid", "int": "integer", "text": "text", "boolean": "boolean", "text_array": "text[]",
           "timestamptz": "timestamp with time zone", "timestamptz_micros": "timestamp with time zone",
           "interval": "interval", "bigint": "bigint", "bigint_array": "bigint[]", "numeric_text": "numeric"}
HELPER_GETTERS = {"date_arg": "date", "oid_arg": "oid", "jsonb_arg": "jsonb"}
COMPATIBLE = {"oid": {"oid", "regclass"}}   # a regclass argument is an oid datum

TOP_FN = re.compile(r"^(?:pub(?:\([\w:]+\))? )?fn (\w+)(?:<[^>]*>)?\(([^)]*)\)", re.M)
BILLING_FN = re.compile(r"billing_fn!\(\s*(\w+)\s*,\s*(\w+)\s*,\s*([\w:]+)\s*\)")


def rust_functions(src_dir=REPO / "src"):
    """{name: (file, params, body)} of every top-level fn in src/ (body = text up to the next
    line that is a lone closing brace at column 0)."""
    out = {}
    for f in sorted(Path(src_dir).rglob("*.rs")):
        text = f.read_text()
        for m in TOP_FN.finditer(text):
            end = text.find("\n}", m.end())
            out.setdefault(m.group(1), (f, m.group(2), text[m.end(): end if end >= 0 else len(text)]))
    return out


def billing_fns(src_dir=REPO / "src"):
    """[(symbol, body function, file)] of every billing_fn! entry point."""
    out = []
    for f in sorted(Path(src_dir).rglob("*.rs")):
        for m in BILLING_FN.finditer(f.read_text()):
            out.append((m.group(2), m.group(3).split("::")[-1], f))
    return out


def args_param(params):
    m = re.search(r"(\w+)\s*:\s*&Args\b", params)
    return m.group(1) if m else None


def reads(fns, name, seen=None):
    """{(position, sql type, where)} of the arguments function `name` reads, following the
    functions it hands its &Args to. Positions given by a variable are resolved from a
    `for (n, ...) in [(3, ...), ...]` loop in the same function; anything else is reported as
    position None (the test then fails: teach it the new form)."""
    seen = seen if seen is not None else set()
    if name in seen or name not in fns:
        return set()
    seen.add(name)
    f, params, body = fns[name]
    var = args_param(params)
    if var is None:
        return set()
    out = set()
    # Closures that take the arguments under another name (`|a| ...`) use the same variable name
    # in this code base; any `<ident>.<getter>(` is a read.
    for m in re.finditer(r"\b\w+\.(" + "|".join(GETTERS) + r")\(\s*(\w+)\s*\)", body):
        out |= positions(body, m.group(2), GETTERS[m.group(1)], f"{name} ({f.name})")
    for m in re.finditer(r"\b(" + "|".join(HELPER_GETTERS) + r")\(\s*\w+\s*,\s*(\w+)\s*\)", body):
        out |= positions(body, m.group(2), HELPER_GETTERS[m.group(1)], f"{name} ({f.name})")
    for m in re.finditer(r"\b(\w+)\(\s*" + re.escape(var) + r"\s*[,)]", body):
        callee = m.group(1)
        if callee in fns and callee not in HELPER_GETTERS and args_param(fns[callee][1]):
            out |= reads(fns, callee, seen)
    return out


def positions(body, index, typ, where):
    if index.isdigit():
        return {(int(index), typ, where)}
    loop = re.search(r"for \(\s*" + re.escape(index) + r"\s*,[^)]*\) in \[(.*?)\]", body, re.S)
    if loop:
        return {(int(n), typ, where) for n in re.findall(r"\(\s*(\d+)\s*,", loop.group(1))}
    return {(None, typ, f"{where}: argument index `{index}`")}


def c_functions(conn):
    """{symbol: [(name, [arg types], [arg names])]} of the installed C functions."""
    out = {}
    for name, sym, types, names in q(conn, """
            SELECT p.proname, p.prosrc,
                   ARRAY(SELECT pg_catalog.format_type(t, NULL) FROM unnest(p.proargtypes) t),
                   coalesce(p.proargnames, '{}')
              FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
             WHERE p.pronamespace = 'billing'::regnamespace AND l.lanname = 'c'"""):
        out.setdefault(sym, []).append((name, list(types), list(names)))
    return out


def body_problems(conn, src_dir=REPO / "src"):
    """Differences between the C declarations of the catalog and the Rust bodies."""
    problems = []
    fns = rust_functions(src_dir)
    decls = c_functions(conn)
    entry = billing_fns(src_dir)
    for sym, body, f in entry:
        if body not in fns:
            problems.append(f"{sym}: body function {body} not found in src/")
            continue
        if sym not in decls:
            problems.append(f"{sym} ({f.name}): billing_fn! entry point with no LANGUAGE c declaration in schema billing")
            continue
        body_reads = reads(fns, body)
        for fname, types, names in decls[sym]:
            for pos in sorted(set(range(len(types))) - {r[0] for r in body_reads}):
                arg = names[pos] if pos < len(names) else f"${pos + 1}"
                problems.append(f"{fname} ({sym}): declares argument {pos} ({arg} {types[pos]}) that {body} never reads")
            for pos, typ, where in sorted(body_reads, key=lambda r: (r[0] is None, r[0] or 0, r[1])):
                if pos is None:
                    problems.append(f"{fname} ({sym}): cannot tell which argument {where} reads")
                elif pos >= len(types):
                    problems.append(f"{fname} ({sym}): {where} reads argument {pos} as {typ}, but "
                                    f"{fname} declares only {len(types)} arguments")
                elif types[pos] != typ and types[pos] not in COMPATIBLE.get(typ, ()):
                    arg = names[pos] if pos < len(names) else f"${pos + 1}"
                    problems.append(f"{fname} ({sym}): {where} reads argument {pos} as {typ}, but it is "
                                    f"declared {arg} {types[pos]}")
    for sym in sorted(set(decls) - {s for s, _, _ in entry}):
        problems.append(f"{sym}: declared LANGUAGE c ({', '.join(d[0] for d in decls[sym])}) but no billing_fn! in src/")
    return problems


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help=f"write {PINNED.relative_to(REPO)}")
    g.add_argument("--check", action="store_true", help="compare with it")
    a = ap.parse_args()
    with FreshDatabase() as conn:
        lines = catalog_lines(conn)
    if a.write:
        old = pinned_lines() if PINNED.exists() else []
        write(lines)
        print(f"wrote {PINNED.relative_to(REPO)}: {len(lines)} functions "
              f"({len(set(lines) - set(old))} lines new or changed, {len(set(old) - set(lines))} gone)")
        return 0
    import difflib
    delta = list(difflib.unified_diff(pinned_lines(), lines, "tests/signatures.txt", "catalog", lineterm=""))
    print("\n".join(delta) if delta else f"signatures: {len(lines)} functions as pinned")
    return 1 if delta else 0


if __name__ == "__main__":
    sys.exit(main())
