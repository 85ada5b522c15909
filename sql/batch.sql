-- Batches (0.6.0; issue 16): record_usage_batch and consume_credits_batch (src/api/batch.rs).

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('record_usage_batch', 'service'),
    ('consume_credits_batch', 'service');

CREATE FUNCTION billing.record_usage_batch(p_events jsonb, p_atomic boolean DEFAULT false)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_record_usage_batch';
COMMENT ON FUNCTION billing.record_usage_batch(jsonb, boolean) IS
'Service-only. Record up to 10000 usage events [{user_id, metric, value (default 1), idempotency_key, occurred_at}] in one call: metric is messages, conversations, tokens_input, tokens_output, documents, chunks, generations or api_calls; occurred_at (RFC 3339, default now) from 35 days ago to 5 minutes ahead counts in the period it falls in (the subscription''s period, else the period of the user''s usage row that holds it, else its UTC calendar month). Each idempotency_key counts once per user: a repeat (in this batch or an earlier one) is a success with status duplicate and the first result. Returns one result per event, in order: {index, status: applied | duplicate | error, period_start | first | sqlstate and message}. A bad event is its own error result and the others are recorded, unless p_atomic (then 22023 and nothing is recorded).';

CREATE FUNCTION billing.consume_credits_batch(p_items jsonb, p_atomic boolean DEFAULT false)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_consume_credits_batch';
COMMENT ON FUNCTION billing.consume_credits_batch(jsonb, boolean) IS
'Service-only. Up to 10000 debits [{user_id, amount, description, reference_id, idempotency_key}], each as consume_credits_v2 (FIFO across the pools; keys in the service''s namespace, so a repeat replays). Returns one result per item, in order: {index, status: applied | duplicate | error, result | sqlstate and message}. An item that fails (PT402, P0002, PT409, a bad item: 22023) is its own error result and changes nothing; the others are applied, unless p_atomic (then the whole call fails with 22023 naming the item, and nothing is applied). Items are applied user by user (each user''s items in their order).';
