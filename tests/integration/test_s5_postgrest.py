"""S5/S2 through PostgREST-style calls (SPEC 5, 6, 7): widgets for anon, resource limits for the
owner and for another user, the API rate limit through the public wrapper, and exactness under
concurrency (8 threads calling check_api_rate_limit on a 50/h plan: exactly 50 allowed; 8 threads
recording usage: exact totals).

Every end-user call is made as PostgREST makes it: one transaction at READ COMMITTED,
set_config('role', ..., true), set_config('request.jwt.claims', ..., true), then the `public.`
wrapper created by billing.expose_rpc('public') with named arguments. The integration database
is shared with other modules: every table, plan and registry row made here has a unique name and
is removed at the end."""
import datetime
import threading
import uuid

import psycopg2

from pgb_testlib import claims, connect, expect_sqlstate, new_user, postgrest_call, q


def expose(conn):
    q(conn, "SELECT billing.expose_rpc('public')")


def suffix():
    return uuid.uuid4().hex[:10]


def widget_table_ddl(name, extra):
    return f"""CREATE TABLE public.{name} (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, position integer NOT NULL,
        is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(), {extra})"""


def test_widgets_anon_owner_and_other_user():
    conn = connect()
    expose(conn)
    s = suffix()
    links, gallery = f"widget_s5it{s}l", f"widget_s5it{s}g"
    ty_links, ty_gallery = links[len("widget_"):], gallery[len("widget_"):]
    owner, other = new_user(), new_user()
    try:
        q(conn, widget_table_ddl(links, "label text, url text"))
        q(conn, widget_table_ddl(gallery, "label text, images jsonb"))
        # end users read widget tables with their own rights (issue 10 item 4): grant what
        # Supabase's default privileges grant on public tables
        q(conn, f"GRANT SELECT ON public.{links}, public.{gallery} TO anon, authenticated")
        q(conn, f"""INSERT INTO public.{links} (user_id, position, is_active, label, url) VALUES
                     (%s, 2, true, 'l2', 'https://a'), (%s, 0, true, 'l0', 'https://b'), (%s, 5, false, 'l5-off', 'https://c')""",
          (owner, owner, owner))
        q(conn, f"""INSERT INTO public.{gallery} (user_id, position, is_active, label, images) VALUES
                     (%s, 1, true, 'g1', '["x.png"]'), (%s, 3, false, 'g3-off', '[]'), (%s, 0, true, 'other', '[]')""",
          (owner, owner, other))
        sql = ("SELECT widget_type, position, is_active, data ->> 'label' "
               "FROM public.get_user_widgets_ordered(p_user_id := %s, p_active_only := %s)")

        # anon (public link-in-bio page): active widgets only, even when asking for inactive ones
        for active_only in (True, False):
            rows = postgrest_call(conn, "anon", claims("anon"), sql, (owner, active_only))
            assert rows == [(ty_links, 0, True, "l0"), (ty_gallery, 1, True, "g1"), (ty_links, 2, True, "l2")], rows
        # count_user_widgets_by_type is anon too and counts active and inactive ones
        rows = postgrest_call(conn, "anon", claims("anon"),
                              "SELECT public.count_user_widgets_by_type(p_user_id := %s, p_widget_type := %s)",
                              (owner, ty_links))
        assert rows == [(3,)], rows
        # the owner sees the inactive ones too
        rows = postgrest_call(conn, "authenticated", claims("authenticated", owner), sql, (owner, False))
        assert [r[3] for r in rows] == ["l0", "g1", "l2", "g3-off", "l5-off"], rows
        rows = postgrest_call(conn, "authenticated", claims("authenticated", owner),
                              "SELECT public.get_next_widget_position(p_user_id := %s)", (owner,))
        assert rows == [(6,)], rows
        # another signed-in user: only the active ones; next position of someone else: 42501
        rows = postgrest_call(conn, "authenticated", claims("authenticated", other), sql, (owner, False))
        assert [r[3] for r in rows] == ["l0", "g1", "l2"], rows
        expect_sqlstate("42501", postgrest_call, conn, "authenticated", claims("authenticated", other),
                        "SELECT public.get_next_widget_position(p_user_id := %s)", (owner,))
        # anon may not ask for positions, nor register tables
        expect_sqlstate("42501", postgrest_call, conn, "anon", claims("anon"),
                        "SELECT public.get_next_widget_position(p_user_id := %s)", (owner,))
        # data is the whole row
        rows = postgrest_call(conn, "anon", claims("anon"),
                              "SELECT data FROM public.get_user_widgets_ordered(p_user_id := %s) WHERE data ->> 'label' = 'g1'",
                              (owner,))
        assert rows and rows[0][0]["images"] == ["x.png"] and rows[0][0]["user_id"] == str(owner), rows
    finally:
        q(conn, f"DROP TABLE IF EXISTS public.{links}, public.{gallery}")
        conn.close()


