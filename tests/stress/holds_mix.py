"""Credit holds (issue 14, 0.5.0) in the reliability harness: a mix of reserve_credits (service and
PostgREST-style end-user calls, some with p_allow_partial, TTLs of 1-3 s and 60 s), capture_hold
(each p_over policy, amounts below and above the hold, repeated captures and releases of the same
hold from several threads), release_hold, extend_hold, increase_hold, consume_credits_v2 and
top-ups (add_purchased_credits), on
users of their own (apart from the main mix's, whose ledger checks know nothing of holds); a
third of them may overdraw by 50. Every mutator is keyed, so the crash part can tell committed
calls from lost ones.

`check` then verifies:
  - each hold resolved at most once: every successful capture or release of a hold reports the
    same status, and the database agrees; a captured hold has exactly one capture operation in
    the ledger (type hold_capture, reference_id = the hold id) whose rows sum to minus its
    captured_amount; no other hold has any;
  - captured + released = held: a capture that resolved an active hold released exactly the rest
    of it (amount - min(requested, amount)); a release gave back the whole amount;
  - no credit spent twice or lost: billing.verify_ledger() is empty for these users (the pools are
    the sums of the grants and of the ledger, held is the sum of the active holds), no debt above
    the limit, and a reservation never held more than was available: at no capture did the grants
    fall short of a hold that had not expired (unfunded only for the excess above the hold);
  - after a crash: every call the client saw commit is there (its idempotency row returns the
    same response; a committed reservation's hold exists; a committed capture or release left the
    hold in that status), a failed one left nothing, an in-flight one all or nothing."""
import random
import time
import uuid
from collections import defaultdict

import psycopg2

from pgb_testlib import claims, connect, postgrest_call, q

EXPECTED = {"reserve": {"PT402"}, "reserve_rpc": {"PT402"}, "consume": {"PT402"}, "capture": {"PT410", "PT402", "22023"},
            "release": set(), "extend": {"PT410", "22023"}, "increase": {"PT402", "PT410", "22023"}}


class HoldCall:
    __slots__ = ("op", "user", "args", "key", "status", "result", "sqlstate", "error")

    def __init__(self, op, user, args, key):
        self.op, self.user, self.args, self.key = op, user, args, key
        self.status, self.result, self.sqlstate, self.error = "inflight", None, None, None


class HoldRecorder:
    def __init__(self):
        import threading
        self.lock = threading.Lock()
        self.calls = []
        self.holds = defaultdict(list)     # user -> hold ids reserved (committed)

    def add(self, c):
        with self.lock:
            self.calls.append(c)
            if c.status == "ok" and c.op in ("reserve", "reserve_rpc"):
                self.holds[c.user].append(c.result["hold_id"])

    def pick_hold(self, rnd, user):
        with self.lock:
            hs = self.holds.get(user)
            return rnd.choice(hs[-6:]) if hs else None


def setup(conn, n, tag):
    users = [uuid.uuid4() for _ in range(n)]
    for i, u in enumerate(users):
        q(conn, "SELECT billing.add_purchased_credits(%s, 400, 'holds mix', NULL, %s)", (u, f"{tag}-setup-{i}"))
        if i % 3 == 0:
            q(conn, "SELECT billing.set_overdraft_limit(%s, 50)", (u,))
    return users


