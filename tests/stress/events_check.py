"""Events out (issue 15, 0.6.0) in the reliability harness: balance rules on the users of the mix,
a probe that crosses thresholds in transactions that roll back, consumers that claim and
acknowledge while the mix runs, and the checks of billing.events against the ledger.

`set_rules` gives the users of the main mix balance rules before it starts: every other user a
rule of its own (thresholds around its balance, hysteresis 0 to 0.5), the subscribed users
(plan stress_rollover) the plan's rule, the rest none; and half the holds users rules of their own
(their available balance also moves with holds, which write no ledger rows). It records each
rule's state as it was set.

`check` then verifies, from the database alone (so after a crash it checks what recovery left):
  - balance rules, exactly: the committed ledger of each main-mix user with a rule, grouped by
    writing transaction (its rows' xmin) in commit order (the account lock serializes them, so
    their ids are in commit order), replayed through the state machine of
    pg_billing_core::events (next_state / transition_events, transcribed below) predicts the
    user's balance.low / balance.depleted / balance.recovered events: the same types, in the same
    order, each written by the transaction that caused it (events.tx = the ledger rows' xmin),
    with that transaction's available balance, the rule's threshold, re-arm level and kind in its
    payload. So every committed crossing has exactly one event, and no event exists that no
    committed transaction caused. Users without a rule have no balance event;
  - balance rules of the holds users (held moves without ledger rows): the events alternate as the
    state machine allows (no second balance.low without a balance.recovered between, depleted
    only after low, recovered only after one of them), each payload's available balance agrees
    with the state it moved to, and is subscription + purchased - held - debt;
  - rule state as set: the re-arm level is ceil(threshold * (1 + hysteresis)) and the state is
    pg_billing_core::events::initial_state (no event at set time);
  - grant.expired: exactly one per 'expiration' ledger row of a grant, of that amount, written by
    that row's transaction; grant.voided: exactly one per voided grant, of its voided amount (by
    the transaction of its void row); hold.expired: exactly one per hold whose status is expired
    or that was captured or released well (0.5 s) after its expiry (within the capture grace), none
    for a hold resolved before its expiry, at most one per hold;
  - overdraft.entered: exactly one per debt row that took the debt from 0 above 0, by its
    transaction, with that debt;
  - per user, one transaction's events are consecutive in id order, and events commit in id
    order: along event ids, their transactions come in ledger order;
  - the rollback probe: no event has the transaction id of a probe transaction that rolled back
    (ROLLBACK, an error after the crossing, ROLLBACK TO SAVEPOINT, or killed in flight), though
    inside each the crossing had written its events (the control); the probe users have no event
    and their rules are still armed;
  - delivery (`drain`): a fresh consumer claiming until nothing is left gets every event in the
    table once, each user's in id order.
`late_accounts_probe` (contention): a plan's rule also covers accounts made after it was set.
`DeliveryWorkers` (contention) claim and acknowledge while the mix runs, one of them dropping
some claims as a crashed worker would; `check_delivery` verifies at-least-once delivery, that no
two claims held one event at the same time (a dropped claim's events come back only after its
visibility timeout, with deliveries counted up), that no acknowledged event is handed out again,
that no claim skips one of a user's events, and that no claim hands out a user's event while an
earlier one of the user is not yet acknowledged."""
import datetime
import random
import sys
import threading
import time
import uuid
from collections import defaultdict
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgb_testlib import connect, q

ARMED, LOW, DEPLETED = 0, 1, 2
BALANCE_TYPES = ("balance.low", "balance.depleted", "balance.recovered")
KNOWN_TYPES = set(BALANCE_TYPES) | {"limit.reached", "limit.cleared", "grant.expired", "grant.voided", "hold.expired",
                                    "overdraft.entered", "subscription.changed", "rate_limit.exceeded"}
PLAN = "stress_rollover"      # common.ROLLOVER_PLAN
PLAN_THRESHOLD, PLAN_HYSTERESIS = 600, Decimal("0.1")
HOLD_SETTLE_MARGIN = datetime.timedelta(seconds=0.5)


# pg_billing_core::events, transcribed (core/src/events.rs: next_state, transition_events,
# initial_state). selftest() runs the core's own unit-test sequence through it.
def next_state(state, available, threshold, rearm):
    if available <= 0:
        return DEPLETED
    if available < threshold:
        return DEPLETED if state == DEPLETED else LOW
    if available >= rearm:
        return ARMED
    return state


TRANSITIONS = {(ARMED, LOW): ["balance.low"], (ARMED, DEPLETED): ["balance.low", "balance.depleted"],
               (LOW, DEPLETED): ["balance.depleted"], (LOW, ARMED): ["balance.recovered"],
               (DEPLETED, ARMED): ["balance.recovered"]}


def transition_events(a, b):
    return TRANSITIONS.get((a, b), [])


def initial_state(available, threshold):
    return ARMED if available >= threshold else LOW if available > 0 else DEPLETED


def rearm_of(threshold, hysteresis):
    return int((Decimal(threshold) * (1 + Decimal(hysteresis))).to_integral_value(rounding=ROUND_CEILING))


def selftest():
    s, fired = ARMED, []
    for av in (150, 99, 80, 105, 95, 109, 110, 90, 0, 5, 0, 120):
        n = next_state(s, av, 100, 110)
        fired += [(av, e) for e in transition_events(s, n)]
        s = n
    assert fired == [(99, "balance.low"), (110, "balance.recovered"), (90, "balance.low"), (0, "balance.depleted"),
                     (120, "balance.recovered")], fired
    assert rearm_of(100, "0.1") == 110 and rearm_of(7, "0.05") == 8 and rearm_of(5, 0) == 5