def test_check_resource_limit_own_and_other():
    conn = connect()
    expose(conn)
    s = suffix()
    table, rtype = f"s5it_agents_{s}", f"s5it_agents_{s}"
    me, other = new_user(), new_user()
    try:
        q(conn, f"CREATE TABLE public.{table} (id serial PRIMARY KEY, user_id uuid NOT NULL)")
        q(conn, f"CREATE INDEX ON public.{table} (user_id)")
        q(conn, "SELECT billing.register_resource(%s, %s::regclass, 'user_id', 'agents')", (rtype, f"public.{table}"))
        sql = "SELECT * FROM public.check_resource_limit(p_user_id := %s, p_resource_type := %s)"
        # free plan: 1 agent
        rows = postgrest_call(conn, "authenticated", claims("authenticated", me), sql, (me, rtype))
        assert rows == [(True, 0, 1, rtype)], rows
        q(conn, f"INSERT INTO public.{table} (user_id) VALUES (%s)", (me,))
        rows = postgrest_call(conn, "authenticated", claims("authenticated", me), sql, (me, rtype))
        assert rows == [(False, 1, 1, rtype)], rows
        # ultra: unlimited
        q(conn, "SELECT billing.upsert_subscription(%s, 'ultra', 'active', now(), now() + interval '30 days')", (me,))
        rows = postgrest_call(conn, "authenticated", claims("authenticated", me), sql, (me, rtype))
        assert rows == [(True, 1, -1, rtype)], rows
        # another user's id: 42501; anon: 42501; unknown type: 22023
        expect_sqlstate("42501", postgrest_call, conn, "authenticated", claims("authenticated", other), sql, (me, rtype))
        expect_sqlstate("42501", postgrest_call, conn, "anon", claims("anon"), sql, (me, rtype))
        expect_sqlstate("22023", postgrest_call, conn, "authenticated", claims("authenticated", me), sql,
                        (me, f"no_such_type_{s}"))
        # register_resource (service-only, not exposed) is refused for end users
        expect_sqlstate("42501", postgrest_call, conn, "authenticated", claims("authenticated", me),
                        "SELECT billing.register_resource(%s, %s::regclass)", (rtype + "x", f"public.{table}"))
    finally:
        q(conn, "DELETE FROM billing.resource_types WHERE resource_type = %s", (rtype,))
        q(conn, f"DROP TABLE IF EXISTS public.{table}")
        conn.close()


def next_utc_hour(now_utc):
    return now_utc.replace(minute=0, second=0, microsecond=0) + datetime.timedelta(hours=1)


def test_check_api_rate_limit_through_wrapper():
    conn = connect()
    expose(conn)
    me, other = new_user(), new_user()
    sql = "SELECT * FROM public.check_api_rate_limit(p_user_id := %s, p_endpoint := %s)"
    for attempt in range(2):
        hour = q(conn, "SELECT date_trunc('hour', now() AT TIME ZONE 'UTC')")[0][0]
        rows = [postgrest_call(conn, "authenticated", claims("authenticated", me), sql, (me, "/v1/snap"))[0]
                for _ in range(3)]
        if q(conn, "SELECT date_trunc('hour', now() AT TIME ZONE 'UTC')")[0][0] != hour:
            me = new_user()  # crossed an hour boundary: start again with a fresh user
            continue
        assert [(r[0], r[1], r[2]) for r in rows] == [(True, 50, 49), (True, 50, 48), (True, 50, 47)], rows
        reset_at = rows[0][3].astimezone(datetime.timezone.utc)
        assert reset_at == next_utc_hour(hour.replace(tzinfo=datetime.timezone.utc)), (reset_at, hour)
        counts = q(conn, "SELECT request_count, endpoint_counts FROM billing.api_usage WHERE user_id = %s", (me,))
        assert counts == [(3, {"/v1/snap": 3})], counts
        break
    # another user's id: 42501 and nothing counted for them; anon: 42501
    expect_sqlstate("42501", postgrest_call, conn, "authenticated", claims("authenticated", other), sql, (me, "/x"))
    expect_sqlstate("42501", postgrest_call, conn, "anon", claims("anon"), sql, (me, "/x"))
    assert q(conn, "SELECT sum(request_count) FROM billing.api_usage WHERE user_id = %s", (me,)) == [(3,)]
    conn.close()


def run_threads(n, target):
    errors = []

    def wrap(i):
        try:
            target(i)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(repr(e))

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors


