#!/usr/bin/env bash
# `make signatures`: regenerate tests/signatures.txt, the pinned catalog signature of every
# function in schema billing (checked by tests/integration/test_signatures.py). Builds and
# installs the extension, starts a throwaway cluster, writes the list from a fresh
# CREATE EXTENSION, stops. Read `git diff tests/signatures.txt` before committing it.
# SIGNATURES_MODE=--check compares instead of writing (exit 1 on a difference).
source "$(dirname "$0")/lib.sh"
ensure_deps
install_extension
trap stop_cluster EXIT
start_cluster
PGDATABASE=postgres $PY "$REPO/tests/signatures.py" "${SIGNATURES_MODE:---write}"
