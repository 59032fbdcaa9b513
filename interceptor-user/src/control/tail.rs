//! Which audit events an operator asked to see: the filters of
//! `interceptor tail`, applied alike by the agent (live and recent events)
//! and by the CLI (`--file`, no agent needed).
//!
//! Within one flag any value may match; all flags given must match.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::broadcast;

use crate::audit::{AuditEvent, LiveConnections, Tap};

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

/// Whether `who` (a record carrying `identity` and `identities`) is the
/// workload `want` names.
fn identity_matches(want: &str, who: &Value) -> bool {
    let id = &who["identity"];
    if let Some((key, value)) = want.split_once('=') {
        return match &id[key.trim()] {
            Value::String(s) => s == value.trim(),
            Value::Number(n) => n.to_string() == value.trim(),
            _ => false,
        };
    }
    let named = who["identities"]
        .as_array()
        .is_some_and(|names| names.iter().any(|n| n.as_str() == Some(want)));
    named
        || ["comm", "exe", "user", "unit", "container"]
            .iter()
            .any(|k| id[*k].as_str() == Some(want))
}

impl Filter {
    /// Whether an event passes every filter, judged on the identity it
    /// carries.
    #[must_use]
    pub fn matches(&self, ev: &Value) -> bool {
        self.matches_as(ev, ev)
    }

    /// Whether an event passes every filter, its workload being the one
    /// `who` (a record with `identity` and `identities`) describes: see
    /// [`Connections::who`].
    #[must_use]
    pub fn matches_as(&self, ev: &Value, who: &Value) -> bool {
        any_of(&self.event, ev["event"].as_str())
            && any_of(&self.decision, ev["decision"].as_str())
            && any_of(&self.target, ev["target"].as_str())
            && any_of(&self.rule, ev["rule"].as_str())
            && (self.identity.is_empty() || self.identity.iter().any(|w| identity_matches(w, who)))
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

/// Whether the record's workload must be looked up in its connection's
/// record to judge it: an identity filter, and a record of a connection
/// that carries only a brief identity (`query` records).
fn needs_lookup(filter: &Filter, ev: &Value) -> bool {
    !filter.identity.is_empty() && !whole_identity(ev) && ev["conn"].is_u64()
}

/// Whether a record carries a workload's whole identity (a `connect`
/// record does; a `query` record carries a brief one).
fn whole_identity(ev: &Value) -> bool {
    let id = &ev["identity"];
    id.get("cgroup_id").is_some() || id.get("cgroup").is_some()
}

/// The whole identity of each live connection, learnt reading a log
/// forward from `connect` records and from the `connection` records a file
/// begun by a rotation starts with, so that records carrying a brief
/// identity are judged on the whole one.
#[derive(Debug, Default)]
pub struct Connections {
    by_id: HashMap<u64, Value>,
}

impl Connections {
    /// From the members of live connections' `connect` records (the
    /// agent's own list, for a follower that joins late).
    fn from_members<'a>(members: impl IntoIterator<Item = (u64, &'a str)>) -> Self {
        let by_id = members
            .into_iter()
            .filter_map(|(id, m)| {
                let ev = serde_json::from_str::<Value>(&format!("{{{m}}}")).ok()?;
                Some((id, who_of(&ev)))
            })
            .collect();
        Self { by_id }
    }

    /// Follows the log one record further.
    pub fn learn(&mut self, ev: &Value) {
        let id = ev["conn"].as_u64();
        match (ev["event"].as_str(), id) {
            (Some("connect" | "connection"), Some(id)) if ev["identity"].is_object() => {
                self.by_id.insert(id, who_of(ev));
            }
            (Some("disconnect"), Some(id)) => {
                self.by_id.remove(&id);
            }
            // Connection ids start again with each agent.
            (Some("agent_start"), _) => self.by_id.clear(),
            _ => {}
        }
    }

    /// The record that says who made `ev`: its connection's, when `ev`
    /// carries only a brief identity and the connection is known; else
    /// `ev` itself.
    #[must_use]
    pub fn who<'a>(&'a self, ev: &'a Value) -> &'a Value {
        if whole_identity(ev) {
            return ev;
        }
        ev["conn"]
            .as_u64()
            .and_then(|id| self.by_id.get(&id))
            .unwrap_or(ev)
    }
}