def test_rate_limit_exact_under_concurrency():
    """8 threads x 20 calls on a plan with 50/h: exactly 50 allowed, remaining values 49..0 once each."""
    admin = connect()
    expose(admin)
    plan = f"test_s5it_rl50_{suffix()}"
    q(admin, "INSERT INTO billing.plans (plan_id, display_name, api_rate_limit_hourly) VALUES (%s, 'RL 50', 50)", (plan,))
    try:
        for attempt in range(2):
            user = new_user()
            q(admin, "SELECT billing.upsert_subscription(%s, %s, 'active', now(), now() + interval '30 days')", (user, plan))
            hour = q(admin, "SELECT date_trunc('hour', now() AT TIME ZONE 'UTC')")[0][0]
            results, lock = [], threading.Lock()
            barrier = threading.Barrier(8)

            def worker(i):
                c = connect()
                try:
                    barrier.wait()
                    for j in range(20):
                        r = postgrest_call(c, "authenticated", claims("authenticated", user),
                                           "SELECT allowed, limit_value, remaining FROM public.check_api_rate_limit("
                                           "p_user_id := %s, p_endpoint := %s)", (user, f"/t{i}"))
                        with lock:
                            results.append(r[0])
                finally:
                    c.close()

            run_threads(8, worker)
            if q(admin, "SELECT date_trunc('hour', now() AT TIME ZONE 'UTC')")[0][0] != hour:
                continue  # crossed an hour boundary: two buckets, try again with a fresh user
            assert len(results) == 160
            allowed = [r for r in results if r[0]]
            assert len(allowed) == 50, f"{len(allowed)} allowed, expected exactly 50"
            assert sorted(r[2] for r in allowed) == list(range(50)), sorted(r[2] for r in allowed)
            assert all(r[1] == 50 for r in results)
            assert all(r[2] == 0 for r in results if not r[0])
            rows = q(admin, "SELECT request_count, endpoint_counts FROM billing.api_usage WHERE user_id = %s", (user,))
            assert len(rows) == 1 and rows[0][0] == 50, rows
            assert sum(rows[0][1].values()) == 50, rows
            assert q(admin, "SELECT api_calls_count FROM billing.get_user_current_usage(%s)", (user,)) == [(50,)]
            break
        else:
            raise AssertionError("crossed an hour boundary twice")
    finally:
        q(admin, "DELETE FROM billing.subscriptions WHERE plan_id = %s", (plan,))
        q(admin, "DELETE FROM billing.plans WHERE plan_id = %s", (plan,))
        admin.close()


def test_usage_exact_under_concurrency():
    """8 threads each record 25 messages (tokens i+1 in, 2 out), a conversation and a document per
    5 messages, through the wrappers as service_role: the totals are exact."""
    admin = connect()
    expose(admin)
    user = new_user()
    barrier = threading.Barrier(8)

    def worker(i):
        c = connect()
        try:
            barrier.wait()
            for j in range(25):
                postgrest_call(c, "service_role", claims("service_role"),
                               "SELECT public.record_message_usage(p_user_id := %s, p_tokens_input := %s, p_tokens_output := %s)",
                               (user, i + 1, 2))
                if j % 5 == 0:
                    postgrest_call(c, "service_role", claims("service_role"),
                                   "SELECT public.record_conversation_usage(p_user_id := %s)", (user,))
                    postgrest_call(c, "service_role", claims("service_role"),
                                   "SELECT public.record_document_usage(p_user_id := %s, p_chunks := %s)", (user, 3))
        finally:
            c.close()

    run_threads(8, worker)
    rows = postgrest_call(admin, "authenticated", claims("authenticated", user),
                          "SELECT messages_count, conversations_count, tokens_input_count, tokens_output_count, "
                          "documents_processed_count, chunks_stored_count FROM public.get_user_current_usage(p_user_id := %s)",
                          (user,))
    expected = (200, 40, 25 * sum(range(1, 9)), 400, 40, 120)
    assert rows == [expected], (rows, expected)
    assert q(admin, "SELECT count(*) FROM billing.usage_metrics WHERE user_id = %s", (user,)) == [(1,)]
    # check_monthly_limit agrees (free plan: 100 messages) and an end user cannot record usage
    rows = postgrest_call(admin, "authenticated", claims("authenticated", user),
                          "SELECT * FROM public.check_monthly_limit(p_user_id := %s, p_metric := %s)", (user, "messages"))
    assert rows == [(False, 200, 100, "messages")], rows
    expect_sqlstate("42501", postgrest_call, admin, "authenticated", claims("authenticated", user),
                    "SELECT public.record_message_usage(p_user_id := %s, p_tokens_input := 1, p_tokens_output := 1)", (user,))
    admin.close()


def test_service_only_functions_refused_for_authenticated():
    conn = connect()
    expose(conn)
    me = new_user()
    cl = claims("authenticated", me)
    calls = [
        ("SELECT public.upsert_subscription(p_user_id := %s, p_plan_id := 'ultra', p_status := 'active')", (me,)),
        ("SELECT public.process_expired_subscriptions()", ()),
        ("SELECT public.record_conversation_usage(p_user_id := %s)", (me,)),
        ("SELECT public.record_document_usage(p_user_id := %s, p_chunks := 1)", (me,)),
        ("SELECT public.cleanup_api_usage()", ()),
        ("SELECT public.reset_monthly_usage()", ()),
    ]
    for sql, params in calls:
        expect_sqlstate("42501", postgrest_call, conn, "authenticated", cl, sql, params)
    assert q(conn, "SELECT count(*) FROM billing.subscriptions WHERE user_id = %s", (me,)) == [(0,)]
    # reads of the own plan work
    rows = postgrest_call(conn, "authenticated", cl, "SELECT public.get_effective_plan(p_user_id := %s)", (me,))
    assert rows == [("free",)], rows
    conn.close()
