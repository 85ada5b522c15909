-- Events out (issue 15), limit rules: billing.set_limit_alert(metric, percent, plan) fires
-- limit.reached once per (user, metric, percent, period) when usage >= ceil(limit * percent / 100)
-- and limit.cleared once when a reached rule's usage is back below it: for a monthly metric at the
-- first record of a new period (record_*_usage), for a resource type at the next
-- check_resource_limit (VOLATILE since 0.6.0) that counts fewer. Plan NULL: every plan; p_enabled
-- false removes a rule; unlimited (-1) or missing limits never fire; argument errors.
-- Users 00000000-0000-0000-0000-0000001503xx.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ': ' || msg;
END
$f$;
GRANT EXECUTE ON FUNCTION tests.err(text) TO PUBLIC;
-- new_limit_events(user): the user's limit.* events since the last call, sorted by type, metric
-- and percent (one write may fire several), without user_id and the period (checked apart)
CREATE TEMP TABLE seen (user_id uuid PRIMARY KEY, last_id bigint NOT NULL);
GRANT ALL ON seen TO PUBLIC;
CREATE FUNCTION tests.new_limit_events(p_user uuid) RETURNS TABLE (type text, metric text, pct int, payload jsonb) LANGUAGE plpgsql AS $f$
DECLARE v_last bigint;
BEGIN
    SELECT s.last_id INTO v_last FROM pg_temp.seen AS s WHERE s.user_id = p_user;
    RETURN QUERY SELECT e.type, e.payload ->> 'metric', (e.payload ->> 'percent')::int,
                        e.payload - 'user_id' - 'metric' - 'percent' - 'period_start' - 'period_end'
                   FROM billing.events AS e
                  WHERE e.user_id = p_user AND e.id > COALESCE(v_last, 0) AND e.type LIKE 'limit.%'
                  ORDER BY 1, 2, 3;
    INSERT INTO pg_temp.seen SELECT p_user, COALESCE(max(e.id), 0) FROM billing.events AS e WHERE e.user_id = p_user
    ON CONFLICT (user_id) DO UPDATE SET last_id = EXCLUDED.last_id;
END
$f$;
GRANT EXECUTE ON FUNCTION tests.new_limit_events(uuid) TO PUBLIC;
-- msgs(user, n, tokens_in): records n messages of tokens_in input tokens each, one call each
CREATE FUNCTION tests.msgs(p_user uuid, p_n int, p_tokens int DEFAULT 0) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN
    FOR i IN 1..p_n LOOP PERFORM billing.record_message_usage(p_user, p_tokens, 0); END LOOP;
    RETURN (SELECT messages_count FROM billing.get_user_current_usage(p_user));
END
$f$;

INSERT INTO billing.plans (plan_id, display_name, limits) VALUES
    ('ev_lim', 'Events limits', '{"messages_per_month": 5, "tokens_input_per_month": 100, "conversations_per_month": -1, "ev_gadgets": 2}'),
    ('ev_lim_other', 'Events limits (other)', '{"messages_per_month": 5, "tokens_input_per_month": 100000, "ev_gadgets": 10}');

-- ===== argument errors, each with its SQLSTATE =====
SELECT tests.err($$SELECT billing.set_limit_alert('messages', 0, 'ev_lim')$$) AS percent_0;
SELECT tests.err($$SELECT billing.set_limit_alert('messages', 1001, 'ev_lim')$$) AS percent_1001;
SELECT tests.err($$SELECT billing.set_limit_alert('messages', NULL, 'ev_lim')$$) AS percent_null;
SELECT tests.err($$SELECT billing.set_limit_alert('nope', 80, 'ev_lim')$$) AS unknown_metric;
SELECT tests.err($$SELECT billing.set_limit_alert('', 80, 'ev_lim')$$) AS empty_metric;
SELECT tests.err($$SELECT billing.set_limit_alert(NULL, 80, 'ev_lim')$$) AS null_metric;
SELECT tests.err($$SELECT billing.set_limit_alert('messages_per_month', 80, 'ev_lim')$$) AS limit_key_not_metric;
SELECT tests.err($$SELECT billing.set_limit_alert('ev_gadgets', 80, 'ev_lim')$$) AS resource_not_registered_yet;
SELECT tests.err($$SELECT billing.set_limit_alert('messages', 80, 'no_such_plan')$$) AS unknown_plan;
SELECT count(*) AS rules FROM billing.limit_alerts;
-- the bounds are allowed
SELECT billing.set_limit_alert('documents', 1, 'ev_lim_other') IS NOT NULL AS percent_1,
       billing.set_limit_alert('documents', 1000, 'ev_lim_other') IS NOT NULL AS percent_1000;
