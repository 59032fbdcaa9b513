//! Facts about SQL statements: kind, tables, functions, flags, fingerprint.
//! Knows statements, not bytes and not policy.

use serde::{Deserialize, Serialize};

/// What a statement does, from its most powerful operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    Ddl,
    Dcl,
    Tcl,
    Session,
    Copy,
    Call,
    Explain,
    Other,
}

/// Side effects worth a rule of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Lock,
    FileAccess,
    ProgramExec,
    RoleChange,
    RemoteAccess,
    SessionChange,
    Admin,
}

/// SQL dialect of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    Postgres,
    Mysql,
}
