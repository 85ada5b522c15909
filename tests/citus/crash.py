#!/usr/bin/env python3
"""A worker of the Citus cluster killed under load (issue 17), run by scripts/citus-check.sh.

16 accounts over both workers, each funded once; 8 client threads call consume_credits_v2 and
add_purchased_credits through the coordinator, each call with its own idempotency key. After a
few seconds the first worker's postmaster is SIGKILLed (its pid is the first line of its
postmaster.pid), left down for a moment while the calls go on, and started again (crash
recovery); the calls go on a few seconds more, then Citus's recover_prepared_transactions() runs
on the coordinator. Every call the clients made is then checked against the ledger:
  - committed (the call returned): its ledger rows exist and add up to its amount, and its
    idempotency key stored the response the client got;
  - refused by pg_billing (a PT/22/42 SQLSTATE, e.g. PT402): no ledger row;
  - in doubt (any other error: the worker's connection died; the client cannot know): all or
    nothing, its ledger rows and its key together or neither;
  - no ledger row the clients did not cause; every account's balance equals its funding plus
    what the applied calls added minus what they consumed; verify_ledger() is empty; no prepared
    transaction is left on any node.
Prints `crash on the cluster: N calls (C committed, R refused, D in doubt), M violations`; exits 1
on any violation. Environment: COORD_PORT, W1_PORT, W1_DIR (the worker's directory: data/ and
server.log), PGBIN, PGHOST, CRASH_DB (default crash)."""
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import COORD, W1, W2, connect as node, q, worker_of  # noqa: E402

W1_DIR = Path(os.environ["W1_DIR"])
PGBIN = os.environ["PGBIN"]
DB = os.environ.get("CRASH_DB", "crash")
FUND = 100_000


def connect(port=COORD):
    return node(port, DB)


def definite(sqlstate):
    """An error pg_billing raised itself: the call changed nothing."""
    return bool(sqlstate) and (sqlstate.startswith("PT") or sqlstate[:2] in ("22", "42"))


class Load:
    def __init__(self, users):
        self.users = users
        self.calls = []            # (key, user, kind, amount, outcome, response or sqlstate)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client(self, n):
        rnd = random.Random(n)
        conn, i = None, 0
        while not self.stop.is_set():
            if conn is None:
                try:
                    conn = connect()
                except psycopg2.Error:
                    time.sleep(0.1)
                    continue
            u = rnd.choice(self.users)
            kind = "consume" if rnd.random() < 0.7 else "purchase"
            amount = rnd.randint(1, 50)
            key = f"crash-{n}-{i}"
            i += 1
            sql = ("SELECT billing.consume_credits_v2(%s, %s, 'crash', NULL, %s)" if kind == "consume"
                   else "SELECT billing.add_purchased_credits(%s, %s, 'crash', NULL, %s)")
            try:
                r = q(conn, sql, (u, amount, key))[0][0]
                rec = (key, u, kind, amount, "committed", r)
            except psycopg2.Error as e:
                rec = (key, u, kind, amount, "refused" if definite(e.pgcode) else "in doubt", e.pgcode)
                if conn.closed or not definite(e.pgcode):
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass
                    conn = None
            with self.lock:
                self.calls.append(rec)


def pg_ctl(*args):
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run(sudo + ["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", str(W1_DIR / "data"), *args],
                   check=True, stdout=subprocess.DEVNULL)


def main():
    admin = connect()
    users = []
    while len(users) < 16 or len({worker_of(admin, u) for u in users}) < 2:
        users.append(uuid.uuid4())
    on_w1 = sum(1 for u in users if worker_of(admin, u) == W1)
    for u in users:
        q(admin, "SELECT billing.add_purchased_credits(%s, %s, 'fund', NULL, %s)", (u, FUND, f"fund-{u}"))

    load = Load(users)
    threads = [threading.Thread(target=load.client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(4)
    pid = int((W1_DIR / "data" / "postmaster.pid").read_text().split()[0])
    with load.lock:
        before_kill = len(load.calls)
    os.kill(pid, signal.SIGKILL)
    time.sleep(2)
    with load.lock:
        during_down = len(load.calls) - before_kill
    # The killed postmaster's children exit on their own; start once its shared memory is free.
    for _ in range(100):
        try:
            pg_ctl("-l", str(W1_DIR / "server.log"), "-w", "start")
            break
        except subprocess.CalledProcessError:
            time.sleep(0.2)
    else:
        raise SystemExit("the killed worker did not start again")
    time.sleep(4)
    load.stop.set()
    for t in threads:
        t.join()

    admin = connect()
    q(admin, "SELECT recover_prepared_transactions()")
    problems = []
    for port in (COORD, W1, W2):
        n = q(connect(port), "SELECT count(*) FROM pg_prepared_xacts")[0][0]
        if n:
            problems.append(f"{n} prepared transactions left on :{port}")
    ledger = {}
    for key, n, total in q(admin, """SELECT idempotency_key, count(*), sum(amount) FROM billing.credit_transactions
                                      WHERE user_id = ANY (%s::uuid[]) AND idempotency_key IS NOT NULL GROUP BY 1""",
                           ([str(u) for u in users],)):
        ledger[key] = (n, total)
    keys = {k: r for k, r in q(admin, "SELECT idempotency_key, response FROM billing.idempotency_keys WHERE user_id = ANY (%s::uuid[])",
                               ([str(u) for u in users],))}
    expected = {u: FUND for u in users}
    counts = {"committed": 0, "refused": 0, "in doubt": 0}
    applied_in_doubt = 0
    made = {f"fund-{u}" for u in users}
    for key, u, kind, amount, outcome, detail in load.calls:
        made.add(key)
        counts[outcome] += 1
        sign = -1 if kind == "consume" else 1
        row = ledger.get(key)
        if outcome == "committed":
            if row is None or row[1] != sign * amount:
                problems.append(f"committed {kind} {key} of {amount}: ledger {row}")
            elif keys.get(key) != detail:
                problems.append(f"committed {kind} {key}: its key stored {keys.get(key)}, the client got {detail}")
        elif outcome == "refused":
            if row is not None:
                problems.append(f"refused {kind} {key} ({detail}) has ledger rows {row}")
        else:
            if (row is None) != (key not in keys):
                problems.append(f"in-doubt {kind} {key}: ledger {row}, key stored {key in keys} (not all or nothing)")
            elif row is not None and row[1] != sign * amount:
                problems.append(f"in-doubt {kind} {key} of {amount}: ledger {row}")
            applied_in_doubt += row is not None
        if row is not None:
            expected[u] += sign * amount
    strangers = sorted(set(ledger) - made)
    if strangers:
        problems.append(f"ledger rows no client caused: {strangers[:5]}")
    for u in users:
        got = q(admin, "SELECT total_balance FROM billing.get_user_credits(%s)", (u,))[0][0]
        if got != expected[u]:
            problems.append(f"account {u}: balance {got}, the applied calls say {expected[u]}")
    bad = q(admin, "SELECT * FROM billing.verify_ledger()")
    if bad:
        problems.append(f"verify_ledger: {bad[:3]}")
    for p in problems[:20]:
        print(f"  VIOLATION {p}", flush=True)
    print(f"crash on the cluster: {len(load.calls)} calls on 16 accounts ({on_w1} on the killed worker; "
          f"{counts['committed']} committed, {counts['refused']} refused, {counts['in doubt']} in doubt of which "
          f"{applied_in_doubt} applied; {during_down} calls while it was down), {len(problems)} violations", flush=True)
    return 1 if problems or counts["in doubt"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
