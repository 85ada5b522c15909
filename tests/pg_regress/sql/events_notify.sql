-- Events out (issue 15), wake-ups: with the GUC pg_billing.notify_events on, every event also
-- sends NOTIFY pg_billing_events with the event id as payload, delivered at commit; off (the
-- default) sends none; a rolled-back change sends none. This session LISTENs itself. psql prints
-- 'Asynchronous notification "pg_billing_events" with payload "<id>" received from server
-- process with PID <pid>.' after the statement whose commit delivered it; the PID and the id
-- change from run to run, so each part's output goes to a file (\o) that SQL then reads back
-- (pg_read_file), showing the PID as <pid> and the payload as the event it names.
-- Users 00000000-0000-0000-0000-0000001505xx. (tests/isolation/specs/events_notify.spec: another
-- session listening.)
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SELECT '/tmp/pg_billing_regress_notify_' || pg_backend_pid() || '.out' AS nfile \gset
\setenv NFILE :nfile
-- heard(): the lines psql wrote to the file, the PID masked and the payload shown as the event
-- it names (its rank among the user's events, its user and type; '?' when no such event exists)
CREATE FUNCTION tests.heard(p_file text) RETURNS TABLE (n int, line text) LANGUAGE plpgsql AS $f$
-- (the file's lines first, then each notification's event in statements of their own: Citus
-- plans no correlated subquery beside a set-returning function)
DECLARE r record; v_id bigint; v_user uuid; v_type text; v_rank bigint;
BEGIN
FOR r IN SELECT x.n::int AS n, x.line FROM regexp_split_to_table(pg_read_file(p_file), E'\n') WITH ORDINALITY AS x(line, n)
          WHERE x.line <> '' LOOP
    n := r.n; line := r.line;
    IF r.line LIKE 'Asynchronous notification%' THEN
        v_id := (regexp_match(r.line, 'payload "(\d+)"'))[1]::bigint;
        v_user := NULL; v_type := NULL;
        SELECT e.user_id, e.type INTO v_user, v_type FROM billing.events AS e WHERE e.id = v_id;
        SELECT count(*) INTO v_rank FROM billing.events AS e WHERE e.user_id = v_user AND e.id <= v_id;
        line := regexp_replace(regexp_replace(r.line, 'PID \d+', 'PID <pid>'), 'payload "\d+"',
                    'payload "<' || COALESCE('event #' || v_rank || ' of user ' || right(v_user::text, 3) || ': ' || v_type, '?') || '>"');
    END IF;
    RETURN NEXT;
END LOOP;
END
$f$;

SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150501', 100) ->> 'total_balance' AS total;
-- off by default
SHOW pg_billing.notify_events;
SELECT name, setting, vartype, context FROM pg_settings WHERE name = 'pg_billing.notify_events';
SELECT billing.set_balance_alert(50, '00000000-0000-0000-0000-000000150501', p_hysteresis => 0) ->> 'rearm_at' AS rearm_at;
LISTEN pg_billing_events;

-- ===== on: one notification per event, with its id, after the commit =====
SET pg_billing.notify_events = on;
\o :nfile
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150501', 60) ->> 'total_balance' AS total_40;
\o
SELECT * FROM tests.heard(:'nfile');
-- two events in one write: two notifications, in id order
\o :nfile
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150501', 20) ->> 'total_balance' AS total_60;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150501', 60) ->> 'total_balance' AS total_0;
\o
SELECT * FROM tests.heard(:'nfile');
SELECT count(*) AS events FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150501';

-- ===== in a transaction: nothing until the commit =====
\o :nfile
BEGIN;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150501', 50) ->> 'total_balance' AS total_50;
SELECT 'before commit' AS marker;
COMMIT;
SELECT 'after commit' AS marker;
\o
SELECT * FROM tests.heard(:'nfile');

-- ===== a rolled-back change: no notification, no event =====
\o :nfile
BEGIN;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150501', 50) ->> 'total_balance' AS total_0;
SELECT count(*) AS events_inside FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150501';
ROLLBACK;
SELECT 'after rollback' AS marker;
\o
SELECT * FROM tests.heard(:'nfile');
SELECT count(*) AS events FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150501';

-- ===== off: events, no notification =====
SET pg_billing.notify_events = off;
\o :nfile
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150501', 10) ->> 'total_balance' AS total_40;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150501', 20) ->> 'total_balance' AS total_60;
SELECT 'off' AS marker;
\o
SELECT * FROM tests.heard(:'nfile');
SELECT type FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150501' ORDER BY id DESC LIMIT 2;
-- on for one transaction only (SET LOCAL)
\o :nfile
BEGIN;
SET LOCAL pg_billing.notify_events = on;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150501', 20) ->> 'total_balance' AS total_40;
COMMIT;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150501', 20) ->> 'total_balance' AS total_60;
SELECT 'set local' AS marker;
\o
SELECT * FROM tests.heard(:'nfile');
SHOW pg_billing.notify_events;
UNLISTEN *;
\! rm -f "$NFILE"
SELECT billing.set_balance_alert(NULL, '00000000-0000-0000-0000-000000150501') ->> 'accounts' AS removed;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
