"""The cross-check of the credit ledger and the credit grants against what the client saw, shared by
the contention and the crash parts of the reliability harness (tests/stress).

`verify()` takes the distinct operations the client knows were applied (each call with the
result it got, or for a call in flight at a crash the response stored under its idempotency key)
and every call made, reads billing.credit_transactions, billing.credit_grants,
billing.accounts and billing.credit_expiration_events of the test users, and checks:
  - each operation's ledger rows (by transaction_id = operation_id) add up to its result, in
    total, per pool (the debt pool included) and per grant (`Call.expect`); no two operations
    return one transaction_id; every other operation in the ledger is a lazy expiry settlement
    (only 'expiration' rows of grants whose expires_at had passed when the row was written);
  - the client's own account per user: the sum of what every operation returned plus the
    settlements equals subscription + purchased - debt in billing.accounts (and, for the
    classic users, each pool on its own);
  - per grant: its ledger rows (grant_id) sum to remaining, 0 <= remaining <= amount; a voided
    grant has one 'void' row (of -voided_amount; none when nothing was left), any other grant
    none; no row follows a grant's void or expiration row; no expired grant is ever spent (no
    debit row other than 'expiration' written at or after expires_at) nor one not yet started
    (no debit row other than 'void' before effective_at); only unscoped grants effective at
    creation repay debt;
  - each pool stored in billing.accounts equals the sum of its grants' remaining, the debt equals
    minus its ledger rows and is >= 0, and no debt row left a debt above the highest overdraft
    limit the user ever had;
  - the spending rules, per consumption: only grants whose scope admits the feature (no feature:
    unscoped grants only); consume_credits lists its grants in spending order; no grant
    spendable at the time (started at least 1 s before, not expired, credits left, in scope)
    that comes earlier in the spending order than the last grant the consumption took was left
    out, nor any at all when it took debt; every grant it took but the last was emptied;
  - the debt a consumption returned is within the overdraft limit in force (the last limit set
    before the call, or one being set during it); the stored limit is the last one set;
  - expiration events: per operation, the events sum to minus its 'expiration' and 'rollover'
    rows (what was lost).
Returns a list of violations (strings)."""
import bisect
import datetime
import uuid
from collections import defaultdict, namedtuple

from common import CONSUMERS, has_grants, pool_of, q

G = namedtuple("G", "user id category amount remaining priority effective_at expires_at scope voided_at voided_amount created_at")
L = namedtuple("L", "user op type pool amount after grant at key")

NEVER = datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)
# Ledger rows that take credits from a grant without spending them.
NOT_SPENDING = ("expiration", "void", "clawback")
# A grant counts as spendable for the order check only when it started this long before the
# consumption's first row: the spending statement reads now() when its transaction starts, which
# may be a little earlier than the row's clock time.
START_MARGIN = datetime.timedelta(seconds=1)


def load(conn, users):
    ulist = list(users)
    grants = has_grants(conn)
    g = {}
    if grants:
        for row in q(conn, """SELECT user_id, id::text, category::text, amount, remaining, priority, effective_at, expires_at,
                                     scope, voided_at, voided_amount, created_at
                                FROM billing.credit_grants WHERE user_id = ANY(%s)""", (ulist,)):
            g[row[1]] = G(*row)
    rows = [L(*r) for r in q(conn, f"""
        SELECT user_id, operation_id::text, type, pool::text, amount, balance_after,
               {'grant_id::text' if grants else 'NULL::text'}, created_at, idempotency_key
          FROM billing.credit_transactions WHERE user_id = ANY(%s) ORDER BY user_id, created_at, id""", (ulist,))]
    accounts = {r[0]: r[1:] for r in q(conn, f"""
        SELECT user_id, subscription_credits_balance, purchased_credits_balance,
               {'debt, overdraft_limit' if grants else '0::bigint, 0::bigint'}
          FROM billing.accounts WHERE user_id = ANY(%s)""", (ulist,))}
    events = dict(q(conn, """SELECT operation_id::text, sum(expired_amount)::bigint FROM billing.credit_expiration_events
                              WHERE user_id = ANY(%s) GROUP BY 1""", (ulist,)))
    return g, rows, accounts, events


def spend_key(g):
    """The spending order (GRANTS.md): priority, scoped first, earliest expiry (never last),
    earliest start, oldest, id."""
    return (g.priority, g.scope is None, g.expires_at or NEVER, g.effective_at, g.created_at, uuid.UUID(g.id))


def admits(g, feature):
    return g.scope is None or (feature is not None and feature in g.scope)


def summary(rows):
    by = defaultdict(int)
    for x in rows:
        by[f"{x.type}/{x.pool}"] += x.amount
    return dict(by)


