-- record_webhook_event (SPEC 10): true the first time an event id is seen, false after;
-- NULL/empty arguments are 22023; service-only.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
-- err(sql): runs sql and returns 'SQLSTATE: message [detail]' instead of failing, so the
-- file runs in one transaction. Random uuids (not the fixed 00000000-0000-0000-0000-... test
-- users) are masked.
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; det text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(det, '') || ']', ''),
                          '(?!00000000-0000-0000-0000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                          '<uuid>', 'g');
END
$f$;
-- bal(user): both pools and the number of ledger rows (to show that a failed call changed nothing).
CREATE FUNCTION tests.bal(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s ledger_rows=%s',
                  COALESCE(a.subscription_credits_balance::text, '-'),
                  COALESCE(a.purchased_credits_balance::text, '-'),
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;
-- Results of calls, by label: r - 'transaction_id' is deterministic.
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);

SELECT billing.record_webhook_event('evt_001', 'invoice.paid', '00000000-0000-0000-0000-000000000061');
-- every later delivery of the same id is false, whatever its type or user
SELECT billing.record_webhook_event('evt_001', 'invoice.paid', '00000000-0000-0000-0000-000000000061');
SELECT billing.record_webhook_event('evt_001', 'invoice.paid');
SELECT billing.record_webhook_event('evt_001', 'customer.subscription.updated', '00000000-0000-0000-0000-000000000062');
-- other ids are independent; ids are case-sensitive; the user is optional
SELECT billing.record_webhook_event('evt_002', 'invoice.paid');
SELECT billing.record_webhook_event('EVT_001', 'invoice.paid');
SELECT billing.record_webhook_event('evt_002', 'invoice.paid');
-- what was recorded: the first delivery of each id
SELECT event_id, event_type, user_id FROM billing.webhook_events
 WHERE event_id IN ('evt_001', 'evt_002', 'EVT_001') ORDER BY event_id COLLATE "C";
SELECT count(*) FILTER (WHERE processed_at IS NULL) AS without_time FROM billing.webhook_events;

-- bad arguments: 22023, nothing recorded
SELECT tests.err($$SELECT billing.record_webhook_event(NULL, 'invoice.paid')$$);
SELECT tests.err($$SELECT billing.record_webhook_event('', 'invoice.paid')$$);
SELECT tests.err($$SELECT billing.record_webhook_event('evt_003', NULL)$$);
SELECT tests.err($$SELECT billing.record_webhook_event('evt_003', '')$$);
SELECT tests.err($$SELECT billing.record_webhook_event(repeat('e', 256), 'invoice.paid')$$);
SELECT count(*) AS recorded FROM billing.webhook_events WHERE event_id IN ('evt_003', '');
-- the longest accepted id
SELECT billing.record_webhook_event(repeat('e', 255), 'invoice.paid');
SELECT billing.record_webhook_event(repeat('e', 255), 'invoice.paid');

-- a failed (rolled back) delivery leaves the id unrecorded, so the retry is processed
SAVEPOINT delivery;
SELECT billing.record_webhook_event('evt_004', 'invoice.paid');
ROLLBACK TO SAVEPOINT delivery;
SELECT billing.record_webhook_event('evt_004', 'invoice.paid');

-- service-only: end users are refused (by privilege, and by the internal check)
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000061","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.record_webhook_event('evt_005', 'invoice.paid')$$);
SELECT tests.err($$SELECT count(*) FROM billing.webhook_events$$);
RESET ROLE;
SELECT tests.err($$SELECT billing.record_webhook_event('evt_005', 'invoice.paid')$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SET LOCAL ROLE service_role;
SELECT billing.record_webhook_event('evt_005', 'invoice.paid');
RESET ROLE;
SELECT count(*) AS recorded FROM billing.webhook_events WHERE event_id = 'evt_005';

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
