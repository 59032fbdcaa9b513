//! MySQL and MariaDB sessions through the agent.
//!
//! The protocol is strictly one command, one reply, so a refusal needs no
//! stand-in on the server side (unlike PostgreSQL's): the agent answers a
//! refused command itself with an `ERR` packet (error 1142, SQLSTATE
//! 42000) carrying the next sequence id, sends nothing of it upstream, and
//! the session is then exactly as after any error the server reports.
//! The agent follows each reply's grammar ([`reply`]) to know where it
//! ends, which packets are LOCAL INFILE requests, and which statement ids
//! the server gave to prepared statements it allowed.

pub mod codec;
pub mod login;
pub mod reply;
mod session;

pub use session::serve;
