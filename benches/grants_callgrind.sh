#!/usr/bin/env bash
# Issue 13's speed figures, in one run: instructions per consume_credits_v2 call (callgrind, a
# single-user backend, N2 - N1 prepared calls so start-up costs cancel) of
#   - the previous release (its own library, built from the commit sql/releases/commits.txt
#     records) on accounts holding the two classic pools;
#   - this checkout on the same accounts (after CREATE EXTENSION they are two classic grants:
#     one subscription grant, one purchased grant);
#   - this checkout on accounts holding 10 spendable grants.
# Both libraries are release builds installed into two copies of the same PostgreSQL 15 tree
# (from PyPI, as scripts/lib.sh fetches it), so nothing but the library differs. Needs valgrind.
# Usage: bash benches/grants_callgrind.sh [N1 N2]      (prints one line per case, and ratios)
#        COMPARE="consume_credits_v2 add_purchased_credits reserve_credits" bash benches/grants_callgrind.sh
#        (instead: each named call of one credit, previous release vs this checkout, same accounts)
source "$(dirname "$0")/../scripts/lib.sh"
N1="${1:-300}"; N2="${2:-1300}"
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
PREV="${PREV:-$(awk '!/^#/ && NF == 2 {v = $1} END {print v}' "$REPO/sql/releases/commits.txt")}"
PREV_COMMIT="$(awk -v v="$PREV" '$1 == v {print $2}' "$REPO/sql/releases/commits.txt")"
WORK="$REPO/.tmp/bench-grants"; mkdir -p "$WORK"
BASE_PG_CONFIG="$(fetch_postgres 15)"; BASE="$(dirname "$(dirname "$BASE_PG_CONFIG")")"
tree() { # name: a private copy of the PostgreSQL tree
    [ -x "$WORK/$1/bin/pg_config" ] || { rm -rf "$WORK/$1"; cp -a "$BASE" "$WORK/$1"; }
    echo "$WORK/$1/bin/pg_config"
}
install_into() { # source dir, pg_config, target dir (one per source: a shared one mixes their path crates)
    log "building and installing $(basename "$1") (release) into $2"
    (cd "$1" && env "PGRX_HOME=$REPO/pgrx-config" "PGRX_PG_CONFIG_PATH=$2" CARGO_TARGET_DIR="$3" \
        cargo pgrx install --release --pg-config "$2" >/dev/null)
}
if [ ! -d "$WORK/prev-src" ] || [ "$(cat "$WORK/prev-src/.commit" 2>/dev/null)" != "$PREV_COMMIT" ]; then
    rm -rf "$WORK/prev-src"; mkdir -p "$WORK/prev-src"
    git -C "$REPO" archive "$PREV_COMMIT" | tar x -C "$WORK/prev-src"
    echo "$PREV_COMMIT" > "$WORK/prev-src/.commit"
fi
PREV_PG="$(tree "pg-prev")"; CUR_PG="$(tree "pg-cur")"
install_into "$WORK/prev-src" "$PREV_PG" "$WORK/target-prev"
install_into "$REPO" "$CUR_PG" "$REPO/target"
PG_CONFIG="$CUR_PG" ensure_postgres_can_run 2>/dev/null || true
chmod -R o+rX "$WORK/pg-prev" "$WORK/pg-cur"; chmod o+x "$REPO" "$REPO/.tmp" "$WORK" 2>/dev/null || true

U="('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid"
CLASSIC="SELECT count(billing.add_subscription_credits($U, 1000000000)) + count(billing.add_purchased_credits($U, 1000000000))
           FROM generate_series(1, 10000) AS i"
# Each account has been debited once since its last grant (the steady state: debits outnumber
# grants; since 0.7.0 the first debit after a grant takes the general path and records the head).
PRIME="SELECT count(billing.consume_credits_v2($U, 1)) FROM generate_series(1, 10000) AS i"
# 10 spendable grants: 10 promotional grants of different priorities (the first pays).
TEN="SELECT count(billing.grant_credits($U, 1000000000, 'promotional', 20 + k, now(), NULL, NULL)) FROM generate_series(1, 10000) AS i, generate_series(1, 10) AS k"
# 10 grants of 1 credit each: a debit of 2 spans two grants (the general statement, not the fast path).
SPAN="SELECT count(billing.grant_credits($U, 1, 'promotional', 20 + k, now(), NULL, NULL)) FROM generate_series(1, 10000) AS i, generate_series(1, 10) AS k"

