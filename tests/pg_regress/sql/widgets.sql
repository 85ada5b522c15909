-- Widgets (SPEC 7): public.widget_<type> tables found without registration, a registered table
-- in another schema (register_widget_table), get_user_widgets_ordered (order: position, type,
-- id; data = the columns the reader may SELECT; active only by default), get_next_widget_position,
-- count_user_widgets_by_type, anon and owner visibility, a new widget table picked up in the
-- same session, errors and security.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
-- err(sql): 'SQLSTATE: message [hint]' instead of failing, so the file runs in one transaction.
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; hint text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(hint, '') || ']', ''),
                          '(?!e0000000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g');
END
$f$;
-- w(user, active_only): the widgets as one line each, without uuids and times
CREATE FUNCTION tests.w(p_user uuid, p_active_only boolean DEFAULT true)
RETURNS TABLE (n bigint, widget_type text, "position" integer, is_active boolean, label text, id_ok boolean, times_ok boolean)
LANGUAGE sql AS $f$
    SELECT row_number() OVER (), w.widget_type, w.position, w.is_active, w.data ->> 'label',
           w.id = (w.data ->> 'id')::uuid, w.created_at = (w.data ->> 'created_at')::timestamptz AND w.updated_at = (w.data ->> 'updated_at')::timestamptz
      FROM billing.get_user_widgets_ordered(p_user, p_active_only) AS w
$f$;
GRANT EXECUTE ON FUNCTION tests.err(text), tests.w(uuid, boolean) TO PUBLIC;

-- no widget tables yet (none in public, none registered): nothing, position 0, unknown type
SELECT count(*) FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');

-- ===== the app's widget tables in public: found without registration =====
CREATE TABLE public.widget_links (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL DEFAULT 0,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    label text, url text);
CREATE TABLE public.widget_gallery (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL DEFAULT 0,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    label text, images jsonb NOT NULL DEFAULT '[]');
CREATE TABLE public.widget_youtube (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL DEFAULT 0,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    label text, video_id text, autoplay boolean);
-- not widget tables: lacks columns / wrong name pattern
CREATE TABLE public.widget_broken (id uuid PRIMARY KEY, user_id uuid NOT NULL, label text);
CREATE TABLE public.widgetless_notes (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer, is_active boolean,
    created_at timestamptz, updated_at timestamptz);
-- what Supabase's default privileges give the API roles on public tables: end users read widget
-- tables with their own rights (issue 10 item 4), so they need SELECT like any PostgREST read
GRANT SELECT ON public.widget_links, public.widget_gallery, public.widget_youtube, public.widget_broken TO anon, authenticated;
-- user 401: positions with ties (same position: by type; same position and type: by id)
INSERT INTO public.widget_links (id, user_id, position, is_active, label, url) VALUES
    ('e0000000-0000-4000-8000-00000000a002', 'e0000000-0000-4000-8000-000000000401', 2, true,  'link b (pos 2)', 'https://b.example'),
    ('e0000000-0000-4000-8000-00000000a001', 'e0000000-0000-4000-8000-000000000401', 2, true,  'link a (pos 2)', 'https://a.example'),
    ('e0000000-0000-4000-8000-00000000a003', 'e0000000-0000-4000-8000-000000000401', 0, true,  'link c (pos 0)', 'https://c.example'),
    ('e0000000-0000-4000-8000-00000000a004', 'e0000000-0000-4000-8000-000000000401', 5, false, 'link d (pos 5, inactive)', 'https://d.example'),
    ('e0000000-0000-4000-8000-00000000a005', 'e0000000-0000-4000-8000-000000000402', 0, true,  'other user link', 'https://x.example');
INSERT INTO public.widget_gallery (id, user_id, position, is_active, label, images) VALUES
    ('e0000000-0000-4000-8000-00000000b001', 'e0000000-0000-4000-8000-000000000401', 2, true,  'gallery (pos 2)', '["1.png", "2.png"]'),
    ('e0000000-0000-4000-8000-00000000b002', 'e0000000-0000-4000-8000-000000000401', 7, false, 'gallery (pos 7, inactive)', '[]');
INSERT INTO public.widget_youtube (id, user_id, position, is_active, label, video_id, autoplay) VALUES
    ('e0000000-0000-4000-8000-00000000c001', 'e0000000-0000-4000-8000-000000000401', 1, true,  'youtube (pos 1)', 'dQw4w9WgXcQ', false),
    ('e0000000-0000-4000-8000-00000000c002', 'e0000000-0000-4000-8000-000000000401', 2, true,  'youtube (pos 2)', 'abc', NULL);
INSERT INTO public.widget_broken VALUES ('e0000000-0000-4000-8000-00000000d001', 'e0000000-0000-4000-8000-000000000401', 'broken');

-- active only (the default), ordered by position, type, id
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401');
-- p_active_only false (service caller): the inactive ones too
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401', false);
-- a service caller reads as the table's owner: data is the whole row, every column of the app's table
SELECT w.widget_type, w.data = to_jsonb(t) AS whole_row, w.data ->> 'label' AS label
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401', false) AS w
  JOIN public.widget_links AS t ON t.id = w.id ORDER BY t.id;
SELECT jsonb_object_keys(data) AS youtube_keys
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401') AS w
 WHERE w.id = 'e0000000-0000-4000-8000-00000000c001' ORDER BY 1;
SELECT data -> 'images' AS images FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401')
 WHERE widget_type = 'gallery';
