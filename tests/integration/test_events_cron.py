"""The pg_cron + pg_net recipe of docs/recipes/events_webhook.sql (issue 15, 0.6.0): a job that
claims billing events for consumer 'webhook', sends each through public.event_webhook_send,
keeps the retry state in public.event_webhook_deliveries (attempts, next_attempt_at with
exponential backoff, last_error, gave_up_at), sends a user's events in id order, and
acknowledges in billing what was delivered (or given up).

pg_net is not installable here: the tests replace the sender with a stub (same signature) that
fails every event's first attempt with 'HTTP 503' and every attempt of a "poison" event; it
records what it received in public.webhook_stub_received. Before that, one run with the recipe's
own sender shows what it does without pg_net (a recorded failure, nothing lost).

pg_cron: the PyPI PostgreSQL 17 tree (PG=17) has no pg_cron, and the server scripts/test.sh
starts does not preload it, so test_recipe_job_directly runs the job function directly, run
after run, as pg_cron would, moving next_attempt_at to now between runs instead of waiting
(the backoff itself is checked from the stored times). test_recipe_scheduled_with_pg_cron
detects pg_cron: when the server has it in shared_preload_libraries and CREATE EXTENSION pg_cron
works in cron.database_name (e.g. Debian's postgresql-15-cron with
EXTRA_PG_CONF="shared_preload_libraries = 'pg_cron'"), it schedules the job with
cron.schedule_in_database for this database, checks that cron.job has it, waits until pg_cron's
runs delivered every event, and unschedules it; otherwise it prints why pg_cron is not loadable
and checks only that the recipe's schedule command runs as a plain statement."""
import time
import uuid
from pathlib import Path

import psycopg2

from pgb_testlib import REPO, connect, new_user, q

RECIPE = REPO / "docs" / "recipes" / "events_webhook.sql"
RUN_SIG = "public.event_webhook_run(text, text, integer, interval, interval, integer, interval, interval, interval)"

STUB = """
CREATE TABLE IF NOT EXISTS public.webhook_stub_received (n serial PRIMARY KEY, event_id bigint NOT NULL, attempt int NOT NULL,
                                                         user_id uuid NOT NULL, url text NOT NULL, body jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS public.webhook_stub_poison (event_id bigint PRIMARY KEY);
CREATE OR REPLACE FUNCTION public.event_webhook_send(p_url text, p_body jsonb) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN
    IF (p_body ->> 'attempt')::int = 1 THEN
        RAISE EXCEPTION 'HTTP 503 (stub: first attempt of event %)', p_body ->> 'id';
    END IF;
    IF EXISTS (SELECT 1 FROM public.webhook_stub_poison WHERE event_id = (p_body ->> 'id')::bigint) THEN
        RAISE EXCEPTION 'HTTP 500 (stub: poison event)';
    END IF;
    INSERT INTO public.webhook_stub_received (event_id, attempt, user_id, url, body)
    VALUES ((p_body ->> 'id')::bigint, (p_body ->> 'attempt')::int, (p_body ->> 'user_id')::uuid, p_url, p_body);
    RETURN NULL;
END
$f$;
"""


def script(conn, sql):
    """Run SQL text with several statements as it is (no parameters: % stays %)."""
    with conn.cursor() as cur:
        cur.execute(sql)


def install_recipe(conn):
    script(conn, RECIPE.read_text())
    # twice: the recipe is idempotent
    script(conn, RECIPE.read_text())


def drain(conn, consumer):
    """Claim and acknowledge everything earlier tests left, so the consumer sees only ours."""
    while True:
        rows = q(conn, "SELECT max(id), count(*) FROM billing.claim_events(%s, 10000)", (consumer,))
        if rows[0][1] == 0:
            return
        q(conn, "SELECT billing.ack_events(%s, %s)", (consumer, rows[0][0]))


def grant_voided(conn, u, n):
    """n grant.voided events for user u (a grant of 1, voided), one transaction each."""
    for _ in range(n):
        q(conn, "SELECT billing.void_grant((billing.grant_credits(%s, 1, 'promotional') ->> 'grant_id')::uuid, 'recipe test')", (u,))


def events_of(conn, users):
    return q(conn, "SELECT id, user_id FROM billing.events WHERE user_id = ANY(%s) ORDER BY id", (list(users),))


def run(conn, consumer, **kw):
    args = ", ".join(f"{k} => %s" for k in kw)
    sql = f"SELECT public.event_webhook_run(%s, %s{', ' if kw else ''}{args})"
    return q(conn, sql, ("https://hooks.example.test/billing", consumer, *kw.values()))[0][0]


