#!/usr/bin/env bash
# Smoke test of one PostgreSQL version (`make smoke PG=16`; CI runs it on 16 and 18): build and
# install with that version's Cargo feature, the demo (CREATE EXTENSION, every story and the
# nightly job, ON_ERROR_STOP) and the upgrade check (the integration tests `-k upgrade`: every
# older release built for this version, filled, upgraded and compared with a fresh install).
# Ends with `N passed, N failed` like scripts/test.sh; exits non-zero on any failure.
source "$(dirname "$0")/lib.sh"
OUT="$REPO/.tmp/smoke-output"
rm -rf "$OUT"; mkdir -p "$OUT"
ensure_deps
install_extension
log "smoke test on PostgreSQL $PG_MAJOR: the demo"
set +e
SKIP_DEPS=1 SKIP_INSTALL=1 bash "$REPO/scripts/demo.sh" > "$OUT/demo.log" 2>&1
drc=$?
set -e
tail -n 3 "$OUT/demo.log"
log "smoke test on PostgreSQL $PG_MAJOR: the upgrade check"
set +e
SKIP_DEPS=1 SKIP_INSTALL=1 SUITES=integration PYTEST_ARGS="-k upgrade" TEST_OUT="$OUT/upgrade" \
    bash "$REPO/scripts/test.sh" > "$OUT/upgrade.log" 2>&1
urc=$?
set -e
grep -E '^(  integration|[0-9]+ passed)' "$OUT/upgrade.log" | head -n 1 || true
read -r up uf < <(tail -n 1 "$OUT/upgrade.log" | sed -nE 's/^([0-9]+) passed, ([0-9]+) failed$/\1 \2/p'; echo)
up=${up:-0}; uf=${uf:-0}
[ "$urc" -eq 0 ] || [ "$uf" -gt 0 ] || uf=1
[ $((up + uf)) -gt 0 ] || uf=1
dp=0; df=0
if [ "$drc" -eq 0 ] && grep -q 'demo finished' "$OUT/demo.log"; then dp=1; else df=1; fi
log "summary (PostgreSQL $PG_MAJOR smoke test)"
printf '  %-12s %4d passed, %d failed\n' demo "$dp" "$df" upgrade "$up" "$uf"
echo "$((dp + up)) passed, $((df + uf)) failed"
[ $((df + uf)) -eq 0 ]
