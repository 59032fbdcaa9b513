//! Policy: the file format, its validation, and (later) decisions. Knows
//! statement facts and identities, not protocol bytes.

mod audit;
mod engine;
mod file;
mod logins;
mod names;
mod tls;
mod url;

pub use audit::{AuditSettings, Executions, FlushPolicy, MAX_QUEUE, Overflow};
pub use engine::{
    DecisionRequest, EffectiveMode, Engine, IdentityBinding, SessionState, StatementDetails,
    StatementVerdict, Verdict,
};

pub use file::{
    AdminSpec, ApprovalSpec, Decision, IdentityMode, IdentitySelectorSpec, Mode, NotifySpec,
    OnTimeout, PolicyError, PolicyFile, Protocol, RuleSpec, TargetAddress, TargetSpec,
    WherePresence, parse_duration,
};
pub use logins::{Login, LoginSpec, Secret, login_for, refusal_message as login_refusal};
pub use names::{
    NameChange, NameState, NamedAddress, ServiceAddress, TargetDest, diff as names_diff,
    parse_service,
};
pub use tls::{ServerTls, TlsMaterial, TlsSpec};
pub use url::HttpUrl;

/// The policy shipped inside the binary, used when no file is given and
/// `/etc/interceptor/policy.yaml` does not exist.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default.yaml");

#[cfg(test)]
mod tests;