def fast_forward(conn, consumer):
    """Time passes: every retry is due now."""
    q(conn, "UPDATE public.event_webhook_deliveries SET next_attempt_at = now() WHERE consumer = %s AND next_attempt_at > now()",
      (consumer,))


def state(conn, consumer):
    return {r[0]: r[1:] for r in q(conn, """
        SELECT event_id, attempts, delivered_at IS NOT NULL, gave_up_at IS NOT NULL, acked, last_error
          FROM public.event_webhook_deliveries WHERE consumer = %s ORDER BY event_id""", (consumer,))}


def gaps(conn, consumer):
    """Per open row that was attempted: the backoff its last failure chose, in seconds
    (next_attempt_at - last_attempt_at, both the failing run's now())."""
    return {r[0]: r[1] for r in q(conn, """
        SELECT event_id, round(extract(epoch FROM next_attempt_at - last_attempt_at))::int
          FROM public.event_webhook_deliveries
         WHERE consumer = %s AND delivered_at IS NULL AND gave_up_at IS NULL AND last_attempt_at IS NOT NULL""", (consumer,))}


def logged_run(conn, consumer, **kw):
    """One run of the job (one transaction, as pg_cron runs it)."""
    return run(conn, consumer, **kw)


def received(conn, users):
    return q(conn, "SELECT event_id, attempt, user_id FROM public.webhook_stub_received WHERE user_id = ANY(%s) ORDER BY n",
             (list(users),))


def billing_left(conn, consumer):
    """What billing would still hand this consumer (nothing claimed stays behind)."""
    return q(conn, "SELECT count(*) FROM billing.claim_events(%s, 10000, '1 second')", (consumer,))[0][0]


def cleanup(conn, consumer):
    q(conn, "DELETE FROM public.event_webhook_deliveries WHERE consumer = %s", (consumer,))
    q(conn, "DELETE FROM billing.event_cursors WHERE consumer = %s", (consumer,))
    q(conn, "DELETE FROM billing.event_consumers WHERE consumer = %s", (consumer,))


def test_recipe_installs_and_is_private():
    conn = connect()
    install_recipe(conn)
    assert q(conn, "SELECT to_regclass('public.event_webhook_deliveries') IS NOT NULL") == [(True,)]
    assert q(conn, "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.event_webhook_deliveries'::regclass") == [(True,)]
    for role in ("anon", "authenticated"):
        assert q(conn, f"SELECT has_function_privilege(%s, '{RUN_SIG}', 'EXECUTE'), "
                       "has_function_privilege(%s, 'public.event_webhook_send(text, jsonb)', 'EXECUTE'), "
                       "has_table_privilege(%s, 'public.event_webhook_deliveries', 'SELECT')",
                 (role, role, role)) == [(False, False, False)], role


def test_recipe_without_pg_net_records_the_failure():
    """The recipe's own sender without pg_net: the attempt fails with a sentence saying so, the
    event stays open for a retry and unacknowledged in billing."""
    conn = connect()
    install_recipe(conn)
    assert q(conn, "SELECT to_regnamespace('net') IS NULL") == [(True,)], "this test expects no pg_net"
    consumer = "webhook_nonet_" + uuid.uuid4().hex[:8]
    drain(conn, consumer)
    u = new_user()
    grant_voided(conn, u, 1)
    (eid, _), = events_of(conn, [u])
    r = run(conn, consumer, p_base_backoff="30 seconds")
    assert (r["claimed"], r["sent"], r["delivered"], r["failed"], r["acked"]) == (1, 1, 0, 1, 0), r
    (attempts, delivered, gave_up, acked, err), = [v for k, v in state(conn, consumer).items() if k == eid]
    assert (attempts, delivered, gave_up, acked) == (1, False, False, False)
    assert err.startswith("pg_net is not installed"), err
    cleanup(conn, consumer)