SELECT metric, percent, plan_id FROM billing.limit_alerts ORDER BY metric, percent, plan_id;
SELECT billing.set_limit_alert('documents', 1, 'ev_lim_other', false) IS NOT NULL AS removed_1,
       billing.set_limit_alert('documents', 1000, 'ev_lim_other', p_enabled => false) IS NOT NULL AS removed_1000;
SELECT count(*) AS rules FROM billing.limit_alerts;

-- ===== a monthly metric: messages at 80% (4 of 5) and 100%, tokens_input at 50% for every plan =====
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150301', 'ev_lim', 'active', now() - interval '1 day', now() + interval '29 days') ->> 'applied' AS applied;
SELECT billing.set_limit_alert('messages', 80, 'ev_lim') AS rule;
SELECT billing.set_limit_alert('messages', 100, 'ev_lim') IS NOT NULL AS rule_100;
SELECT billing.set_limit_alert('tokens_input', 50) IS NOT NULL AS rule_every_plan;
SELECT billing.set_limit_alert('conversations', 50, 'ev_lim') IS NOT NULL AS rule_unlimited_metric;
-- setting the same rule twice keeps one
SELECT billing.set_limit_alert('messages', 80, 'ev_lim') IS NOT NULL AS rule_again;
SELECT metric, percent, plan_id FROM billing.limit_alerts ORDER BY metric, percent, plan_id;
-- 3 messages, 30 tokens: below every threshold
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 3, 10) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- the 4th: messages 80% reached (threshold 4)
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 1, 10) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- the 5th, with 15 tokens (55): messages 100% and tokens_input 50% in one call
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 1, 15) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- over the limit: nothing more; unlimited conversations never fire; documents have no rule
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 3, 100) AS messages;
SELECT count(*) FROM (SELECT billing.record_conversation_usage('00000000-0000-0000-0000-000000150301') FROM generate_series(1, 5)) AS c;
SELECT billing.record_document_usage('00000000-0000-0000-0000-000000150301', 3);
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- the period of the events is the current usage period (read first: a function that reads
-- billing tables may not run inside a query on a Citus shard)
SELECT period_start AS p_start, period_end AS p_end FROM billing.current_usage_period('00000000-0000-0000-0000-000000150301') \gset
SELECT bool_and((e.payload ->> 'period_start')::timestamptz = :'p_start'::timestamptz) AS period_start_ok,
       bool_and((e.payload ->> 'period_end')::timestamptz = :'p_end'::timestamptz) AS period_end_ok, count(*) AS events
  FROM billing.events AS e
 WHERE e.user_id = '00000000-0000-0000-0000-000000150301' AND e.type = 'limit.reached';
-- a rule of another plan does not apply to this user
SELECT billing.set_limit_alert('messages', 10, 'ev_lim_other') IS NOT NULL AS other_plan_rule;
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 1) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- a new period: the first record of it clears every reached rule, once
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150301', 'ev_lim', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 1) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- limit.cleared names the period the rule had fired in (its start; no end: that period is over)
SELECT period_start AS p_start FROM billing.current_usage_period('00000000-0000-0000-0000-000000150301') \gset
SELECT count(*) AS cleared,
       bool_and((e.payload ->> 'period_start')::timestamptz = (SELECT min((r.payload ->> 'period_start')::timestamptz) FROM billing.events AS r
                                                                WHERE r.user_id = e.user_id AND r.type = 'limit.reached')) AS fired_period,
       bool_and((e.payload ->> 'period_start')::timestamptz < :'p_start'::timestamptz) AS before_this_period,
       bool_and(e.payload -> 'period_end' = 'null') AS no_end
  FROM billing.events AS e
 WHERE e.user_id = '00000000-0000-0000-0000-000000150301' AND e.type = 'limit.cleared';
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 2) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- in the new period the 80% rule fires again at 4
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 1) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- a removed rule fires nothing: 100% disabled, the 5th message fires nothing
SELECT billing.set_limit_alert('messages', 100, 'ev_lim', false) IS NOT NULL AS disabled;
SELECT tests.msgs('00000000-0000-0000-0000-000000150301', 1) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150301');
-- a user on a plan without the limit key (free has no key ev_gadgets; ultra: -1) never fires
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150302', 'ultra', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT tests.msgs('00000000-0000-0000-0000-000000150302', 3, 100000) AS messages;
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150302');

