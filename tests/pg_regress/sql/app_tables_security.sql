-- The app's own tables are read with the caller's rights, never as the extension owner
-- (issue 10 item 4, issue 11 item 1).
-- 1. RLS and column grants decide what end users get from get_user_widgets_ordered (a private
--    column is not in data, a row RLS hides is not returned); service callers see everything.
-- 2. Attacks by a role with CREATE on public, each of which made it superuser on 0.2.0:
--    (a) a view public.widget_evil whose is_active calls the attacker's function;
--    (b) a plain table with an enum column and a cast (enum AS json) to the attacker's function;
--    (c) a registered resource table replaced by a view calling the attacker's function.
--    The attacker's function logs who ran it and tries ALTER ROLE ... SUPERUSER; the log shows
--    it never ran as a superuser and the attacker is still not a superuser.
-- 3. Registered tables are kept by oid, kind and owner; migrate_single_pool reads as the owner.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- The attacker (a role with CREATE on public and nothing else) exists before the transaction and
-- may log in: on a Citus cluster its CREATE FUNCTION and CREATE TYPE reach the workers over
-- connections opened as that role, which see only committed roles and grants.
CREATE ROLE apt_attacker LOGIN;
GRANT CREATE ON SCHEMA public TO apt_attacker;
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
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
GRANT EXECUTE ON FUNCTION tests.err(text) TO PUBLIC;

-- ===== 1. RLS and column privileges (issue 10 item 4) =====
-- An app table owned by the DBA (trusted): anon may read the public rows and only some columns;
-- authenticated (any signed-in user, in this app) every row and column.
CREATE TABLE public.widget_cards (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    label text, is_public boolean NOT NULL DEFAULT true, private_note text);
GRANT SELECT (id, user_id, position, is_active, created_at, updated_at, label) ON public.widget_cards TO anon;
GRANT SELECT ON public.widget_cards TO authenticated;
ALTER TABLE public.widget_cards ENABLE ROW LEVEL SECURITY;
CREATE POLICY cards_anon ON public.widget_cards FOR SELECT TO anon USING (is_public);
CREATE POLICY cards_signed_in ON public.widget_cards FOR SELECT TO authenticated USING (true);
INSERT INTO public.widget_cards (id, user_id, position, label, is_public, private_note) VALUES
    ('e0000000-0000-4000-8000-00000000a901', 'e0000000-0000-4000-8000-000000000901', 1, 'public card', true, 'note 1'),
    ('e0000000-0000-4000-8000-00000000a902', 'e0000000-0000-4000-8000-000000000901', 2, 'hidden by RLS', false, 'note 2');
-- anon: the row RLS hides is not returned; data has only the columns anon may SELECT
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT widget_type, position, data ->> 'label' AS label, data ? 'private_note' AS has_private_note,
       data ? 'is_public' AS has_is_public, (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(data) AS k) AS keys
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000901', 'cards') AS anon_count;
-- what a direct read under the same rights gives (the same)
SELECT count(*) AS direct_anon_rows FROM public.widget_cards;
RESET ROLE;
-- a privileged session sending anon's claims reads as anon too
SELECT count(*) AS anon_claims_rows, bool_or(data ? 'private_note') AS any_private_note
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- authenticated (RLS lets it see every row, every column granted)
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000901","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT position, data ->> 'label' AS label, data ->> 'private_note' AS private_note
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000901') AS next_position;
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- a service caller (no claims) reads as the table's owner: every row and column, as before
SELECT position, data ->> 'label' AS label, data ->> 'private_note' AS private_note, data ->> 'is_public' AS is_public
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000901', 'cards') AS service_count;
-- a widget table anon may not read at all is skipped for anon (not an error); counting it is 42501
REVOKE SELECT ON public.widget_cards FROM anon;
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT count(*) AS anon_rows_without_grant FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000901', 'cards')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
DROP TABLE public.widget_cards;