def execute(conn, c):
    u, a, k = c.user, c.args, c.key
    try:
        if c.op == "reserve":
            r = q(conn, "SELECT billing.reserve_credits(%s, %s, %s::interval, NULL, %s, %s)",
                  (u, a["amount"], a["ttl"], k, a["partial"]))[0][0]
        elif c.op == "reserve_rpc":
            r = postgrest_call(conn, "authenticated", claims("authenticated", u),
                               "SELECT public.reserve_credits(p_user_id := %s, p_amount := %s, p_ttl := %s::interval, "
                               "p_idempotency_key := %s, p_allow_partial := %s)",
                               (u, a["amount"], a["ttl"], k, a["partial"]))[0][0]
        elif c.op == "consume":
            r = q(conn, "SELECT billing.consume_credits_v2(%s, %s, NULL, NULL, %s)", (u, a["amount"], k))[0][0]
        elif c.op == "add":
            r = q(conn, "SELECT billing.add_purchased_credits(%s, %s, NULL, NULL, %s)", (u, a["amount"], k))[0][0]
        elif c.op == "capture":
            r = q(conn, "SELECT billing.capture_hold(%s, %s, NULL, %s, %s)", (a["hold"], a["amount"], k, a["over"]))[0][0]
        elif c.op == "release":
            r = q(conn, "SELECT billing.release_hold(%s, %s)", (a["hold"], k))[0][0]
        elif c.op == "extend":
            r = q(conn, "SELECT billing.extend_hold(%s, %s::interval)", (a["hold"], a["ttl"]))[0][0]
        elif c.op == "increase":
            r = q(conn, "SELECT billing.increase_hold(%s, %s, %s)", (a["hold"], a["amount"], k))[0][0]
        else:
            raise ValueError(c.op)
        c.status, c.result = "ok", r
    except psycopg2.Error as e:
        c.sqlstate = e.pgcode
        c.error = (e.pgerror or str(e)).strip().splitlines()[0] if (e.pgerror or str(e)) else repr(e)
        c.status = "unknown" if (conn.closed or e.pgcode is None or e.pgcode[:2] in ("08", "57")) else "fail"
    return c


def make_call(rnd, users, rec, tag, seq):
    u = rnd.choice(users)
    key = f"{tag}-{seq}"
    x = rnd.random()
    hold = rec.pick_hold(rnd, u)
    if x < 0.35 or hold is None:
        op = "reserve_rpc" if rnd.random() < 0.5 else "reserve"
        ttl = rnd.choice(["1 second", "2 seconds", "3 seconds", "60 seconds"])
        return HoldCall(op, u, {"amount": rnd.randint(1, 120), "ttl": ttl, "partial": rnd.random() < 0.3}, key)
    if x < 0.55:
        return HoldCall("capture", u, {"hold": hold, "amount": rnd.randint(0, 150),
                                       "over": rnd.choice(["available", "reject", "overdraft"])}, key)
    if x < 0.65:
        return HoldCall("release", u, {"hold": hold}, key)
    if x < 0.78:
        return HoldCall("consume", u, {"amount": rnd.randint(1, 40)}, key)
    if x < 0.85:
        return HoldCall("add", u, {"amount": rnd.randint(50, 200)}, key)
    if x < 0.93:
        return HoldCall("extend", u, {"hold": hold, "ttl": rnd.choice(["1 second", "5 seconds"])}, None)
    return HoldCall("increase", u, {"hold": hold, "amount": rnd.randint(1, 30)}, key)


def worker(dsn, users, stop, rec, tag, seed, on_lost=None):
    rnd = random.Random(seed)
    conn, seq = None, 0
    while not stop.is_set():
        if conn is None or conn.closed:
            try:
                conn = connect(dsn)
            except psycopg2.Error:
                if on_lost and on_lost():
                    return
                time.sleep(0.2)
                continue
        seq += 1
        c = execute(conn, make_call(rnd, users, rec, tag, seq))
        rec.add(c)
        if c.status == "unknown":
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            if on_lost and on_lost():
                break
    if conn is not None and not conn.closed:
        conn.close()


