#!/usr/bin/env python3
"""Runs every tests/integration/test_*.py module's test_* functions against the database named by
PGDATABASE (PGHOST/PGPORT/PGUSER from the environment). Each test gets a fresh connection factory.
Prints one line per test and 'integration: N passed, M failed' at the end."""
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    short = "--short" in sys.argv
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    os.environ["PGB_SHORT"] = "1" if short else "0"
    passed = failed = 0
    for path in sorted(HERE.glob("test_*.py")):
        if only and not any(o in path.stem for o in only):
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name in sorted(n for n in dir(mod) if n.startswith("test_")):
            fn = getattr(mod, name)
            t0 = time.time()
            try:
                fn()
                passed += 1
                print(f"ok   {path.stem}.{name} ({time.time() - t0:.1f}s)", flush=True)
            except Exception:  # noqa: BLE001 - report every failure and go on
                failed += 1
                print(f"FAIL {path.stem}.{name}", flush=True)
                traceback.print_exc()
    print(f"integration: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
