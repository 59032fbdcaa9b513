//! Between a protocol session and the policy: decides each query message
//! for one connection, audits every statement, and tells the protocol
//! whether to forward or refuse. Protocols see [`Outcome`], never rules.

use std::sync::{Arc, atomic::Ordering};

use serde::Serialize;

use super::{ConnInfo, Shared};
use crate::{
    policy::{Decision, DecisionRequest, IdentityBinding, SessionState, Verdict},
    sql::Kind,
};

/// What the protocol does with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send it on, unchanged.
    Forward,
    /// Refuse it with this message; nothing of it reaches the server.
    Refuse(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Decision id, also in the audit log.
    pub id: String,
    /// The whole text for the client: rule or default, reason, decision id.
    pub message: String,
}

/// Per-connection decision state.
pub struct Guard {
    shared: Arc<Shared>,
    pub info: ConnInfo,
    binding: IdentityBinding,
    session: SessionState,
    pub db_user: String,
    pub database: String,
    next_decision: u64,
}

#[derive(Serialize)]
struct Facts<'a> {
    kind: Kind,
    tables: &'a [String],
}

impl Guard {
    #[must_use]
    pub fn new(shared: Arc<Shared>, info: ConnInfo) -> Self {
        let binding = shared.engine.load().bind_identity(&info.identity);
        Self {
            shared,
            info,
            binding,
            session: SessionState::default(),
            db_user: String::new(),
            database: String::new(),
            next_decision: 1,
        }
    }

    /// Session facts learnt from the protocol's startup.
    pub fn set_session(&mut self, db_user: &str, database: &str) {
        db_user.clone_into(&mut self.db_user);
        database.clone_into(&mut self.database);
        self.session.database = Some(database.to_owned());
    }

    /// Largest client message to buffer for a decision.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.shared.max_frame
    }

    /// Audits the session facts once the protocol's startup is read.
    pub fn record_session(&self, application_name: Option<&str>) {
        self.shared.audit.record(
            self.info
                .event("session")
                .with("db_user", &self.db_user)
                .with("database", &self.database)
                .with("application_name", application_name),
        );
    }

    /// Audits a cancel request passed on to the server.
    pub fn record_cancel(&self, backend_pid: u32) {
        self.shared
            .audit
            .record(self.info.event("cancel").with("backend_pid", backend_pid));
    }

    /// Decides one query message (which may hold several statements).
    pub fn check(&mut self, sql: &str) -> Outcome {
        let engine = self.shared.engine.load();
        let req = DecisionRequest {
            identity: &self.info.identity,
            binding: &self.binding,
            target: &self.info.target.name,
            db_user: &self.db_user,
            database: &self.database,
            sql,
        };
        let verdict = engine.decide(&req, &mut self.session);
        self.conclude(sql, &verdict)
    }

    /// Decides a call of a function given by name or OID (PostgreSQL FunctionCall).
    pub fn check_call(&mut self, function: &str) -> Outcome {
        let engine = self.shared.engine.load();
        let text = format!("-- FunctionCall {function}");
        let req = DecisionRequest {
            identity: &self.info.identity,
            binding: &self.binding,
            target: &self.info.target.name,
            db_user: &self.db_user,
            database: &self.database,
            sql: &text,
        };
        let verdict = engine.decide_function_call(&req, function, &mut self.session);
        self.conclude(&text, &verdict)
    }

    fn conclude(&mut self, sql: &str, v: &Verdict) -> Outcome {
        let id = format!(
            "{}-{}-{}",
            self.shared.boot_id, self.info.id, self.next_decision
        );
        self.next_decision += 1;
        self.audit(&id, sql, v);
        if !v.blocks() {
            return Outcome::Forward;
        }
        self.shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        let who = v.rule.as_deref().map_or_else(
            || "no rule allowed this statement".to_owned(),
            |r| format!("by rule \"{r}\""),
        );
        let message = match v.decision {
            Decision::Approve => format!(
                "interceptor: statement needs approval ({who}: {}), and this agent has no approval channel yet, so it is refused (decision {id})",
                v.reason
            ),
            _ => format!("interceptor: denied {who}: {} (decision {id})", v.reason),
        };
        Outcome::Refuse(Refusal { id, message })
    }

    /// One `query` event per statement of the message.
    fn audit(&self, id: &str, sql: &str, v: &Verdict) {
        let max = self.shared.audit_query_max;
        let fallback;
        let statements: &[_] = if v.statements.is_empty() {
            fallback = [crate::policy::StatementVerdict {
                text: sql.to_owned(),
                kind: Kind::Other,
                tables: Vec::new(),
                fingerprint: String::new(),
                decision: v.decision,
                rule: v.rule.clone(),
                reason: v.reason.clone(),
                unparsed: true,
            }];
            &fallback
        } else {
            &v.statements
        };
        for (i, st) in statements.iter().enumerate() {
            let facts = Facts {
                kind: st.kind,
                tables: &st.tables,
            };
            self.shared.audit.record(
                self.info
                    .event("query")
                    .with("decision_id", id)
                    .with("statement", i)
                    .with("decision", st.decision)
                    .with("message_decision", v.decision)
                    .with("rule", st.rule.as_ref().or(v.rule.as_ref()))
                    .with(
                        "reason",
                        if st.reason.is_empty() {
                            &v.reason
                        } else {
                            &st.reason
                        },
                    )
                    .with("enforced", v.enforced)
                    .with("query", truncate(&st.text, max))
                    .with("fingerprint", &st.fingerprint)
                    .with("kind", facts.kind)
                    .with("tables", facts.tables)
                    .with("unparsed", st.unparsed)
                    .with("db_user", &self.db_user)
                    .with("database", &self.database)
                    .with("eval_us", v.eval_us),
            );
        }
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
#[must_use]
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
