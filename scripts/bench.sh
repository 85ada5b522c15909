#!/usr/bin/env bash
# Benchmarks (issue 5): release build, throwaway cluster (PostgreSQL 15, or PG=16|17|18), data,
# every workload, report (which names the server version).
# BENCH_SMOKE=1 for a seconds-long harness check; see benches/run.py for the other knobs.
source "$(dirname "$0")/lib.sh"
ensure_deps
PROFILE="${PROFILE:-release}" install_extension
trap stop_cluster EXIT
EXTRA_PG_CONF="fsync = on
max_wal_size = 4GB
checkpoint_timeout = 30min
autovacuum_naptime = 10s" start_cluster
createdb bench
psql_q -d bench -c "CREATE EXTENSION pg_billing"
PGDATABASE=bench /usr/bin/python3 "$REPO/benches/run.py" "$@"
