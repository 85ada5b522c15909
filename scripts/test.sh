#!/usr/bin/env bash
# Every test of pg_billing, from a fresh machine: unit tests, pg_regress, isolation specs and
# integration tests (PostgREST-style calls, dump/restore, ...). Prints the counts at the end.
# Usage: scripts/test.sh            (all suites)
#        SUITES="regress isolation" scripts/test.sh
source "$(dirname "$0")/lib.sh"
SUITES="${SUITES:-unit regress isolation integration}"
PY=/usr/bin/python3   # Debian's, which has python3-psycopg2
OUT="${TEST_OUT:-$REPO/.tmp/test-output}"
rm -rf "$OUT"; mkdir -p "$OUT"
chmod 777 "$OUT" "$(dirname "$OUT")"

passed=0; failed=0; declare -a summary
record() { # suite passed failed
    passed=$((passed + $2)); failed=$((failed + $3))
    summary+=("$(printf '%-12s %4d passed, %d failed' "$1" "$2" "$3")")
}

ensure_deps

if [[ " $SUITES " == *" unit "* ]]; then
    log "unit tests (pg_billing_core)"
    if (cd "$REPO" && cargo test -q -p pg_billing_core 2>&1) | tee "$OUT/unit.log" | tail -n 5; then :; fi
    read -r up uf < <(grep -E '^test result:' "$OUT/unit.log" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
    grep -q '^test result: ok' "$OUT/unit.log" || uf=$((uf > 0 ? uf : 1))
    record unit "$up" "$uf"
fi

install_extension
trap stop_cluster EXIT
start_cluster

# Supabase's roles, so grants, RLS and PostgREST-style calls are tested as they run there.
setup_db() { # dbname
    createdb "$1"
    psql_q -d "$1" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN CREATE ROLE service_role NOLOGIN BYPASSRLS; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticator') THEN
    CREATE ROLE authenticator LOGIN NOINHERIT;
    GRANT anon, authenticated, service_role TO authenticator;
  END IF;
END $$;
CREATE EXTENSION pg_billing;
SQL
}

if [[ " $SUITES " == *" regress "* ]]; then
    log "pg_regress"
    setup_db regression
    tests=$(cd "$REPO/tests/pg_regress/sql" && ls *.sql | sed 's/\.sql$//' | sort)
    set +e
    "$PGXS/src/test/regress/pg_regress" --use-existing --bindir="$PGBIN" --host="$PGHOST" --port="$PGPORT" --user=postgres \
        --dbname=regression --inputdir="$REPO/tests/pg_regress" --outputdir="$OUT/regress" $tests 2>&1 | tee "$OUT/regress.log"
    set -e
    rp=$(grep -cE '^(ok|test) .* ok( |$)|^ok [0-9]+ ' "$OUT/regress.log" || true)
    rf=$(grep -cE ' FAILED|failed \(ignored\)|^not ok' "$OUT/regress.log" || true)
    [ -f "$OUT/regress/regression.diffs" ] && cp "$OUT/regress/regression.diffs" "$OUT/regress.diffs" && head -n 200 "$OUT/regress.diffs"
    record regress "$rp" "$rf"
fi

if [[ " $SUITES " == *" isolation "* ]]; then
    log "isolation specs"
    setup_db isolation
    specs=$(cd "$REPO/tests/isolation/specs" && ls *.spec 2>/dev/null | sed 's/\.spec$//' | sort)
    set +e
    "$PGXS/src/test/isolation/pg_isolation_regress" --use-existing --bindir="$PGBIN" --host="$PGHOST" --port="$PGPORT" --user=postgres \
        --dbname=isolation --inputdir="$REPO/tests/isolation" --outputdir="$OUT/isolation" $specs 2>&1 | tee "$OUT/isolation.log"
    set -e
    ip=$(grep -cE '^(ok|test|permutation) .* ok( |$)|^ok [0-9]+ ' "$OUT/isolation.log" || true)
    if_=$(grep -cE ' FAILED|^not ok' "$OUT/isolation.log" || true)
    [ -f "$OUT/isolation/regression.diffs" ] && cp "$OUT/isolation/regression.diffs" "$OUT/isolation.diffs" && head -n 200 "$OUT/isolation.diffs"
    record isolation "$ip" "$if_"
fi

if [[ " $SUITES " == *" integration "* ]]; then
    log "integration tests"
    setup_db integration
    set +e
    PGDATABASE=integration $PY "$REPO/tests/integration/run.py" --short 2>&1 | tee "$OUT/integration.log"
    set -e
    read -r np nf < <(grep -E '^integration: [0-9]+ passed, [0-9]+ failed' "$OUT/integration.log" | tail -n1 | awk '{print $2, $4}')
    record integration "${np:-0}" "${nf:-1}"
fi

log "summary"
for line in "${summary[@]}"; do echo "  $line"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
