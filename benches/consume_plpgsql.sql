\set uid random(1, :users)
SELECT bench.consume_credits_plpgsql(('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid, 1);