-- created_at and updated_at come from the row
SELECT bool_and(created_at = now() AND updated_at = now()) AS times_ok
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401', false);
-- other users: their own widgets only; none at all
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000402', false);
SELECT count(*) FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000403', false);

-- ===== get_next_widget_position: max over all tables + 1, inactive included; 0 when none =====
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000402');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000403');

-- ===== count_user_widgets_by_type: active or not =====
SELECT t.ty, billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', t.ty)
  FROM unnest(ARRAY['links', 'gallery', 'youtube']) AS t(ty);
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000403', 'links');
-- unknown type (a table without the columns, a name that is not a table): 22023 listing the known ones
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'broken')$$);
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'notes')$$);
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', NULL)$$);
SELECT tests.err($$SELECT billing.count_user_widgets_by_type(NULL, 'links')$$);
SELECT tests.err($$SELECT * FROM billing.get_user_widgets_ordered(NULL)$$);
SELECT tests.err($$SELECT billing.get_next_widget_position(NULL)$$);

-- ===== a registered table in another schema =====
CREATE SCHEMA s5_app;
CREATE TABLE s5_app.promo_cards (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    label text, discount numeric);
GRANT USAGE ON SCHEMA s5_app TO anon, authenticated;
GRANT SELECT ON s5_app.promo_cards TO anon, authenticated;
INSERT INTO s5_app.promo_cards (id, user_id, position, label, discount) VALUES
    ('e0000000-0000-4000-8000-00000000e001', 'e0000000-0000-4000-8000-000000000401', 1, 'promo (pos 1)', 12.5),
    ('e0000000-0000-4000-8000-00000000e002', 'e0000000-0000-4000-8000-000000000401', 9, 'promo (pos 9)', 50);
-- not known before registration
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'promo')$$);
SELECT billing.register_widget_table('promo', 's5_app.promo_cards');
SELECT widget_type, schema_name, table_name FROM billing.widget_tables ORDER BY widget_type;
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401');
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'promo');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');
SELECT (data ->> 'discount')::numeric AS discount FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401')
 WHERE widget_type = 'promo' ORDER BY position;
-- a table missing widget columns (or with a wrong type): 22023 naming them
CREATE TABLE s5_app.bad_widgets (id uuid PRIMARY KEY, user_id text, position integer, created_at timestamptz);
SELECT tests.err($$SELECT billing.register_widget_table('bad', 's5_app.bad_widgets')$$);
-- a position that is not an integer (the function's own HINT asks for position integer): 22023,
-- otherwise every get_user_widgets_ordered call of that user fails on the cast later
CREATE TABLE s5_app.text_position_widgets (id uuid PRIMARY KEY, user_id uuid NOT NULL, position text,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
SELECT left(tests.err($$SELECT billing.register_widget_table('textpos', 's5_app.text_position_widgets')$$), 6) AS sqlstate;
-- bad type names and NULLs: 22023
SELECT tests.err($$SELECT billing.register_widget_table('Promo', 's5_app.promo_cards')$$);
SELECT tests.err($$SELECT billing.register_widget_table('promo cards', 's5_app.promo_cards')$$);
SELECT tests.err($$SELECT billing.register_widget_table(NULL, 's5_app.promo_cards')$$);
SELECT tests.err($$SELECT billing.register_widget_table('promo2', NULL)$$);
SELECT widget_type FROM billing.widget_tables ORDER BY widget_type;

-- ===== anon: active widgets of any user, even with p_active_only false =====
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401', false);
SELECT count(*) AS anon_default FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401');
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'links') AS links;
-- get_next_widget_position is not for anon
SELECT tests.err($$SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401')$$);
SELECT tests.err($$SELECT billing.register_widget_table('x', 'public.widget_links')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

-- ===== the owner (authenticated) sees inactive ones; another user only active ones =====
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000401","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401', false);
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000402","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT count(*) FILTER (WHERE is_active) AS active, count(*) FILTER (WHERE NOT is_active) AS inactive
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401', false);
-- get_next_widget_position on another user: 42501
SELECT tests.err($$SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401')$$);
-- register_widget_table is service-only
SELECT tests.err($$SELECT billing.register_widget_table('x', 'public.widget_links')$$);
RESET ROLE;
-- the internal check holds without the privilege check (claims say authenticated)
SELECT tests.err($$SELECT billing.register_widget_table('x', 'public.widget_links')$$);
SELECT count(*) FILTER (WHERE NOT is_active) AS inactive_seen
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000401', false);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

-- ===== a new widget table in the same session is picked up =====
CREATE TABLE public.widget_music (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    label text, track text);
GRANT SELECT ON public.widget_music TO anon, authenticated;
INSERT INTO public.widget_music (id, user_id, position, label, track) VALUES
    ('e0000000-0000-4000-8000-00000000f001', 'e0000000-0000-4000-8000-000000000401', 12, 'music (pos 12)', 'song.mp3');
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'music');
-- the broken table gets its columns: now it is a widget table too
ALTER TABLE public.widget_broken ADD COLUMN position integer NOT NULL DEFAULT 20, ADD COLUMN is_active boolean NOT NULL DEFAULT true,
    ADD COLUMN created_at timestamptz NOT NULL DEFAULT now(), ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'broken');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');
-- and a dropped one disappears
DROP TABLE public.widget_music;
DROP TABLE public.widget_broken;
SELECT * FROM tests.w('e0000000-0000-4000-8000-000000000401');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000401');
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000401', 'music')$$);

ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