def match(exp, rows):
    """None when the rows add up to what the result says, else the difference."""
    pools = defaultdict(int)
    for x in rows:
        pools[x.pool] += x.amount
    total = sum(pools.values())
    if total != exp["total"]:
        return f"total {total} != {exp['total']}"
    for key, want in exp["pools"].items():
        got = sum(pools[p] for p in key)
        if got != want:
            return f"{'+'.join(key)} {got} != {want}"
    if "grants" in exp:
        per = defaultdict(int)
        for x in rows:
            if x.pool != "debt":
                per[x.grant] += x.amount
        per = {k: v for k, v in per.items() if v}
        want = {k: v for k, v in exp["grants"].items() if v}
        if per != want:
            return f"per grant {per} != {want}"
    return None


class Limits:
    """The overdraft limits set per user, with when each call ran: which limit was in force."""

    def __init__(self, calls, users):
        self.log = defaultdict(list)      # user -> [(t0, t1, limit, status)]
        for u in users:
            self.log[u].append((0.0, 0.0, 0, "ok"))
        for c in calls:
            if c.op == "limit" and c.status in ("ok", "unknown"):
                self.log[c.user].append((c.t0, c.t1 if c.status == "ok" else float("inf"), c.args["limit"], c.status))

    def candidates(self, u, t0, t1):
        """Limits possibly in force for a call that ran from t0 to t1."""
        log = self.log[u]
        out = []
        for x in log:
            if x[0] > t1:
                continue
            # superseded: a later call that finished before this call started
            if any(y[3] == "ok" and y[0] > x[1] and y[1] < t0 for y in log):
                continue
            out.append(x[2])
        return out

    def highest(self, u):
        return max(x[2] for x in self.log[u])


