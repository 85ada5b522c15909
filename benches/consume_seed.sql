\set uid random(1, :users)
SELECT bench_seed.consume_credits_v2(('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid, 1);
