-- Supabase's roles, so grants, RLS and PostgREST-style calls are tested as they run there:
-- anon, authenticated, service_role (BYPASSRLS) and the LOGIN role PostgREST connects as
-- (authenticator, NOINHERIT). Created when absent. Used by scripts/test.sh, scripts/stress.sh
-- and tests/pgb_testlib.py (ensure_roles).
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN CREATE ROLE service_role NOLOGIN BYPASSRLS; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticator') THEN
    CREATE ROLE authenticator LOGIN NOINHERIT;
    GRANT anon, authenticated, service_role TO authenticator;
  END IF;
END $$;