measure() { # label, pg_config, setup sql[, the call (default: consume_credits_v2 of 1)[, priming sql]]
    local bin d per tot=() n
    bin="$("$2" --bindir)"; d="$(mktemp -d /tmp/pgb_gcg.XXXXXX)"; chown postgres "$d"; chmod 755 "$d"
    runuser -u postgres -- "$bin/initdb" -D "$d/data" -A trust -U postgres --no-sync >/dev/null
    runuser -u postgres -- "$bin/pg_ctl" -D "$d/data" -o "-k $d -p 54998 -c listen_addresses=''" -w start >/dev/null
    "$bin/createdb" -h "$d" -p 54998 -U postgres cg
    "$bin/psql" -X -q -h "$d" -p 54998 -U postgres -d cg -v ON_ERROR_STOP=1 -c "CREATE EXTENSION pg_billing" -c "$3" -c "${5:-$PRIME}" -c "VACUUM ANALYZE" >/dev/null
    runuser -u postgres -- "$bin/pg_ctl" -D "$d/data" -w stop >/dev/null
    for n in "$N1" "$N2"; do
        { echo "SET synchronous_commit = off;"; echo; echo "PREPARE c(uuid) AS SELECT ${4:-billing.consume_credits_v2(\$1, 1)};"; echo
          for ((i = 0; i < n; i++)); do printf "EXECUTE c('00000000-0000-4000-8000-%012x');\n\n" $((i % 10000 + 1)); done
        } > "$d/calls_$n.sql"
        rm -rf "$d/run"; cp -a "$d/data" "$d/run"
        runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$d/cg.$n.out" \
            "$bin/postgres" --single -D "$d/run" -j cg < "$d/calls_$n.sql" > "$d/log.$n" 2>&1
        if grep -q ERROR "$d/log.$n"; then grep -m3 ERROR "$d/log.$n" >&2; exit 1; fi
        tot+=("$(callgrind_annotate "$d/cg.$n.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')")
    done
    rm -rf "$d"
    per=$(( (tot[1] - tot[0]) / (N2 - N1) ))
    echo "$per"
}
if [ -n "${COMPARE:-}" ]; then
    for f in $COMPARE; do
        log "callgrind: $f, $((N2 - N1)) calls per case"
        prev="$(measure prev "$PREV_PG" "$CLASSIC" "billing.$f(\$1, 1)")"
        cur="$(measure cur "$CUR_PG" "$CLASSIC" "billing.$f(\$1, 1)")"
        awk -v f="$f" -v v="$PREV" -v p="$prev" -v c="$cur" \
            'BEGIN { printf "%s of 1 credit: %s %d, this checkout %d instructions per call (%+.1f%%)\n", f, v, p, c, (c / p - 1) * 100 }'
    done
    exit 0
fi
log "callgrind: consume_credits_v2, $((N2 - N1)) calls per case"
prev="$(measure prev "$PREV_PG" "$CLASSIC")"
echo "$PREV (previous release), two classic pools:  $prev instructions per call"
cur="$(measure cur "$CUR_PG" "$CLASSIC")"
echo "this checkout, two classic grants:        $cur instructions per call"
ten="$(measure ten "$CUR_PG" "$TEN")"
echo "this checkout, 10 spendable grants:       $ten instructions per call"
span="$(measure span "$CUR_PG" "$SPAN" "billing.consume_credits_v2(\$1, 2)")"
echo "this checkout, debit spanning 2 of 10 grants: $span instructions per call"
# No debit since the grants were made: each call is the first after a grant change (the general
# path, which records the head of the spending order on the account).
first="$(measure first "$CUR_PG" "$CLASSIC" "billing.consume_credits_v2(\$1, 1)" "SELECT 1")"
echo "this checkout, two classic grants, first debit after a grant: $first instructions per call"
awk -v p="$prev" -v c="$cur" -v t="$ten" -v s="$span" 'BEGIN {
    printf "two classic grants vs %s: %+.1f%% (target: at most +10%%)\n", "previous release", (c / p - 1) * 100
    printf "10 grants vs two classic grants: %.2fx (target: at most 1.6x)\n", t / c
    printf "a debit spanning 2 of 10 grants vs two classic grants: %.2fx\n", s / c }' | sed "s/previous release/$PREV/"
