"""Shared pieces of the stress harness (tests/stress): connections, PostgREST-style calls, the
random mix of billing calls, and a thread-safe recorder of every call and its outcome.

Every call goes through `Call`: the op, its user, its arguments, its idempotency key, and the
outcome the client saw: `ok` (the call, and its COMMIT, returned), `fail` (the server raised an
error: nothing may have changed), or `unknown` (the connection was lost before the result came
back: the call may or may not be applied, but only as a whole).

Credit grants (0.4.0): the users are split in two. The "classic" users (the first 30%) only ever
see the two-pool API and no overdraft, so their calls keep the strict two-pool checks (FIFO, exact
pool deltas). The other users also get grant_credits (every category, custom priorities,
feature scopes, expiries a few seconds away, starts a few seconds ahead), void_grant (also of
grants already voided), consume_credits with and without a feature (service and end user),
set_overdraft_limit and reads of their grants; a third of them may overdraw by 30, a third by
150. What each successful call must have written to the ledger is `Call.expect()`; the
cross-check against the database is tests/stress/ledger_check.py."""
import os
import random
import subprocess
import sys
import tempfile
import threading
import datetime
import time
import uuid
from pathlib import Path

import psycopg2

# The helpers shared with the integration tests (connections, PostgREST-style calls, claims,
# roles) live once in tests/pgb_testlib.py; the stress modules import them from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pgb_testlib import claims, connect, distributed, ensure_roles, expect_sqlstate, fmt, postgrest_call, q  # noqa: E402,F401

# SQLSTATEs a call may legitimately raise in the mix: not enough credits. Everything else that
# comes back with a SQLSTATE from a live connection is an invariant violation (XX000, deadlock,
# serialization failure, a wrong 42501, ...).
EXPECTED_ERRORS = {"consume": {"PT402"}, "consume_rpc": {"PT402"}, "consume_f": {"PT402"}, "consume_f_rpc": {"PT402"}}

# The calls that change credits (all idempotent with a key).
MUTATORS = ("consume", "consume_rpc", "add_sub", "add_pur", "refund", "expire", "renew",
            "grant", "void", "consume_f", "consume_f_rpc")
CONSUMERS = ("consume", "consume_rpc", "consume_f", "consume_f_rpc")
# Calls only the grant users get.
GRANT_OPS = ("grant", "void", "consume_f", "consume_f_rpc", "limit", "read_grants", "balance_at")

CATEGORIES = ("subscription", "purchased", "promotional", "rollover", "refund")
DEFAULT_PRIORITY = {"subscription": 10, "rollover": 20, "promotional": 30, "refund": 40, "purchased": 50}
FEATURES = ("chat", "image", "video")
SCOPES = [["chat"], ["image"], ["chat", "image"]]
OVERDRAFT_LIMITS = (0, 30, 150)


def pool_of(category):
    """The pool a grant's credits count in (GRANTS.md)."""
    return "subscription" if category in ("subscription", "rollover") else "purchased"


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


class Users(list):
    """The test users; `classic` (a set) only get the two-pool API, `granted` (a list) get
    everything; `limits` holds the overdraft limit each got at setup."""

    def __init__(self, users, classic_share=0.3):
        super().__init__(users)
        n = int(len(users) * classic_share)
        self.classic = set(users[:n])
        self.granted = list(users[n:]) or list(users)
        self.limits = {u: 0 for u in users}


# ---------------------------------------------------------------------------------------------
# Calls


