//! Which audit events an operator asked to see: the filters of
//! `interceptor tail`, applied alike by the agent (live and recent events)
//! and by the CLI (`--file`, no agent needed).
//!
//! Within one flag any value may match; all flags given must match.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::broadcast;

use crate::audit::{AuditEvent, Tap};

/// The filters of one `tail` request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// `allow`, `deny`, `approve` (the statement's decision).
    pub decision: Vec<String>,
    /// An identity name from the policy, or `key=value` over the identity's
    /// fields (`pid`, `uid`, `user`, `comm`, `exe`, `unit`, ...), or a bare
    /// value matching `comm`, `exe`, `user`, `unit` or `container`.
    pub identity: Vec<String>,
    /// Target name.
    pub target: Vec<String>,
    /// Event type (`query`, `connect`, `block`, ...).
    pub event: Vec<String>,
    /// Rule name.
    pub rule: Vec<String>,
    /// Only events at or after this instant (RFC 3339).
    pub since: Option<String>,
}

fn any_of(wanted: &[String], have: Option<&str>) -> bool {
    wanted.is_empty() || have.is_some_and(|h| wanted.iter().any(|w| w == h))
}

fn identity_matches(want: &str, ev: &Value) -> bool {
    let id = &ev["identity"];
    if let Some((key, value)) = want.split_once('=') {
        return match &id[key.trim()] {
            Value::String(s) => s == value.trim(),
            Value::Number(n) => n.to_string() == value.trim(),
            _ => false,
        };
    }
    let named = ev["identities"]
        .as_array()
        .is_some_and(|names| names.iter().any(|n| n.as_str() == Some(want)));
    named
        || ["comm", "exe", "user", "unit", "container"]
            .iter()
            .any(|k| id[*k].as_str() == Some(want))
}

impl Filter {
    /// Whether an event passes every filter.
    #[must_use]
    pub fn matches(&self, ev: &Value) -> bool {
        any_of(&self.event, ev["event"].as_str())
            && any_of(&self.decision, ev["decision"].as_str())
            && any_of(&self.target, ev["target"].as_str())
            && any_of(&self.rule, ev["rule"].as_str())
            && (self.identity.is_empty() || self.identity.iter().any(|w| identity_matches(w, ev)))
            && self.since.as_deref().is_none_or(|since| {
                // RFC 3339 UTC with a fixed number of digits compares as text;
                // parse both to be exact about fractions.
                match (parse_ts(since), ev["ts"].as_str().and_then(parse_ts)) {
                    (Some(s), Some(t)) => t >= s,
                    _ => false,
                }
            })
    }
}

fn parse_ts(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// `--since`: a duration back from `now` (`90s`, `10m`, `2h`, `1d`) or an
/// RFC 3339 timestamp; returns the instant as RFC 3339.
///
/// # Errors
/// When it is neither.
pub fn resolve_since(text: &str, now: OffsetDateTime) -> Result<String, String> {
    if let Some(ts) = parse_ts(text) {
        return Ok(crate::audit::format_ts(ts));
    }
    let d = parse_duration(text).ok_or_else(|| {
        format!("--since {text:?}: expected a duration such as 90s, 10m, 2h, 1d or an RFC 3339 timestamp")
    })?;
    Ok(crate::audit::format_ts(now - d))
}

/// `--since` durations: the policy's duration syntax.
fn parse_duration(text: &str) -> Option<Duration> {
    let d = crate::policy::parse_duration(text).ok()?;
    Duration::try_from(d).ok()
}

/// The live feed of audit records for followers: the writer hands each
/// rendered line to it; with no follower that costs one check.
pub struct Feed {
    tx: broadcast::Sender<Arc<str>>,
}

/// How many records a slow follower may lag before it is told it missed
/// some.
const FOLLOW_BUFFER: usize = 4096;

impl Feed {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            tx: broadcast::channel(FOLLOW_BUFFER).0,
        })
    }

    /// Live records from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

