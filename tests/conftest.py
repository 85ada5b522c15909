"""pytest configuration shared by every Python test (tests/integration, which also runs the short
stress harness of tests/stress). The helpers live in pgb_testlib.py beside this file; pytest puts
this directory on sys.path, so tests import them with `from pgb_testlib import ...`."""
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for p in (TESTS, TESTS / "stress"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# The database scripts/test.sh creates for these tests (PGHOST/PGPORT/PGUSER come from it too).
os.environ.setdefault("PGDATABASE", "integration")
os.environ.setdefault("PGB_SHORT", "1")


def pytest_collection_modifyitems(session, config, items):
    # The order the tests have always run in: modules by name, then tests by name (some tests
    # share the database and were written for that order).
    items.sort(key=lambda it: (Path(str(it.fspath)).name, it.name))