def verify(conn, users, applied, calls, classic=(), stats=None):
    """`applied`: [(call, result)] of distinct applied operations; `calls`: every call made.
    `stats` (a dict), when given, receives counts of what the run exercised."""
    bad = []
    grants, rows, accounts, events = load(conn, users)
    if stats is not None:
        stats.update(grants=len(grants), voided=sum(g.voided_at is not None for g in grants.values()),
                     scoped=sum(g.scope is not None for g in grants.values()),
                     expired=len({x.grant for x in rows if x.type == "expiration" and x.grant}),
                     debt_taken=sum(1 for x in rows if x.pool == "debt" and x.amount < 0),
                     debt_repaid=sum(1 for x in rows if x.pool == "debt" and x.amount > 0),
                     rollovers=sum(1 for x in rows if x.type == "rollover"))
    ulist = list(users)
    by_op = defaultdict(list)
    by_grant = defaultdict(list)
    for x in rows:
        by_op[x.op].append(x)
        if x.grant is not None:
            by_grant[x.grant].append(x)

    def lazy(x):
        g = grants.get(x.grant)
        return x.type == "expiration" and g is not None and g.expires_at is not None and g.expires_at <= x.at

    # 1. Operations: ledger rows against results.
    claimed = {}
    model = defaultdict(int)
    model_pool = defaultdict(lambda: defaultdict(int))
    settled = defaultdict(int)
    settled_pool = defaultdict(lambda: defaultdict(int))
    consumptions = []          # (call, result, op rows)
    for c, r in applied:
        exp = c.expect(r)
        if exp is None:
            g = grants.get(str(r.get("grant_id")))
            if c.op == "void" and g is not None and (g.voided_amount or 0) != int(r["voided_amount"]):
                bad.append(f"void_grant {g.id} repeated: voided_amount {r['voided_amount']}, the grant says {g.voided_amount}")
            continue
        tx = r.get("transaction_id")
        tx = str(tx) if tx is not None else None
        if tx is not None and tx in claimed:
            bad.append(f"transaction_id {tx} returned by two operations: {claimed[tx].op} and {c.op}")
        claimed[tx] = c
        op_rows = by_op.get(tx, []) if tx else []
        for x in op_rows:
            if x.user != c.user:
                bad.append(f"{c.op} {tx} for {c.user} wrote a ledger row of {x.user}")
        chosen = None
        # A write settles the grants whose expiry has passed in its own operation; its result may
        # count them (expire_subscription_credits' expired_amount counts those of the
        # subscription pool, not those of the purchased pool), or not.
        variants = [op_rows, [x for x in op_rows if not lazy(x)]]
        variants += [[x for x in op_rows if not (lazy(x) and x.pool == p)] for p in ("purchased", "subscription")]
        for variant in variants:
            if match(exp, variant) is None:
                chosen = variant
                break
        if chosen is None:
            bad.append(f"{c.op} {tx} on {c.user}: ledger {summary(op_rows)} ({match(exp, op_rows)}), result {r}")
            chosen = op_rows
        for x in op_rows:
            if not any(x is y for y in chosen):
                settled[x.user] += x.amount
                settled_pool[x.user][x.pool] += x.amount
        model[c.user] += exp["total"]
        for key, v in exp["pools"].items():
            model_pool[c.user][key[0]] += v
        if c.op in CONSUMERS:
            consumptions.append((c, r, [x for x in chosen if x.grant is not None or x.pool == "debt"]))
    lazy_ops = 0
    for op, op_rows in by_op.items():
        if op in claimed:
            continue
        if all(lazy(x) for x in op_rows):
            lazy_ops += 1
            for x in op_rows:
                settled[x.user] += x.amount
                settled_pool[x.user][x.pool] += x.amount
        else:
            bad.append(f"ledger operation {op} ({summary(op_rows)}) was never returned to the client")

    if stats is not None:
        stats.update(settlements=lazy_ops, consumptions=len(consumptions))

    # 2. The client's own account per user.
    for u in users:
        sub, pur, debt, _lim = accounts.get(u, (0, 0, 0, 0))
        want = model[u] + settled[u]
        if sub + pur - debt != want:
            bad.append(f"user {u}: subscription {sub} + purchased {pur} - debt {debt} = {sub + pur - debt}, "
                       f"the client's account says {want} (settled expiries {settled[u]})")
        if u in classic:
            for pool, have in (("subscription", sub), ("purchased", pur), ("debt", -debt)):
                w = model_pool[u][pool] + settled_pool[u][pool]
                if have != w:
                    bad.append(f"user {u}: {pool} {have}, the client's account says {w}")

    # 3. Grants.
    pool_sum = defaultdict(int)
    for x in rows:
        if x.grant is None and x.pool != "debt":
            pool_sum[(x.user, x.pool)] += x.amount
    debt_sum = defaultdict(int)
    for x in rows:
        if x.pool == "debt":
            debt_sum[x.user] += x.amount
    boundary = 0
    for g in grants.values():
        gr = by_grant.get(g.id, [])
        s = sum(x.amount for x in gr)
        pool_sum[(g.user, pool_of(g.category))] += g.remaining
        if s != g.remaining:
            bad.append(f"grant {g.id} ({g.category}): ledger rows sum to {s}, remaining {g.remaining}")
        if not 0 <= g.remaining <= g.amount:
            bad.append(f"grant {g.id}: remaining {g.remaining} of {g.amount}")
        voids = [x for x in gr if x.type in ("void", "clawback")]     # a clawback voids a purchase's grant
        if g.voided_at is not None:
            want_n = 1 if (g.voided_amount or 0) > 0 else 0
            if len(voids) != want_n or sum(x.amount for x in voids) != -(g.voided_amount or 0):
                bad.append(f"grant {g.id} voided ({g.voided_amount}): {len(voids)} void rows summing to {sum(x.amount for x in voids)}")
        elif voids:
            bad.append(f"grant {g.id} is not voided but has {len(voids)} void rows")
        ends = [x for x in gr if x.type in ("void", "clawback", "expiration")]
        if len([x for x in ends if x.type == "expiration"]) > 1:
            bad.append(f"grant {g.id} expired {len([x for x in ends if x.type == 'expiration'])} times")
        if ends:
            end = min(x.at for x in ends)
            after = [x for x in gr if x.at > end]
            if after:
                bad.append(f"grant {g.id}: {len(after)} rows after its {ends[0].type} row: {summary(after)}")
        for x in gr:
            if x.amount < 0 and x.type != "expiration" and g.expires_at is not None and x.at >= g.expires_at:
                # The spending statement reads the clock once, under the account lock, and its rows
                # are written a little later (tens of ms on a loaded machine): a row dated at or
                # after the expiry of a call that began before it may have been decided before it.
                # Certain: the call began after the expiry (or the client never saw the call).
                c = claimed.get(x.op)
                if c is not None and c.t0 < g.expires_at.timestamp():
                    boundary += 1
                else:
                    bad.append(f"expired grant spent: grant {g.id} expires {g.expires_at}, {x.type} row {x.amount} "
                               f"written {x.at} (operation {x.op}, call began "
                               f"{datetime.datetime.fromtimestamp(c.t0, datetime.timezone.utc) if c else 'unknown'})")
            if x.amount < 0 and x.type not in ("void", "expiration") and x.at < g.effective_at:
                bad.append(f"grant {g.id} spent before it started: effective {g.effective_at}, {x.type} row {x.amount} at {x.at}")
            if x.type == "debt_repayment" and (g.scope is not None or g.effective_at > g.created_at + datetime.timedelta(milliseconds=1)):
                bad.append(f"grant {g.id} (scope {g.scope}, effective {g.effective_at}, created {g.created_at}) repaid debt")
    for u in users:
        sub, pur, debt, _lim = accounts.get(u, (0, 0, 0, 0))
        if sub != pool_sum[(u, "subscription")] or pur != pool_sum[(u, "purchased")]:
            bad.append(f"user {u}: pools ({sub}, {pur}) but its grants hold ({pool_sum[(u, 'subscription')]}, "
                       f"{pool_sum[(u, 'purchased')]})")
        if debt < 0 or debt != -debt_sum[u]:
            bad.append(f"user {u}: debt {debt}, debt ledger rows sum to {debt_sum[u]}")

    if stats is not None:
        stats["spent_at_expiry_boundary"] = boundary

    # 4. Spending rules per consumption.
    by_user = defaultdict(list)
    for g in grants.values():
        by_user[g.user].append(g)
    prefix = {}
    for gid, gr in by_grant.items():
        ts, acc, sums = [], 0, []
        for x in gr:
            acc += x.amount
            ts.append(x.at)
            sums.append(acc)
        prefix[gid] = (ts, sums)

    def before(gid, t):
        ts, sums = prefix.get(gid, ([], []))
        i = bisect.bisect_left(ts, t)
        return sums[i - 1] if i else 0

    for c, r, op_rows in consumptions:
        feature = c.args.get("feature") if c.op in ("consume_f", "consume_f_rpc") else None
        spent = [x for x in op_rows if x.grant is not None and x.amount < 0 and x.type not in NOT_SPENDING]
        for x in spent:
            g = grants.get(x.grant)
            if g is None:
                bad.append(f"{c.op} spent grant {x.grant}, which does not exist")
            elif not admits(g, feature):
                bad.append(f"{c.op} for feature {feature!r} spent grant {g.id} scoped {g.scope}")
        if c.op in ("consume_f", "consume_f_rpc"):
            keys = [spend_key(grants[str(x["grant_id"])]) for x in r["grants"] if str(x["grant_id"]) in grants]
            if keys != sorted(keys):
                bad.append(f"consume_credits listed its grants out of spending order: {r['grants']}")
        if not op_rows:
            continue
        t = min(x.at for x in op_rows)
        took = {x.grant: 0 for x in spent}
        for x in spent:
            took[x.grant] += x.amount
        debt_added = -sum(x.amount for x in op_rows if x.pool == "debt" and x.amount < 0)
        last = max((spend_key(grants[gid]) for gid in took if gid in grants), default=None)
        for g in by_user[c.user]:
            if g.id in took or not admits(g, feature) or g.effective_at > t - START_MARGIN:
                continue
            if g.expires_at is not None and g.expires_at <= t:
                continue
            left = before(g.id, t)
            if left > 0 and (debt_added > 0 or (last is not None and spend_key(g) < last)):
                bad.append(f"{c.op} {r.get('transaction_id')} (feature {feature!r}) left out grant {g.id} "
                           f"({g.category}, priority {g.priority}, scope {g.scope}, {left} left)"
                           + (f" and took {debt_added} debt" if debt_added > 0 else " ahead of a grant it took"))
        for gid, amt in took.items():
            if gid in grants and spend_key(grants[gid]) != last and before(gid, t) + amt != 0:
                bad.append(f"{c.op} {r.get('transaction_id')}: took {-amt} of grant {gid} which had {before(gid, t)}, "
                           "then went on to the next grant")

    # 5. Overdraft limits.
    limits = Limits(calls, users)
    for c, r in applied:
        if c.op in CONSUMERS and "debt" in r and int(r.get("debt_added", 0) or 0) > 0:
            allowed = max(limits.candidates(c.user, c.t0, c.t1 or float("inf")))
            if int(r["debt"]) > allowed:
                bad.append(f"{c.op} on {c.user} left debt {r['debt']} above the overdraft limit {allowed}: {r}")
    for x in rows:
        if x.pool == "debt" and x.amount < 0 and abs(x.after) > limits.highest(x.user):
            bad.append(f"user {x.user}: a debt row left debt {abs(x.after)}, above any limit it had ({limits.highest(x.user)})")
    for u in ulist:
        lim = accounts.get(u, (0, 0, 0, 0))[3]
        if lim not in limits.candidates(u, float("inf"), float("inf")):
            bad.append(f"user {u}: overdraft_limit {lim}, but the last limits set were {limits.candidates(u, float('inf'), float('inf'))}")

    # 6. Expiration events per operation: what was lost (at a renewal, what expired less what rolled
    # over).
    exp_rows = defaultdict(int)
    for x in rows:
        if x.type in ("expiration", "rollover"):
            exp_rows[x.op] += x.amount
    for op in set(exp_rows) | set(events):
        if events.get(op, 0) != -exp_rows.get(op, 0):
            bad.append(f"operation {op}: expiration events {events.get(op, 0)}, expiration rows {exp_rows.get(op, 0)}")
    return bad
