#!/usr/bin/env python3
"""Runs the reliability and security harness: contention (part 1), crash (part 2), the bad-input
sweep (part 3), the privilege sweep (part 4) and the upgrade path (part 5), and prints one
figure line per part.

  run.py --short   contention 20 s, one SIGKILL, bad inputs (one value at a time), the privilege
                   sweep, upgrade paths                    (what the test suite runs)
  run.py --long    contention 5 min, eight kill cycles, bad inputs with more values and random
                   two-argument combinations, the privilege sweep, upgrade paths (`make stress`)

contention and privilege use the database named by PGHOST/PGPORT/PGUSER/PGDATABASE (with
pg_billing installed); bad inputs and upgrade create (and drop) databases of their own in the same
cluster; crash starts and removes its own durable throwaway cluster.
Exits 1 when any part finds a violation."""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bad_input  # noqa: E402
import contention  # noqa: E402
import crash  # noqa: E402
import privilege  # noqa: E402
import upgrade  # noqa: E402
from common import fmt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--short", action="store_true")
    g.add_argument("--long", action="store_true")
    ap.add_argument("--only", nargs="*", choices=["contention", "crash", "bad_input", "privilege", "upgrade"])
    a = ap.parse_args()
    parts = a.only or ["contention", "crash", "bad_input", "privilege", "upgrade"]
    lines, failed = [], False
    t0 = time.time()
    if "contention" in parts:
        n, v = contention.run(300 if a.long else 20)
        lines.append(f"contention: {fmt(n)} calls, {fmt(len(v))} invariant violations")
        failed |= bool(v)
        print(lines[-1], flush=True)
    if "crash" in parts:
        committed, lost, bad, kills = crash.run(8, 20) if a.long else crash.run(1, 4)
        lines.append(f"crash: {fmt(committed)} committed calls, {fmt(len(lost))} lost"
                     + (f", {fmt(len(bad))} other violations" if bad else "") + f" ({kills} SIGKILLs)")
        failed |= bool(lost or bad)
        print(lines[-1], flush=True)
    if "bad_input" in parts:
        res = bad_input.run(long=a.long)
        lines.append(res.line())
        failed |= bool(res.findings)
        print(lines[-1], flush=True)
    if "privilege" in parts:
        sw = privilege.run()
        lines.append(f"privilege: {fmt(sw.attempts)} attempts, {fmt(len(sw.allowed))} allowed"
                     + (f", {fmt(len(sw.wrong_code))} refused with a SQLSTATE other than 42501" if sw.wrong_code else ""))
        failed |= bool(sw.allowed or sw.wrong_code or sw.notes)
        print(lines[-1], flush=True)
    if "upgrade" in parts:
        out = upgrade.run()
        lines.append(out.line())
        failed |= bool(out.differences)
        for d in out.differences[:20]:
            print("  DIFFERENCE:", d, flush=True)
        print(lines[-1], flush=True)
    print(f"== stress summary ({'long' if a.long else 'short'}, {time.time() - t0:.0f} s)")
    for line in lines:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