selftest()


def xid32(tx):
    """billing.events.tx (xid8, as text or int) as the 32-bit xid a row's xmin shows."""
    return int(tx) % (1 << 32)


class Rules:
    """The balance rules the harness set: user -> dict(threshold, rearm, state, available,
    last_id (the user's highest ledger id when it was set), kind 'user' | 'plan')."""

    def __init__(self):
        self.rule = {}
        self.exact = set()       # users whose events are replayed from the ledger
        self.grammar = set()     # users whose events are checked for alternation only (holds)
        self.none = set()        # users of the mix without a rule
        self.problems = []


def set_rules(conn, users, hold_users=(), seed=0):
    """Balance rules on the mix's users before it starts (see the module's doc)."""
    rnd = random.Random(seed)
    r = Rules()
    ulist = list(users) + list(hold_users)
    avail = dict(q(conn, """SELECT user_id, subscription_credits_balance + purchased_credits_balance - held - debt
                              FROM billing.accounts WHERE user_id = ANY(%s)""", (ulist,)))
    want = {}
    has_plan = bool(q(conn, "SELECT 1 FROM billing.plans WHERE plan_id = %s", (PLAN,)))
    if has_plan:
        # (removed first, so every account of the plan takes its state from its balance now, also
        # when an earlier run left the same rule)
        q(conn, "SELECT billing.set_balance_alert(NULL, p_plan_id := %s)", (PLAN,))
        out = q(conn, "SELECT billing.set_balance_alert(%s, p_plan_id := %s, p_hysteresis := %s)",
                (PLAN_THRESHOLD, PLAN, PLAN_HYSTERESIS))[0][0]
        if int(out["rearm_at"]) != rearm_of(PLAN_THRESHOLD, PLAN_HYSTERESIS):
            r.problems.append(f"set_balance_alert on plan {PLAN}: rearm_at {out['rearm_at']}")
    for i, u in enumerate(users):
        if i % 2 == 0:
            t = max(1, avail.get(u, 0) + rnd.randint(-60, 15))
            h = rnd.choice([Decimal("0"), Decimal("0.05"), Decimal("0.1"), Decimal("0.5")])
            out = q(conn, "SELECT billing.set_balance_alert(%s, %s, NULL, %s)", (t, u, h))[0][0]
            want[u] = (t, rearm_of(t, h), "user")
            if int(out["rearm_at"]) != want[u][1] or str(out["user_id"]) != str(u):
                r.problems.append(f"set_balance_alert({t}, {u}, hysteresis {h}) returned {out}")
    for i, u in enumerate(hold_users):
        if i % 2 == 0:
            t = rnd.randint(150, 380)
            h = rnd.choice([Decimal("0"), Decimal("0.1"), Decimal("0.3")])
            q(conn, "SELECT billing.set_balance_alert(%s, %s, NULL, %s)", (t, u, h))
            want[u] = (t, rearm_of(t, h), "user")
    rows = q(conn, """SELECT a.user_id, a.alert_threshold, a.alert_rearm, a.alert_state,
                             a.subscription_credits_balance + a.purchased_credits_balance - a.held - a.debt,
                             (SELECT COALESCE(max(t.id), 0) FROM billing.credit_transactions AS t WHERE t.user_id = a.user_id),
                             billing.user_effective_plan(a.user_id)
                        FROM billing.accounts AS a WHERE a.user_id = ANY(%s)""", (ulist,))
    for u, t, rearm, state, av, last, plan in rows:
        if u not in want and plan == PLAN and has_plan:
            want[u] = (PLAN_THRESHOLD, rearm_of(PLAN_THRESHOLD, PLAN_HYSTERESIS), "plan")
        w = want.get(u)
        if w is None:
            if t is not None:
                r.problems.append(f"user {u} has no rule but alert_threshold {t}")
            r.none.add(u)
            continue
        if (t, rearm) != w[:2]:
            r.problems.append(f"user {u}: rule {w[2]} threshold {w[0]} re-arm {w[1]}, accounts says {t} / {rearm}")
        if state != initial_state(av, w[0]):
            r.problems.append(f"user {u}: rule set at available {av}, threshold {w[0]}: state {state}, "
                              f"want {initial_state(av, w[0])}")
        r.rule[u] = {"threshold": w[0], "rearm": w[1], "state": state, "available": av, "last_id": last, "kind": w[2]}
        (r.grammar if u in set(hold_users) else r.exact).add(u)
    return r


# ---------------------------------------------------------------------------------------------
# The rollback probe