class Call:
    __slots__ = ("op", "user", "args", "key", "status", "result", "sqlstate", "error", "t0", "t1")

    def __init__(self, op, user, args, key=None):
        self.op, self.user, self.args, self.key = op, user, args, key
        self.status, self.result, self.sqlstate, self.error = "inflight", None, None, None
        self.t0 = time.time()
        self.t1 = None

    @property
    def classic(self):
        return bool(self.args.get("classic"))

    def expect(self, r=None):
        """What a successful credit call must have written to the ledger, from its result `r`
        (default: the result it got): {"total": sum of its ledger rows over all pools, "pools":
        {(pool, ...): sum of its rows in those pools}, "grants": {grant_id: sum of its rows on
        that grant} (when the result names them)}. None: the call writes nothing (a repeated
        void). A new grant may pay debt first (debt_repayment rows inside the operation), so the
        pool a two-pool grant adds to is checked together with the debt pool."""
        r = self.result if r is None else r
        op = self.op
        if op in ("consume", "consume_rpc"):
            n, su, pu = int(r["consumed"]), int(r["subscription_used"]), int(r["purchased_used"])
            d = int(r["debt_added"]) if "debt_added" in r else n - su - pu
            return {"total": -n, "pools": {("subscription",): -su, ("purchased",): -pu, ("debt",): -d}}
        if op in ("consume_f", "consume_f_rpc"):
            per, pools = {}, {"subscription": 0, "purchased": 0}
            for g in r["grants"]:
                per[str(g["grant_id"])] = per.get(str(g["grant_id"]), 0) - int(g["amount"])
                pools[pool_of(g["category"])] -= int(g["amount"])
            return {"total": -int(r["consumed"]), "grants": per,
                    "pools": {("subscription",): pools["subscription"], ("purchased",): pools["purchased"],
                              ("debt",): -int(r["debt_added"])}}
        if op == "add_sub":
            return {"total": int(r["added"]), "pools": {("subscription", "debt"): int(r["added"]), ("purchased",): 0}}
        if op in ("add_pur", "refund"):
            return {"total": int(r["added"]), "pools": {("purchased", "debt"): int(r["added"]), ("subscription",): 0}}
        if op == "expire":
            e = int(r["expired_amount"])
            return {"total": -e, "pools": {("subscription",): -e, ("purchased",): 0, ("debt",): 0}}
        if op == "renew":
            x = int(r["added"]) - int(r["expired_amount"])
            return {"total": x, "pools": {("subscription", "debt"): x, ("purchased",): 0}}
        if op == "grant":
            amt, rep, p = int(r["amount"]), int(r["debt_repaid"]), pool_of(r["category"])
            other = "purchased" if p == "subscription" else "subscription"
            return {"total": amt, "grants": {str(r["grant_id"]): amt - rep},
                    "pools": {(p,): amt - rep, ("debt",): rep, (other,): 0}}
        if op == "void":
            if r.get("already_voided"):
                return None
            v = int(r["voided_amount"])
            return {"total": -v, "grants": {str(r["grant_id"]): -v},
                    "pools": {("subscription", "purchased"): -v, ("debt",): 0}}
        return None

    def check_result(self):
        """Problems with a successful result on its own (before any cross-checking)."""
        r, a, op = self.result, self.args, self.op
        bad = []
        if op in MUTATORS:
            if not isinstance(r, dict):
                return [f"{op}: result is not a JSON object: {r!r}"]
            for k in ("subscription_credits_balance", "purchased_credits_balance", "debt"):
                if k in r and int(r[k]) < 0:
                    bad.append(f"{op}: negative {k} in result {r}")
            # (the two-pool results name no debt: their total is less by the debt, if any)
            if "total_balance" in r and "subscription_credits_balance" in r and ("debt" in r or self.classic):
                want = int(r["subscription_credits_balance"]) + int(r["purchased_credits_balance"]) - int(r.get("debt", 0))
                if int(r["total_balance"]) != want:
                    bad.append(f"{op}: total_balance {r['total_balance']} is not subscription + purchased - debt: {r}")
            elif "total_balance" in r and "subscription_credits_balance" in r and \
                    int(r["total_balance"]) > int(r["subscription_credits_balance"]) + int(r["purchased_credits_balance"]):
                bad.append(f"{op}: total_balance {r['total_balance']} above subscription + purchased: {r}")
            if self.classic and int(r.get("debt", 0)) != 0:
                bad.append(f"{op}: a user with no overdraft is in debt: {r}")
        if op in ("consume", "consume_rpc"):
            su, pu = int(r["subscription_used"]), int(r["purchased_used"])
            if int(r["consumed"]) != a["amount"] or su < 0 or pu < 0 or su + pu > a["amount"]:
                bad.append(f"consume {a['amount']}: result does not add up: {r}")
            if self.classic:
                if su + pu != a["amount"]:
                    bad.append(f"consume {a['amount']}: result does not add up: {r}")
                if pu > 0 and int(r["subscription_credits_balance"]) != 0:
                    bad.append(f"consume: FIFO broken (purchased used while subscription pool left): {r}")
        elif op in ("consume_f", "consume_f_rpc"):
            used = sum(int(g["amount"]) for g in r["grants"])
            if int(r["consumed"]) != a["amount"] or used + int(r["debt_added"]) != a["amount"]:
                bad.append(f"consume_credits {a['amount']}: grants {used} + debt_added {r['debt_added']} "
                           f"!= consumed {r['consumed']}: {r}")
            if any(int(g["amount"]) <= 0 for g in r["grants"]) or int(r["debt_added"]) < 0:
                bad.append(f"consume_credits: a non-positive part in {r}")
            if len({str(g["grant_id"]) for g in r["grants"]}) != len(r["grants"]):
                bad.append(f"consume_credits: a grant listed twice in {r}")
            if r.get("feature") != a.get("feature"):
                bad.append(f"consume_credits: feature {r.get('feature')!r}, asked {a.get('feature')!r}")
            if int(r["debt_added"]) > int(r["debt"]):
                bad.append(f"consume_credits: debt_added {r['debt_added']} > debt {r['debt']}")
        elif op in ("add_sub", "add_pur", "refund"):
            if int(r["added"]) != a["amount"]:
                bad.append(f"{op} {a['amount']}: added {r['added']}")
        elif op == "renew":
            if int(r["added"]) != a["amount"] or int(r["expired_amount"]) < 0:
                bad.append(f"renew {a['amount']}: {r}")
            if self.classic and int(r["subscription_credits_balance"]) != a["amount"]:
                bad.append(f"renew {a['amount']}: {r}")
        elif op == "expire":
            if int(r["expired_amount"]) < 0 or (self.classic and int(r["subscription_credits_balance"]) != 0):
                bad.append(f"expire: {r}")
        elif op == "grant":
            prio = a["priority"] if a.get("priority") is not None else DEFAULT_PRIORITY[a["category"]]
            if (int(r["amount"]), r["category"], int(r["priority"])) != (a["amount"], a["category"], prio):
                bad.append(f"grant_credits {a['amount']} {a['category']} priority {prio}: {r}")
            if (r.get("scope") or None) != a.get("scope"):
                bad.append(f"grant_credits scope {a.get('scope')}: result says {r.get('scope')}")
            rep = int(r["debt_repaid"])
            if not 0 <= rep <= a["amount"]:
                bad.append(f"grant_credits: debt_repaid {rep} of {a['amount']}: {r}")
            later = a.get("effective_at") is not None and a["effective_at"].timestamp() > self.t0 + 0.05
            if (a.get("scope") or later) and rep:
                bad.append(f"grant_credits (scoped or starting later) repaid debt: {r}")
            if not a.get("scope") and a.get("effective_at") is None and rep < a["amount"] and int(r["debt"]) != 0:
                bad.append(f"grant_credits effective now repaid {rep} of {a['amount']} but left debt {r['debt']}: {r}")
        elif op == "void":
            if str(r["grant_id"]) != str(a["grant_id"]) or str(r["user_id"]) != str(self.user) or int(r["voided_amount"]) < 0:
                bad.append(f"void_grant {a['grant_id']}: {r}")
        elif op == "limit":
            if int(r["overdraft_limit"]) != a["limit"] or int(r["debt"]) < 0:
                bad.append(f"set_overdraft_limit {a['limit']}: {r}")
        elif op == "read_grants":
            for row in r:
                gid, cat, amount, remaining, status = row
                if status not in ("active", "scheduled") or not 0 <= remaining <= amount:
                    bad.append(f"get_credit_grants: row {row}")
        elif op == "balance_at":
            if min(int(r["subscription_credits_balance"]), int(r["purchased_credits_balance"]), int(r["debt"])) < 0 or \
                    int(r["total_balance"]) != int(r["subscription_credits_balance"]) + int(r["purchased_credits_balance"]) - int(r["debt"]):
                bad.append(f"balance_at: {dict((k, v) for k, v in r.items() if k != 'grants')}")
            if str(r.get("user_id")) != str(self.user):
                bad.append(f"balance_at for {self.user} answered for {r.get('user_id')}")
        return bad


