#!/usr/bin/env python3
"""Event delivery under write load (issue 15, 0.6.0): writer threads add events for a few hundred
users (billing._emit_event under the user's account lock, 1-3 per transaction, as the credit
functions do) while three workers of one consumer claim and acknowledge (one drops every fourth
claim, as a crashed worker would: 2 s visibility timeout); then the rest is drained and
tests/stress/events_check.check_delivery verifies at-least-once, no event in two live claims, a
dropped claim's events back only after its timeout with deliveries counted up, no acknowledged
event handed out again, no skipped event, per-user order. Any error of claim_events / ack_events
(a deadlock, 40P01) is a violation too.

The contention part runs the same workers beside the billing mix, whose event rate is far lower;
this one writes thousands of events a second, so claims and acknowledgements of many users overlap.

Usage: delivery_load.py [--seconds 15] [--users 200] [--writers 4]
(connection from PGHOST/PGPORT/PGUSER/PGDATABASE). Exits 1 on any violation."""
import argparse
import random
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import events_check  # noqa: E402
from common import connect, fmt, q  # noqa: E402


def run(seconds=15.0, nusers=200, writers=4, quiet=False):
    conn = connect()
    users = [uuid.uuid4() for _ in range(nusers)]
    for u in users:
        q(conn, "SELECT billing.add_purchased_credits(%s, 10, 'delivery load')", (u,))
    stop = threading.Event()
    written = [0]
    lock = threading.Lock()

    def writer(seed):
        rnd = random.Random(seed)
        c = connect()
        try:
            while not stop.is_set():
                u = rnd.choice(users)
                c.autocommit = False
                with c.cursor() as cur:
                    cur.execute("SELECT 1 FROM billing.accounts WHERE user_id = %s FOR UPDATE", (u,))
                    k = rnd.randint(1, 3)
                    for _ in range(k):
                        cur.execute("SELECT billing._emit_event(%s, 'stress.delivery', '{}')", (u,))
                c.commit()
                c.autocommit = True
                with lock:
                    written[0] += k
        finally:
            c.close()

    dw = events_check.DeliveryWorkers(f"load-{uuid.uuid4().hex[:8]}")
    # (a fresh consumer starts with every retained event: skip what is there already)
    rows = q(conn, "SELECT max(id) FROM billing.claim_events(%s, 10000)", (dw.consumer,))
    while rows and rows[0][0] is not None:
        q(conn, "SELECT billing.ack_events(%s, %s)", (dw.consumer, rows[0][0]))
        rows = q(conn, "SELECT max(id) FROM billing.claim_events(%s, 10000)", (dw.consumer,))
    first = q(conn, "SELECT COALESCE(max(id), 0) FROM billing.events")[0][0]
    ts = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)] + dw.threads(None, stop)
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join(timeout=120)
    dw.finish(None)
    # Only this run's events and claims count (older events were acknowledged above).
    dw.claims = [c for c in dw.claims if c.events]
    stats = {}
    bad = events_check.check_delivery(conn, dw, stats, since=first)
    conn.close()
    if not quiet:
        print(f"  {fmt(written[0])} events written in {seconds:.0f} s; " + ", ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
        for v in bad[:30]:
            print("  VIOLATION:", v, flush=True)
    return written[0], bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--writers", type=int, default=4)
    a = ap.parse_args()
    n, bad = run(a.seconds, a.users, a.writers)
    print(f"delivery under load: {fmt(n)} events, {fmt(len(bad))} violations", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
