-- Recipe: post pg_billing's events (billing.events, issue 15) to an HTTPS endpoint, with retries
-- and exponential backoff, from inside the database: pg_cron runs the job, pg_net sends.
--
--   psql -f docs/recipes/events_webhook.sql          (idempotent: run it again to update)
--   SELECT cron.schedule('billing-events-webhook', '10 seconds',
--          $$SELECT public.event_webhook_run('https://example.com/hooks/billing')$$);
--   SELECT cron.schedule('billing-events-cleanup', '17 3 * * *', $$SELECT billing.cleanup_events('7 days')$$);
--
-- ('10 seconds' needs pg_cron 1.5 or later; '* * * * *', once a minute, works everywhere.)
--
-- How it works, one run of public.event_webhook_run (one transaction):
--   1. Answers: requests an earlier run queued with pg_net are looked up in net._http_response:
--      2xx = delivered; any other status, a pg_net error or no answer within p_response_timeout =
--      failed.
--   2. Claim: billing.claim_events(p_consumer, p_batch, p_visibility_timeout) hands out new
--      events; each gets a row in public.event_webhook_deliveries (the retry state). An event
--      handed out again (its claim timed out) keeps its row: it is never sent twice because of that.
--   3. Send: the due rows, per user in id order: a user's event waits while an earlier event of
--      that user is neither delivered nor given up. public.event_webhook_send(url, body) sends one:
--      it returns NULL when the event was delivered there and then, a pg_net request id when the
--      answer comes later (step 1 of a later run), or raises when it failed. A failure is retried
--      after p_base_backoff * 2^(attempts - 1), at most p_max_backoff; after p_max_attempts it is
--      given up (gave_up_at, last_error kept for an operator; the user's later events go on).
--   4. Acknowledge: billing.ack_events(p_consumer, up_to, claim_id) for each claim, up to just
--      below its first event that is neither delivered nor given up (ack_events acknowledges a
--      claim's events up to an id). Until then billing keeps that user's later events back, and
--      hands the unacknowledged ones out again after the visibility timeout (step 2 keeps their rows).
--   Delivered rows older than p_keep are deleted.
--
-- At least once: an event leaves billing only when a run acknowledges it after delivering it (or
-- giving up). pg_net queues its request in the run's transaction, so a run that fails sends
-- nothing. The receiver may see an event twice (a crash between an HTTP answer and the commit of
-- the run that reads it): the body's "id" is the event id; deduplicate on it.
-- The body: {"id", "type", "user_id", "created_at", "payload", "attempt", "consumer"}, JSON,
-- with the header X-Billing-Event-Id.
--
-- Without pg_net (or to sign requests, or to call an Edge Function with a key), replace
-- public.event_webhook_send with your own function of the same signature.
-- Supabase: the objects below live in schema public, which PostgREST exposes; this file revokes
-- them from anon and authenticated (Supabase's default privileges grant new functions and tables
-- in public to them), and the table has row security with no policy. The job runs as the role
-- that scheduled it (postgres on Supabase), which may call billing's service functions.

CREATE TABLE IF NOT EXISTS public.event_webhook_deliveries (
    consumer        text        NOT NULL,
    event_id        bigint      NOT NULL,
    user_id         uuid        NOT NULL,
    type            text        NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    claim_id        uuid,                                  -- the billing claim it came in
    attempts        integer     NOT NULL DEFAULT 0,
    last_attempt_at timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    request_id      bigint,                                -- a pg_net request awaiting its answer
    sent_at         timestamptz,
    delivered_at    timestamptz,
    gave_up_at      timestamptz,
    acked           boolean     NOT NULL DEFAULT false,    -- acknowledged in billing
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS event_webhook_deliveries_open
    ON public.event_webhook_deliveries (consumer, user_id, event_id) WHERE delivered_at IS NULL AND gave_up_at IS NULL;
ALTER TABLE public.event_webhook_deliveries ENABLE ROW LEVEL SECURITY;
COMMENT ON TABLE public.event_webhook_deliveries IS
'Retry state of the events webhook (docs/recipes/events_webhook.sql): one row per consumer and billing event.';

-- The sender: pg_net's net.http_post when the schema net exists.
CREATE OR REPLACE FUNCTION public.event_webhook_send(p_url text, p_body jsonb) RETURNS bigint
LANGUAGE plpgsql AS $f$
BEGIN
    IF pg_catalog.to_regnamespace('net') IS NULL THEN
        RAISE EXCEPTION 'pg_net is not installed: CREATE EXTENSION pg_net, or replace public.event_webhook_send(text, jsonb) with a sender of your own';
    END IF;
    RETURN net.http_post(url := p_url, body := p_body,
                         headers := pg_catalog.jsonb_build_object('Content-Type', 'application/json',
                                                                  'X-Billing-Event-Id', p_body ->> 'id'),
                         timeout_milliseconds := 5000);
END
$f$;
COMMENT ON FUNCTION public.event_webhook_send(text, jsonb) IS
'Sends one event: NULL = delivered now, a pg_net request id = answer pending, an exception = failed.';

CREATE OR REPLACE FUNCTION public.event_webhook_run(
    p_url                text,
    p_consumer           text     DEFAULT 'webhook',
    p_batch              integer  DEFAULT 100,
    p_base_backoff       interval DEFAULT '10 seconds',
    p_max_backoff        interval DEFAULT '1 hour',
    p_max_attempts       integer  DEFAULT 12,
    p_visibility_timeout interval DEFAULT '10 minutes',
    p_response_timeout   interval DEFAULT '2 minutes',
    p_keep               interval DEFAULT '7 days')
RETURNS jsonb LANGUAGE plpgsql AS $f$
DECLARE
    d record;
    c record;
    v_status integer;
    v_error text;
    v_rows integer;
    v_request bigint;
    v_up_to bigint;
    n_claimed integer := 0;
    n_sent integer := 0;
    n_delivered integer := 0;
    n_failed integer := 0;
    n_gave_up integer := 0;
    n_acked integer := 0;
    has_net boolean := pg_catalog.to_regclass('net._http_response') IS NOT NULL;
BEGIN
    -- One run at a time per consumer (pg_cron starts a run even when the last is still going).
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('public.event_webhook_run'), pg_catalog.hashtext(p_consumer)) THEN
        RETURN pg_catalog.jsonb_build_object('skipped', 'another run of consumer ' || p_consumer || ' is in progress');
    END IF;

    -- 1. Answers to the requests earlier runs queued with pg_net.
    IF has_net THEN
        FOR d IN SELECT * FROM public.event_webhook_deliveries AS x
                  WHERE x.consumer = p_consumer AND x.request_id IS NOT NULL AND x.delivered_at IS NULL AND x.gave_up_at IS NULL
                  ORDER BY x.event_id
        LOOP
            SELECT r.status_code, COALESCE(r.error_msg, CASE WHEN r.timed_out THEN 'timed out' END,
                                           'HTTP ' || r.status_code || ': ' || pg_catalog.left(COALESCE(r.content, ''), 200))
              INTO v_status, v_error
              FROM net._http_response AS r WHERE r.id = d.request_id;
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            IF v_rows = 1 AND v_status BETWEEN 200 AND 299 THEN
                UPDATE public.event_webhook_deliveries SET delivered_at = now(), last_error = NULL
                 WHERE consumer = d.consumer AND event_id = d.event_id;
                n_delivered := n_delivered + 1;
            ELSIF v_rows = 1 OR d.sent_at < now() - p_response_timeout THEN
                UPDATE public.event_webhook_deliveries
                   SET request_id = NULL,
                       last_error = CASE WHEN v_rows = 1 THEN v_error ELSE 'no answer within ' || p_response_timeout END,
                       next_attempt_at = now() + LEAST(p_max_backoff, p_base_backoff * pg_catalog.power(2, GREATEST(attempts - 1, 0))),
                       gave_up_at = CASE WHEN attempts >= p_max_attempts THEN now() END
                 WHERE consumer = d.consumer AND event_id = d.event_id;
                n_failed := n_failed + 1;
            END IF;
        END LOOP;
    END IF;

    -- 2. New events (and events handed out again after a timed-out claim).
    FOR c IN SELECT * FROM billing.claim_events(p_consumer, p_batch, p_visibility_timeout) LOOP
        INSERT INTO public.event_webhook_deliveries AS x (consumer, event_id, user_id, type, payload, created_at, claim_id)
        VALUES (p_consumer, c.id, c.user_id, c.type, c.payload, c.created_at, c.claim_id)
        ON CONFLICT (consumer, event_id) DO UPDATE SET claim_id = EXCLUDED.claim_id, acked = false;
        n_claimed := n_claimed + 1;
    END LOOP;

    -- 3. Send what is due: each time the earliest due event of a user with no earlier open event.
    LOOP
        EXIT WHEN n_sent >= p_batch;
        SELECT * INTO d FROM public.event_webhook_deliveries AS x
         WHERE x.consumer = p_consumer AND x.delivered_at IS NULL AND x.gave_up_at IS NULL
           AND x.request_id IS NULL AND x.next_attempt_at <= now()
           AND NOT EXISTS (SELECT 1 FROM public.event_webhook_deliveries AS y
                            WHERE y.consumer = x.consumer AND y.user_id = x.user_id AND y.event_id < x.event_id
                              AND y.delivered_at IS NULL AND y.gave_up_at IS NULL)
         ORDER BY x.event_id LIMIT 1;
        EXIT WHEN NOT FOUND;
        UPDATE public.event_webhook_deliveries SET attempts = attempts + 1, last_attempt_at = now()
         WHERE consumer = d.consumer AND event_id = d.event_id;
        n_sent := n_sent + 1;
        BEGIN
            v_request := public.event_webhook_send(p_url, pg_catalog.jsonb_build_object(
                'id', d.event_id, 'type', d.type, 'user_id', d.user_id, 'created_at', d.created_at,
                'payload', d.payload, 'attempt', d.attempts + 1, 'consumer', p_consumer));
            IF v_request IS NULL THEN
                UPDATE public.event_webhook_deliveries SET delivered_at = now(), last_error = NULL
                 WHERE consumer = d.consumer AND event_id = d.event_id;
                n_delivered := n_delivered + 1;
            ELSE
                UPDATE public.event_webhook_deliveries SET request_id = v_request, sent_at = now()
                 WHERE consumer = d.consumer AND event_id = d.event_id;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            UPDATE public.event_webhook_deliveries
               SET last_error = SQLERRM,
                   next_attempt_at = now() + LEAST(p_max_backoff, p_base_backoff * pg_catalog.power(2, attempts - 1)),
                   gave_up_at = CASE WHEN attempts >= p_max_attempts THEN now() END
             WHERE consumer = d.consumer AND event_id = d.event_id;
            n_failed := n_failed + 1;
        END;
    END LOOP;
    SELECT pg_catalog.count(*) INTO n_gave_up FROM public.event_webhook_deliveries
     WHERE consumer = p_consumer AND gave_up_at IS NOT NULL AND NOT acked;

    -- 4. Acknowledge, per claim, up to just below its first open event.
    FOR c IN SELECT x.claim_id,
                    COALESCE(pg_catalog.min(x.event_id) FILTER (WHERE x.delivered_at IS NULL AND x.gave_up_at IS NULL) - 1,
                             pg_catalog.max(x.event_id)) AS up_to
               FROM public.event_webhook_deliveries AS x
              WHERE x.consumer = p_consumer AND NOT x.acked AND x.claim_id IS NOT NULL
              GROUP BY x.claim_id
    LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM public.event_webhook_deliveries AS x
                                   WHERE x.consumer = p_consumer AND x.claim_id = c.claim_id AND NOT x.acked AND x.event_id <= c.up_to);
        n_acked := n_acked + billing.ack_events(p_consumer, c.up_to, c.claim_id);
        -- Marked even when billing acknowledged fewer (a claim that timed out): billing hands
        -- those out again, and step 2 clears the mark with the new claim id.
        UPDATE public.event_webhook_deliveries SET acked = true
         WHERE consumer = p_consumer AND claim_id = c.claim_id AND NOT acked AND event_id <= c.up_to;
    END LOOP;

    DELETE FROM public.event_webhook_deliveries
     WHERE consumer = p_consumer AND acked AND delivered_at < now() - p_keep;

    RETURN pg_catalog.jsonb_build_object('claimed', n_claimed, 'sent', n_sent, 'delivered', n_delivered,
                                         'failed', n_failed, 'gave_up', n_gave_up, 'acked', n_acked,
                                         'open', (SELECT pg_catalog.count(*) FROM public.event_webhook_deliveries AS x
                                                   WHERE x.consumer = p_consumer AND x.delivered_at IS NULL AND x.gave_up_at IS NULL));
END
$f$;
COMMENT ON FUNCTION public.event_webhook_run(text, text, integer, interval, interval, integer, interval, interval, interval) IS
'One run of the events webhook (docs/recipes/events_webhook.sql): answers, claim, send with backoff, acknowledge. Schedule it with pg_cron.';

-- Not for PostgREST's roles (Supabase grants them new objects in public by default).
DO $d$
DECLARE r text;
BEGIN
    REVOKE ALL ON TABLE public.event_webhook_deliveries FROM PUBLIC;
    REVOKE ALL ON FUNCTION public.event_webhook_send(text, jsonb) FROM PUBLIC;
    REVOKE ALL ON FUNCTION public.event_webhook_run(text, text, integer, interval, interval, integer, interval, interval, interval) FROM PUBLIC;
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE format('REVOKE ALL ON TABLE public.event_webhook_deliveries FROM %I', r);
            EXECUTE format('REVOKE ALL ON FUNCTION public.event_webhook_send(text, jsonb) FROM %I', r);
            EXECUTE format('REVOKE ALL ON FUNCTION public.event_webhook_run(text, text, integer, interval, interval, integer, interval, interval, interval) FROM %I', r);
        END IF;
    END LOOP;
END
$d$;