def test_recipe_job_directly():
    """The job run after run (pg_cron's part done by hand): first attempts fail, retries with
    backoff 10 s, 20 s, 25 s (capped), given up after 4 attempts; a user's events in id order,
    each received once; billing acknowledges a claim's events up to its first open one, and in
    the end everything; an event handed out again after a timed-out claim is not sent twice."""
    conn = connect()
    install_recipe(conn)
    script(conn, STUB)
    consumer = "webhook_test_" + uuid.uuid4().hex[:8]
    drain(conn, consumer)
    u1, u2, poison = new_user(), new_user(), new_user()
    grant_voided(conn, u1, 3)
    grant_voided(conn, u2, 2)
    grant_voided(conn, poison, 2)
    evs = events_of(conn, [u1, u2, poison])
    ids = {u: [i for i, uu in evs if uu == u] for u in (u1, u2, poison)}
    q(conn, "INSERT INTO public.webhook_stub_poison VALUES (%s)", (ids[poison][0],))
    params = dict(p_base_backoff="10 seconds", p_max_backoff="25 seconds", p_max_attempts=4)

    # run 1: claims all 7, the first event of each user fails (attempt 1), nothing acknowledged
    r = logged_run(conn, consumer, p_visibility_timeout="1 second", **params)
    assert (r["claimed"], r["sent"], r["delivered"], r["failed"], r["acked"], r["open"]) == (7, 3, 0, 3, 0, 7), r
    st = state(conn, consumer)
    assert set(st) == {i for i, _ in evs}
    firsts = {ids[u][0] for u in ids}
    for i, (attempts, delivered, gave_up, acked, err) in st.items():
        assert (attempts, delivered, gave_up, acked) == ((1 if i in firsts else 0), False, False, False), (i, st[i])
        assert (err or "").startswith("HTTP 503") == (i in firsts), (i, err)
    assert gaps(conn, consumer) == {i: 10 for i in firsts}
    claim1 = set(q(conn, "SELECT DISTINCT claim_id FROM public.event_webhook_deliveries WHERE consumer = %s", (consumer,)))
    assert len(claim1) == 1

    # run 2, 1.2 s later: nothing is due; the claim (1 s) timed out, so billing hands all 7 out
    # again: their rows keep their state and get the new claim id; nothing is sent twice
    time.sleep(1.2)
    r = logged_run(conn, consumer, **params)
    assert (r["claimed"], r["sent"], r["delivered"], r["failed"], r["acked"]) == (7, 0, 0, 0, 0), r
    claim2 = set(q(conn, "SELECT DISTINCT claim_id FROM public.event_webhook_deliveries WHERE consumer = %s", (consumer,)))
    assert len(claim2) == 1 and claim2 != claim1
    assert {i: v[0] for i, v in state(conn, consumer).items()} == {i: (1 if i in firsts else 0) for i in st}
    assert received(conn, [u1, u2, poison]) == []

    # run 3: u1's and u2's first events go through (attempt 2), their second ones fail once;
    # the poison user's first fails again (backoff 20 s); billing acknowledges u1's first only
    # (the claim's first open event is u1's second)
    fast_forward(conn, consumer)
    r = logged_run(conn, consumer, **params)
    assert (r["claimed"], r["sent"], r["delivered"], r["failed"]) == (0, 5, 2, 3), r
    assert received(conn, [u1, u2, poison]) == [(ids[u1][0], 2, u1), (ids[u2][0], 2, u2)]
    assert gaps(conn, consumer)[ids[poison][0]] == 20
    assert r["acked"] == sum(1 for i, _ in evs if i < min(ids[u1][1], ids[u2][1], ids[poison][0])), r

    # run 4: u1's second, u2's second; u1's third fails once; poison: 25 s (40 capped)
    fast_forward(conn, consumer)
    r = logged_run(conn, consumer, **params)
    assert (r["sent"], r["delivered"], r["failed"]) == (4, 2, 2), r
    assert gaps(conn, consumer)[ids[poison][0]] == 25

    # run 5: u1's third; the poison user's first is given up (4th attempt), so its second is
    # sent at once (and fails: first attempt)
    fast_forward(conn, consumer)
    r = logged_run(conn, consumer, **params)
    assert (r["sent"], r["delivered"], r["failed"], r["gave_up"]) == (3, 1, 2, 1), r
    st = state(conn, consumer)
    attempts, delivered, gave_up, acked, err = st[ids[poison][0]]
    assert (attempts, delivered, gave_up, acked) == (4, False, True, True), st[ids[poison][0]]
    assert err.startswith("HTTP 500"), err

    # run 6: the poison user's second; everything settled and acknowledged
    fast_forward(conn, consumer)
    r = logged_run(conn, consumer, **params)
    assert (r["sent"], r["delivered"], r["failed"], r["open"]) == (1, 1, 0, 0), r
    got = received(conn, [u1, u2, poison])
    assert sorted(i for i, _, _ in got) == sorted(i for i, _ in evs if i != ids[poison][0]), got
    assert all(a == 2 for _, a, _ in got), got
    for u in (u1, u2, poison):   # per user in id order
        mine = [i for i, _, uu in got if uu == u]
        assert mine == sorted(mine) == [i for i in ids[u] if i != ids[poison][0]], (u, mine)
    assert all(v[3] for v in state(conn, consumer).values()), state(conn, consumer)
    assert billing_left(conn, consumer) == 0
    acked = dict(q(conn, "SELECT user_id, acked_id FROM billing.event_cursors WHERE consumer = %s AND user_id = ANY(%s)",
                   (consumer, [u1, u2, poison])))
    assert acked == {u: ids[u][-1] for u in (u1, u2, poison)}, acked
    # the body the endpoint got
    body = q(conn, "SELECT body FROM public.webhook_stub_received WHERE event_id = %s", (ids[u2][0],))[0][0]
    assert (body["id"], body["type"], body["user_id"], body["attempt"], body["consumer"]) == \
        (ids[u2][0], "grant.voided", str(u2), 2, consumer), body
    assert body["payload"]["user_id"] == str(u2) and body["payload"]["voided_amount"] == 1, body
    # a run with nothing to do
    r = logged_run(conn, consumer, **params)
    assert (r["claimed"], r["sent"], r["acked"], r["open"]) == (0, 0, 0, 0), r
    cleanup(conn, consumer)