class RollbackProbe:
    """Users of its own (300 credits, a rule at 200 with no hysteresis) and a thread that crosses
    their threshold in transactions that never commit: ROLLBACK; an error after the crossing;
    ROLLBACK TO SAVEPOINT then COMMIT. Inside each it counts the events the crossing wrote (the
    control: they must exist there) and records the transaction id."""

    def __init__(self, conn, n=4, tag="p"):
        self.users = [uuid.uuid4() for _ in range(n)]
        for i, u in enumerate(self.users):
            q(conn, "SELECT billing.add_purchased_credits(%s, 300, 'rollback probe', NULL, %s)", (u, f"{tag}-probe-{i}"))
            q(conn, "SELECT billing.set_balance_alert(200, %s, NULL, 0)", (u,))
        self.last_ids = dict(q(conn, """SELECT user_id, max(id) FROM billing.credit_transactions WHERE user_id = ANY(%s)
                                         GROUP BY 1""", (self.users,)))
        self.lock = threading.Lock()
        self.txs = []              # (variant, xid8 as int)
        self.inside = defaultdict(int)   # variant -> events seen inside the transaction
        self.runs = defaultdict(int)
        self.problems = []

    def run(self, dsn, stop, dead=None, seed=0):
        rnd = random.Random(seed)
        conn = None
        while not stop.is_set():
            if conn is None or conn.closed:
                try:
                    conn = connect(dsn)
                except psycopg2.Error:
                    if dead and dead():
                        return
                    time.sleep(0.2)
                    continue
            u = rnd.choice(self.users)
            variant = rnd.choice(["rollback", "error", "savepoint"])
            amount = rnd.choice([150, 300])      # low, or low and depleted
            try:
                conn.autocommit = False
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_current_xact_id()::text")
                    tx = int(cur.fetchone()[0])
                    with self.lock:
                        self.txs.append((variant, tx))
                    if variant == "savepoint":
                        cur.execute("SAVEPOINT s")
                    cur.execute("SELECT billing.consume_credits_v2(%s, %s, 'probe')", (u, amount))
                    cur.execute("SELECT count(*) FROM billing.events WHERE user_id = %s AND tx = pg_current_xact_id()", (u,))
                    n = cur.fetchone()[0]
                    want = 1 if amount == 150 else 2
                    if n != want:
                        with self.lock:
                            self.problems.append(f"probe ({variant}): consume {amount} of 300 across 200 wrote {n} events "
                                                 f"inside its transaction, want {want}")
                    with self.lock:
                        self.inside[variant] += n
                    if variant == "rollback":
                        conn.rollback()
                    elif variant == "error":
                        try:
                            cur.execute("SELECT 1 / 0")
                        except psycopg2.Error:
                            pass
                        conn.rollback()
                    else:
                        cur.execute("ROLLBACK TO SAVEPOINT s")
                        cur.execute("SELECT count(*) FROM billing.events WHERE user_id = %s AND tx = pg_current_xact_id()", (u,))
                        left = cur.fetchone()[0]
                        if left:
                            with self.lock:
                                self.problems.append(f"probe: {left} events left after ROLLBACK TO SAVEPOINT")
                        conn.commit()
                with self.lock:
                    self.runs[variant] += 1
                conn.autocommit = True
            except psycopg2.Error as e:
                if conn.closed or e.pgcode is None or e.pgcode[:2] in ("08", "57"):
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    if dead and dead():
                        return
                    continue
                with self.lock:
                    self.problems.append(f"probe ({variant}) raised {e.pgcode}: {str(e).strip().splitlines()[0]}")
                try:
                    conn.rollback()
                    conn.autocommit = True
                except psycopg2.Error:
                    pass
        if conn is not None and not conn.closed:
            conn.close()

    def check(self, conn):
        bad = list(self.problems)
        txs = {xid32(t): v for v, t in self.txs}
        if self.txs:
            for row in q(conn, "SELECT user_id, id, type, tx::text FROM billing.events WHERE (tx::text::numeric %% 4294967296)::bigint = ANY(%s)",
                         (list(txs),)):
                bad.append(f"rollback probe: event {row[2]} (id {row[1]}) of a transaction that did not commit "
                           f"({txs[xid32(row[3])]})")
        for row in q(conn, "SELECT user_id, id, type FROM billing.events WHERE user_id = ANY(%s)", (self.users,)):
            bad.append(f"rollback probe: user {row[0]} has event {row[2]} (id {row[1]}) but never committed a change")
        for u, st, av, last in q(conn, """SELECT a.user_id, a.alert_state, a.subscription_credits_balance + a.purchased_credits_balance - a.held - a.debt,
                                                 (SELECT max(t.id) FROM billing.credit_transactions AS t WHERE t.user_id = a.user_id)
                                            FROM billing.accounts AS a WHERE a.user_id = ANY(%s)""", (self.users,)):
            if st != ARMED or av != 300 or last != self.last_ids.get(u):
                bad.append(f"rollback probe: user {u} changed: state {st}, available {av}, last ledger id {last}")
        return bad

    def summary(self):
        return (f"rollback probe: {sum(self.runs.values())} transactions ("
                + ", ".join(f"{k} {v}" for k, v in sorted(self.runs.items())) + f"), {sum(self.inside.values())} events "
                "written inside them")


# ---------------------------------------------------------------------------------------------
# The checks


def load_events(conn, users):
    """user -> [(id, type, payload, tx32)] in id order."""
    out = defaultdict(list)
    for u, i, t, p, tx in q(conn, """SELECT user_id, id, type, payload, tx::text FROM billing.events WHERE user_id = ANY(%s)
                                      ORDER BY user_id, id""", (list(users),)):
        out[u].append((i, t, p, xid32(tx)))
    return out


def load_ledger(conn, users):
    """user -> [(id, pool, amount, balance_after, type, grant_id, xmin)] in id order."""
    out = defaultdict(list)
    for row in q(conn, """SELECT user_id, id, pool::text, amount, balance_after, type, grant_id::text, xmin::text::bigint
                            FROM billing.credit_transactions WHERE user_id = ANY(%s) ORDER BY user_id, id""", (list(users),)):
        out[row[0]].append(row[1:])
    return out


