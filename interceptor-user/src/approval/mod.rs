//! Approvals: statements a rule holds (`decision: approve`) wait here for
//! people. One store per agent, shared by all workers: a pending approval
//! per held statement, the standing grants, deadlines and escalation.
//!
//! A waiting session holds a [`Ticket`]; the store wakes it through a
//! oneshot channel with the [`Resolution`]. Dropping the ticket (the client
//! left, the connection was killed) withdraws the approval. Only `approve`
//! verdicts touch the store; the allow path never does.

pub mod grants;
pub mod notify;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::oneshot;

pub use grants::{Actor, Grant, GrantScope, WorkloadKey};
use notify::{Message, Notifier};

use crate::{
    audit::{AuditEvent, AuditLog, format_ts},
    conn::{ConnInfo, truncate},
    policy::{ApprovalSpec, OnTimeout},
};

/// Largest statement text kept for approvers to read.
const MAX_SHOWN_QUERY: usize = 64 * 1024;
/// Grant length when the approver names none.
pub const DEFAULT_GRANT: Duration = Duration::from_secs(3600);

/// How a held statement ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Approved,
    /// Denied by an approver, timed out, or withdrawn: the text says which.
    Denied {
        reason: String,
    },
}

/// A statement to hold.
pub struct NewApproval<'a> {
    pub info: &'a ConnInfo,
    pub decision_id: &'a str,
    pub db_user: &'a str,
    pub database: &'a str,
    pub query: &'a str,
    /// The statement as the audit log may keep it (truncated; literals
    /// replaced when the policy redacts them): for audit events, grants
    /// and, when `redacted`, webhooks.
    pub logged_query: &'a str,
    pub redacted: bool,
    pub fingerprint: &'a str,
    pub rule: Option<&'a str>,
    pub spec: Arc<ApprovalSpec>,
}

/// One approver's yes.
#[derive(Clone, Debug)]
struct Vote {
    actor: Actor,
    grant: GrantScope,
    grant_for: Duration,
    reason: Option<String>,
}

struct Pending {
    id: String,
    decision_id: String,
    info: ConnInfo,
    workload: WorkloadKey,
    db_user: String,
    database: String,
    query: String,
    logged_query: String,
    redacted: bool,
    fingerprint: String,
    rule: Option<String>,
    spec: Arc<ApprovalSpec>,
    requested_at: OffsetDateTime,
    expires_at: OffsetDateTime,
    escalated: bool,
    votes: Vec<Vote>,
    tx: Option<oneshot::Sender<Resolution>>,
}

impl Pending {
    /// Groups whose members may decide it now.
    fn approver_groups(&self) -> Vec<String> {
        let mut g = self.spec.approvers.clone();
        if self.escalated {
            g.extend(self.spec.escalate_to.iter().flatten().cloned());
        }
        g
    }

    fn view(&self) -> Value {
        json!({
            "id": self.id,
            "decision_id": self.decision_id,
            "conn": self.info.id,
            "identity": &*self.info.identity,
            "target": self.info.target.name,
            "db_user": self.db_user,
            "database": self.database,
            "query": self.query,
            "fingerprint": self.fingerprint,
            "rule": self.rule,
            "approvers": self.approver_groups(),
            "required": self.spec.required(),
            "approved_by": self.votes.iter().map(|v| &v.actor).collect::<Vec<_>>(),
            "escalated": self.escalated,
            "requested_at": format_ts(self.requested_at),
            "expires_at": format_ts(self.expires_at),
        })
    }

    /// What webhooks get: the statement redacted when the audit log's is.
    fn notify_view(&self) -> Value {
        let mut v = self.view();
        if self.redacted {
            v["query"] = Value::String(self.logged_query.clone());
        }
        v
    }

    fn event(&self, name: &'static str) -> AuditEvent {
        self.info
            .event(name)
            .with("approval_id", &self.id)
            .with("decision_id", &self.decision_id)
            .with("rule", &self.rule)
            .with("query", &self.logged_query)
            .with("fingerprint", &self.fingerprint)
            .with("db_user", &self.db_user)
            .with("database", &self.database)
    }

    fn resolve(&mut self, r: Resolution) {
        if let Some(tx) = self.tx.take() {
            // The session may be gone already; nothing to wake then.
            let _ = tx.send(r);
        }
    }
}

struct Inner {
    pending: BTreeMap<String, Pending>,
    grants: Vec<Grant>,
}

/// Every pending approval and grant of the agent.
pub struct ApprovalStore {
    inner: Mutex<Inner>,
    audit: AuditLog,
    notifier: Notifier,
    grants_path: Option<PathBuf>,
    boot_id: String,
    next: AtomicU64,
}