/// What of a connection's record says who it is.
fn who_of(ev: &Value) -> Value {
    serde_json::json!({"identity": ev["identity"], "identities": ev["identities"]})
}

/// Where a file's `connect`, `connection` and `agent_start` records are,
/// for finding the connection record of a record met reading backwards.
struct FileConnections {
    file: std::fs::File,
    /// Connection id -> offsets of its records, ascending.
    records: HashMap<u64, Vec<u64>>,
    /// Offsets of `agent_start` records, ascending: a connection record
    /// before one does not hold for records after it.
    starts: Vec<u64>,
    /// Records read, by offset.
    cache: HashMap<u64, Value>,
}

/// How many connection records a backward read keeps parsed.
const WHO_CACHE: usize = 4096;

impl FileConnections {
    fn build(path: &Path) -> std::io::Result<Self> {
        use std::io::BufRead as _;
        let mut r = std::io::BufReader::with_capacity(256 * 1024, std::fs::File::open(path)?);
        let (mut records, mut starts) = (HashMap::<u64, Vec<u64>>::new(), Vec::new());
        let (mut at, mut line) = (0u64, Vec::new());
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            // The writer renders `"event":"..."` without spaces: only
            // candidate lines are parsed.
            let candidate = memchr::memmem::find(&line, br#""event":"connect"#).is_some()
                || memchr::memmem::find(&line, br#""event":"agent_start""#).is_some();
            if candidate && let Ok(ev) = serde_json::from_slice::<Value>(&line) {
                match (ev["event"].as_str(), ev["conn"].as_u64()) {
                    (Some("connect" | "connection"), Some(id)) => {
                        records.entry(id).or_default().push(at);
                    }
                    (Some("agent_start"), _) => starts.push(at),
                    _ => {}
                }
            }
            at += n as u64;
        }
        Ok(Self {
            file: r.into_inner(),
            records,
            starts,
            cache: HashMap::new(),
        })
    }

    /// The connection record of `ev`, a record at offset `at`.
    fn who(&mut self, ev: &Value, at: u64) -> Option<&Value> {
        let offsets = self.records.get(&ev["conn"].as_u64()?)?;
        let before = offsets.partition_point(|o| *o < at);
        let found = *offsets.get(before.checked_sub(1)?)?;
        let restarted =
            self.starts.partition_point(|s| *s <= found) < self.starts.partition_point(|s| *s < at);
        if restarted {
            return None;
        }
        if !self.cache.contains_key(&found) {
            if self.cache.len() >= WHO_CACHE {
                self.cache.clear();
            }
            let record = serde_json::from_slice::<Value>(&read_line_at(&self.file, found)?).ok()?;
            if !record["identity"].is_object() {
                return None;
            }
            self.cache.insert(found, who_of(&record));
        }
        self.cache.get(&found)
    }
}

/// The line that starts at `at`.
fn read_line_at(file: &std::fs::File, at: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let mut pos = at;
    loop {
        let n = file.read_at(&mut buf, pos).ok()?;
        if n == 0 {
            return Some(line);
        }
        if let Some(end) = memchr::memchr(b'\n', &buf[..n]) {
            line.extend_from_slice(&buf[..end]);
            return Some(line);
        }
        line.extend_from_slice(&buf[..n]);
        pos += n as u64;
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
    /// The connections open now, kept by the audit writer: what a
    /// follower that joins late needs to judge records carrying a brief
    /// identity.
    live: Arc<LiveConnections>,
}

/// How many records a slow follower may lag before it is told it missed
/// some.
const FOLLOW_BUFFER: usize = 4096;

impl Feed {
    /// A feed whose followers learn the open connections from `live` (the
    /// audit writer's, [`crate::audit::AuditConfig::live`]).
    #[must_use]
    pub fn new(live: Arc<LiveConnections>) -> Arc<Self> {
        Arc::new(Self {
            tx: broadcast::channel(FOLLOW_BUFFER).0,
            live,
        })
    }

    /// Live records from now on, and the connections open now.
    #[must_use]
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<str>>, Connections) {
        let (members, rx) = self.live.snapshot_with(|| self.tx.subscribe());
        let conns = Connections::from_members(members.iter().map(|(id, m)| (*id, &**m)));
        (rx, conns)
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
        let Some((live, conns)) = live.as_mut() else {
            return;
        };
        loop {
            let item = match live.recv().await {
                Ok(line) => match serde_json::from_str::<Value>(&line) {
                    Ok(ev) => {
                        conns.learn(&ev);
                        if ev["seq"].as_u64().unwrap_or(u64::MAX) > seen
                            && filter.matches_as(&ev, conns.who(&ev))
                        {
                            ev
                        } else {
                            continue;
                        }
                    }
                    Err(_) => continue,
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

/// Reads a file's lines from the end, in chunks, newest first, each with
/// its offset in the file.
struct ReverseLines {
    file: std::fs::File,
    /// Bytes of the file not yet read.
    left: u64,
    /// Bytes read but not yet split into whole lines (start of the file
    /// side).
    carry: Vec<u8>,
    lines: Vec<(u64, Vec<u8>)>,
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
    type Item = std::io::Result<(u64, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        loop {
            if let Some(l) = self.lines.pop() {
                return Some(Ok(l));
            }
            if self.left == 0 {
                let last = std::mem::take(&mut self.carry);
                return (!last.is_empty()).then_some(Ok((0, last)));
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
            let Some(first) = memchr::memchr(b'\n', &chunk) else {
                self.carry = chunk;
                continue;
            };
            let mut at = self.left + first as u64 + 1;
            for line in chunk[first + 1..].split(|b| *b == b'\n') {
                if !line.is_empty() {
                    self.lines.push((at, line.to_vec()));
                }
                at += line.len() as u64 + 1;
            }
            chunk.truncate(first);
            self.carry = chunk;
        }
    }
}

/// The last `n` records of the logs (newest file last) that pass
/// `filter`, oldest first. Stops reading at records older than the
/// filter's `since`. Unreadable lines are skipped (the verifier reports
/// them; a tail shows what it can). A record carrying a brief identity is
/// judged on its connection's whole identity, found in the same file (see
/// [`Connections`]); where none is found, on its own.
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
        // Built on the first record that needs it.
        let mut conns: Option<Option<FileConnections>> = None;
        for line in lines {
            let Ok((at, line)) = line else {
                continue 'files;
            };
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let matched = if needs_lookup(filter, &ev) {
                let index = conns.get_or_insert_with(|| FileConnections::build(path).ok());
                let who = index.as_mut().and_then(|i| i.who(&ev, at));
                filter.matches_as(&ev, who.unwrap_or(&ev))
            } else {
                filter.matches(&ev)
            };
            if matched {
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

    fn connect(conn: u64, unit: &str, event: &str) -> String {
        json!({"ts": "2026-11-28T00:00:00.000000Z", "event": event, "conn": conn,
               "identities": [], "identity": {"pid": conn, "comm": "psql", "cgroup_id": 9, "unit": unit}})
        .to_string()
    }

    fn brief(seq: u64, conn: u64) -> String {
        json!({"ts": "2026-11-28T00:00:00.000000Z", "seq": seq, "event": "query", "conn": conn,
               "identities": [], "identity": {"pid": conn, "comm": "psql"}})
        .to_string()
    }

    #[test]
    fn brief_records_are_judged_on_their_connections_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let lines = [
            connect(1, "a.service", "connect"),
            connect(2, "b.service", "connect"),
            brief(1, 1),
            brief(2, 2),
            r#"{"event":"disconnect","conn":2,"identity":{"cgroup_id":9,"unit":"b.service"}}"#
                .to_owned(),
            // A new agent: its connection 1 is another workload, and its
            // connection 2 was never seen connecting.
            r#"{"event":"agent_start"}"#.to_owned(),
            connect(1, "c.service", "connect"),
            brief(3, 1),
            brief(4, 2),
            brief(5, 7),
        ];
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let files = vec![path.clone()];
        let seqs = |unit: &str| -> Vec<u64> {
            let f = Filter {
                identity: vec![format!("unit={unit}")],
                event: vec!["query".into()],
                ..Filter::default()
            };
            last_matching(&files, &f, 100)
                .iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(seqs("a.service"), [1]);
        assert_eq!(seqs("b.service"), [2]);
        assert_eq!(seqs("c.service"), [3]);
        // Unknown connections are judged on their own brief identity.
        let f = Filter {
            identity: vec!["pid=7".into()],
            ..Filter::default()
        };
        assert_eq!(last_matching(&files, &f, 100).len(), 1);
        // Reading forward gives the same answers.
        let mut conns = Connections::default();
        let f = Filter {
            identity: vec!["unit=c.service".into()],
            event: vec!["query".into()],
            ..Filter::default()
        };
        let forward: Vec<u64> = lines
            .iter()
            .filter_map(|l| {
                let ev: Value = serde_json::from_str(l).unwrap();
                conns.learn(&ev);
                f.matches_as(&ev, conns.who(&ev))
                    .then(|| ev["seq"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(forward, [3]);
    }

    #[test]
    fn reverse_lines_know_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut text = Vec::new();
        for i in 0..20_000 {
            text.extend_from_slice(format!("line {i} {}\n", "y".repeat(i % 13)).as_bytes());
        }
        std::fs::write(&path, &text).unwrap();
        let mut n = 0;
        for l in ReverseLines::open(&path).unwrap() {
            let (at, line) = l.unwrap();
            let at = usize::try_from(at).unwrap();
            assert_eq!(&text[at..at + line.len()], &line[..]);
            assert!(at == 0 || text[at - 1] == b'\n');
            n += 1;
        }
        assert_eq!(n, 20_000);
    }

    #[tokio::test]
    async fn a_late_follower_knows_the_live_connections() {
        use crate::audit::{AuditConfig, AuditEvent, AuditWriter};
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig::new(dir.path().join("audit.jsonl"));
        let feed = Feed::new(Arc::clone(&config.live));
        let (log, writer) = AuditWriter::start(AuditConfig {
            taps: vec![feed.clone()],
            ..config
        })
        .unwrap();
        let members = |id: u64, unit: &str| -> Arc<str> {
            Arc::from(format!(
                r#""conn":{id},"identities":[],"identity":{{"cgroup_id":1,"unit":"{unit}"}}"#
            ))
        };
        log.record(AuditEvent::new("connect").with_conn(1, members(1, "a")));
        log.record(AuditEvent::new("connect").with_conn(2, members(2, "b")));
        log.record(AuditEvent::new("disconnect").with_conn(2, members(2, "b")));
        drop(log);
        writer.finish();
        let (_rx, conns) = feed.subscribe();
        let ev = json!({"event": "query", "conn": 1, "identity": {"comm": "x"}});
        assert_eq!(conns.who(&ev)["identity"]["unit"], "a");
        let ev = json!({"event": "query", "conn": 2, "identity": {"comm": "x"}});
        assert_eq!(conns.who(&ev)["identity"]["comm"], "x");
    }

    #[test]
    fn every_rotated_file_resolves_its_brief_records() {
        use crate::audit::{AuditConfig, AuditEvent, AuditWriter, log_files};
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let mut config = AuditConfig::new(&base);
        config.settings.rotate_bytes = 3000;
        config.settings.retain = 100;
        let (log, writer) = AuditWriter::start(config).unwrap();
        let conn = |id: u64, whole: bool| -> Arc<str> {
            let unit = if whole {
                format!(r#","cgroup_id":{id},"unit":"u{id}.service""#)
            } else {
                String::new()
            };
            Arc::from(format!(
                r#""conn":{id},"identities":[],"identity":{{"pid":{id},"comm":"c"{unit}}}"#
            ))
        };
        for id in [1, 2] {
            log.record(AuditEvent::new("connect").with_conn(id, conn(id, true)));
        }
        for i in 0..60 {
            let id = 1 + i % 2;
            log.record(AuditEvent::new("query").with_conn(id, conn(id, false)));
        }
        drop(log);
        writer.finish();
        let files = log_files(&[&base]).unwrap();
        assert!(files.len() >= 3, "{files:?}");
        let filter = Filter {
            identity: vec!["unit=u1.service".into()],
            event: vec!["query".into()],
            ..Filter::default()
        };
        // Every file on its own, as if the older ones were deleted.
        let mut found = 0;
        for file in &files {
            found += last_matching(std::slice::from_ref(file), &filter, 1000).len();
        }
        assert_eq!(found, 30);
        assert_eq!(last_matching(&files, &filter, 1000).len(), 30);
    }
}