def tx_groups(rows):
    """The ledger rows grouped by writing transaction, in commit order: [(xmin, [rows])]. None
    when two transactions' rows interleave (the account lock serializes a user's writers)."""
    groups, seen = [], set()
    for r in rows:
        x = r[6]
        if groups and groups[-1][0] == x:
            groups[-1][1].append(r)
            continue
        if x in seen:
            return None
        seen.add(x)
        groups.append((x, [r]))
    return groups


def check(conn, rules, users, hold_users=(), probe=None, stats=None):
    """Violations (strings); `stats` (a dict) receives counts of what was checked."""
    bad = list(rules.problems)
    everyone = list(users) + list(hold_users)
    events = load_events(conn, everyone)
    ledger = load_ledger(conn, everyone)
    st = defaultdict(int)

    for u in everyone:
        for i, t, p, tx in events.get(u, []):
            st[t] += 1
            if t not in KNOWN_TYPES:
                bad.append(f"user {u}: event {i} of unknown type {t}")
            if str(p.get("user_id")) != str(u):
                bad.append(f"user {u}: event {i} ({t}) names user {p.get('user_id')}")

    # Per user, one transaction's events are consecutive (it holds the account lock until it
    # commits), and events commit in id order.
    for u in everyone:
        seen, last = set(), None
        for i, t, p, tx in events.get(u, []):
            if tx != last and tx in seen:
                bad.append(f"user {u}: event {i} ({t}) of transaction {tx} comes after another transaction's events "
                           f"that followed that transaction's earlier ones")
                break
            seen.add(tx)
            last = tx
    for u in everyone:
        first = {}
        for r in ledger.get(u, []):
            first.setdefault(r[6], r[0])
        pos = [first[tx] for i, t, p, tx in events.get(u, []) if tx in first]
        if pos != sorted(pos):
            bad.append(f"user {u}: events are not in the commit order of their transactions: ledger ids {pos[:20]}")

    # Balance rules, exactly, from the committed ledger.
    for u in rules.exact:
        rl = rules.rule[u]
        rows = [r for r in ledger.get(u, []) if r[0] > rl["last_id"]]
        groups = tx_groups(rows)
        if groups is None:
            bad.append(f"user {u}: ledger rows of two transactions interleave")
            continue
        s, av, want = rl["state"], rl["available"], []
        for x, rs in groups:
            av += sum(r[2] for r in rs)
            n = next_state(s, av, rl["threshold"], rl["rearm"])
            want += [(e, av, x) for e in transition_events(s, n)]
            s = n
        st["replayed transactions"] += len(groups)
        got = [(t, int(p.get("available", -10 ** 18)), tx) for i, t, p, tx in events.get(u, []) if t in BALANCE_TYPES]
        if got != want:
            k = next((j for j in range(min(len(got), len(want))) if got[j] != want[j]), min(len(got), len(want)))
            bad.append(f"user {u} (threshold {rl['threshold']}, re-arm {rl['rearm']}, set at {rl['available']} state "
                       f"{rl['state']}): {len(got)} balance events, the committed ledger predicts {len(want)}; first "
                       f"difference at #{k}: got {got[k:k + 3]}, want {want[k:k + 3]}")
        st["balance events predicted"] += len(want)
        for i, t, p, tx in events.get(u, []):
            if t in BALANCE_TYPES:
                bad += payload_problems(u, i, t, p, rl)
    for u in rules.none:
        n = [(i, t) for i, t, p, tx in events.get(u, []) if t in BALANCE_TYPES]
        if n:
            bad.append(f"user {u} has no balance rule but {len(n)} balance events, e.g. {n[:3]}")

    # Balance rules of the holds users: alternation and payloads.
    for u in rules.grammar:
        rl = rules.rule[u]
        s = rl["state"]
        by_tx = []
        for i, t, p, tx in events.get(u, []):
            if t not in BALANCE_TYPES:
                continue
            bad += payload_problems(u, i, t, p, rl)
            if by_tx and by_tx[-1][0] == tx:
                by_tx[-1][1].append((i, t, p))
            else:
                by_tx.append((tx, [(i, t, p)]))
        for tx, evs in by_tx:
            av = int(evs[-1][2].get("available", 0))
            n = next_state(s, av, rl["threshold"], rl["rearm"])
            if [t for _, t, _ in evs] != transition_events(s, n) or n == s:
                bad.append(f"holds user {u}: from state {s} transaction {tx} wrote {[t for _, t, _ in evs]} at available "
                           f"{av} (threshold {rl['threshold']}, re-arm {rl['rearm']}): the rule allows "
                           f"{transition_events(s, n)}")
                break
            s = n
            st["holds balance transitions"] += 1

    # grant.expired: one per expiration row of a grant; grant.voided: one per voided grant.
    exp_rows = defaultdict(list)
    void_rows = {}
    for u in everyone:
        for r in ledger.get(u, []):
            if r[4] == "expiration" and r[5] is not None:
                exp_rows[(u, r[5])].append(r)
            if r[4] in ("void", "clawback") and r[5] is not None:
                void_rows[(u, r[5])] = r
    exp_ev = defaultdict(list)
    void_ev = defaultdict(list)
    for u in everyone:
        for i, t, p, tx in events.get(u, []):
            if t == "grant.expired":
                exp_ev[(u, str(p.get("grant_id")))].append((i, p, tx))
            elif t == "grant.voided":
                void_ev[(u, str(p.get("grant_id")))].append((i, p, tx))
    for k in set(exp_rows) | set(exp_ev):
        rs, es = exp_rows.get(k, []), exp_ev.get(k, [])
        if len(rs) != len(es):
            bad.append(f"grant {k[1]} of {k[0]}: {len(rs)} expiration rows, {len(es)} grant.expired events")
            continue
        for r, (i, p, tx) in zip(rs, es):
            if int(p.get("expired_amount", 0)) != -r[2] or tx != r[6]:
                bad.append(f"grant {k[1]}: grant.expired {i} says {p.get('expired_amount')} (tx {tx}), "
                           f"the expiration row {-r[2]} (tx {r[6]})")
    voided = {(u, g): (va, xm) for u, g, va, xm in q(conn, """
        SELECT user_id, id::text, voided_amount, xmin::text::bigint FROM billing.credit_grants
         WHERE user_id = ANY(%s) AND voided_at IS NOT NULL""", (everyone,))}
    for k in set(voided) | set(void_ev):
        es = void_ev.get(k, [])
        if k not in voided or len(es) != 1:
            bad.append(f"grant {k[1]} of {k[0]}: {'voided' if k in voided else 'not voided'}, {len(es)} grant.voided events")
            continue
        i, p, tx = es[0]
        va = voided[k][0] or 0
        r = void_rows.get(k)
        if int(p.get("voided_amount", -1)) != va or (r is not None and tx != r[6]):
            bad.append(f"grant {k[1]}: grant.voided {i} says {p.get('voided_amount')} (tx {tx}), the grant "
                       f"{va} (void row tx {r[6] if r else None})")
    st["expiration rows"] = sum(len(v) for v in exp_rows.values())
    st["voided grants"] = len(voided)

    # hold.expired.
    holds = {(u, h): (amount, status, exp, res, xm) for u, h, amount, status, exp, res, xm in q(conn, """
        SELECT user_id, id::text, amount, status::text, expires_at, resolved_at, xmin::text::bigint
          FROM billing.credit_holds WHERE user_id = ANY(%s)""", (everyone,))}
    hev = defaultdict(list)
    for u in everyone:
        for i, t, p, tx in events.get(u, []):
            if t == "hold.expired":
                hev[(u, str(p.get("hold_id")))].append((i, p, tx))
    for k, (amount, status, exp, res, xm) in holds.items():
        es = hev.get(k, [])
        # (a capture or release settles the expired holds under the lock before it resolves
        # its own, a little later: resolved well after the expiry, it was expired first)
        late = status != "expired" and res is not None and res >= exp + HOLD_SETTLE_MARGIN
        if len(es) > 1 or ((status == "expired" or late) and len(es) != 1):
            bad.append(f"hold {k[1]} ({status}, expires {exp}, resolved {res}): {len(es)} hold.expired events")
        elif es:
            i, p, tx = es[0]
            if int(p.get("amount", -1)) != amount:
                bad.append(f"hold {k[1]}: hold.expired {i} says amount {p.get('amount')}, the hold {amount}")
            if status == "expired" and tx != xm:
                bad.append(f"hold {k[1]}: hold.expired written by tx {tx}, the hold expired by tx {xm}")
            if status != "expired" and res is not None and res < exp:
                bad.append(f"hold {k[1]} was {status} at {res}, before its expiry {exp}, but has a hold.expired event")
    for k in hev:
        if k not in holds:
            bad.append(f"hold.expired for hold {k[1]} of {k[0]}, which does not exist")
    st["expired holds"] = sum(1 for v in holds.values() if v[1] == "expired")

    # overdraft.entered: one per debt row taking the debt from 0 above 0.
    for u in everyone:
        debt, want = 0, []
        for r in ledger.get(u, []):
            if r[1] == "debt":
                if debt == 0 and r[2] < 0:
                    want.append((r[3], r[6]))
                debt -= r[2]
        got = [(int(p.get("debt", -1)), tx) for i, t, p, tx in events.get(u, []) if t == "overdraft.entered"]
        if got != want:
            bad.append(f"user {u}: overdraft.entered events {got}, the debt rows predict {want}")
        st["overdraft entries"] += len(want)

    if probe is not None:
        bad += probe.check(conn)
    if stats is not None:
        stats.update(st)
    return bad


