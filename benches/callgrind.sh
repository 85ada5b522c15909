#!/usr/bin/env bash
# Instructions per call of the three consume implementations, counted by callgrind in a
# single-user backend: deterministic, and independent of whatever else the machine is doing
# (wall-clock benchmarks are not). Each implementation runs N1 and N2 prepared calls; the
# difference divided by N2 - N1 removes start-up costs. Builds and installs the release library
# first (SKIP_INSTALL=1 measures what is installed) into the PostgreSQL tree PG_CONFIG names
# (Debian's 15 by default, as in scripts/lib.sh), and runs that tree's binaries. Needs valgrind.
# Usage: [PG_CONFIG=...] bash benches/callgrind.sh [N1 N2]
# LEDGER_ROWS=5000000 preloads that many old ledger rows first (the cost-growth target);
# ONLY=rust measures only pg_billing.
source "$(dirname "$0")/../scripts/lib.sh"
HERE="$REPO/benches"
N1="${1:-300}"; N2="${2:-1300}"
PROFILE="${PROFILE:-release}" install_extension
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
D="$(mktemp -d /tmp/pgb_callgrind.XXXXXX)"; chown postgres "$D"; chmod 755 "$D"
trap 'rm -rf "$D"' EXIT
ensure_postgres_can_run
runuser -u postgres -- "$PGBIN/initdb" -D "$D/data" -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$D/data" -o "-k $D -p 54999 -c listen_addresses=''" -w start >/dev/null
"$PGBIN/createdb" -h "$D" -p 54999 -U postgres cg
"$PGBIN/psql" -X -q -h "$D" -p 54999 -U postgres -d cg -c "CREATE EXTENSION pg_billing" -f "$HERE/plpgsql_reference.sql" \
  -c "SELECT count(billing.add_purchased_credits(('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 2000000000)) FROM generate_series(1, 10000) AS i" >/dev/null
if [ "${LEDGER_ROWS:-0}" -gt 0 ]; then
    "$PGBIN/psql" -X -q -h "$D" -p 54999 -U postgres -d cg -c "INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, created_at)
        SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i % 10000), 12, '0'))::uuid, gen_random_uuid(), 'usage', 'purchased', -1, 1, now() - interval '1 year'
          FROM generate_series(1, ${LEDGER_ROWS}) AS i" -c "VACUUM ANALYZE billing.credit_transactions" >/dev/null
fi
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$D/data" -w stop >/dev/null
/usr/bin/python3 - "$D" "$N1" "$N2" "$HERE" <<'PY'
import sys
d, n1, n2, here = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
raw = open(f"{here}/consume_raw.sql").read().split("\n", 1)[1]
raw = raw.replace("('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid", "$1").replace("\n", " ").rstrip("; ")
prep = {"rust": "SELECT billing.consume_credits_v2($1, 1)", "plpgsql": "SELECT bench.consume_credits_plpgsql($1, 1)", "raw": raw}
for name, body in prep.items():
    for n in (n1, n2):
        with open(f"{d}/{name}_{n}.sql", "w") as f:
            f.write(f"SET synchronous_commit = off;\n\nPREPARE c(uuid) AS {body};\n\n")
            for i in range(n):
                f.write(f"EXECUTE c('00000000-0000-4000-8000-{i % 10000 + 1:012x}');\n\n")
PY
chmod 644 "$D"/*.sql
declare -A per
for name in ${ONLY:-rust plpgsql raw}; do
    tot=()
    for n in "$N1" "$N2"; do
        # each run starts from the same data: copy the cluster
        rm -rf "$D/run"; cp -a "$D/data" "$D/run"
        runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$D/$name.$n.out" \
            "$PGBIN/postgres" --single -D "$D/run" -j cg < "$D/${name}_$n.sql" > "$D/$name.$n.log" 2>&1
        if grep -q ERROR "$D/$name.$n.log"; then grep -m3 ERROR "$D/$name.$n.log"; exit 1; fi
        callgrind_annotate "$D/$name.$n.out" > "$D/$name.$n.txt" 2>/dev/null
        tot+=("$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$D/$name.$n.txt")")
    done
    per[$name]=$(( (tot[1] - tot[0]) / (N2 - N1) ))
    echo "$name: ${per[$name]} instructions per call"
done
[ -n "${ONLY:-}" ] && exit 0
awk -v r="${per[rust]}" -v p="${per[plpgsql]}" -v w="${per[raw]}" \
    'BEGIN { printf "PL/pgSQL / Rust = %.2fx, raw SQL / Rust = %.2fx (higher is better for Rust)\n", p / r, w / r }'
