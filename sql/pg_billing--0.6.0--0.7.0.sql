-- pg_billing 0.6.0 -> 0.7.0: the speed of a debit (issue 13) and Citus routing (issue 17).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.7.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.7.0'" to load this file. \quit

-- ---------------------------------------------------------------------------------------------
-- Events on a Citus cluster (issue 17, branch citus-events): claims and acks on a distributed
-- billing.events use no transaction-id horizon (src/api/events.rs, mod cluster), so
-- cleanup_events deletes what every consumer acknowledged without comparing horizons there.
-- (Unchanged on a single node.)
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION billing.cleanup_events(p_older_than interval DEFAULT '7 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_consumers text[];
    v_horizon pg_catalog.xid8;
    v_cluster boolean := false;
    n bigint;
BEGIN
    PERFORM billing.check_retention('cleanup_events', p_older_than, interval '1 hour', 'a consumer made after the cleanup does not see deleted events');
    v_cutoff := pg_catalog.now() - p_older_than;
    -- The consumers first (on Citus a reference table, which a correlated subquery of a
    -- statement on a distributed table may not read): an event goes when it is older than the
    -- cut-off and, for every consumer, the consumer's horizon is past its transaction and the
    -- consumer's cursor of its user has acknowledged it (with no consumer: every such event).
    SELECT pg_catalog.array_agg(k.consumer), pg_catalog.min(k.horizon) INTO v_consumers, v_horizon
      FROM billing.event_consumers AS k;
    -- On Citus (billing.events distributed) claims use no horizon (src/api/events.rs, mod
    -- cluster): an acknowledgement by every consumer is enough.
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        v_cluster := billing._citus_placed('events');
    END IF;
    DELETE FROM billing.events AS e
     WHERE e.created_at < v_cutoff
       AND (v_consumers IS NULL
            OR ((v_cluster OR e.tx < v_horizon)
                AND (SELECT pg_catalog.count(*) FROM billing.event_cursors AS c
                      WHERE c.user_id = e.user_id AND c.consumer = ANY (v_consumers) AND c.acked_id >= e.id)
                    = pg_catalog.cardinality(v_consumers)));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