def pg_cron_status(conn):
    """(connection to cron.database_name with pg_cron created, None) or (None, why not)."""
    avail = q(conn, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_cron'")
    if not avail:
        return None, "pg_cron is not installed in this PostgreSQL tree (no pg_cron in pg_available_extensions)"
    preload = q(conn, "SHOW shared_preload_libraries")[0][0]
    if "pg_cron" not in preload:
        return None, f"pg_cron {avail[0][0]} is installed but not in shared_preload_libraries ({preload!r})"
    dbname = q(conn, "SELECT current_setting('cron.database_name', true)")[0][0] or "postgres"
    try:
        cconn = connect(dbname=dbname)
        q(cconn, "CREATE EXTENSION IF NOT EXISTS pg_cron")
    except psycopg2.Error as e:
        return None, f"CREATE EXTENSION pg_cron in {dbname} failed: {e.pgerror or e}"
    return cconn, None


def test_recipe_scheduled_with_pg_cron():
    """With pg_cron loadable: schedule the job every second in this database, check cron.job,
    wait until pg_cron's runs delivered the events (first attempts fail, backoff 1 s), unschedule.
    Without: say why, and run the scheduled command once as a plain statement."""
    conn = connect()
    install_recipe(conn)
    script(conn, STUB)
    consumer = "webhook_cron_" + uuid.uuid4().hex[:8]
    drain(conn, consumer)
    u = new_user()
    grant_voided(conn, u, 3)
    ids = [i for i, _ in events_of(conn, [u])]
    command = (f"SELECT public.event_webhook_run('https://hooks.example.test/billing', '{consumer}', "
               f"p_base_backoff => '1 second', p_max_backoff => '2 seconds')")
    cconn, why = pg_cron_status(conn)
    if cconn is None:
        print(f"\npg_cron not loadable here: {why}; the job function is run directly (test_recipe_job_directly)")
        r = q(conn, command)[0][0]
        assert (r["claimed"], r["sent"], r["failed"]) == (3, 1, 1), r
        cleanup(conn, consumer)
        return
    dbname = q(conn, "SELECT current_database()")[0][0]
    # pg_cron 1.5 schedules in seconds; 1.4 (Debian 12) by the minute. The three events of one
    # user go in order and each first attempt fails, so they need four runs: up to four minutes
    # and a bit by the minute (200 s was too short when the first run came late in a minute).
    version = q(cconn, "SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")[0][0]
    seconds = tuple(int(x) for x in version.split("-")[0].split(".")[:2]) >= (1, 5)
    schedule, wait = ("1 seconds", 60) if seconds else ("* * * * *", 330)
    job = q(cconn, "SELECT cron.schedule_in_database(%s, %s, %s, %s)", ("pgb-events-webhook-test", schedule, command, dbname))[0][0]
    try:
        assert q(cconn, "SELECT jobname, command, database, active FROM cron.job WHERE jobid = %s", (job,)) == \
            [("pgb-events-webhook-test", command, dbname, True)]
        deadline = time.time() + wait
        while time.time() < deadline:
            if [i for i, _, _ in received(conn, [u])] == ids:
                break
            time.sleep(0.5)
        assert [(i, a) for i, a, _ in received(conn, [u])] == [(i, 2) for i in ids], received(conn, [u])
        runs = q(cconn, "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed') "
                        "FROM cron.job_run_details WHERE jobid = %s", (job,))[0]
        assert runs[0] >= (4 if seconds else 2) and runs[1] == 0, runs
        print(f"\npg_cron {version}: job {job} ran {runs[0]} times ({schedule!r}), every event delivered once after a failed first attempt")
    finally:
        q(cconn, "SELECT cron.unschedule(%s)", (job,))
    time.sleep(1.5)   # a run in flight finishes
    assert billing_left(conn, consumer) == 0
    cleanup(conn, consumer)