def execute(conn, call):
    """Run one call on `conn` and fill in its outcome. Never raises for database errors."""
    u, a, k = call.user, call.args, call.key
    try:
        if call.op == "consume":
            r = q(conn, "SELECT billing.consume_credits_v2(%s, %s, %s, %s, %s)",
                  (u, a["amount"], a.get("desc"), a.get("ref"), k))[0][0]
        elif call.op == "consume_rpc":
            r = postgrest_call(conn, "authenticated", claims("authenticated", u),
                               "SELECT public.consume_credits_v2(p_user_id := %s, p_amount := %s, "
                               "p_reference_id := %s, p_idempotency_key := %s)",
                               (u, a["amount"], a.get("ref"), k))[0][0]
        elif call.op == "add_sub":
            r = q(conn, "SELECT billing.add_subscription_credits(%s, %s, %s, %s, %s)",
                  (u, a["amount"], a.get("desc"), a.get("ref"), k))[0][0]
        elif call.op == "add_pur":
            r = q(conn, "SELECT billing.add_purchased_credits(%s, %s, %s, %s, %s)",
                  (u, a["amount"], a.get("desc"), a.get("ref"), k))[0][0]
        elif call.op == "refund":
            r = q(conn, "SELECT billing.refund_credits(%s, %s, %s, %s, %s)",
                  (u, a["amount"], a.get("desc"), a.get("ref"), k))[0][0]
        elif call.op == "expire":
            r = q(conn, "SELECT billing.expire_subscription_credits(%s, %s, %s)", (u, a.get("desc"), k))[0][0]
        elif call.op == "renew":
            r = q(conn, "SELECT billing.renew_subscription_credits(%s, %s, NULL, %s)", (u, a["amount"], k))[0][0]
        elif call.op == "grant":
            eff = "p_effective_at := %s::timestamptz, " if a.get("effective_at") is not None else ""
            params = [u, a["amount"], a["category"], a.get("priority")]
            if eff:
                params.append(a["effective_at"])
            params += [a.get("expires_at"), a.get("scope"), a.get("desc"), a.get("ref"), k]
            r = q(conn, "SELECT billing.grant_credits(p_user_id := %s, p_amount := %s, p_category := %s, "
                        f"p_priority := %s::integer, {eff}p_expires_at := %s::timestamptz, p_scope := %s::text[], "
                        "p_description := %s, p_reference_id := %s, p_idempotency_key := %s)", params)[0][0]
        elif call.op == "void":
            r = q(conn, "SELECT billing.void_grant(p_grant_id := %s, p_reason := %s, p_idempotency_key := %s)",
                  (a["grant_id"], a.get("reason"), k))[0][0]
        elif call.op == "consume_f":
            r = q(conn, "SELECT billing.consume_credits(p_user_id := %s, p_amount := %s, p_feature := %s, "
                        "p_description := %s, p_reference_id := %s, p_idempotency_key := %s)",
                  (u, a["amount"], a.get("feature"), a.get("desc"), a.get("ref"), k))[0][0]
        elif call.op == "consume_f_rpc":
            r = postgrest_call(conn, "authenticated", claims("authenticated", u),
                               "SELECT public.consume_credits(p_user_id := %s, p_amount := %s, p_feature := %s, "
                               "p_reference_id := %s, p_idempotency_key := %s)",
                               (u, a["amount"], a.get("feature"), a.get("ref"), k))[0][0]
        elif call.op == "limit":
            r = q(conn, "SELECT billing.set_overdraft_limit(%s, %s)", (u, a["limit"]))[0][0]
        elif call.op == "read_grants":
            r = [tuple(x) for x in postgrest_call(
                conn, "authenticated", claims("authenticated", u),
                "SELECT grant_id, category::text, amount, remaining, status FROM public.get_credit_grants(p_user_id := %s)", (u,))]
        elif call.op == "balance_at":
            r = postgrest_call(conn, "authenticated", claims("authenticated", u),
                               "SELECT public.balance_at(p_user_id := %s, p_at := now())", (u,))[0][0]
        elif call.op == "usage":
            q(conn, "SELECT billing.record_message_usage(%s, %s, %s)", (u, a["tin"], a["tout"]))
            r = None
        elif call.op == "rate":
            row = postgrest_call(conn, "authenticated", claims("authenticated", u),
                                 "SELECT allowed, limit_value, remaining, reset_at "
                                 "FROM public.check_api_rate_limit(p_user_id := %s, p_endpoint := %s)",
                                 (u, a["endpoint"]))[0]
            r = {"allowed": row[0], "limit_value": row[1], "remaining": row[2], "reset_at": row[3]}
        elif call.op == "read":
            row = postgrest_call(conn, "authenticated", claims("authenticated", u),
                                 "SELECT subscription_credits_balance, purchased_credits_balance "
                                 "FROM public.get_user_credits(p_user_id := %s)", (u,))[0]
            r = {"sub": row[0], "pur": row[1]}
        else:
            raise ValueError(call.op)
        call.status, call.result, call.t1 = "ok", r, time.time()
    except psycopg2.Error as e:
        call.t1 = time.time()
        call.sqlstate = e.pgcode
        call.error = (e.pgerror or str(e)).strip().splitlines()[0] if (e.pgerror or str(e)) else repr(e)
        if conn.closed or e.pgcode is None or e.pgcode[:2] in ("08", "57"):
            call.status = "unknown"      # connection lost: the result never reached us
        else:
            call.status = "fail"
    return call