-- ===== the attacker's code =====
-- who ran the attacker's code, whether that role was a superuser, and whether ALTER ROLE worked
CREATE TABLE public.apt_log (n serial, attack text, who text, was_superuser boolean, alter_role text);
GRANT INSERT, SELECT ON public.apt_log TO PUBLIC;
GRANT USAGE ON SEQUENCE public.apt_log_n_seq TO PUBLIC;
SET LOCAL ROLE apt_attacker;
CREATE FUNCTION public.apt_evil(p_attack text) RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE outcome text := 'became superuser';
BEGIN
    BEGIN
        EXECUTE 'ALTER ROLE apt_attacker SUPERUSER';
    EXCEPTION WHEN OTHERS THEN
        outcome := 'refused: ' || SQLSTATE;
    END;
    INSERT INTO public.apt_log (attack, who, was_superuser, alter_role)
    VALUES (p_attack, current_user, (SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user), outcome);
    RETURN true;
END
$f$;
RESET ROLE;

-- ===== attack (a): a view public.widget_evil whose is_active calls the attacker's function =====
SET LOCAL ROLE apt_attacker;
CREATE VIEW public.widget_evil AS
    SELECT 'e0000000-0000-4000-8000-00000000e901'::uuid AS id, 'e0000000-0000-4000-8000-000000000901'::uuid AS user_id,
           1 AS position, public.apt_evil('a') AS is_active, now() AS created_at, now() AS updated_at;
GRANT SELECT ON public.widget_evil TO PUBLIC;
RESET ROLE;
-- an anonymous page view, and a service call: a view is never found by name
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT count(*) AS anon_widgets FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000901', 'evil')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT count(*) AS service_widgets FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901', false);
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000901') AS next_position;
-- not even when the DBA trusts the attacker's tables: only plain tables are found by name
SET LOCAL pg_billing.trusted_table_owners = 'apt_attacker';
SELECT count(*) AS service_widgets_trusting FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901', false);
RESET pg_billing.trusted_table_owners;
SELECT count(*) AS attack_a_runs FROM public.apt_log;
-- a DBA who registers the view explicitly: it is read as anon (end users) or as its owner
-- (service callers), so the attacker's function runs with those rights only
SELECT billing.register_widget_table('evilreg', 'public.widget_evil');
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT widget_type, position, is_active FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT widget_type, position, is_active FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000901', 'evilreg') AS service_count;
SELECT attack, who, was_superuser, alter_role FROM public.apt_log ORDER BY n;
SELECT rolsuper AS attacker_is_superuser FROM pg_roles WHERE rolname = 'apt_attacker';
-- pg_billing's own rights are back after each call
SELECT current_user = session_user AS user_restored;
-- the registered view is replaced (drop and re-create under the same name: another oid): refused
SET LOCAL ROLE apt_attacker;
DROP VIEW public.widget_evil;
CREATE VIEW public.widget_evil AS
    SELECT 'e0000000-0000-4000-8000-00000000e902'::uuid AS id, 'e0000000-0000-4000-8000-000000000901'::uuid AS user_id,
           2 AS position, public.apt_evil('a, re-created') AS is_active, now() AS created_at, now() AS updated_at;
