//! The policy file's `audit:` section: how the audit log's writer queues,
//! flushes and rotates, and what it keeps of statements and executions.
//! The writer ([`crate::audit`]) reads these; it sits above the policy.

use serde::{Deserialize, Serialize};

/// What a full queue does to a sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// The sender waits for room: nothing is lost.
    #[default]
    Block,
    /// The event is dropped and counted; a `gap` event records how many.
    Drop,
}

/// When written records are flushed to the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushPolicy {
    /// After every record.
    Every,
    /// Once per drain cycle (every few milliseconds while events arrive).
    #[default]
    Batch,
}

/// What the log keeps of the executions of prepared statements and
/// portals (PostgreSQL Execute, MySQL COM_STMT_EXECUTE), which are decided
/// once, when prepared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Executions {
    /// One `executions` record per connection and prepared statement for
    /// each window (at most a second) in which it ran.
    #[default]
    Summary = 0,
    /// One `execute` record per execution.
    Each = 1,
    /// None: only the decision's `query` record.
    Off = 2,
}

impl Executions {
    /// The value stored by [`Executions::as_u8`].
    #[must_use]
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Each,
            2 => Self::Off,
            _ => Self::Summary,
        }
    }

    #[must_use]
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// The policy file's `audit:` section. The writer settings apply at agent
/// start; `redact_literals` and `executions` apply on every reload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    pub overflow: Overflow,
    /// Events the queue holds between the data path and the writer.
    pub queue: usize,
    pub flush: FlushPolicy,
    /// fsync after each flush.
    pub fsync: bool,
    /// Rotate when the live file would exceed this many bytes; 0 = never.
    pub rotate_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` ... `audit.jsonl.N`).
    pub retain: usize,
    /// `query` events carry the statement with its literals replaced (the
    /// fingerprinted text) instead of the raw text.
    pub redact_literals: bool,
    /// Records of prepared statements' executions.
    pub executions: Executions,
}

/// Largest `queue`: its slots are allocated up front.
pub const MAX_QUEUE: usize = 1 << 20;

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            overflow: Overflow::Block,
            queue: 65_536,
            flush: FlushPolicy::Batch,
            fsync: false,
            rotate_bytes: 100 << 20,
            retain: 10,
            redact_literals: false,
            executions: Executions::Summary,
        }
    }
}

impl AuditSettings {
    /// Checks bounds.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.queue == 0 || self.queue > MAX_QUEUE {
            return Err(format!(
                "audit.queue must be between 1 and {MAX_QUEUE}, not {}",
                self.queue
            ));
        }
        Ok(())
    }

    /// Names of the writer settings (those that need a restart) that differ.
    #[must_use]
    pub fn restart_needed(&self, new: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.overflow != new.overflow {
            out.push("overflow");
        }
        if self.queue != new.queue {
            out.push("queue");
        }
        if self.flush != new.flush {
            out.push("flush");
        }
        if self.fsync != new.fsync {
            out.push("fsync");
        }
        if self.rotate_bytes != new.rotate_bytes {
            out.push("rotate_bytes");
        }
        if self.retain != new.retain {
            out.push("retain");
        }
        out
    }
}
