//! Decisions: a statement's facts, the workload's identity and the session
//! against the policy's rules.
//!
//! CONTRACT used by the protocol modules (keep these signatures; extend
//! additively): `Engine::new`, `Engine::bind_identity`, `Engine::decide`,
//! `Engine::decide_function_call`, `SessionState`, `Verdict`,
//! `StatementVerdict`.

use std::sync::Arc;

use serde::Serialize;

use super::{ApprovalSpec, Decision, PolicyError, PolicyFile};
use crate::{identity::Identity, sql::Kind};

/// A validated policy, ready to decide. Immutable; the agent swaps in a new
/// one on reload.
#[derive(Debug)]
pub struct Engine {
    file: PolicyFile,
}

/// Which named identities of the policy a connection's workload matches,
/// computed once per connection.
#[derive(Clone, Debug, Default)]
pub struct IdentityBinding {
    /// Names of the matching `identities` entries.
    pub names: Vec<String>,
}

/// Per-connection state the engine needs between statements: SQL-level
/// prepared statements (`PREPARE name AS q` / `EXECUTE name`), the current
/// database (MySQL `USE`), caches.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Current database; MySQL resolves unqualified names against it.
    pub database: Option<String>,
}

/// What to decide: the statement text and who runs it where.
#[derive(Clone, Copy, Debug)]
pub struct DecisionRequest<'a> {
    pub identity: &'a Identity,
    pub binding: &'a IdentityBinding,
    /// Target name, as in the policy's `targets`.
    pub target: &'a str,
    pub db_user: &'a str,
    pub database: &'a str,
    /// One query message: may hold several statements.
    pub sql: &'a str,
}

/// The decision about one statement of a message.
#[derive(Clone, Debug, Serialize)]
pub struct StatementVerdict {
    /// The statement's text (a slice of the message, trimmed).
    pub text: String,
    pub kind: Kind,
    pub tables: Vec<String>,
    pub fingerprint: String,
    pub decision: Decision,
    pub rule: Option<String>,
    pub reason: String,
    /// True when sqlparser could not parse it (lexical classification).
    pub unparsed: bool,
}

/// The decision about a whole message: the strictest of its statements.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// What the policy says. In shadow or learn mode the statement goes
    /// through anyway: see `enforced`.
    pub decision: Decision,
    /// False in shadow and learn mode: the decision is recorded, not applied.
    pub enforced: bool,
    /// The deciding rule, `None` when the default applied.
    pub rule: Option<String>,
    /// Human-readable reason, for the client's error and the audit log.
    pub reason: String,
    pub statements: Vec<StatementVerdict>,
    /// Evaluation time in microseconds.
    pub eval_us: u64,
    /// The deciding rule's approval settings when `decision` is `approve`.
    #[serde(skip)]
    pub approval: Option<Arc<ApprovalSpec>>,
}

impl Verdict {
    /// Whether the statement must be held back (denied or awaiting approval).
    #[must_use]
    pub fn blocks(&self) -> bool {
        self.enforced && self.decision != Decision::Allow
    }
}

impl Engine {
    /// # Errors
    /// When the policy cannot be compiled (bad globs, bad fingerprints).
    pub fn new(file: PolicyFile) -> Result<Self, PolicyError> {
        Ok(Self { file })
    }

    #[must_use]
    pub fn file(&self) -> &PolicyFile {
        &self.file
    }

    #[must_use]
    pub fn bind_identity(&self, _identity: &Identity) -> IdentityBinding {
        IdentityBinding::default()
    }

    /// Decides one query message (placeholder until the rules engine lands:
    /// applies `default` to the whole message).
    pub fn decide(&self, req: &DecisionRequest<'_>, _session: &mut SessionState) -> Verdict {
        let started = std::time::Instant::now();
        let decision = self.file.default;
        Verdict {
            decision,
            enforced: self.file.mode == super::Mode::Enforce,
            rule: None,
            reason: format!("no rule matched; the policy's default is {decision}"),
            statements: vec![StatementVerdict {
                text: req.sql.trim().to_owned(),
                kind: Kind::Other,
                tables: Vec::new(),
                fingerprint: String::new(),
                decision,
                rule: None,
                reason: String::new(),
                unparsed: true,
            }],
            eval_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            approval: None,
        }
    }

    /// Decides a PostgreSQL FunctionCall message (a call by function OID).
    pub fn decide_function_call(
        &self,
        req: &DecisionRequest<'_>,
        function: &str,
        session: &mut SessionState,
    ) -> Verdict {
        let _ = function;
        self.decide(req, session)
    }
}
