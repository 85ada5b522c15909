#!/usr/bin/env bash
# The demo (PostgreSQL 15, or PG=16|17|18): a throwaway cluster, CREATE EXTENSION pg_billing, the five stories (S4, S2, S5, S1, S3) and the nightly job.
source "$(dirname "$0")/lib.sh"
ensure_deps
install_extension
trap stop_cluster EXIT
start_cluster
createdb demo
psql -X -v ON_ERROR_STOP=1 -d demo -f "$REPO/demo/demo.sql"
log "demo finished"
