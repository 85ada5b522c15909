"""Issue 10 item 10: every billing function's catalog signature is pinned in tests/signatures.txt,
and the hand-written LANGUAGE c declarations are tied to the library and to the Rust bodies
(tests/signatures.py says how). After a deliberate signature change: `make signatures`."""
import difflib
from pathlib import Path

import signatures
from pgb_testlib import REPO

RELEASES = sorted((REPO / "sql" / "releases").glob("pg_billing--*.sql"))
CURRENT_SQL = sorted(p for p in (REPO / "sql").glob("*.sql"))


def test_catalog_signatures_match_pinned_list():
    with signatures.FreshDatabase() as conn:
        lines = signatures.catalog_lines(conn)
    pinned = signatures.pinned_lines()
    assert len(lines) > 50, f"only {len(lines)} functions in schema billing"
    delta = list(difflib.unified_diff(pinned, lines, "tests/signatures.txt (pinned)", "catalog (fresh install)",
                                      lineterm="", n=0))
    assert not delta, ("the catalog signatures differ from tests/signatures.txt; if the change is deliberate, "
                       "run `make signatures` and commit the new list:\n" + "\n".join(delta[:60]))
    print(f"signatures: {len(lines)} functions as pinned", flush=True)


def test_library_exports_every_declared_symbol():
    # A symbol named by a released script must stay in the library (a database still on that
    # release, or mid-upgrade, calls it), as must every symbol of the current scripts.
    so = signatures.library_path()
    exported = signatures.exported_symbols(so)
    declared = signatures.declared_symbols(CURRENT_SQL + RELEASES)
    with signatures.FreshDatabase() as conn:
        for sym in signatures.c_functions(conn):
            declared.setdefault(sym, []).append("catalog")
    assert len(declared) > 30, f"only {len(declared)} C symbols declared"
    assert RELEASES, "no frozen release in sql/releases"
    missing = [f"{sym} (named in {', '.join(sorted(set(where)))})" for sym, where in sorted(declared.items())
               if sym not in exported or f"pg_finfo_{sym}" not in exported]
    assert not missing, f"{so} does not export (with its pg_finfo_ record): " + "; ".join(missing)
    print(f"symbols: {len(declared)} C symbols of sql/ and sql/releases/ exported by {so.name}", flush=True)


def test_rust_bodies_read_declared_arguments():
    entry = signatures.billing_fns()
    assert len(entry) > 30, f"only {len(entry)} billing_fn! entry points found in src/"
    fns = signatures.rust_functions()
    n_reads = sum(len(signatures.reads(fns, body)) for _, body, _ in entry)
    assert n_reads > 60, f"only {n_reads} argument reads found: the parser of src/ no longer sees them"
    with signatures.FreshDatabase() as conn:
        problems = signatures.body_problems(conn)
    assert not problems, "LANGUAGE c declarations and Rust bodies disagree:\n" + "\n".join(problems)
    print(f"bodies: {len(entry)} billing_fn! entry points, {n_reads} positional argument reads match "
          "their declarations", flush=True)


def test_body_check_finds_a_drift():
    # The check itself: a body that reads one argument too many, an argument as the wrong type,
    # or leaves a declared argument unread must be reported (on a copy of src/ with two bodies
    # changed), and nothing else.
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="pgb_signatures_"))
    try:
        src = tmp / "src"
        shutil.copytree(REPO / "src", src)
        credits = src / "api" / "credits.rs"
        text = credits.read_text()
        body = "fn consume_credits_v2(a: &Args) -> BResult<Ret> {\n"
        assert body in text
        credits.write_text(text.replace(body, body + "    let _drift = (a.text(5), a.uuid(1));\n", 1))
        usage = src / "api" / "usage.rs"
        text = usage.read_text()
        read = 'non_negative("p_chunks", a.int(1))'
        assert read in text
        usage.write_text(text.replace(read, 'non_negative("p_chunks", Some(1))', 1))
        with signatures.FreshDatabase() as conn:
            problems = signatures.body_problems(conn, src_dir=src)
        assert any("reads argument 5" in p and "consume_credits_v2" in p for p in problems), problems
        assert any("reads argument 1 as uuid" in p and "p_amount integer" in p for p in problems), problems
        assert any("record_document_usage" in p and "(p_chunks integer)" in p and "never reads" in p
                   for p in problems), problems
        assert len(problems) == 3, problems
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
