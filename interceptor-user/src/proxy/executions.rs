//! Executions of prepared statements and portals: decided once, when
//! prepared, and from then on run any number of times. The protocols
//! report each execution's end here with what the server said (rows,
//! error); the policy's `audit.executions` says what the log keeps:
//!
//! - `each`: an `execute` record per execution;
//! - `summary`: one `executions` record per (connection, prepared
//!   statement) and window: flushed by [`super::Shared::flush_executions`]
//!   every second, when the statement is closed, and when the connection
//!   ends (the agent's shutdown and drain included);
//! - `off`: nothing beyond the decision's `query` record.
//!
//! The per-execution cost is a relaxed counter, one uncontended lock of the
//! connection's own tally (summary) or one queued record (each).

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use time::OffsetDateTime;

use super::{LiveConn, Shared};
use crate::{
    audit::{EventBody, ExecutionFacts, json},
    policy::{Decision, Executions},
};

/// A prepared statement as the protocols know it: the decision that let it
/// through. Decision number 0 means the statement is unknown to the agent
/// (its name did not fit what the agent reads), so no decision id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub decision: u64,
    pub verdict: Decision,
}

impl Prepared {
    /// An execution of a statement the agent could not tie to a decision.
    pub const UNKNOWN: Self = Self {
        decision: 0,
        verdict: Decision::Allow,
    };
}

/// A server error: its SQLSTATE, and MySQL's error number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub sqlstate: [u8; 5],
    pub code: Option<u16>,
}

impl ServerError {
    /// From a PostgreSQL ErrorResponse's code field.
    #[must_use]
    pub fn postgres(code: Option<&str>) -> Self {
        Self {
            sqlstate: sqlstate(code.map(str::as_bytes)),
            code: None,
        }
    }

    /// From a MySQL ERR packet.
    #[must_use]
    pub fn mysql(code: u16, state: Option<&[u8]>) -> Self {
        Self {
            sqlstate: sqlstate(state),
            code: Some(code),
        }
    }

    /// The SQLSTATE as text (`HY000` when the server sent something else).
    #[must_use]
    pub fn sqlstate(&self) -> &str {
        std::str::from_utf8(&self.sqlstate).unwrap_or("HY000")
    }
}

fn sqlstate(code: Option<&[u8]>) -> [u8; 5] {
    match code {
        Some(c) if c.len() == 5 && c.iter().all(u8::is_ascii_alphanumeric) => {
            [c[0], c[1], c[2], c[3], c[4]]
        }
        _ => *b"HY000",
    }
}

/// What became of one execution, or of one statement of a simple query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The server answered: rows returned or affected when the reply
    /// says (a `SELECT 3`, `UPDATE 2`, OK packet or result set; `None` for
    /// replies without a count, such as DDL), or the error.
    Done {
        rows: Option<u64>,
        error: Option<ServerError>,
    },
    /// Not run: an earlier statement of the same message failed.
    Skipped,
    /// The connection ended before the server's answer.
    Unfinished,
}

impl Completion {
    /// Success with `rows`.
    #[must_use]
    pub fn rows(rows: Option<u64>) -> Self {
        Self::Done { rows, error: None }
    }

    /// The server's error.
    #[must_use]
    pub fn error(e: ServerError) -> Self {
        Self::Done {
            rows: None,
            error: Some(e),
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Self::Done { error: None, .. } => "ok",
            Self::Done { error: Some(_), .. } => "error",
            Self::Skipped => "skipped",
            Self::Unfinished => "unfinished",
        }
    }

    /// Appends `outcome`, `rows`, `error` and `error_code`.
    pub(crate) fn write_members(&self, out: &mut Vec<u8>) {
        json::str_member(out, "outcome", self.outcome());
        let (rows, error) = match self {
            Self::Done { rows, error } => (*rows, *error),
            Self::Skipped | Self::Unfinished => (None, None),
        };
        json::opt_u64_member(out, "rows", rows);
        json::opt_str_member(out, "error", error.as_ref().map(ServerError::sqlstate));
        json::opt_u64_member(out, "error_code", error.and_then(|e| e.code).map(u64::from));
    }
}

/// One statement's executions in the current window.
#[derive(Debug)]
struct Window {
    prepared: Prepared,
    count: u64,
    rows: u64,
    errors: u64,
    unfinished: u64,
    first: SystemTime,
    last: SystemTime,
    last_error: Option<ServerError>,
}

#[derive(Debug, Default)]
struct Open {
    /// The connection's decision id prefix, learnt from its first report.
    prefix: Option<Arc<str>>,
    windows: Vec<Window>,
}

/// Windows kept open per connection before they are flushed early: bounds
/// the tally of a client that prepares statements without end.
const MAX_WINDOWS: usize = 256;

