//! The audit log: JSON Lines, one event per line, written by a dedicated
//! thread so the data path only pays for a channel send.
//!
//! Fields are added over time but never renamed: `ts` (RFC 3339 UTC with
//! microseconds), `seq` (strictly increasing), `event`, then the event's own
//! fields.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
};

use serde::Serialize;
use serde_json::{Map, Value};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start audit writer: {0}")]
    Spawn(std::io::Error),
}

/// Typed event fields, rendered to JSON by the writer thread (off the data
/// path).
pub trait EventBody: Send + Sync {
    /// The body as a JSON object.
    fn to_json(&self) -> String;
}

impl<T: Serialize + Send + Sync> EventBody for T {
    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Sees every record once it is rendered (live tail, metrics); called on
/// the writer thread, so it must be quick.
pub trait Tap: Send + Sync {
    fn event(&self, ev: &AuditEvent, line: &str);
}

/// One event on its way to the log.
pub struct AuditEvent {
    pub ts: OffsetDateTime,
    pub event: &'static str,
    /// JSON members shared by every event of one connection (connection id,
    /// target, identity...), rendered once per connection, without braces.
    pub conn: Option<Arc<str>>,
    /// Typed fields, for events on the per-query path.
    pub body: Option<Box<dyn EventBody>>,
    /// Ad-hoc fields, for rare events.
    pub fields: Map<String, Value>,
}

impl std::fmt::Debug for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditEvent")
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl AuditEvent {
    #[must_use]
    pub fn new(event: &'static str) -> Self {
        Self {
            ts: OffsetDateTime::now_utc(),
            event,
            conn: None,
            body: None,
            fields: Map::new(),
        }
    }

    /// Adds a field; values that fail to serialise become `null` rather than
    /// losing the event.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        self.fields.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
        self
    }

    /// Adds the connection's pre-rendered members.
    #[must_use]
    pub fn with_conn(mut self, members: Arc<str>) -> Self {
        self.conn = Some(members);
        self
    }

    /// Adds typed fields, serialised later by the writer.
    #[must_use]
    pub fn with_body(mut self, body: impl EventBody + 'static) -> Self {
        self.body = Some(Box::new(body));
        self
    }
}

/// The members of a JSON object (`{"a":1}` -> `"a":1`), for splicing.
#[must_use]
pub fn members(object_json: &str) -> &str {
    object_json
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or("")
}

/// RFC 3339 UTC with exactly microseconds, e.g. `2026-11-27T21:00:00.123456Z`.
#[must_use]
pub fn format_ts(ts: OffsetDateTime) -> String {
    let ts = ts.to_offset(time::UtcOffset::UTC);
    let micros = ts.microsecond();
    let whole = ts.replace_nanosecond(0).unwrap_or(ts);
    let base = whole
        .format(&Rfc3339)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"));
    // `base` ends in `Z` with no fraction since nanoseconds are zero.
    let stem = base.strip_suffix('Z').unwrap_or(&base);
    format!("{stem}.{micros:06}Z")
}

/// Renders one event as its JSON line (without the newline).
#[must_use]
pub fn render(seq: u64, ev: &AuditEvent) -> String {
    let mut line = String::with_capacity(512);
    line.push_str("{\"ts\":\"");
    line.push_str(&format_ts(ev.ts));
    line.push_str("\",\"seq\":");
    line.push_str(&seq.to_string());
    line.push_str(",\"event\":");
    line.push_str(&Value::String(ev.event.to_owned()).to_string());
    let mut splice = |m: &str| {
        if !m.is_empty() {
            line.push(',');
            line.push_str(m);
        }
    };
    if let Some(c) = &ev.conn {
        splice(c);
    }
    if let Some(b) = &ev.body {
        splice(members(&b.to_json()));
    }
    if !ev.fields.is_empty() {
        splice(members(&Value::Object(ev.fields.clone()).to_string()));
    }
    line.push('}');
    line
}

/// Sending side of the audit log; cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<AuditEvent>,
}

