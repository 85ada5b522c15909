//! Webhook idempotency (SPEC 10).

use pgrx::spi::{Spi, SpiClient};

use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, uuid_arg, TEXT, UUID};
use crate::validate;

const RECORD: &str = "
INSERT INTO billing.webhook_events (event_id, event_type, user_id) VALUES ($1, $2, $3)
ON CONFLICT (event_id) DO NOTHING RETURNING 1";

/// Record a provider event id; true the first time, false after (a concurrent duplicate waits
/// for the first to commit, then sees it).
pub fn record(c: &mut SpiClient<'_>, event_id: &str, event_type: &str, user: Option<&[u8; 16]>) -> BResult<bool> {
    let user_arg = match user {
        Some(u) => uuid_arg(u),
        None => pgrx::datum::DatumWithOid::null::<pgrx::Uuid>(),
    };
    let t = spi::write(c, RECORD, &[TEXT, TEXT, UUID], &[event_id.into(), event_type.into(), user_arg])?;
    Ok(!t.is_empty())
}

/// record_webhook_event(p_event_id, p_event_type, p_user_id)
fn record_webhook_event(a: &Args) -> BResult<Ret> {
    security::require_service("record_webhook_event")?;
    let id = a.text(0);
    let event_id = validate::required_key("p_event_id", id.as_deref())?;
    let ty = a.text(1);
    let event_type = validate::required_key("p_event_type", ty.as_deref())?;
    let user = a.uuid(2);
    Spi::connect_mut(|c| record(c, event_id, event_type, user.as_ref())).map(Ret::Bool)
}
crate::billing_fn!(pg_finfo_pgb_record_webhook_event, pgb_record_webhook_event, record_webhook_event);