# ---------------------------------------------------------------------------------------------
# The random mix


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.keyed_ok = []               # successful keyed mutator calls, for idempotent retries
        self.replays = []                # (original call, replay call)
        self.unexpected = []             # calls that raised an error they never should
        self.grants = []                 # (user, grant_id) of every grant a grant_credits call returned
        self.late = 0                    # grant_credits refused (22023) because its expiry passed under load

    def add(self, call):
        with self.lock:
            self.calls.append(call)
            if call.status == "ok" and call.key and call.op in MUTATORS:
                self.keyed_ok.append(call)
            if call.status == "ok" and call.op == "grant":
                self.grants.append((call.user, call.result["grant_id"]))
            if call.status == "fail" and call.sqlstate not in EXPECTED_ERRORS.get(call.op, ()):
                if late_grant(call):
                    self.late += 1
                else:
                    self.unexpected.append(call)

    def pick_keyed(self, rnd):
        with self.lock:
            if not self.keyed_ok:
                return None
            return self.keyed_ok[rnd.randrange(len(self.keyed_ok))]

    def pick_grant(self, rnd):
        with self.lock:
            if not self.grants:
                return None
            # mostly recent grants (still holding credits), sometimes any (voided, spent, expired)
            n = len(self.grants)
            i = n - 1 - rnd.randrange(min(n, 200)) if rnd.random() < 0.8 else rnd.randrange(n)
            return self.grants[i]


