"""Shared pieces of the stress harness (tests/stress): connections, PostgREST-style calls, the
random mix of billing calls, and a thread-safe recorder of every call and its outcome.

Every call goes through `Call`: the op, its user, its arguments, its idempotency key, and the
outcome the client saw: `ok` (the call, and its COMMIT, returned), `fail` (the server raised an
error: nothing may have changed), or `unknown` (the connection was lost before the result came
back: the call may or may not be applied, but only as a whole)."""
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2

# The helpers shared with the integration tests (connections, PostgREST-style calls, claims,
# roles) live once in tests/pgb_testlib.py; the stress modules import them from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pgb_testlib import claims, connect, ensure_roles, expect_sqlstate, fmt, postgrest_call, q  # noqa: E402,F401

# SQLSTATEs a call may legitimately raise in the mix: not enough credits. Everything else that
# comes back with a SQLSTATE from a live connection is an invariant violation (XX000, deadlock,
# serialization failure, a wrong 42501, ...).
EXPECTED_ERRORS = {"consume": {"PT402"}, "consume_rpc": {"PT402"}}

MUTATORS = ("consume", "consume_rpc", "add_sub", "add_pur", "refund", "expire", "renew")


# ---------------------------------------------------------------------------------------------
# Calls


class Call:
    __slots__ = ("op", "user", "args", "key", "status", "result", "sqlstate", "error", "t0")

    def __init__(self, op, user, args, key=None):
        self.op, self.user, self.args, self.key = op, user, args, key
        self.status, self.result, self.sqlstate, self.error = "inflight", None, None, None
        self.t0 = time.time()

    def deltas(self):
        """(subscription delta, purchased delta) of a successful credit call, from its result."""
        r = self.result
        if self.op in ("consume", "consume_rpc"):
            return -int(r["subscription_used"]), -int(r["purchased_used"])
        if self.op == "add_sub":
            return int(r["added"]), 0
        if self.op in ("add_pur", "refund"):
            return 0, int(r["added"])
        if self.op == "expire":
            return -int(r["expired_amount"]), 0
        if self.op == "renew":
            return int(r["added"]) - int(r["expired_amount"]), 0
        return 0, 0

    def check_result(self):
        """Problems with a successful result on its own (before any cross-checking)."""
        r, a = self.result, self.args
        bad = []
        if self.op in MUTATORS:
            if not isinstance(r, dict):
                return [f"{self.op}: result is not a JSON object: {r!r}"]
            for k in ("subscription_credits_balance", "purchased_credits_balance"):
                if k in r and int(r[k]) < 0:
                    bad.append(f"{self.op}: negative {k} in result {r}")
        if self.op in ("consume", "consume_rpc"):
            if int(r["consumed"]) != a["amount"] or int(r["subscription_used"]) + int(r["purchased_used"]) != a["amount"]:
                bad.append(f"consume {a['amount']}: result does not add up: {r}")
            if int(r["subscription_used"]) < 0 or int(r["purchased_used"]) < 0:
                bad.append(f"consume: negative split {r}")
            if int(r["purchased_used"]) > 0 and int(r["subscription_credits_balance"]) != 0:
                bad.append(f"consume: FIFO broken (purchased used while subscription pool left): {r}")
        elif self.op in ("add_sub", "add_pur", "refund"):
            if int(r["added"]) != a["amount"]:
                bad.append(f"{self.op} {a['amount']}: added {r['added']}")
        elif self.op == "renew":
            if int(r["added"]) != a["amount"] or int(r["subscription_credits_balance"]) != a["amount"]:
                bad.append(f"renew {a['amount']}: {r}")
        elif self.op == "expire":
            if int(r["subscription_credits_balance"]) != 0 or int(r["expired_amount"]) < 0:
                bad.append(f"expire: {r}")
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
        call.status, call.result = "ok", r
    except psycopg2.Error as e:
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

    def add(self, call):
        with self.lock:
            self.calls.append(call)
            if call.status == "ok" and call.key and call.op in MUTATORS:
                self.keyed_ok.append(call)
            if call.status == "fail" and call.sqlstate not in EXPECTED_ERRORS.get(call.op, ()):
                self.unexpected.append(call)

    def pick_keyed(self, rnd):
        with self.lock:
            if not self.keyed_ok:
                return None
            return self.keyed_ok[rnd.randrange(len(self.keyed_ok))]


# op -> weight
MIX = [("consume", 26), ("consume_rpc", 8), ("add_sub", 9), ("add_pur", 9), ("refund", 5), ("expire", 3),
       ("renew", 3), ("retry", 9), ("shared", 6), ("rate", 10), ("usage", 10), ("read", 2)]
SHARED_OPS = ("add_sub", "add_pur", "consume", "refund")


def shared_call(users, rnd, tag):
    """A call whose key and arguments are a function of a small key space, so several threads run
    the same keyed call at the same time (concurrent idempotent repeats)."""
    ui = rnd.randrange(len(users))
    slot = rnd.randrange(8)
    h = hash((tag, ui, slot)) & 0xFFFFFFFF
    op = SHARED_OPS[h % len(SHARED_OPS)]
    return Call(op, users[ui], {"amount": 1 + (h >> 8) % 40, "ref": f"shared-{slot}"},
                key=f"{tag}-shared-{ui}-{slot}")


def make_call(users, rnd, tag, seq, keyed_prob=0.5):
    op = rnd.choices([m[0] for m in MIX], weights=[m[1] for m in MIX])[0]
    if op in ("retry", "shared"):
        return op, None
    u = users[rnd.randrange(len(users))]
    key = f"{tag}-{seq}" if (op in MUTATORS and rnd.random() < keyed_prob) else None
    if op in ("consume", "consume_rpc"):
        args = {"amount": rnd.choice([1, 1, 2, 3, 5, 8, 13, 40, 120]), "ref": f"{tag}-{seq}"}
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
    else:
        args = {}
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
        op, call = make_call(users, rnd, tag, seq, keyed_prob)
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


def setup_users(conn, n, tag):
    """n fresh users, each with an account (credits in both pools). Returns (users, setup calls)."""
    users = [uuid.uuid4() for _ in range(n)]
    calls = []
    for i, u in enumerate(users):
        for op, amt in (("add_sub", 200), ("add_pur", 200)):
            c = Call(op, u, {"amount": amt, "ref": f"{tag}-setup"}, key=f"{tag}-setup-{op}-{i}")
            execute(conn, c)
            if c.status != "ok":
                raise RuntimeError(f"setup call failed: {c.op} {c.sqlstate} {c.error}")
            calls.append(c)
    return users, calls


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
