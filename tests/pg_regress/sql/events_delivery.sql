-- Events out (issue 15), delivery: billing.claim_events hands a consumer its events in id order
-- (per user in id order), at most p_limit; a user's events are in at most one claim of a consumer
-- at a time, until acknowledged or until the visibility timeout passes (then they are handed out
-- again with deliveries + 1); consumers are independent and a new one starts with every retained
-- event; billing.ack_events acknowledges claimed events up to an id (only a claim's, given its id);
-- billing.cleanup_events deletes old events every consumer acknowledged; argument errors.
-- Events are labelled by user and rank (A1 = user A's first event here), so the output does not
-- depend on the sequence. Users 00000000-0000-0000-0000-0000001504xx.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
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
CREATE TEMP TABLE who (user_id uuid PRIMARY KEY, name text NOT NULL);
INSERT INTO who VALUES ('00000000-0000-0000-0000-000000150401', 'A'), ('00000000-0000-0000-0000-000000150402', 'B'),
                       ('00000000-0000-0000-0000-000000150403', 'C'), ('00000000-0000-0000-0000-000000150404', 'D');
-- fire(name): one grant.voided event for that user (a grant of 1, voided); returns its label
CREATE TEMP TABLE lbl (id bigint PRIMARY KEY, label text NOT NULL UNIQUE);
CREATE FUNCTION tests.fire(p_name text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE v_user uuid := (SELECT user_id FROM pg_temp.who WHERE name = p_name); v_id bigint; v_label text;
BEGIN
    PERFORM billing.void_grant((billing.grant_credits(v_user, 1, 'promotional') ->> 'grant_id')::uuid, 'test');
    SELECT max(e.id) INTO v_id FROM billing.events AS e WHERE e.user_id = v_user AND e.type = 'grant.voided';
    v_label := p_name || (SELECT count(*) + 1 FROM pg_temp.lbl WHERE label LIKE p_name || '%');
    INSERT INTO pg_temp.lbl VALUES (v_id, v_label);
    RETURN v_label;
END
$f$;
-- l(id): the label of an event ('?' for an event of another test)
CREATE FUNCTION tests.l(p_id bigint) RETURNS text LANGUAGE sql AS $f$
    SELECT COALESCE((SELECT label FROM pg_temp.lbl WHERE id = p_id), '?')
$f$;
CREATE FUNCTION tests.id(p_label text) RETURNS bigint LANGUAGE sql AS $f$ SELECT id FROM pg_temp.lbl WHERE label = p_label $f$;
-- claim(consumer, limit, timeout): claims and returns the batch by label, in the order returned;
-- the claim ids are kept by number (claim 1, 2, ... in this file) in claims
CREATE TEMP TABLE claims (n serial, claim_id uuid UNIQUE);
CREATE TEMP TABLE batch (pos int, claim_id uuid, id bigint, user_id uuid, type text, payload jsonb, created_at timestamptz, deliveries int);
CREATE FUNCTION tests.claim(p_consumer text, p_limit int DEFAULT 100, p_timeout interval DEFAULT '30 seconds')
RETURNS TABLE (pos int, label text, claim int, deliveries int) LANGUAGE plpgsql AS $f$
BEGIN
    DELETE FROM pg_temp.batch;
    INSERT INTO pg_temp.batch
    SELECT row_number() OVER (), c.claim_id, c.id, c.user_id, c.type, c.payload, c.created_at, c.deliveries
      FROM billing.claim_events(p_consumer, p_limit, p_timeout) AS c;
    INSERT INTO pg_temp.claims (claim_id) SELECT DISTINCT b.claim_id FROM pg_temp.batch AS b ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT b.pos::int, tests.l(b.id), (SELECT c.n FROM pg_temp.claims AS c WHERE c.claim_id = b.claim_id), b.deliveries
                   FROM pg_temp.batch AS b ORDER BY b.pos;
END
$f$;
CREATE FUNCTION tests.claim_id(p_n int) RETURNS uuid LANGUAGE sql AS $f$ SELECT claim_id FROM pg_temp.claims WHERE n = p_n $f$;
-- cursors(): the cursors of consumers d1 and d2; this file's events (ids): billing rows read in a
-- statement of their own, then labeled on the coordinator (a label helper called inside a query on
-- a billing table would run on a Citus worker, which has no pg_temp.lbl)
CREATE FUNCTION tests.cursors() RETURNS TABLE (user_id uuid, consumer text, acked_id bigint, claim_id uuid) LANGUAGE plpgsql AS $f$
BEGIN
    RETURN QUERY SELECT c.user_id, c.consumer, c.acked_id, c.claim_id FROM billing.event_cursors AS c WHERE c.consumer IN ('d1', 'd2');
END $f$;
CREATE FUNCTION tests.event_ids() RETURNS SETOF bigint LANGUAGE plpgsql AS $f$
BEGIN
    RETURN QUERY SELECT e.id FROM billing.events AS e WHERE e.user_id IN (SELECT w.user_id FROM pg_temp.who AS w);
END $f$;
-- drain(consumer): claims and acknowledges until nothing is left (the events of earlier tests)
CREATE FUNCTION tests.drain(p_consumer text) RETURNS bigint LANGUAGE plpgsql AS $f$
DECLARE v_total bigint := 0; v_n bigint; v_max bigint;
BEGIN
    LOOP
        SELECT count(*), max(c.id) INTO v_n, v_max FROM billing.claim_events(p_consumer, 10000) AS c;
        EXIT WHEN v_n = 0;
        PERFORM billing.ack_events(p_consumer, v_max);
        v_total := v_total + v_n;
    END LOOP;
    RETURN v_total;
END
$f$;

-- ===== the columns a claim returns =====
SELECT p.proname, pg_get_function_result(p.oid) AS result
  FROM pg_proc AS p WHERE p.oid = 'billing.claim_events(text, integer, interval)'::regprocedure;
-- two consumers, d1 and d2, start with every retained event; drain what earlier tests wrote
SELECT tests.drain('d1') >= 0 AS d1_drained, tests.drain('d2') >= 0 AS d2_drained;
SELECT count(*) AS d1_left FROM billing.claim_events('d1');
SELECT consumer FROM billing.event_consumers WHERE consumer IN ('d1', 'd2') ORDER BY 1;

-- ===== order and limit =====
SELECT tests.fire('A'), tests.fire('B');
SELECT tests.fire('A');
SELECT tests.fire('C');
SELECT tests.fire('B');
SELECT tests.fire('A');
-- the first 4 in id order, in one claim, delivered once
SELECT * FROM tests.claim('d1', 4);
SELECT bool_and(b.user_id = e.user_id AND b.type = e.type AND b.payload = e.payload AND b.created_at = e.created_at) AS rows_as_stored,
       bool_and(b.type = 'grant.voided') AS all_voided
  FROM batch AS b JOIN billing.events AS e USING (id);
-- claimed again before the ack: A, B and C are in claim 1, so none of their events; D's are free
SELECT tests.fire('D');
SELECT * FROM tests.claim('d1', 100);
-- another consumer is independent: all of them, in id order
SELECT * FROM tests.claim('d2', 100);

-- ===== acknowledging =====
-- claim 1 up to A2: A1, B1, A2 (3); C1 stays claimed
SELECT billing.ack_events('d1', tests.id('A2'), tests.claim_id(1)) AS acked;
-- now B2 and A3 (their users' claimed events are all acknowledged); C is still in claim 1
SELECT * FROM tests.claim('d1', 100);
-- an id below every claimed event: 0; another claim's id: 0
SELECT billing.ack_events('d1', tests.id('A1')) AS acked_below;
SELECT billing.ack_events('d1', tests.id('A3'), gen_random_uuid()) AS acked_unknown_claim;
-- the claim id of another consumer's claim (d2's claim 3): 0
SELECT billing.ack_events('d1', tests.id('A3'), tests.claim_id(3)) AS acked_other_consumers_claim;
-- without a claim id: every claimed event up to the id (C1 of claim 1, D1 of claim 2, B2 and A3 of claim 4)
SELECT billing.ack_events('d1', tests.id('D1')) AS acked;
SELECT billing.ack_events('d1', tests.id('D1')) AS acked_again;
SELECT * FROM tests.claim('d1', 100);
-- d2 still has its claim (claim 3) open: nothing for it; acknowledge it all
SELECT * FROM tests.claim('d2', 100);
SELECT billing.ack_events('d2', (SELECT max(id) FROM lbl)) AS acked_d2;
SELECT * FROM tests.claim('d2', 100);
-- unknown consumer: P0002
SELECT tests.err($$SELECT billing.ack_events('no_such_consumer', 1)$$) AS unknown_consumer;
-- the cursors: acknowledged up to each user's last event, no open claim
SELECT w.name, c.consumer, tests.l(c.acked_id) AS acked, c.claim_id IS NULL AS no_claim
  FROM tests.cursors() AS c JOIN who AS w USING (user_id) ORDER BY 2, 1;

-- ===== per user in id order across claims; a user's later events wait for the earlier ones =====
SELECT tests.fire('C'), tests.fire('C'), tests.fire('C');
SELECT tests.fire('A');
SELECT * FROM tests.claim('d1', 2);
-- C4 waits until C2 and C3 are acknowledged; A4 is free
SELECT * FROM tests.claim('d1', 2);
SELECT billing.ack_events('d1', tests.id('C3')) AS acked;
SELECT * FROM tests.claim('d1', 2);
SELECT billing.ack_events('d1', (SELECT max(id) FROM lbl)) AS acked;

-- ===== the visibility timeout: unacknowledged events come back, deliveries + 1 =====
SELECT tests.fire('A'), tests.fire('B');
SELECT * FROM tests.claim('d1', 100, '1 second');
SELECT * FROM tests.claim('d1', 100, '1 second');
SELECT pg_sleep(1.3);
-- handed out again in a new claim
SELECT * FROM tests.claim('d1', 100, '1 second');
-- the first worker's late ack (its claim is gone) acknowledges nothing; the new claim's does
SELECT billing.ack_events('d1', tests.id('B3'), tests.claim_id(8)) AS late_ack;
SELECT billing.ack_events('d1', tests.id('B3'), tests.claim_id(9)) AS acked;
SELECT * FROM tests.claim('d1', 100, '1 second');
-- a partial ack: only the unacknowledged ones come back
SELECT tests.fire('A'), tests.fire('A');
SELECT * FROM tests.claim('d1', 100, '1 second');
SELECT billing.ack_events('d1', tests.id('A6')) AS acked;
SELECT pg_sleep(1.3);
SELECT * FROM tests.claim('d1', 100, '1 second');
-- again and again: deliveries counts every hand-out
SELECT pg_sleep(1.3);
SELECT * FROM tests.claim('d1', 100, '1 second');
SELECT billing.ack_events('d1', tests.id('A7')) AS acked;
SELECT * FROM tests.claim('d1', 100, '1 second');
-- an acknowledged event is never handed out again, even after the timeout
SELECT pg_sleep(1.3);
SELECT * FROM tests.claim('d1', 100, '1 second');
SELECT tests.drain('d2') AS d2_drained;

-- ===== argument errors =====
SELECT tests.err($$SELECT * FROM billing.claim_events('')$$) AS consumer_empty;
SELECT tests.err($$SELECT * FROM billing.claim_events('has space')$$) AS consumer_space;
SELECT tests.err($$SELECT * FROM billing.claim_events('semi;colon')$$) AS consumer_semicolon;
SELECT tests.err($$SELECT * FROM billing.claim_events('é')$$) AS consumer_non_ascii;
SELECT tests.err(format('SELECT * FROM billing.claim_events(%L)', repeat('x', 101))) AS consumer_101;
SELECT tests.err($$SELECT * FROM billing.claim_events(NULL)$$) AS consumer_null;
SELECT tests.err($$SELECT * FROM billing.claim_events('d1', 0)$$) AS limit_0;
SELECT tests.err($$SELECT * FROM billing.claim_events('d1', 10001)$$) AS limit_10001;
SELECT tests.err($$SELECT * FROM billing.claim_events('d1', NULL)$$) AS limit_null;
SELECT tests.err($$SELECT * FROM billing.claim_events('d1', 10, '0.5 seconds')$$) AS timeout_short;
SELECT tests.err($$SELECT * FROM billing.claim_events('d1', 10, '1 day 1 second')$$) AS timeout_long;
SELECT tests.err($$SELECT * FROM billing.claim_events('d1', 10, NULL)$$) AS timeout_null;
SELECT tests.err($$SELECT billing.ack_events('d1', NULL)$$) AS ack_null_id;
SELECT tests.err($$SELECT billing.ack_events(NULL, 1)$$) AS ack_null_consumer;
SELECT tests.err($$SELECT billing.cleanup_events('59 minutes')$$) AS cleanup_short;
SELECT tests.err($$SELECT billing.cleanup_events(NULL)$$) AS cleanup_null;
-- the bounds are allowed (and the failed calls created no consumer)
SELECT count(*) AS rows FROM billing.claim_events('a.b:c-d_9', 1, '1 second');
SELECT count(*) >= 15 AS all_retained FROM billing.claim_events(repeat('x', 100), 10000, '1 day');
SELECT billing.ack_events('a.b:c-d_9', (SELECT max(id) FROM billing.events)) >= 0 AS ok,
       billing.ack_events(repeat('x', 100), (SELECT max(id) FROM billing.events)) >= 0 AS ok100;
SELECT consumer FROM billing.event_consumers WHERE consumer NOT IN ('d1', 'd2') ORDER BY 1;

-- ===== a new consumer starts with every retained event =====
SELECT w.name, count(*) AS events, bool_and(c.deliveries = 1) AS first_delivery
  FROM billing.claim_events('late', 10000) AS c JOIN who AS w USING (user_id) GROUP BY 1 ORDER BY 1;
SELECT (SELECT count(*) FROM lbl) AS fired_here;
SELECT billing.ack_events('late', (SELECT max(id) FROM billing.events)) >= 12 AS late_acked;

-- ===== cleanup_events: old events that every consumer acknowledged =====
-- A8 is acknowledged by d1 and late, not yet by d2; the other consumers of this file drain it too
SELECT tests.fire('A');
SELECT tests.drain('d1') AS d1, tests.drain('late') AS late, tests.drain('a.b:c-d_9') >= 1 AS c3, tests.drain(repeat('x', 100)) AS c4;
-- none is older than 1 hour yet: nothing deleted
SELECT billing.cleanup_events('1 hour') AS deleted_young;
-- make this file's events two days old (an IMMUTABLE expression: Citus takes no STABLE function over a column in an UPDATE)
UPDATE billing.events SET created_at = (created_at AT TIME ZONE 'UTC' - interval '2 days') AT TIME ZONE 'UTC' WHERE user_id IN (SELECT user_id FROM who);
SELECT billing.cleanup_events('3 days') AS deleted_older_than_3_days;
-- every one of them but A8 (d2 has not acknowledged it)
SELECT billing.cleanup_events('1 day') = (SELECT count(*) - 1 FROM lbl) AS deleted_all_but_a8;
SELECT tests.l(e.id) AS left_over FROM tests.event_ids() AS e(id) ORDER BY e.id;
SELECT tests.drain('d2') AS d2;
SELECT billing.cleanup_events('1 day') AS deleted_a8;
SELECT count(*) AS left_over FROM billing.events WHERE user_id IN (SELECT user_id FROM who);
-- events after the cleanup are delivered as before
SELECT tests.fire('B');
SELECT * FROM tests.claim('d1', 100);
SELECT billing.ack_events('d1', tests.id('B4')) AS acked;
SELECT tests.drain('d2') AS d2, tests.drain('late') AS late;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