def late_grant(call):
    """A grant_credits call whose expiry had already passed when the server read the clock (the
    machine was slow): 22023 is its documented answer, not a finding."""
    e = call.args.get("expires_at") if call.op == "grant" else None
    return call.sqlstate == "22023" and e is not None and e.timestamp() <= (call.t1 or time.time()) + 0.5


# op -> weight. The grant ops (GRANT_OPS) go to the grant users only.
MIX = [("consume", 26), ("consume_rpc", 8), ("add_sub", 9), ("add_pur", 9), ("refund", 5), ("expire", 3),
       ("renew", 3), ("retry", 9), ("shared", 6), ("rate", 10), ("usage", 10), ("read", 2),
       ("grant", 14), ("void", 4), ("consume_f", 16), ("consume_f_rpc", 6), ("limit", 1), ("read_grants", 2),
       ("balance_at", 1)]
SHARED_OPS = ("add_sub", "add_pur", "consume", "refund")
SHARED_GRANT_OPS = ("add_sub", "add_pur", "consume", "refund", "grant", "consume_f")


def shared_call(users, rnd, tag):
    """A call whose key and arguments are a function of a small key space, so several threads run
    the same keyed call at the same time (concurrent idempotent repeats)."""
    ui = rnd.randrange(len(users))
    slot = rnd.randrange(8)
    h = hash((tag, ui, slot)) & 0xFFFFFFFF
    u = users[ui]
    classic = u in getattr(users, "classic", ())
    ops = SHARED_OPS if classic or not hasattr(users, "classic") else SHARED_GRANT_OPS
    op = ops[h % len(ops)]
    args = {"amount": 1 + (h >> 8) % 40, "ref": f"shared-{slot}", "classic": classic}
    if op == "grant":
        # no timestamps: every repeat sends the very same arguments
        args.update(category=CATEGORIES[(h >> 4) % 5], scope=SCOPES[(h >> 12) % 3] if (h >> 14) % 3 == 0 else None)
    elif op == "consume_f":
        args["feature"] = (FEATURES + (None,))[(h >> 16) % 4]
    return Call(op, u, args, key=f"{tag}-shared-{ui}-{slot}")


