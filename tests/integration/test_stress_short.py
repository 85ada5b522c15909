"""The short variants of the reliability and security harness (tests/stress): contention for
20 s and the privilege sweep against PGDATABASE, one SIGKILL of a durable throwaway cluster, the
bad-input sweep over every function and the upgrade paths (both in databases of their own).
The long variants run with `scripts/stress.sh` (make stress)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stress"))
import contention  # noqa: E402
import crash  # noqa: E402
import bad_input  # noqa: E402
import privilege  # noqa: E402
import upgrade  # noqa: E402
from common import fmt  # noqa: E402


def test_contention_short():
    n, violations = contention.run(20)
    print(f"contention: {fmt(n)} calls, {fmt(len(violations))} invariant violations", flush=True)
    assert n > 1000, f"only {n} calls in 20 s"
    assert not violations, f"{len(violations)} invariant violations, first: {violations[:5]}"


def test_crash_short():
    committed, lost, bad, kills = crash.run(1, 4)
    print(f"crash: {fmt(committed)} committed calls, {fmt(len(lost))} lost ({kills} SIGKILLs)", flush=True)
    assert committed > 100, f"only {committed} committed calls before the kill"
    assert not lost, f"{len(lost)} committed calls lost, first: {lost[:5]}"
    assert not bad, f"{len(bad)} violations after the crash, first: {bad[:5]}"


def test_privilege_sweep():
    sw = privilege.run()
    print(f"privilege: {fmt(sw.attempts)} attempts, {fmt(len(sw.allowed))} allowed", flush=True)
    assert not sw.allowed, f"{len(sw.allowed)} attempts allowed, first: {sw.allowed[:5]}"
    assert not sw.wrong_code, f"{len(sw.wrong_code)} refused with a SQLSTATE other than 42501: {sw.wrong_code[:5]}"
    assert not sw.notes, f"sweep controls failed: {sw.notes}"


def test_bad_input_every_function_short():
    res = bad_input.run(long=False)
    print(res.line(), flush=True)
    assert res.tried > 1000, f"only {res.tried} calls"
    assert res.outcomes.get("ok", 0) > 300 and res.outcomes.get("22023", 0) > 100, res.outcomes
    assert not res.findings, f"{len(res.findings)} findings, first: {res.findings[:10]}"


def test_upgrade_paths():
    out = upgrade.run()
    print(out.line(), flush=True)
    assert not out.differences, f"{len(out.differences)} differences, first: {out.differences[:10]}"
    if os.environ.get("PGB_REQUIRE_OLD_LIBRARY") == "1":
        # make test: every older release's data is written by its own library, never the current one.
        assert out.paths > 0 and out.old_libraries == out.paths, out.line()


def test_upgrade_check_finds_mistakes():
    # The upgrade check itself: a made-up older release must upgrade with no difference, and
    # a schema change, as well as each typical mistake in the real upgrade scripts (grants, an
    # index, the API catalog rows, a comment left out; a statement that cannot run twice), must
    # be reported.
    problems = upgrade.selftest(quiet=True)
    tried, more = upgrade.mutation_test(quiet=True)
    print(f"upgrade check: selftest {'ok' if not problems else problems}; {tried} mutations tried, "
          f"{tried - len(more)} found", flush=True)
    assert not problems and not more, problems + more
    assert tried >= 5, f"only {tried} mutations applied to the upgrade scripts"