impl Tap for Feed {
    fn event(&self, _ev: &AuditEvent, line: &str) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::from(line));
        }
    }
}

/// Answers a `tail` request: the last `last` matching records, then (with
/// `follow`) every new matching record until the caller hangs up.
#[must_use]
pub fn serve(
    feed: &Feed,
    files: Vec<PathBuf>,
    filter: Filter,
    last: usize,
    follow: bool,
) -> super::Reply {
    // Subscribe before reading the history, so nothing falls between.
    let mut live = follow.then(|| feed.subscribe());
    let (tx, items) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        let history = {
            let filter = filter.clone();
            tokio::task::spawn_blocking(move || last_matching(&files, &filter, last))
                .await
                .unwrap_or_default()
        };
        let mut seen = 0u64;
        for ev in history {
            seen = seen.max(ev["seq"].as_u64().unwrap_or(0));
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        let Some(live) = live.as_mut() else { return };
        loop {
            let item = match live.recv().await {
                Ok(line) => match serde_json::from_str::<Value>(&line) {
                    Ok(ev)
                        if ev["seq"].as_u64().unwrap_or(u64::MAX) > seen && filter.matches(&ev) =>
                    {
                        ev
                    }
                    _ => continue,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    serde_json::json!({"event": "tail_lagged", "missed": n})
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    super::Reply::Stream {
        first: serde_json::json!({"follow": follow}),
        items,
    }
}

/// Reads a file's lines from the end, in chunks, newest first.
struct ReverseLines {
    file: std::fs::File,
    /// Bytes of the file not yet read.
    left: u64,
    /// Bytes read but not yet split into whole lines (start of the file
    /// side).
    carry: Vec<u8>,
    lines: Vec<Vec<u8>>,
}

const REVERSE_CHUNK: u64 = 64 * 1024;

impl ReverseLines {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let left = file.metadata()?.len();
        Ok(Self {
            file,
            left,
            carry: Vec::new(),
            lines: Vec::new(),
        })
    }
}

impl Iterator for ReverseLines {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        loop {
            if let Some(l) = self.lines.pop() {
                return Some(Ok(l));
            }
            if self.left == 0 {
                let last = std::mem::take(&mut self.carry);
                return (!last.is_empty()).then_some(Ok(last));
            }
            let n = self.left.min(REVERSE_CHUNK);
            self.left -= n;
            let mut chunk = vec![0u8; usize::try_from(n).unwrap_or(0)];
            if let Err(e) = self
                .file
                .seek(SeekFrom::Start(self.left))
                .and_then(|_| self.file.read_exact(&mut chunk))
            {
                self.left = 0;
                return Some(Err(e));
            }
            chunk.extend_from_slice(&self.carry);
            // Everything after the first newline is whole lines; before it
            // waits for the previous chunk (unless this is the file start).
            let mut parts: Vec<Vec<u8>> =
                chunk.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
            self.carry = if parts.is_empty() {
                Vec::new()
            } else {
                parts.remove(0)
            };
            self.lines = parts.into_iter().filter(|l| !l.is_empty()).collect();
        }
    }
}

/// The last `n` records of the logs (newest file last) that pass
/// `filter`, oldest first. Stops reading at records older than the
/// filter's `since`. Unreadable lines are skipped (the verifier reports
/// them; a tail shows what it can).
#[must_use]
pub fn last_matching(files: &[PathBuf], filter: &Filter, n: usize) -> Vec<Value> {
    let mut found = Vec::new();
    if n == 0 {
        return found;
    }
    'files: for path in files.iter().rev() {
        let Ok(lines) = ReverseLines::open(path) else {
            continue;
        };
        for line in lines {
            let Ok(line) = line else { continue 'files };
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if filter.matches(&ev) {
                found.push(ev);
                if found.len() == n {
                    break 'files;
                }
            } else if filter.since.is_some()
                && let (Some(since), Some(ts)) = (
                    filter.since.as_deref().and_then(parse_ts),
                    ev["ts"].as_str().and_then(parse_ts),
                )
                && ts < since
            {
                break 'files;
            }
        }
    }
    found.reverse();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(decision: &str, rule: &str, comm: &str) -> Value {
        json!({"ts": "2026-11-28T00:00:10.000000Z", "event": "query", "decision": decision,
               "rule": rule, "target": "pg", "identities": ["batch"],
               "identity": {"comm": comm, "uid": 1000, "exe": "/usr/bin/psql"}})
    }

    #[test]
    fn flags_and_values() {
        let f = Filter {
            decision: vec!["deny".into(), "approve".into()],
            identity: vec!["uid=1000".into()],
            ..Filter::default()
        };
        assert!(f.matches(&query("deny", "r", "psql")));
        assert!(f.matches(&query("approve", "r", "psql")));
        assert!(!f.matches(&query("allow", "r", "psql")));
        let f = Filter {
            identity: vec!["batch".into()],
            rule: vec!["r".into()],
            target: vec!["pg".into()],
            event: vec!["query".into()],
            ..Filter::default()
        };
        assert!(f.matches(&query("allow", "r", "psql")));
        assert!(!f.matches(&query("allow", "other", "psql")));
        let f = Filter {
            identity: vec!["psql".into(), "/usr/bin/x".into()],
            ..Filter::default()
        };
        assert!(f.matches(&query("allow", "r", "psql")));
        assert!(!f.matches(&query("allow", "r", "pgbench")));
        // A filter on a field the event lacks does not match it.
        let f = Filter {
            decision: vec!["deny".into()],
            ..Filter::default()
        };
        assert!(!f.matches(&json!({"event": "connect"})));
        assert!(Filter::default().matches(&json!({"event": "connect"})));
    }

    #[test]
    fn since() {
        let now = OffsetDateTime::parse("2026-11-28T00:10:00Z", &Rfc3339).unwrap();
        assert_eq!(
            resolve_since("10m", now).unwrap(),
            "2026-11-28T00:00:00.000000Z"
        );
        assert_eq!(
            resolve_since("2026-11-28T00:00:11Z", now).unwrap(),
            "2026-11-28T00:00:11.000000Z"
        );
        assert!(resolve_since("ten minutes", now).is_err());
        let f = Filter {
            since: Some(resolve_since("10m", now).unwrap()),
            ..Filter::default()
        };
        assert!(f.matches(&query("allow", "r", "psql")));
        let f = Filter {
            since: Some(resolve_since("1m", now).unwrap()),
            ..Filter::default()
        };
        assert!(!f.matches(&query("allow", "r", "psql")));
        assert_eq!(parse_duration("1h30m"), Some(Duration::minutes(90)));
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn last_matching_reads_backwards_across_chunks_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        let mut seq = 0;
        for f in 0..2 {
            let path = dir.path().join(format!("a{f}.jsonl"));
            let mut text = String::new();
            for _ in 0..3000 {
                seq += 1;
                let decision = if seq % 7 == 0 { "deny" } else { "allow" };
                text.push_str(&format!(
                    "{{\"ts\":\"2026-11-28T00:00:00.000000Z\",\"seq\":{seq},\"event\":\"query\",\"decision\":\"{decision}\",\"pad\":\"{}\"}}\n",
                    "x".repeat(40)
                ));
            }
            std::fs::write(&path, text).unwrap();
            files.push(path);
        }
        let deny = Filter {
            decision: vec!["deny".into()],
            ..Filter::default()
        };
        let got = last_matching(&files, &deny, 5);
        let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![5971, 5978, 5985, 5992, 5999]);
        // More than the newest file holds: the older file supplies the rest.
        let all = last_matching(&files, &Filter::default(), 4000);
        assert_eq!(all.len(), 4000);
        assert_eq!(all[0]["seq"], 2001);
        assert_eq!(all[3999]["seq"], 6000);
        assert!(last_matching(&files, &deny, 0).is_empty());
    }
}