def grant_args(rnd, tag, seq):
    """grant_credits arguments: every category, default or custom priority, a scope now and then,
    an expiry 3-8 s away, a start up to 4 s ahead."""
    cat = rnd.choice(CATEGORIES)
    a = {"amount": rnd.choice([1, 5, 10, 25, 100]), "category": cat, "ref": f"{tag}-{seq}", "desc": "stress grant",
         "priority": None if rnd.random() < 0.6 else rnd.randrange(0, 101),
         "scope": None if rnd.random() < 0.65 else rnd.choice(SCOPES)}
    now = utcnow()
    x = rnd.random()
    if x < 0.25:
        a["effective_at"] = now + datetime.timedelta(seconds=rnd.uniform(0.5, 4))
    elif x < 0.4:
        a["effective_at"] = now - datetime.timedelta(seconds=rnd.uniform(0, 2))
    if rnd.random() < 0.5:
        start = a.get("effective_at") or now
        a["expires_at"] = max(start, now) + datetime.timedelta(seconds=rnd.uniform(3, 8))
    return a


def make_call(users, rnd, tag, seq, keyed_prob=0.5, rec=None):
    op = rnd.choices([m[0] for m in MIX], weights=[m[1] for m in MIX])[0]
    if op in ("retry", "shared"):
        return op, None
    granted = getattr(users, "granted", None)
    if op in GRANT_OPS:
        if not granted:
            return "skip", None
        u = granted[rnd.randrange(len(granted))]
    else:
        u = users[rnd.randrange(len(users))]
    classic = u in getattr(users, "classic", ())
    key = f"{tag}-{seq}" if (op in MUTATORS and rnd.random() < keyed_prob) else None
    if op in CONSUMERS:
        args = {"amount": rnd.choice([1, 1, 2, 3, 5, 8, 13, 40, 120]), "ref": f"{tag}-{seq}"}
        if op in ("consume_f", "consume_f_rpc"):
            args["feature"] = rnd.choice(FEATURES + (None,))
    elif op in ("add_sub", "add_pur", "refund"):
        args = {"amount": rnd.choice([1, 5, 10, 25, 100]), "ref": f"{tag}-{seq}", "desc": "stress"}
    elif op == "renew":
        args = {"amount": rnd.choice([10, 50, 100])}
    elif op == "expire":
        args = {"desc": "stress expire"}
    elif op == "usage":
        args = {"tin": rnd.randrange(0, 500), "tout": rnd.randrange(0, 500)}
    elif op == "rate":
        args = {"endpoint": rnd.choice(["/a", "/b", "/c"])}
    elif op == "grant":
        args = grant_args(rnd, tag, seq)
    elif op == "void":
        picked = rec.pick_grant(rnd) if rec else None
        if picked is None:
            return "skip", None
        u = picked[0]
        args = {"grant_id": picked[1], "reason": rnd.choice([None, "chargeback"])}
    elif op == "limit":
        args = {"limit": rnd.choice(OVERDRAFT_LIMITS)}
    else:
        args = {}
    args["classic"] = classic
    return op, Call(op, u, args, key)


def worker(dsn, users, stop, rec, tag, seed, keyed_prob=0.5, on_lost=None):
    """Run the mix until `stop` is set. On a lost connection: reconnect unless `on_lost` says to
    stop (the crash test stops the thread; the server is going down)."""
    rnd = random.Random(seed)
    conn = None
    seq = 0
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
        op, call = make_call(users, rnd, tag, seq, keyed_prob, rec)
        if op == "skip":
            continue
        if op == "retry":
            orig = rec.pick_keyed(rnd)
            if orig is None:
                continue
            call = Call(orig.op, orig.user, orig.args, orig.key)
            execute(conn, call)
            with rec.lock:
                rec.replays.append((orig, call))
                rec.calls.append(call)
            if call.status == "unknown" and on_lost and on_lost():
                break
            continue
        if op == "shared":
            call = shared_call(users, rnd, tag.split("-")[0])
        execute(conn, call)
        rec.add(call)
        if call.status == "unknown":
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            if on_lost and on_lost():
                break
    if conn is not None and not conn.closed:
        conn.close()