def check(conn, users, calls, crashed=False):
    """Returns (lost, violations)."""
    lost, bad = [], []
    ulist = list(users)
    for c in calls:
        if c.status == "fail" and c.sqlstate not in EXPECTED.get(c.op, set()):
            bad.append(f"holds: {c.op} raised {c.sqlstate}: {c.error}")
        if c.status == "unknown" and not crashed:
            bad.append(f"holds: {c.op} lost its connection ({c.error})")
    for row in q(conn, "SELECT * FROM billing.verify_ledger() WHERE user_id = ANY(%s)", (ulist,)):
        bad.append(f"holds: verify_ledger: {row}")
    for row in q(conn, "SELECT user_id, debt, overdraft_limit FROM billing.accounts WHERE user_id = ANY(%s) AND debt > GREATEST(overdraft_limit, 0)",
                 (ulist,)):
        bad.append(f"holds: debt above the limit: {row}")
    holds = {str(r[0]): r[1:] for r in q(conn, """
        SELECT h.id, h.user_id, h.amount, h.status::text, h.captured_amount,
               (SELECT count(DISTINCT t.operation_id) FROM billing.credit_transactions AS t
                 WHERE t.user_id = h.user_id AND t.type = 'hold_capture' AND t.reference_id = h.id::text),
               (SELECT -COALESCE(sum(t.amount), 0) FROM billing.credit_transactions AS t
                 WHERE t.user_id = h.user_id AND t.type = 'hold_capture' AND t.reference_id = h.id::text)
          FROM billing.credit_holds AS h WHERE h.user_id = ANY(%s)""", (ulist,))}
    for hid, (u, amount, status, captured, ops, debited) in holds.items():
        want_ops = 1 if status == "captured" and captured else 0
        if ops != want_ops or (status == "captured" and debited != captured) or (status != "captured" and debited):
            bad.append(f"holds: hold {hid} {status} captured {captured}: {ops} capture operations debiting {debited}")
    keys = {(r[0], r[1]): r[2] for r in q(conn, """SELECT user_id, idempotency_key, response FROM billing.idempotency_keys
                                                    WHERE user_id = ANY(%s)""", (ulist,))}
    resolved = defaultdict(set)
    reserved = defaultdict(int)
    for c in calls:
        r = c.result
        if c.status == "ok" and c.op in ("capture", "release"):
            h = holds.get(str(c.args["hold"]))
            resolved[str(c.args["hold"])].add(r["status"])
            if h is None:
                lost.append(f"holds: {c.op} of {c.args['hold']} committed but the hold is gone")
                continue
            if h[2] != r["status"]:
                lost.append(f"holds: {c.op} of {c.args['hold']} returned {r['status']}, the hold is {h[2]}")
            if r["status"] == "captured":
                if int(r["captured"]) != h[3]:
                    lost.append(f"holds: capture of {c.args['hold']} returned captured {r['captured']}, stored {h[3]}")
                req = int(r["requested"])
                if int(r["released"]) not in (0, h[1] - min(req, h[1])) or int(r["captured"]) + int(r["unfunded"]) != req:
                    bad.append(f"holds: capture of {c.args['hold']} (held {h[1]}) does not add up: {r}")
                if r["released"] and int(r["unfunded"]) > max(req - h[1], 0):
                    bad.append(f"holds: an active hold of {h[1]} could not be funded: {r}")
            elif r["status"] == "released" and not r["already_resolved"] and int(r["released"]) not in (0, h[1]):
                # (0: it had expired, within the capture grace: its credits came back at the expiry)
                bad.append(f"holds: release of {c.args['hold']} gave back {r['released']} of {h[1]}")
        if c.op in ("reserve", "reserve_rpc") and c.status == "ok":
            reserved[c.user] += 1
            if r["hold_id"] not in holds:
                lost.append(f"holds: committed reservation {r['hold_id']} is gone")
            elif holds[r["hold_id"]][1] < int(r["held"]):
                bad.append(f"holds: reservation {r['hold_id']} holds less than it returned")
        if c.key is not None and c.op in ("reserve", "reserve_rpc", "consume", "add", "capture", "release", "increase"):
            stored = keys.get((c.user, c.key))     # (a hold's key lives with its user: the same one)
            if c.status == "ok" and stored is not None and stored != r:
                lost.append(f"holds: {c.op} key {c.key}: stored {stored} != returned {r}")
            if c.status == "ok" and stored is None:
                lost.append(f"holds: committed {c.op} key {c.key}: no idempotency row")
            if c.status == "fail" and stored is not None:
                bad.append(f"holds: failed {c.op} key {c.key} left {stored}")
    for hid, sts in resolved.items():
        if len(sts) > 1:
            bad.append(f"holds: hold {hid} resolved as {sorted(sts)}")
    return lost, bad


def stats(calls):
    by = defaultdict(int)
    for c in calls:
        by[(c.op, c.status, c.sqlstate)] += 1
    return ", ".join(f"{k[0]}:{k[1]}{'/' + k[2] if k[2] else ''}={v}" for k, v in sorted(by.items()))