GRANT SELECT ON public.widget_evil TO PUBLIC;
RESET ROLE;
SELECT tests.err($$SELECT * FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901')$$);
SELECT tests.err($$SELECT billing.count_user_widgets_by_type('e0000000-0000-4000-8000-000000000901', 'evilreg')$$);
SELECT count(*) AS recreated_view_runs FROM public.apt_log WHERE attack = 'a, re-created';
DELETE FROM billing.widget_tables WHERE widget_type = 'evilreg';
SET LOCAL ROLE apt_attacker;
DROP VIEW public.widget_evil;
RESET ROLE;

-- ===== attack (b): a plain table with an enum column and a cast (enum AS json) =====
SET LOCAL ROLE apt_attacker;
CREATE TYPE public.apt_mood AS ENUM ('happy', 'sad');
CREATE FUNCTION public.apt_mood_json(p public.apt_mood) RETURNS json LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM public.apt_evil('b');
    RETURN pg_catalog.to_json(p::text);
END
$f$;
CREATE CAST (public.apt_mood AS json) WITH FUNCTION public.apt_mood_json(public.apt_mood);
CREATE TABLE public.widget_moods (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    mood public.apt_mood);
INSERT INTO public.widget_moods (id, user_id, position, mood)
VALUES ('e0000000-0000-4000-8000-00000000b901', 'e0000000-0000-4000-8000-000000000901', 3, 'happy');
GRANT SELECT ON public.widget_moods TO PUBLIC;
RESET ROLE;
-- the attacker is not a trusted owner: the table is not a widget table, nothing of it runs
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT count(*) AS anon_widgets FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT count(*) AS service_widgets FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT count(*) AS attack_b_runs_untrusted FROM public.apt_log WHERE attack = 'b';
-- a DBA who trusts the attacker's tables: the cast runs, as anon for an end user and as the
-- attacker (the table's owner) for a service caller, never as a superuser. Next to it, a widget
-- table of the DBA's: a service caller reads each owner's tables as that owner and gets one list.
CREATE TABLE public.widget_plain (id uuid PRIMARY KEY, user_id uuid NOT NULL, position bigint NOT NULL,
    is_active boolean NOT NULL DEFAULT true, created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    amount numeric);
GRANT SELECT ON public.widget_plain TO anon;
INSERT INTO public.widget_plain (id, user_id, position, amount) VALUES
    ('e0000000-0000-4000-8000-00000000d901', 'e0000000-0000-4000-8000-000000000901', 1, 123456789012345678901234567890.000000001),
    ('e0000000-0000-4000-8000-00000000d902', 'e0000000-0000-4000-8000-000000000901', 3, 1);
SET LOCAL pg_billing.trusted_table_owners = 'someone_else, apt_attacker';
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT widget_type, position, data ->> 'mood' AS mood, data -> 'amount' AS amount
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT widget_type, position, data ->> 'mood' AS mood, data -> 'amount' AS amount
  FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT billing.get_next_widget_position('e0000000-0000-4000-8000-000000000901') AS next_position;
RESET pg_billing.trusted_table_owners;
SELECT attack, who, was_superuser, alter_role FROM public.apt_log WHERE attack = 'b' ORDER BY n;
SELECT rolsuper AS attacker_is_superuser FROM pg_roles WHERE rolname = 'apt_attacker';
-- only a superuser may trust owners
SET LOCAL ROLE apt_attacker;
SELECT tests.err($$SET pg_billing.trusted_table_owners = 'apt_attacker'$$);
RESET ROLE;
DROP TABLE public.widget_moods, public.widget_plain;

-- ===== attack (c): a registered resource table replaced by a view =====
SET LOCAL ROLE apt_attacker;
CREATE TABLE public.apt_things (id bigint, user_id uuid NOT NULL);
CREATE INDEX ON public.apt_things (user_id);
INSERT INTO public.apt_things VALUES (1, 'e0000000-0000-4000-8000-000000000901');
RESET ROLE;
SELECT billing.register_resource('apt_things', 'public.apt_things', 'user_id', 'agents');
SELECT resource_type, table_oid = 'public.apt_things'::regclass AS oid_kept, table_kind, table_owner
  FROM billing.resource_types WHERE resource_type = 'apt_things';
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000901","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT allowed, current_count, max_allowed FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000901', 'apt_things');
RESET ROLE;
-- the owner swaps the table for a view with the same name that calls its function
SET LOCAL ROLE apt_attacker;
DROP TABLE public.apt_things;
CREATE VIEW public.apt_things AS SELECT 1::bigint AS id, 'e0000000-0000-4000-8000-000000000901'::uuid AS user_id
                                  WHERE public.apt_evil('c');
GRANT SELECT ON public.apt_things TO PUBLIC;
RESET ROLE;
-- the end user's limit check (and the dashboard) refuse: the registered relation is gone
SET LOCAL ROLE authenticated;
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000901', 'apt_things')$$);
SELECT tests.err($$SELECT resources FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000901')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT count(*) AS attack_c_runs FROM public.apt_log WHERE attack = 'c';
SELECT rolsuper AS attacker_is_superuser FROM pg_roles WHERE rolname = 'apt_attacker';
-- registering the view is refused (resources are plain tables)
SELECT tests.err($$SELECT billing.register_resource('apt_things', 'public.apt_things', 'user_id', 'agents')$$);
-- the owner keeps a table but puts its function in a forced RLS policy: the count runs as the
-- owner, so the function runs with the owner's rights only
SET LOCAL ROLE apt_attacker;
DROP VIEW public.apt_things;
CREATE TABLE public.apt_things (id bigint, user_id uuid NOT NULL);
CREATE INDEX ON public.apt_things (user_id);
INSERT INTO public.apt_things VALUES (1, 'e0000000-0000-4000-8000-000000000901'), (2, 'e0000000-0000-4000-8000-000000000901');
ALTER TABLE public.apt_things ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY apt_things_all ON public.apt_things USING (public.apt_evil('c, policy'));
RESET ROLE;
SELECT billing.register_resource('apt_things', 'public.apt_things', 'user_id', 'agents');
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000901","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT allowed, current_count, max_allowed FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000901', 'apt_things');
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT DISTINCT attack, who, was_superuser, alter_role FROM public.apt_log WHERE attack LIKE 'c%' ORDER BY 1;
SELECT rolsuper AS attacker_is_superuser FROM pg_roles WHERE rolname = 'apt_attacker';
-- a change of owner also needs a new registration
ALTER TABLE public.apt_things OWNER TO CURRENT_USER;
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000901', 'apt_things')$$);
DELETE FROM billing.resource_types WHERE resource_type = 'apt_things';

-- ===== migrate_single_pool reads the legacy tables as their owner =====
SET LOCAL ROLE apt_attacker;
CREATE VIEW public.apt_legacy AS SELECT 'e0000000-0000-4000-8000-000000000902'::uuid AS id, 7 AS credits
                                  WHERE public.apt_evil('migrate');
RESET ROLE;
SELECT billing.migrate_single_pool('public.apt_legacy', 'id', 'credits') AS imported;
SELECT attack, who, was_superuser, alter_role FROM public.apt_log WHERE attack = 'migrate' ORDER BY n;
SELECT total_balance FROM billing.get_user_credits('e0000000-0000-4000-8000-000000000902');
SELECT rolsuper AS attacker_is_superuser FROM pg_roles WHERE rolname = 'apt_attacker';
SELECT count(*) AS ledger_problems FROM billing.verify_ledger();

-- ===== code run inside cannot leave settings behind =====
SET LOCAL ROLE apt_attacker;
CREATE FUNCTION public.apt_claims() RETURNS boolean LANGUAGE sql AS
    $f$SELECT pg_catalog.set_config('request.jwt.claims', '{"role":"service_role"}', true) IS NOT NULL$f$;
CREATE VIEW public.apt_sneaky AS SELECT 'e0000000-0000-4000-8000-00000000c901'::uuid AS id,
    'e0000000-0000-4000-8000-000000000901'::uuid AS user_id, 1 AS position, public.apt_claims() AS is_active,
    now() AS created_at, now() AS updated_at;
GRANT SELECT ON public.apt_sneaky TO PUBLIC;
RESET ROLE;
SELECT billing.register_widget_table('sneaky', 'public.apt_sneaky');
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT widget_type, is_active FROM billing.get_user_widgets_ordered('e0000000-0000-4000-8000-000000000901');
SELECT current_setting('request.jwt.claims') AS claims_after, current_user AS user_after;
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

ROLLBACK;
DROP OWNED BY apt_attacker;  -- its grant on public (a REVOKE does not reach the workers of a Citus cluster)
DROP ROLE apt_attacker;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
