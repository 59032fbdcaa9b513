//! The approval requests of the control socket, served by the agent's
//! [`ApprovalStore`].

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::Request;
use crate::{
    approval::{Actor, ApprovalStore, GrantScope},
    conn::Caller,
};

/// Serves the approval requests of the control socket. The caller's
/// identity and groups come from `SO_PEERCRED` and the group database.
///
/// # Errors
/// The caller's mistake or lack of rights, for the caller.
pub fn handle(store: &ApprovalStore, caller: &Caller, req: Request) -> Result<Value, String> {
    let actor = Actor::from(caller);
    let now = OffsetDateTime::now_utc();
    match req {
        Request::ApprovalsList => Ok(Value::Array(store.list())),
        Request::Approve {
            id,
            reason,
            grant,
            for_secs,
        } => store.approve(
            &actor,
            &caller.groups(),
            &id,
            reason.as_deref(),
            grant.unwrap_or(GrantScope::Once),
            for_secs.map(Duration::from_secs),
            now,
        ),
        Request::Deny { id, reason } => {
            store.deny(&actor, &caller.groups(), &id, reason.as_deref())
        }
        Request::GrantsList => Ok(json!(store.grants(now))),
        Request::GrantRevoke { id } => store.revoke(&actor, &id),
        other => Err(format!("not an approval request: {other:?}")),
    }
}