/// A connection's executions: the open summary windows and a total count.
#[derive(Debug, Default)]
pub struct Tally {
    open: Mutex<Open>,
    total: AtomicU64,
}

impl Tally {
    /// Executions reported on this connection so far, whatever the mode.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes an `executions` record for every open window of `live` (only
    /// the statement `only`, when given) and closes them.
    pub(crate) fn flush(shared: &Shared, live: &LiveConn, only: Option<u64>) {
        let (prefix, windows) = {
            let mut open = live.executions.lock();
            if open.windows.is_empty() {
                return;
            }
            let windows: Vec<Window> = match only {
                None => std::mem::take(&mut open.windows),
                Some(d) => {
                    let Some(i) = open.windows.iter().position(|w| w.prepared.decision == d) else {
                        return;
                    };
                    vec![open.windows.swap_remove(i)]
                }
            };
            (
                open.prefix.clone().unwrap_or_else(|| Arc::from("")),
                windows,
            )
        };
        for w in windows {
            let facts = live.info.execution_facts(w.prepared.verdict, w.count);
            shared.audit.record(
                live.info
                    .short_event("executions")
                    .with_executions(facts)
                    .with_body(SummaryEvent {
                        prefix: Arc::clone(&prefix),
                        window: w,
                    }),
            );
        }
    }
}

/// A connection's view of its executions, handed to its protocol session.
#[derive(Clone)]
pub struct ExecLog {
    shared: Arc<Shared>,
    live: Arc<LiveConn>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for ExecLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecLog")
            .field("conn", &self.live.info.id)
            .finish_non_exhaustive()
    }
}

impl ExecLog {
    pub(crate) fn new(shared: Arc<Shared>, live: Arc<LiveConn>, prefix: Arc<str>) -> Self {
        Self {
            shared,
            live,
            prefix,
        }
    }

    /// One execution of `prepared` ended (started at `started`, when the
    /// request went to the server).
    pub fn executed(&self, prepared: Prepared, done: Completion, started: Instant) {
        let tally = &self.live.executions;
        tally.total.fetch_add(1, Ordering::Relaxed);
        match self.shared.executions_mode() {
            Executions::Off => {}
            Executions::Each => {
                let facts = self.live.info.execution_facts(prepared.verdict, 1);
                let body = ExecuteEvent {
                    prefix: Arc::clone(&self.prefix),
                    prepared,
                    done,
                    duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                };
                self.shared.audit.record(
                    self.live
                        .info
                        .short_event("execute")
                        .with_executions(facts)
                        .with_body(body),
                );
            }
            Executions::Summary => {
                let now = SystemTime::now();
                let full = {
                    let mut open = tally.lock();
                    if open.prefix.is_none() {
                        open.prefix = Some(Arc::clone(&self.prefix));
                    }
                    let i = match open
                        .windows
                        .iter()
                        .rposition(|w| w.prepared.decision == prepared.decision)
                    {
                        Some(i) => i,
                        None => {
                            open.windows.push(Window {
                                prepared,
                                count: 0,
                                rows: 0,
                                errors: 0,
                                unfinished: 0,
                                first: now,
                                last: now,
                                last_error: None,
                            });
                            open.windows.len() - 1
                        }
                    };
                    let w = &mut open.windows[i];
                    w.count += 1;
                    w.last = now;
                    match done {
                        Completion::Done { rows, error } => {
                            w.rows += rows.unwrap_or(0);
                            if let Some(e) = error {
                                w.errors += 1;
                                w.last_error = Some(e);
                            }
                        }
                        Completion::Unfinished => w.unfinished += 1,
                        Completion::Skipped => {}
                    }
                    open.windows.len() >= MAX_WINDOWS
                };
                if full {
                    Tally::flush(&self.shared, &self.live, None);
                }
            }
        }
    }

    /// One execution of `prepared` whose answer goes into the `query`
    /// record of its Parse (see [`super::Guard::check_parse`]): counted,
    /// and the facts metrics count from that record (`None` with
    /// `executions: off`, whose executions metrics do not count).
    pub fn folded(&self, prepared: Prepared) -> Option<ExecutionFacts> {
        self.live.executions.total.fetch_add(1, Ordering::Relaxed);
        match self.shared.executions_mode() {
            Executions::Off => None,
            _ => Some(self.live.info.execution_facts(prepared.verdict, 1)),
        }
    }

    /// The statement was closed (Close, COM_STMT_CLOSE, or replaced): its
    /// window is written now.
    pub fn closed(&self, prepared: Prepared) {
        Tally::flush(&self.shared, &self.live, Some(prepared.decision));
    }