/// A held statement's claim on its approval; dropping it withdraws it.
pub struct Ticket {
    store: Arc<ApprovalStore>,
    pub id: String,
    rx: oneshot::Receiver<Resolution>,
    done: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl Ticket {
    /// Waits for the decision (cancel-safe: dropping the future keeps the
    /// ticket, dropping the ticket withdraws).
    pub async fn wait(&mut self) -> Resolution {
        let r = (&mut self.rx).await.unwrap_or_else(|_| Resolution::Denied {
            reason: "the approval was withdrawn".into(),
        });
        self.done = true;
        r
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.store.withdraw(&self.id);
        }
    }
}

impl ApprovalStore {
    /// A store; with `grants_path`, grants are loaded from and saved to it.
    #[must_use]
    pub fn new(audit: AuditLog, grants_path: Option<PathBuf>, boot_id: &str) -> Self {
        let now = unix_ms(OffsetDateTime::now_utc());
        let grants = match &grants_path {
            Some(p) => grants::load(p, now).unwrap_or_else(|e| {
                // Starting with no grants only asks people again: the safe side.
                tracing::error!("grants not loaded, starting without any: {e}");
                audit.record(AuditEvent::new("grants_load_failed").with("error", e.to_string()));
                Vec::new()
            }),
            None => Vec::new(),
        };
        Self {
            inner: Mutex::new(Inner {
                pending: BTreeMap::new(),
                grants,
            }),
            notifier: Notifier::new(audit.clone()),
            audit,
            grants_path,
            boot_id: boot_id.to_owned(),
            next: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(
        &self,
        p: &Pending,
        event: &'static str,
        actor: Option<&Actor>,
        reason: Option<&str>,
    ) {
        let Some(specs) = p.spec.notify.as_deref().filter(|s| !s.is_empty()) else {
            return;
        };
        let message = Message {
            event,
            approval: p.notify_view(),
            actor: actor.map(|a| json!(a)),
            reason: reason.map(str::to_owned),
        };
        self.notifier.send(specs, &message);
    }

    /// A grant in force for this statement, if any: audited as `grant_used`
    /// and returned by id.
    pub fn use_grant(
        &self,
        info: &ConnInfo,
        decision_id: &str,
        rule: Option<&str>,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> Option<String> {
        let key = WorkloadKey::of(&info.identity);
        let mut inner = self.lock();
        let now_ms = unix_ms(now);
        let g = inner
            .grants
            .iter_mut()
            .find(|g| g.covers(&key, &info.target.name, rule, fingerprint, now_ms))?;
        g.uses += 1;
        self.audit.record(
            info.event("grant_used")
                .with("grant_id", &g.id)
                .with("scope", g.scope)
                .with("decision_id", decision_id)
                .with("rule", rule)
                .with("fingerprint", fingerprint)
                .with("approval_id", &g.approval_id)
                .with("expires_at", &g.expires_at),
        );
        Some(g.id.clone())
    }

    /// Holds a statement: records, audits and announces it.
    #[must_use]
    pub fn request(self: &Arc<Self>, a: &NewApproval<'_>, now: OffsetDateTime) -> Ticket {
        let id = format!(
            "{}-{}",
            self.boot_id,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        let p = Pending {
            id: id.clone(),
            decision_id: a.decision_id.to_owned(),
            info: a.info.clone(),
            workload: WorkloadKey::of(&a.info.identity),
            db_user: a.db_user.to_owned(),
            database: a.database.to_owned(),
            query: truncate(a.query, MAX_SHOWN_QUERY).to_owned(),
            logged_query: a.logged_query.to_owned(),
            redacted: a.redacted,
            fingerprint: a.fingerprint.to_owned(),
            rule: a.rule.map(str::to_owned),
            requested_at: now,
            expires_at: now + a.spec.timeout(),
            spec: Arc::clone(&a.spec),
            escalated: false,
            votes: Vec::new(),
            tx: Some(tx),
        };
        self.audit.record(
            p.event("approval_requested")
                .with("approvers", p.approver_groups())
                .with("required", p.spec.required())
                .with("requested_at", format_ts(p.requested_at))
                .with("expires_at", format_ts(p.expires_at)),
        );
        self.notify(&p, "approval_requested", None, None);
        self.lock().pending.insert(id.clone(), p);
        Ticket {
            store: Arc::clone(self),
            id,
            rx,
            done: false,
        }
    }

    /// Removes a pending approval whose statement nobody waits for any more.
    fn withdraw(&self, id: &str) {
        let Some(mut p) = self.lock().pending.remove(id) else {
            return;
        };
        p.tx = None;
        self.audit.record(p.event("approval_withdrawn").with(
            "reason",
            "the client connection ended while the statement waited",
        ));
        self.notify(&p, "approval_withdrawn", None, None);
    }

    /// The pending approvals, oldest first.
    #[must_use]
    pub fn list(&self) -> Vec<Value> {
        let inner = self.lock();
        let mut v: Vec<_> = inner.pending.values().collect();
        v.sort_by_key(|p| (p.requested_at, p.id.clone()));
        v.into_iter().map(Pending::view).collect()
    }

    /// Checks that `actor` (member of `groups`) may decide `p`.
    fn may_decide(
        p: &Pending,
        actor: &Actor,
        groups: &[String],
        approving: bool,
    ) -> Result<(), String> {
        if approving && actor.uid == p.info.identity.uid {
            return Err(format!(
                "uid {} opened the connection that sent this statement: a workload can never approve its own statement",
                actor.uid
            ));
        }
        let allowed = p.approver_groups();
        if !groups.iter().any(|g| allowed.contains(g)) {
            return Err(format!(
                "{} is in none of the approver groups {allowed:?}",
                who(actor)
            ));
        }
        Ok(())
    }

    /// Records `actor`'s approval; once `required` distinct approvers said
    /// yes, the statement runs (and a grant is made when every approver
    /// asked for one: the narrowest scope and the shortest time).
    ///
    /// # Errors
    /// No such approval, or `actor` may not approve it.
    #[allow(clippy::too_many_arguments)]
    pub fn approve(
        &self,
        actor: &Actor,
        groups: &[String],
        id: &str,
        reason: Option<&str>,
        grant: GrantScope,
        grant_for: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<Value, String> {
        let mut inner = self.lock();
        let Some(p) = inner.pending.get_mut(id) else {
            return Err(format!("no pending approval {id:?}"));
        };
        if let Err(e) = Self::may_decide(p, actor, groups, true) {
            self.audit.record(
                p.event("approval_refused")
                    .with("actor", actor)
                    .with("error", &e),
            );
            return Err(e);
        }
        if p.votes.iter().any(|v| v.actor.uid == actor.uid) {
            return Err(format!(
                "{} already approved {id}; it needs {} distinct approvers",
                who(actor),
                p.spec.required()
            ));
        }
        p.votes.push(Vote {
            actor: actor.clone(),
            grant,
            grant_for: grant_for.unwrap_or(DEFAULT_GRANT),
            reason: reason.map(str::to_owned),
        });
        let have = p.votes.len();
        let need = p.spec.required() as usize;
        if have < need {
            self.audit.record(
                p.event("approval_recorded")
                    .with("actor", actor)
                    .with("reason", reason)
                    .with("approvals", have)
                    .with("required", need),
            );
            return Ok(json!({"id": id, "state": "pending", "approvals": have, "required": need}));
        }
        let Some(mut p) = inner.pending.remove(id) else {
            return Err(format!("no pending approval {id:?}"));
        };
        let made = self.make_grant(&p, now);
        if let Some(g) = &made {
            inner.grants.push(g.clone());
            self.persist(&inner.grants);
        }
        drop(inner);
        p.resolve(Resolution::Approved);
        self.audit.record(
            p.event("approval_granted")
                .with("actor", actor)
                .with(
                    "approved_by",
                    p.votes.iter().map(|v| &v.actor).collect::<Vec<_>>(),
                )
                .with("reason", reason)
                .with(
                    "grant",
                    made.as_ref()
                        .map(|g| json!({"id": g.id, "scope": g.scope, "expires_at": g.expires_at})),
                ),
        );
        self.notify(&p, "approval_granted", Some(actor), reason);
        Ok(json!({
            "id": id,
            "state": "approved",
            "grant": made.map(|g| json!(g)),
        }))
    }

    fn make_grant(&self, p: &Pending, now: OffsetDateTime) -> Option<Grant> {
        let scope = p.votes.iter().map(|v| v.grant).min()?;
        if scope == GrantScope::Once {
            return None;
        }
        let length = p.votes.iter().map(|v| v.grant_for).min()?;
        let expires = now + length;
        Some(Grant {
            id: format!(
                "g{}-{}",
                self.boot_id,
                self.next.fetch_add(1, Ordering::Relaxed)
            ),
            scope,
            workload: p.workload.clone(),
            target: p.info.target.name.clone(),
            rule: p.rule.clone(),
            fingerprint: (scope == GrantScope::Fingerprint).then(|| p.fingerprint.clone()),
            approval_id: p.id.clone(),
            query: p.logged_query.clone(),
            granted_by: p.votes.iter().map(|v| v.actor.clone()).collect(),
            reason: p.votes.iter().rev().find_map(|v| v.reason.clone()),
            created_at: format_ts(now),
            expires_at: format_ts(expires),
            expires_unix_ms: unix_ms(expires),
            uses: 0,
        })
    }

    fn persist(&self, grants: &[Grant]) {
        if let Some(path) = &self.grants_path
            && let Err(e) = grants::save(path, grants)
        {
            tracing::error!("{e}");
            self.audit
                .record(AuditEvent::new("grants_save_failed").with("error", e.to_string()));
        }
    }

    /// Denies a pending statement; the client gets a denial.
    ///
    /// # Errors
    /// No such approval, or `actor` may not decide it.
    pub fn deny(
        &self,
        actor: &Actor,
        groups: &[String],
        id: &str,
        reason: Option<&str>,
    ) -> Result<Value, String> {
        let mut inner = self.lock();
        let Some(p) = inner.pending.get(id) else {
            return Err(format!("no pending approval {id:?}"));
        };
        if let Err(e) = Self::may_decide(p, actor, groups, false) {
            self.audit.record(
                p.event("approval_refused")
                    .with("actor", actor)
                    .with("error", &e),
            );
            return Err(e);
        }
        let Some(mut p) = inner.pending.remove(id) else {
            return Err(format!("no pending approval {id:?}"));
        };
        drop(inner);
        let text = match reason {
            Some(r) => format!("approval {id} denied by {}: {r}", who(actor)),
            None => format!("approval {id} denied by {}", who(actor)),
        };
        p.resolve(Resolution::Denied {
            reason: text.clone(),
        });
        self.audit.record(
            p.event("approval_denied")
                .with("actor", actor)
                .with("reason", reason),
        );
        self.notify(&p, "approval_denied", Some(actor), reason);
        Ok(json!({"id": id, "state": "denied"}))
    }

    /// Deadlines: escalates or expires what is due at `now`, and forgets
    /// expired grants.
    pub fn tick(&self, now: OffsetDateTime) {
        let mut inner = self.lock();
        let due: Vec<String> = inner
            .pending
            .values()
            .filter(|p| p.expires_at <= now)
            .map(|p| p.id.clone())
            .collect();
        for id in due {
            let Some(p) = inner.pending.get_mut(&id) else {
                continue;
            };
            if !p.escalated && p.spec.on_timeout() == OnTimeout::Escalate {
                p.escalated = true;
                p.expires_at = now + p.spec.escalation_timeout();
                self.audit.record(
                    p.event("approval_escalated")
                        .with("approvers", p.approver_groups())
                        .with("expires_at", format_ts(p.expires_at)),
                );
                self.notify(p, "approval_escalated", None, None);
                continue;
            }
            let Some(mut p) = inner.pending.remove(&id) else {
                continue;
            };
            let waited = human(now - p.requested_at);
            let text = format!("approval {id} was not given within {waited}");
            p.resolve(Resolution::Denied {
                reason: text.clone(),
            });
            self.audit
                .record(p.event("approval_expired").with("reason", &text));
            self.notify(&p, "approval_expired", None, Some(&text));
        }
        let now_ms = unix_ms(now);
        inner.grants.retain(|g| g.expires_unix_ms > now_ms);
    }

    /// Runs [`ApprovalStore::tick`] until the task is dropped.
    pub async fn run_deadlines(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            self.tick(OffsetDateTime::now_utc());
        }
    }

    /// Grants in force.
    #[must_use]
    pub fn grants(&self, now: OffsetDateTime) -> Vec<Grant> {
        let now_ms = unix_ms(now);
        self.lock()
            .grants
            .iter()
            .filter(|g| g.expires_unix_ms > now_ms)
            .cloned()
            .collect()
    }

    /// Revokes a grant.
    ///
    /// # Errors
    /// No such grant.
    pub fn revoke(&self, actor: &Actor, id: &str) -> Result<Value, String> {
        let mut inner = self.lock();
        let Some(i) = inner.grants.iter().position(|g| g.id == id) else {
            return Err(format!("no grant {id:?}"));
        };
        let g = inner.grants.remove(i);
        self.persist(&inner.grants);
        drop(inner);
        self.audit.record(
            AuditEvent::new("grant_revoked")
                .with("grant_id", &g.id)
                .with("scope", g.scope)
                .with("target", &g.target)
                .with("rule", &g.rule)
                .with("workload", &g.workload)
                .with("actor", actor),
        );
        Ok(json!({"id": id, "state": "revoked"}))
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn who(a: &Actor) -> String {
    a.user.clone().unwrap_or_else(|| format!("uid {}", a.uid))
}

/// `2s`, `5m`, `1h30m`: how long something took, for people.
fn human(d: time::Duration) -> String {
    let secs = d.whole_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}", s / 60, opt(s % 60, "s")),
        s => format!("{}h{}", s / 3600, opt(s % 3600 / 60, "m")),
    }
}

fn opt(n: i64, unit: &str) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("{n}{unit}")
    }
}

#[cfg(test)]
mod tests;
