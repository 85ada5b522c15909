#!/usr/bin/env bash
# The long variant of the reliability and security harness (`make stress`): contention for
# 5 minutes (32 connections, 100 users), eight SIGKILL/restart cycles of a durable throwaway
# cluster, and the privilege sweep. Prints one figure line per part; exits non-zero on any
# violation. STRESS_MODE=--short runs the short variant (what `make test` includes).
source "$(dirname "$0")/lib.sh"
ensure_deps
install_extension
trap stop_cluster EXIT
start_cluster
createdb stress
psql_q -d stress -f "$REPO/tests/roles.sql"        # Supabase's roles, as in scripts/test.sh
psql_q -d stress -c "CREATE EXTENSION pg_billing"
# The long run must check every upgrade path with the old release's own library.
[ "${STRESS_MODE:---long}" = --long ] && export PGB_REQUIRE_OLD_LIBRARY="${PGB_REQUIRE_OLD_LIBRARY:-1}"
PGDATABASE=stress $PY "$REPO/tests/stress/run.py" "${STRESS_MODE:---long}"
