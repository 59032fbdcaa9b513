//! Facts about SQL statements: kind, tables, functions, flags, fingerprint.
//! Knows statements, not bytes and not policy.
//!
//! The pipeline for one query message:
//! 1. [`split`]: statements, by a hand-written lexer that knows each
//!    dialect's quotes and comments;
//! 2. [`normalize`]: one linear pass per statement writes its canonical text
//!    (literals replaced, case and spacing folded, literal lists collapsed);
//!    the policy engine finds the shape's cached facts by it, and
//!    [`Fingerprint::of`] hashes it once per new shape. This is the hot path;
//! 3. [`analyze`]: only for a shape not seen before, sqlparser parses the
//!    canonical text (small even for a 20 MiB `INSERT`) and a visitor collects
//!    the facts; a lexical pass adds the flags and classifies what sqlparser
//!    cannot parse; SQL run from a string or relations named by a value
//!    (the [`hidden`] catalogue) are analysed as part of the statement, or
//!    make it `dynamic_sql`;
//! 4. [`Analysis::resolve`]: table names resolved against the session's
//!    schema or database.

mod analyze;
mod fingerprint;
pub mod hidden;
pub mod lexer;
mod lexical;
mod mysql_forms;
mod names;
mod pg_grammar;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use analyze::{Analysis, Effect, Hidden, PreparedBody, SearchPathChange, analyze};
pub use fingerprint::Fingerprint;
pub use lexer::{LexMode, NormInfo, Scratch, StatementSpan, normalize, redact, split, split_into};
pub use lexical::function_flags;
pub use names::{HiddenFacts, Resolution, StatementFacts};

/// What a statement does, from its most powerful operation.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
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
    #[default]
    Other,
}

impl Kind {
    pub const ALL: [Self; 14] = [
        Self::Select,
        Self::Insert,
        Self::Update,
        Self::Delete,
        Self::Merge,
        Self::Truncate,
        Self::Ddl,
        Self::Dcl,
        Self::Tcl,
        Self::Session,
        Self::Copy,
        Self::Call,
        Self::Explain,
        Self::Other,
    ];

    /// How much a statement of this kind can do, to pick a compound
    /// statement's kind: a SELECT whose CTE deletes is a `delete`, a SET
    /// whose value is a subquery is a `select`, a CALL with a subquery
    /// argument stays a `call`.
    #[must_use]
    pub fn power(self) -> u8 {
        match self {
            Self::Explain | Self::Tcl | Self::Session | Self::Other => 0,
            Self::Select | Self::Copy => 1,
            Self::Insert => 2,
            Self::Update => 3,
            Self::Merge => 4,
            Self::Delete => 5,
            Self::Truncate => 6,
            Self::Call => 7,
            Self::Ddl => 8,
            Self::Dcl => 9,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Select => "select",
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Merge => "merge",
            Self::Truncate => "truncate",
            Self::Ddl => "ddl",
            Self::Dcl => "dcl",
            Self::Tcl => "tcl",
            Self::Session => "session",
            Self::Copy => "copy",
            Self::Call => "call",
            Self::Explain => "explain",
            Self::Other => "other",
        }
    }

    /// Bit for kind sets.
    #[must_use]
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Runs SQL text or reads relations it does not name (a query in a
    /// string, a relation named by a value, whole schemas, `PREPARE ...
    /// FROM @var`): its tables are unknown.
    DynamicSql,
}

impl Flag {
    pub const ALL: [Self; 8] = [
        Self::Lock,
        Self::FileAccess,
        Self::ProgramExec,
        Self::RoleChange,
        Self::RemoteAccess,
        Self::SessionChange,
        Self::Admin,
        Self::DynamicSql,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lock => "lock",
            Self::FileAccess => "file_access",
            Self::ProgramExec => "program_exec",
            Self::RoleChange => "role_change",
            Self::RemoteAccess => "remote_access",
            Self::SessionChange => "session_change",
            Self::Admin => "admin",
            Self::DynamicSql => "dynamic_sql",
        }
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Flag`]s, serialised as a list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlagSet(u8);

impl FlagSet {
    #[must_use]
    pub fn contains(self, f: Flag) -> bool {
        self.0 & (1 << f as u8) != 0
    }

    pub fn insert(&mut self, f: Flag) {
        self.0 |= 1 << f as u8;
    }

    #[must_use]
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    #[must_use]
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    #[must_use]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Flag> {
        Flag::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

impl FromIterator<Flag> for FlagSet {
    fn from_iter<I: IntoIterator<Item = Flag>>(iter: I) -> Self {
        let mut s = Self::default();
        for f in iter {
            s.insert(f);
        }
        s
    }
}

impl Serialize for FlagSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// SQL dialect of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    Postgres,
    Mysql,
}

/// Bounds on the work spent on one statement. Beyond them a statement is
/// classified lexically and marked unparsed: never a panic, never an
/// unbounded parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest statement analysed at all (bytes of original text). Lexing
    /// is linear and literals vanish in the canonical text, so the default
    /// admits bulk loads.
    pub max_statement_bytes: usize,
    /// Deepest nesting of parentheses handed to the parser.
    pub max_depth: usize,
    /// Most tokens (after collapsing literal lists) handed to the parser.
    pub max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_statement_bytes: 64 << 20,
            max_depth: 64,
            max_tokens: 8192,
        }
    }
}

#[cfg(test)]
mod tests;