def payload_problems(u, i, t, p, rl):
    out = []
    try:
        av = int(p["available"])
        parts = int(p["subscription_credits_balance"]) + int(p["purchased_credits_balance"]) - int(p["held"]) - int(p["debt"])
        if av != parts:
            out.append(f"user {u}: {t} {i}: available {av} is not subscription + purchased - held - debt = {parts}")
        if (int(p["threshold"]), int(p["rearm_at"]), p["rule"]) != (rl["threshold"], rl["rearm"], rl["kind"]):
            out.append(f"user {u}: {t} {i}: threshold {p['threshold']} re-arm {p['rearm_at']} rule {p['rule']}, "
                       f"set {rl['threshold']} / {rl['rearm']} / {rl['kind']}")
    except (KeyError, TypeError, ValueError) as e:
        out.append(f"user {u}: {t} {i}: payload {p} lacks {e}")
    return out


def summary(stats):
    b = {t: stats.get(t, 0) for t in BALANCE_TYPES}
    parts = ", ".join(f"{k.split('.')[1]} {v}" for k, v in b.items())
    return (f"events: {sum(b.values())} balance ({parts}; "
            f"{stats.get('replayed transactions', 0)} committed transactions replayed, "
            f"{stats.get('holds balance transitions', 0)} on holds users), "
            f"grant.expired {stats.get('grant.expired', 0)}, grant.voided {stats.get('grant.voided', 0)}, "
            f"hold.expired {stats.get('hold.expired', 0)}, overdraft.entered {stats.get('overdraft.entered', 0)}")


