//! PostgreSQL (protocol 3.x) sessions through the agent.
//!
//! Denials keep the server's and the client's view of the session the same
//! without depending on timing: a refused Query, Parse or FunctionCall is
//! replaced on its way to the server by a statement that fails at parse
//! analysis with a unique marker (a missing relation named after the
//! decision id). The server then does exactly what it does after any
//! error (skips to the next Sync, fails an open transaction block, sends
//! ReadyForQuery) and the agent rewrites that one marked ErrorResponse into
//! the denial (SQLSTATE 42501) on its way back.

pub mod codec;
mod login;
mod session;
mod track;

pub use session::serve;