impl AuditLog {
    /// Queues an event. The writer only stops after every sender is gone, so
    /// nothing sent is lost.
    pub fn record(&self, ev: AuditEvent) {
        if self.tx.send(ev).is_err() {
            tracing::error!("audit writer is gone; event dropped");
        }
    }
}

/// Owns the writer thread; dropping every [`AuditLog`] and then calling
/// [`AuditWriter::finish`] flushes and closes the file.
pub struct AuditWriter {
    handle: Option<JoinHandle<()>>,
}

impl AuditWriter {
    /// Opens (appending) the log file, creating its directory, and starts the writer.
    ///
    /// # Errors
    /// When the file cannot be opened or the thread cannot start.
    pub fn start(path: &Path) -> Result<(AuditLog, Self), AuditError> {
        Self::start_with_taps(path, Vec::new())
    }

    /// As [`AuditWriter::start`], handing every rendered record to `taps`.
    ///
    /// # Errors
    /// As [`AuditWriter::start`].
    pub fn start_with_taps(
        path: &Path,
        taps: Vec<Arc<dyn Tap>>,
    ) -> Result<(AuditLog, Self), AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AuditError::Open {
                path: path.to_owned(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_owned(),
                source,
            })?;
        let start_seq = last_seq(path).map_or(1, |s| s + 1);
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(file, rx, start_seq, &taps))
            .map_err(AuditError::Spawn)?;
        Ok((
            AuditLog { tx },
            Self {
                handle: Some(handle),
            },
        ))
    }

    /// Waits until every queued event is on disk.
    pub fn finish(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Audit files in chain order (by their first record's `seq`).
#[must_use]
pub fn chain_order(paths: &[PathBuf]) -> Vec<PathBuf> {
    let first_seq = |p: &PathBuf| {
        std::fs::read_to_string(p).ok().and_then(|t| {
            t.lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok()?.get("seq")?.as_u64())
        })
    };
    let mut v: Vec<(Option<u64>, PathBuf)> =
        paths.iter().map(|p| (first_seq(p), p.clone())).collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// `seq` continues across restarts: find the last one in an existing log.
fn last_seq(path: &Path) -> Option<u64> {
    let text = std::fs::read(path).ok()?;
    let tail_start = text.len().saturating_sub(64 * 1024);
    let tail = &text[tail_start..];
    tail.split(|b| *b == b'\n')
        .rev()
        .filter(|l| !l.is_empty())
        .find_map(|l| {
            serde_json::from_slice::<Value>(l)
                .ok()?
                .get("seq")?
                .as_u64()
        })
}

/// How often the writer wakes to drain the queue. The data path never
/// wakes the writer (a wake-up per statement costs a context switch, which
/// on a busy CPU is most of a query's budget); it only pushes.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

fn write_loop(
    file: File,
    mut rx: mpsc::UnboundedReceiver<AuditEvent>,
    mut seq: u64,
    taps: &[Arc<dyn Tap>],
) {
    use mpsc::error::TryRecvError;
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    loop {
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(ev) => {
                    let line = render(seq, &ev);
                    seq += 1;
                    for t in taps {
                        t.event(&ev, &line);
                    }
                    wrote = true;
                    if let Err(e) = out
                        .write_all(line.as_bytes())
                        .and_then(|()| out.write_all(b"\n"))
                    {
                        tracing::error!("audit write failed: {e}");
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if wrote && let Err(e) = out.flush() {
            tracing::error!("audit flush failed: {e}");
        }
        if closed {
            break;
        }
        std::thread::sleep(DRAIN_INTERVAL);
    }
    let _ = out.flush();
    let _ = out.get_ref().sync_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_microseconds() {
        let ts = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(format_ts(ts), "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn writes_lines_in_order_and_continues_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        for round in 0..2 {
            let (log, writer) = AuditWriter::start(&path).unwrap();
            for i in 0..3 {
                log.record(AuditEvent::new("connect").with("conn", i + round * 3));
            }
            drop(log);
            writer.finish();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    }
}