    /// Writes every open window (the connection ends).
    pub fn flush(&self) {
        Tally::flush(&self.shared, &self.live, None);
    }
}

fn ts(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// Fields of an `execute` record.
struct ExecuteEvent {
    prefix: Arc<str>,
    prepared: Prepared,
    done: Completion,
    duration_us: u64,
}

fn decision_members(out: &mut Vec<u8>, prefix: &str, p: Prepared) {
    if p.decision == 0 {
        json::opt_str_member(out, "decision_id", None);
    } else {
        json::numbered_member(out, "decision_id", prefix, p.decision);
    }
    json::str_member(out, "decision", p.verdict.as_str());
}

impl EventBody for ExecuteEvent {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        decision_members(out, &self.prefix, self.prepared);
        self.done.write_members(out);
        json::u64_member(out, "duration_us", self.duration_us);
        out.push(b'}');
    }
}

/// Fields of an `executions` record.
struct SummaryEvent {
    prefix: Arc<str>,
    window: Window,
}

impl EventBody for SummaryEvent {
    fn write_json(&self, out: &mut Vec<u8>) {
        let w = &self.window;
        out.push(b'{');
        decision_members(out, &self.prefix, w.prepared);
        json::u64_member(out, "count", w.count);
        json::u64_member(out, "rows", w.rows);
        json::u64_member(out, "errors", w.errors);
        json::u64_member(out, "unfinished", w.unfinished);
        json::str_member(out, "first", &crate::audit::format_ts(ts(w.first)));
        json::str_member(out, "last", &crate::audit::format_ts(ts(w.last)));
        json::opt_str_member(
            out,
            "last_error",
            w.last_error.as_ref().map(ServerError::sqlstate),
        );
        out.push(b'}');
    }
}

/// The number in a PostgreSQL CommandComplete tag (`SELECT 5`, `INSERT 0
/// 5`, `UPDATE 5`, `COPY 5`, ...); `None` for tags without one.
#[must_use]
pub fn command_tag_rows(tag: &[u8]) -> Option<u64> {
    let tag = tag.strip_suffix(b"\0").unwrap_or(tag);
    let mut words = tag.split(|b| *b == b' ');
    let verb = words.next()?;
    if !matches!(
        verb,
        b"SELECT" | b"INSERT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"COPY" | b"FETCH" | b"MOVE"
    ) {
        return None;
    }
    let last = tag.rsplit(|b| *b == b' ').next()?;
    std::str::from_utf8(last).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags() {
        assert_eq!(command_tag_rows(b"SELECT 5\0"), Some(5));
        assert_eq!(command_tag_rows(b"INSERT 0 3\0"), Some(3));
        assert_eq!(command_tag_rows(b"UPDATE 0"), Some(0));
        assert_eq!(command_tag_rows(b"DELETE 12\0"), Some(12));
        assert_eq!(command_tag_rows(b"COPY 1000\0"), Some(1000));
        assert_eq!(command_tag_rows(b"MERGE 2\0"), Some(2));
        assert_eq!(command_tag_rows(b"CREATE TABLE\0"), None);
        assert_eq!(command_tag_rows(b"BEGIN\0"), None);
        assert_eq!(command_tag_rows(b"SELECT\0"), None);
        assert_eq!(command_tag_rows(b""), None);
    }

    #[test]
    fn records_are_json_with_every_field() {
        let done = Completion::error(ServerError::mysql(1062, Some(b"23000")));
        let mut out = Vec::new();
        ExecuteEvent {
            prefix: Arc::from("b-1-"),
            prepared: Prepared {
                decision: 4,
                verdict: Decision::Allow,
            },
            done,
            duration_us: 9,
        }
        .write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["decision_id"], "b-1-4");
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["outcome"], "error");
        assert_eq!(v["error"], "23000");
        assert_eq!(v["error_code"], 1062);
        assert!(v["rows"].is_null());
        assert_eq!(v["duration_us"], 9);

        let now = SystemTime::now();
        out.clear();
        SummaryEvent {
            prefix: Arc::from("b-1-"),
            window: Window {
                prepared: Prepared::UNKNOWN,
                count: 3,
                rows: 7,
                errors: 1,
                unfinished: 0,
                first: now,
                last: now,
                last_error: Some(ServerError::postgres(Some("23505"))),
            },
        }
        .write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["decision_id"].is_null());
        assert_eq!(
            (&v["count"], &v["rows"], &v["errors"], &v["last_error"]),
            (
                &serde_json::json!(3),
                &serde_json::json!(7),
                &serde_json::json!(1),
                &serde_json::json!("23505")
            )
        );
        assert_eq!(v["first"], v["last"]);
        assert_eq!(ServerError::postgres(Some("bad")).sqlstate(), "HY000");
    }
}