def setup_users(conn, n, tag, grants=True):
    """n fresh users, each with an account (credits in both pools). With `grants` (and pg_billing
    0.4.0), the grant users also get a promotional grant and scoped credits, and a third of them
    an overdraft limit of 30, a third of 150. Returns (Users, setup calls)."""
    users = Users([uuid.uuid4() for _ in range(n)])
    if not grants or not has_grants(conn):
        users.granted = []
        users.classic = set(users)
    calls = []
    for i, u in enumerate(users):
        classic = u in users.classic or not users.granted
        if not classic and i % 2:
            # first (its period starts now): a subscription on a plan that rolls over up to 40
            # credits at each renewal
            calls.append(subscribe(conn, u, f"{tag}-sub-{i}"))
        todo = [("add_sub", {"amount": 200}), ("add_pur", {"amount": 200})]
        if not classic:
            todo += [("grant", {"amount": 100, "category": "promotional", "scope": None, "priority": None}),
                     ("grant", {"amount": 50, "category": "purchased", "scope": ["chat"], "priority": None})]
        for j, (op, args) in enumerate(todo):
            args.update(ref=f"{tag}-setup", classic=classic)
            c = Call(op, u, args, key=f"{tag}-setup-{op}-{i}-{j}")
            execute(conn, c)
            if c.status != "ok":
                raise RuntimeError(f"setup call failed: {c.op} {c.sqlstate} {c.error}")
            calls.append(c)
        if not classic:
            lim = OVERDRAFT_LIMITS[i % 3]
            users.limits[u] = lim
            if lim:
                c = Call("limit", u, {"limit": lim, "classic": False})
                execute(conn, c)
                if c.status != "ok":
                    raise RuntimeError(f"setup call failed: set_overdraft_limit {c.sqlstate} {c.error}")
                calls.append(c)
    return users, calls


GRANT_SQL_CHECKS = [
    ("a grant's remaining is outside 0..amount",
     "SELECT user_id, id, amount, remaining FROM billing.credit_grants WHERE remaining < 0 OR remaining > amount"),
    ("a grant's ledger rows do not sum to its remaining",
     """SELECT g.user_id, g.id, g.remaining, COALESCE(sum(t.amount), 0) FROM billing.credit_grants AS g
          LEFT JOIN billing.credit_transactions AS t ON t.user_id = g.user_id AND t.grant_id = g.id
         GROUP BY g.user_id, g.id, g.remaining HAVING COALESCE(sum(t.amount), 0) <> g.remaining"""),
    ("an account's pools are not the sums of its grants",
     """SELECT a.user_id, a.subscription_credits_balance, a.purchased_credits_balance, s.sub, s.pur
          FROM billing.accounts AS a
          CROSS JOIN LATERAL (
                SELECT COALESCE(sum(x.v) FILTER (WHERE x.pool = 'subscription'), 0) AS sub,
                       COALESCE(sum(x.v) FILTER (WHERE x.pool = 'purchased'), 0) AS pur
                  FROM (SELECT g.pool, g.remaining AS v FROM billing.credit_grants AS g WHERE g.user_id = a.user_id
                        UNION ALL
                        SELECT t.pool, t.amount FROM billing.credit_transactions AS t
                         WHERE t.user_id = a.user_id AND t.grant_id IS NULL AND t.pool <> 'debt') AS x) AS s
         WHERE (a.subscription_credits_balance, a.purchased_credits_balance) <> (s.sub, s.pur)"""),
    ("an account's debt is negative or not minus its debt rows",
     """SELECT a.user_id, a.debt, (SELECT sum(t.amount) FROM billing.credit_transactions AS t
                                   WHERE t.user_id = a.user_id AND t.pool = 'debt')
          FROM billing.accounts AS a
         WHERE a.debt < 0 OR a.debt <> -COALESCE((SELECT sum(t.amount) FROM billing.credit_transactions AS t
                                                  WHERE t.user_id = a.user_id AND t.pool = 'debt'), 0)"""),
    # (clawback_credits_from_transaction voids a purchase's grant with a 'clawback' row)
    ("a grant is not voided exactly once",
     """SELECT g.user_id, g.id, g.voided_at, g.voided_amount, count(t.*), sum(t.amount)
          FROM billing.credit_grants AS g
          LEFT JOIN billing.credit_transactions AS t ON t.user_id = g.user_id AND t.grant_id = g.id
                                                AND t.type IN ('void', 'clawback')
         GROUP BY g.user_id, g.id, g.voided_at, g.voided_amount
        HAVING (g.voided_at IS NULL AND count(t.*) > 0)
            OR (g.voided_at IS NOT NULL AND (count(t.*) <> CASE WHEN g.voided_amount > 0 THEN 1 ELSE 0 END
                                             OR COALESCE(sum(t.amount), 0) <> -COALESCE(g.voided_amount, 0)))"""),
    ("an expired grant was spent",
     """SELECT g.user_id, g.id, g.expires_at, t.type, t.amount, t.created_at FROM billing.credit_grants AS g
          JOIN billing.credit_transactions AS t ON t.user_id = g.user_id AND t.grant_id = g.id
         WHERE t.amount < 0 AND t.type <> 'expiration' AND t.created_at >= g.expires_at"""),
]


