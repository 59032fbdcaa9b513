//! Wire protocols: frames and sessions, not policy. A session asks its
//! [`crate::proxy::Guard`] about each statement and turns a refusal into the
//! protocol's own error.

pub mod mysql;
pub mod postgres;