-- ===== a resource type: counted by check_resource_limit =====
SELECT provolatile FROM pg_proc WHERE oid = 'billing.check_resource_limit(uuid, text)'::regprocedure;
CREATE TABLE public.ev_gadgets (id serial PRIMARY KEY, user_id uuid NOT NULL);
CREATE INDEX ON public.ev_gadgets (user_id);
SELECT billing.register_resource('ev_gadgets', 'public.ev_gadgets');
SELECT billing.set_limit_alert('ev_gadgets', 50, 'ev_lim') IS NOT NULL AS rule_50;
SELECT billing.set_limit_alert('ev_gadgets', 100, 'ev_lim') IS NOT NULL AS rule_100;
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150303', 'ev_lim', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT allowed, current_count, max_allowed FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- 1 of 2: 50% reached (threshold 1)
INSERT INTO public.ev_gadgets (user_id) VALUES ('00000000-0000-0000-0000-000000150303');
SELECT allowed, current_count, max_allowed FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- checked again: nothing
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- 2 of 2: 100% reached
INSERT INTO public.ev_gadgets (user_id) VALUES ('00000000-0000-0000-0000-000000150303');
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- back to 1: 100% cleared (50% still reached)
DELETE FROM public.ev_gadgets WHERE id = (SELECT max(id) FROM public.ev_gadgets WHERE user_id = '00000000-0000-0000-0000-000000150303');
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- to 0: 50% cleared; checked again: nothing
DELETE FROM public.ev_gadgets WHERE user_id = '00000000-0000-0000-0000-000000150303';
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT * FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- reached again after it cleared: a new crossing fires again
INSERT INTO public.ev_gadgets (user_id) VALUES ('00000000-0000-0000-0000-000000150303');
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
SELECT type, metric, pct FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- an end user's own check writes the event as well, and the user reads it through RLS
INSERT INTO public.ev_gadgets (user_id) VALUES ('00000000-0000-0000-0000-000000150303');
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000150303","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT allowed, current_count FROM billing.check_resource_limit('00000000-0000-0000-0000-000000150303', 'ev_gadgets');
-- single node only: Citus refuses an end user's read of rows the owner wrote earlier in this transaction
\if :single_node
SELECT type, payload ->> 'metric' AS metric, payload ->> 'percent' AS pct
  FROM billing.events WHERE type LIKE 'limit.%' ORDER BY id DESC LIMIT 1;
SELECT count(*) FILTER (WHERE user_id <> '00000000-0000-0000-0000-000000150303') AS others_rows FROM billing.events;
\endif
-- an end user may not set rules (42501)
SELECT tests.err($$SELECT billing.set_limit_alert('messages', 50, 'ev_lim')$$) AS end_user_set_limit_alert;
COMMIT;
SELECT type, metric, pct FROM tests.new_limit_events('00000000-0000-0000-0000-000000150303');
-- a registered resource with an unknown plan: P0002
SELECT tests.err($$SELECT billing.set_limit_alert('ev_gadgets', 10, 'no_such_plan')$$) AS unknown_plan;

-- ===== every limit event of this file: payload fields =====
SELECT type, count(*) AS events,
       count(*) FILTER (WHERE payload ->> 'user_id' IS DISTINCT FROM user_id::text) AS wrong_user,
       count(*) FILTER (WHERE NOT payload ?& ARRAY['metric', 'percent', 'limit_value', 'current_usage', 'threshold_value', 'plan_id', 'period_start', 'period_end']) AS missing_keys
  FROM billing.events WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001503%' AND type LIKE 'limit.%' GROUP BY type ORDER BY type;
-- leave no rule behind (other tests record usage on every plan)
-- (the table keeps '' for a rule of every plan)
SELECT count(*) AS removed FROM (SELECT billing.set_limit_alert(metric, percent, NULLIF(plan_id, ''), false) FROM billing.limit_alerts) AS r;
SELECT count(*) AS rules_left FROM billing.limit_alerts;
DELETE FROM billing.resource_types WHERE resource_type = 'ev_gadgets';
DROP TABLE public.ev_gadgets;
DELETE FROM billing.usage_metrics WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001503%';
DELETE FROM billing.subscriptions WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001503%';
DELETE FROM billing.plans WHERE plan_id IN ('ev_lim', 'ev_lim_other');
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
