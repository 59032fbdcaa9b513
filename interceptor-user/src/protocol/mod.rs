//! Wire protocols: frames and sessions, not policy. A session asks its
//! [`crate::proxy::Guard`] about each statement and turns a refusal into the
//! protocol's own error.

pub mod mysql;
pub mod postgres;

/// Why the agent's own login (a brokered one) failed, in either protocol.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The server refused it: its SQLSTATE (PostgreSQL) or error number
    /// (MySQL), and its message.
    #[error("{message}")]
    Refused { code: String, message: String },
    /// The server asked for something the agent cannot answer.
    #[error("{0}")]
    Unsupported(String),
    #[error("server protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