def late_accounts_probe(conn, tag, n=3):
    """A plan's rule covers the accounts of the plan made after it was set, too: with a rule on
    plan free (the plan of a user without a subscription), new users buy 500 credits and spend
    400: each must get balance.low. The plan's rule is restored afterwards (setting and removing
    it fires nothing). Returns violations."""
    bad = []
    had = q(conn, "SELECT threshold, hysteresis FROM billing.plan_balance_alerts WHERE plan_id = 'free'")
    q(conn, "SELECT billing.set_balance_alert(200, p_plan_id := 'free', p_hysteresis := 0)")
    try:
        for i in range(n):
            u = uuid.uuid4()
            q(conn, "SELECT billing.add_purchased_credits(%s, 500, 'late account', NULL, %s)", (u, f"{tag}-late-{i}"))
            q(conn, "SELECT billing.consume_credits_v2(%s, 400, 'late account')", (u,))
            got = [r[0] for r in q(conn, "SELECT type FROM billing.events WHERE user_id = %s ORDER BY id", (u,))]
            if got != ["balance.low"]:
                t = q(conn, "SELECT alert_threshold, alert_state FROM billing.accounts WHERE user_id = %s", (u,))
                bad.append(f"late account: a user without a subscription whose account was made after plan free's rule "
                           f"(threshold 200) was set spent 500 -> 100: events {got}, want ['balance.low'] "
                           f"(accounts.alert_threshold, alert_state = {t[0] if t else None})")
    finally:
        if had:
            q(conn, "SELECT billing.set_balance_alert(%s, p_plan_id := 'free', p_hysteresis := %s)", had[0])
        else:
            q(conn, "SELECT billing.set_balance_alert(NULL, p_plan_id := 'free')")
    return bad


# ---------------------------------------------------------------------------------------------
# Delivery


def drain(conn, consumer, limit=10000):
    """Claim and acknowledge until nothing is left; returns [(id, user_id)] in delivery order."""
    out = []
    while True:
        rows = q(conn, "SELECT claim_id, id, user_id FROM billing.claim_events(%s, %s)", (consumer, limit))
        if not rows:
            return out
        n = q(conn, "SELECT billing.ack_events(%s, %s, %s)", (consumer, max(r[1] for r in rows), rows[0][0]))[0][0]
        if n != len(rows):
            raise AssertionError(f"ack_events acknowledged {n} of a claim of {len(rows)}")
        out += [(r[1], r[2]) for r in rows]


def check_drain(conn, consumer):
    """A fresh consumer gets every event in the table once, each user's in id order."""
    bad = []
    got = drain(conn, consumer)
    ids = [i for i, _ in got]
    allids = {r[0] for r in q(conn, "SELECT id FROM billing.events")}
    if len(ids) != len(set(ids)):
        bad.append(f"drain: {len(ids) - len(set(ids))} events handed out twice to consumer {consumer}")
    if set(ids) != allids:
        bad.append(f"drain: consumer {consumer} got {len(set(ids))} events, the table holds {len(allids)}; "
                   f"missing {sorted(allids - set(ids))[:10]}, unknown {sorted(set(ids) - allids)[:10]}")
    last = {}
    for i, u in got:
        if last.get(u, 0) >= i:
            bad.append(f"drain: user {u}'s event {i} came after {last[u]}")
            break
        last[u] = i
    return len(ids), bad


class Claim:
    __slots__ = ("worker", "claim_id", "t0", "t1", "events", "acked", "ack_t0", "ack_t1", "dropped", "timeout")

    def __init__(self, worker, t0, t1, rows, timeout):
        self.worker, self.t0, self.t1, self.timeout = worker, t0, t1, timeout
        self.claim_id = rows[0][0] if rows else None
        self.events = [(r[1], r[2], r[3]) for r in rows]     # (id, user, deliveries)
        self.acked, self.ack_t0, self.ack_t1, self.dropped = None, None, None, False


