-- Grants and row security, after every object exists.

-- Nothing is executable by PUBLIC unless listed here; billing.apply_grants() then grants the
-- API to anon / authenticated / service_role where those roles exist (Supabase).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA billing FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing.current_user_id() TO PUBLIC;
GRANT USAGE ON SCHEMA billing TO PUBLIC;

-- End users may read (never write) their own rows; the plan catalog is public. SELECT is granted
-- by billing.apply_grants() (below) to the end-user roles and service_role, never to PUBLIC.

ALTER TABLE billing.plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.credit_transactions ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.credit_expiration_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.usage_event_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.clawbacks ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.webhook_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.credit_grants ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.credit_holds ENABLE ROW LEVEL SECURITY;

CREATE POLICY plans_read ON billing.plans FOR SELECT USING (true);
CREATE POLICY accounts_read_own ON billing.accounts FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY credit_transactions_read_own ON billing.credit_transactions FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY credit_expiration_events_read_own ON billing.credit_expiration_events FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY idempotency_keys_read_own ON billing.idempotency_keys FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY clawbacks_read_own ON billing.clawbacks FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY credit_grants_read_own ON billing.credit_grants FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY credit_holds_read_own ON billing.credit_holds FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
-- billing.webhook_events: no policy, so no end-user rows (service callers use the functions).

SELECT billing.apply_grants();
