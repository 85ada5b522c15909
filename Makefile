# pg_billing: the two commands are `make demo` and `make test` (see README).
.PHONY: demo test unit install bench stress signatures

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

unit:
	cargo test -p pg_billing_core

install:
	bash -c 'source scripts/lib.sh && ensure_deps && install_extension'

bench:
	bash scripts/bench.sh

bench-smoke:
	BENCH_SMOKE=1 bash scripts/bench.sh

stress:
	bash scripts/stress.sh

# Regenerate tests/signatures.txt (the pinned catalog signatures) after a deliberate change.
signatures:
	bash scripts/signatures.sh