class DeliveryWorkers:
    """Workers of one consumer that claim and acknowledge while the mix runs. Worker 0 drops every
    fourth claim (claimed with a 2 s visibility timeout, never acknowledged: a crashed worker)."""

    DROP_TIMEOUT = 2.0

    def __init__(self, consumer, n=3):
        self.consumer, self.n = consumer, n
        self.lock = threading.Lock()
        self.claims = []
        self.errors = []
        self.last_drop = 0.0

    def worker(self, dsn, stop, w, seed):
        rnd = random.Random(seed)
        conn = connect(dsn)
        k = 0
        try:
            while not stop.is_set():
                k += 1
                drop = w == 0 and k % 4 == 0
                timeout = self.DROP_TIMEOUT if drop else 30.0
                t0 = time.time()
                try:
                    rows = q(conn, "SELECT claim_id, id, user_id, deliveries FROM billing.claim_events(%s, %s, %s::interval)",
                             (self.consumer, rnd.choice([10, 50, 200]), f"{timeout} seconds"))
                except psycopg2.Error as e:
                    with self.lock:
                        self.errors.append(f"claim_events raised {e.pgcode}: {str(e).strip().splitlines()[0]}")
                    continue
                c = Claim(w, t0, time.time(), rows, timeout)
                if not rows:
                    time.sleep(0.05)
                    continue
                if drop:
                    c.dropped = True
                    with self.lock:
                        self.last_drop = time.time()
                else:
                    c.ack_t0 = time.time()
                    for _attempt in range(5):       # (a worker retries a failed acknowledgement)
                        try:
                            c.acked = q(conn, "SELECT billing.ack_events(%s, %s, %s)",
                                        (self.consumer, max(e[0] for e in c.events), c.claim_id))[0][0]
                            break
                        except psycopg2.Error as e:
                            with self.lock:
                                self.errors.append(f"ack_events raised {e.pgcode}: {str(e).strip().splitlines()[0]}")
                    c.ack_t1 = time.time()
                with self.lock:
                    self.claims.append(c)
        finally:
            conn.close()

    def threads(self, dsn, stop, seed=0):
        return [threading.Thread(target=self.worker, args=(dsn, stop, w, hash((seed, w))), daemon=True) for w in range(self.n)]

    def finish(self, dsn):
        """After the mix: wait out the dropped claims, then drain as one more worker."""
        wait = self.last_drop + self.DROP_TIMEOUT + 0.2 - time.time()
        if wait > 0:
            time.sleep(wait)
        conn = connect(dsn)
        try:
            while True:
                t0 = time.time()
                rows = q(conn, "SELECT claim_id, id, user_id, deliveries FROM billing.claim_events(%s, 10000)", (self.consumer,))
                c = Claim(self.n, t0, time.time(), rows, 30.0)
                if not rows:
                    break
                c.ack_t0 = time.time()
                c.acked = q(conn, "SELECT billing.ack_events(%s, %s, %s)", (self.consumer, max(e[0] for e in c.events), c.claim_id))[0][0]
                c.ack_t1 = time.time()
                self.claims.append(c)
        finally:
            conn.close()


def describe(c):
    t = f"claim {c.claim_id} of worker {c.worker} [{c.t0:.3f}, {c.t1:.3f}] timeout {c.timeout}"
    return t + (" dropped" if c.dropped else f", ack [{c.ack_t0:.3f}, {c.ack_t1:.3f}] acknowledged {c.acked} of {len(c.events)}")


def check_delivery(conn, dw, stats=None, since=0):
    """The delivery checks of the module's doc, for the claims `dw` recorded (over the events with
    ids above `since`)."""
    bad = list(dw.errors)
    user_events = defaultdict(list)
    for u, i in q(conn, "SELECT user_id, id FROM billing.events WHERE id > %s ORDER BY user_id, id", (since,)):
        user_events[u].append(i)
    index = {(u, i): k for u, ids in user_events.items() for k, i in enumerate(ids)}
    handed = defaultdict(list)          # event id -> [claim]
    first_ack = {}                      # event id -> ack call start of the claim that acknowledged it
    for c in dw.claims:
        if not c.dropped and c.acked is not None and c.acked != len(c.events):
            bad.append(f"worker {c.worker}: ack_events of its claim of {len(c.events)} acknowledged {c.acked} "
                       f"(claimed {c.ack_t0 - c.t1:.2f} s before, timeout {c.timeout} s)")
        per_user = defaultdict(list)
        for i, u, d in c.events:
            handed[i].append(c)
            per_user[u].append(i)
            if c.acked == len(c.events):
                first_ack[i] = min(first_ack.get(i, c.ack_t0), c.ack_t0)
        ids = [i for i, _, _ in c.events]
        if ids != sorted(ids):
            bad.append(f"worker {c.worker}: a claim not in id order: {ids[:10]}")
        for u, ids in per_user.items():
            ks = [index.get((u, i)) for i in ids]
            if None in ks or ks != list(range(ks[0], ks[0] + len(ks))):
                bad.append(f"worker {c.worker}: a claim skips events of user {u}: ids {ids[:10]}, positions {ks[:10]}")
    # At least once: every event acknowledged.
    missing = [i for ids in user_events.values() for i in ids if i not in first_ack]
    if missing:
        bad.append(f"delivery: {len(missing)} events never acknowledged, e.g. {missing[:10]}")
    redelivered = 0
    for i, cs in handed.items():
        cs = sorted(cs, key=lambda c: c.t0)
        for a, b in zip(cs, cs[1:]):
            redelivered += 1
            if not a.dropped:
                if a.ack_t1 is not None and a.ack_t1 <= b.t0:
                    bad.append(f"delivery: event {i} handed out again after its claim was acknowledged "
                               f"(workers {a.worker} then {b.worker})")
                else:
                    bad.append(f"delivery: event {i} in two claims (workers {a.worker}, {b.worker}) though the first was not dropped")
            elif b.t1 < a.t0 + a.timeout:
                bad.append(f"delivery: event {i} handed out again {b.t1 - a.t0:.2f} s after a claim with a "
                           f"{a.timeout} s visibility timeout (workers {a.worker} then {b.worker})")
            d_a = next(d for j, _, d in a.events if j == i)
            d_b = next(d for j, _, d in b.events if j == i)
            if d_b <= d_a:
                bad.append(f"delivery: event {i} handed out again with deliveries {d_b} after {d_a}: "
                           f"{describe(a)} then {describe(b)}")
    # Order: no user's event is handed out while an earlier one is not yet acknowledged.
    order_bad = 0
    for c in dw.claims:
        for i, u, d in c.events:
            k = index.get((u, i))
            if k:
                prev = user_events[u][k - 1]
                if prev not in {j for j, _, _ in c.events} and first_ack.get(prev, float("inf")) >= c.t1:
                    order_bad += 1
                    if order_bad <= 5:
                        bad.append(f"delivery: user {u}'s event {i} handed out (worker {c.worker}) before event {prev} "
                                   f"was acknowledged")
    if stats is not None:
        stats.update(claims=len(dw.claims), dropped=sum(c.dropped for c in dw.claims),
                     handed=sum(len(c.events) for c in dw.claims), redelivered=redelivered,
                     events=sum(len(v) for v in user_events.values()))
    return bad