def grant_sql_checks(conn):
    """The grant invariants that need no client knowledge, over the whole database (0.4.0; none
    before): each a violation message with up to 3 example rows."""
    if not has_grants(conn):
        return []
    out = []
    for what, sql in GRANT_SQL_CHECKS:
        rows = q(conn, sql)
        if rows:
            out.append(f"{what}: {len(rows)} rows, e.g. {rows[:3]}")
    return out


ROLLOVER_PLAN = "stress_rollover"


def subscribe(conn, u, event_id):
    """Subscribe u to ROLLOVER_PLAN (created when absent: 100 credits a month, up to 40 roll over).
    upsert_subscription returns no transaction_id; its grant is the user's latest ledger operation,
    returned here as the add_sub call it amounts to, so the ledger check knows it."""
    q(conn, """INSERT INTO billing.plans (plan_id, display_name, monthly_credits, rollover_max, sort_order)
               VALUES (%s, 'Stress rollover', 100, 40, 99) ON CONFLICT (plan_id) DO NOTHING""", (ROLLOVER_PLAN,))
    r = q(conn, """SELECT billing.upsert_subscription(p_user_id := %s, p_plan_id := %s, p_status := 'active',
                                                      p_current_period_start := now() - interval '1 day',
                                                      p_current_period_end := now() + interval '29 days', p_event_id := %s)""",
          (u, ROLLOVER_PLAN, event_id))[0][0]
    op = q(conn, """SELECT operation_id::text FROM billing.credit_transactions WHERE user_id = %s
                     ORDER BY created_at DESC, id DESC LIMIT 1""", (u,))[0][0]
    c = Call("add_sub", u, {"amount": int(r["credits_granted"]), "classic": False})
    c.status, c.t1 = "ok", time.time()
    c.result = {"success": True, "added": int(r["credits_granted"]), "transaction_id": op}
    if not r.get("applied") or int(r["credits_granted"]) != 100:
        raise RuntimeError(f"setup: upsert_subscription did not grant the plan's credits: {r}")
    return c


def has_grants(conn):
    """pg_billing 0.4.0 or later (credit grants)."""
    return bool(q(conn, "SELECT 1 FROM pg_proc WHERE proname = 'grant_credits' AND pronamespace = 'billing'::regnamespace"))


# ---------------------------------------------------------------------------------------------
# Throwaway clusters (crash test)

PGBIN = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")


def _as_postgres(args, **kw):
    pre = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else ["sudo", "-n", "runuser", "-u", "postgres", "--"]
    return subprocess.run(pre + args, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Cluster:
    """A throwaway PostgreSQL 15 cluster owned by postgres, durable (fsync and synchronous_commit
    on), on a free port with its socket in its own directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pg_billing_crash.")
        os.chmod(self.dir, 0o755)
        subprocess.run(["chown", "postgres:postgres", self.dir], check=True) if os.geteuid() == 0 else \
            subprocess.run(["sudo", "-n", "chown", "postgres:postgres", self.dir], check=True)
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        _as_postgres([f"{PGBIN}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres"])
        conf = f"""
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.dir}'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 100
shared_buffers = 128MB
"""
        _as_postgres(["sh", "-c", f"cat >> '{self.data}/postgresql.conf'"], input=conf)
        self.start()

    def dsn(self, db="postgres"):
        return f"host={self.dir} port={self.port} user=postgres dbname={db}"

    def start(self, timeout=60):
        """pg_ctl start; retried while orphaned backends of a killed postmaster still hold the
        old shared memory (they exit as soon as their current statement ends)."""
        deadline = time.time() + timeout
        while True:
            try:
                _as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "server.log"),
                              "-w", "-t", "60", "start"])
                return
            except subprocess.CalledProcessError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline().strip())

    def kill_postmaster(self):
        """SIGKILL the server's main process, by the pid in postmaster.pid (never by name)."""
        pid = self.postmaster_pid()
        os.kill(pid, 9)
        return pid

    def stop(self):
        try:
            _as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"])
        except subprocess.CalledProcessError:
            pass
        subprocess.run(["rm", "-rf", self.dir], check=False)