# ---------------------------------------------------------------------------------------------
# The checks themselves


MUTATIONS = [
    ("a balance.low event lost", """
        DELETE FROM billing.events WHERE (user_id, id) = (SELECT user_id, id FROM billing.events
         WHERE type = 'balance.low' AND user_id = ANY(%(exact)s) ORDER BY id DESC LIMIT 1)"""),
    ("a balance.low event twice", """
        INSERT INTO billing.events (user_id, type, payload, tx)
        SELECT user_id, type, payload, tx FROM billing.events
         WHERE type = 'balance.low' AND user_id = ANY(%(exact)s) ORDER BY id DESC LIMIT 1"""),
    ("a balance.recovered written by another transaction", """
        UPDATE billing.events SET tx = '1' WHERE (user_id, id) = (SELECT user_id, id FROM billing.events
         WHERE type = 'balance.recovered' AND user_id = ANY(%(exact)s) ORDER BY id LIMIT 1)"""),
    ("a balance.depleted with the wrong available balance", """
        UPDATE billing.events SET payload = payload || jsonb_build_object('available', (payload->>'available')::bigint + 1)
         WHERE (user_id, id) = (SELECT user_id, id FROM billing.events
         WHERE type = 'balance.depleted' AND user_id = ANY(%(exact)s) ORDER BY id LIMIT 1)"""),
    ("a balance.low on a holds user without a recovery between", """
        INSERT INTO billing.events (user_id, type, payload, tx)
        SELECT user_id, type, payload, tx FROM billing.events
         WHERE type = 'balance.low' AND user_id = ANY(%(grammar)s) ORDER BY id DESC LIMIT 1"""),
    ("a balance event for a user without a rule", """
        INSERT INTO billing.events (user_id, type, payload)
        SELECT a.user_id, 'balance.low', jsonb_build_object('user_id', a.user_id) FROM billing.accounts AS a
         WHERE a.user_id = ANY(%(none)s) LIMIT 1"""),
    ("a grant.expired event lost", """
        DELETE FROM billing.events WHERE (user_id, id) = (SELECT user_id, id FROM billing.events
         WHERE type = 'grant.expired' AND user_id = ANY(%(all)s) ORDER BY id LIMIT 1)"""),
    ("a grant.voided event for a grant not voided", """
        INSERT INTO billing.events (user_id, type, payload)
        SELECT g.user_id, 'grant.voided', jsonb_build_object('user_id', g.user_id, 'grant_id', g.id, 'voided_amount', 0)
          FROM billing.credit_grants AS g WHERE g.user_id = ANY(%(all)s) AND g.voided_at IS NULL LIMIT 1"""),
    ("a hold.expired event lost", """
        DELETE FROM billing.events WHERE (user_id, id) = (SELECT e.user_id, e.id FROM billing.events AS e
          JOIN billing.credit_holds AS h ON h.user_id = e.user_id AND h.id = (e.payload->>'hold_id')::uuid
         WHERE e.type = 'hold.expired' AND e.user_id = ANY(%(all)s) AND h.status = 'expired' ORDER BY e.id LIMIT 1)"""),
    ("an overdraft.entered event lost", """
        DELETE FROM billing.events WHERE (user_id, id) = (SELECT user_id, id FROM billing.events
         WHERE type = 'overdraft.entered' AND user_id = ANY(%(all)s) ORDER BY id LIMIT 1)"""),
    ("a balance event whose transaction committed no change (its ledger rows gone)", """
        DELETE FROM billing.credit_transactions AS t USING (
            SELECT e.user_id, e.tx FROM billing.events AS e
             WHERE e.type LIKE 'balance.%%' AND e.user_id = ANY(%(exact)s) ORDER BY e.id LIMIT 1) AS e
         WHERE t.user_id = e.user_id AND t.xmin::text::bigint = (e.tx::text::numeric %% 4294967296)::bigint"""),
]


def mutation_test(conn, rules, users, hold_users=(), probe=None):
    """Each mutation of MUTATIONS, in a transaction that rolls back, must make `check` report.
    Returns (tried, [mutations not found])."""
    params = {"exact": list(rules.exact), "grammar": list(rules.grammar), "none": list(rules.none),
              "all": list(users) + list(hold_users)}
    clean = check(conn, rules, users, hold_users, probe)
    if clean:
        return 0, [f"the unmutated database already has {len(clean)} findings: {clean[:3]}"]
    missed, tried = [], 0
    muts = list(MUTATIONS)
    if probe is not None and probe.txs:
        muts.append(("an event of a rolled-back probe transaction", """
            INSERT INTO billing.events (user_id, type, payload, tx) VALUES (%(probe_user)s, 'balance.low', '{}', %(probe_tx)s::text::xid8)"""))
        params.update(probe_user=probe.users[0], probe_tx=str(probe.txs[-1][1]))
    conn.autocommit = False
    try:
        for what, sql in muts:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                n = cur.rowcount
            if n < 1:
                conn.rollback()
                continue            # nothing to mutate in this run
            tried += 1
            if not check(conn, rules, users, hold_users, probe):
                missed.append(what)
            conn.rollback()
    finally:
        conn.rollback()
        conn.autocommit = True
    return tried, missed
