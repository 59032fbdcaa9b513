//! The audit log: JSON Lines, one event per line, written by a dedicated
//! thread so the data path only pays for a queue push.
//!
//! Fields are added over time but never renamed: `ts` (RFC 3339 UTC with
//! microseconds), `seq` (strictly increasing, continued across restarts and
//! rotations), `event`, then the event's own fields, and last `prev` and
//! `hash`, the hash chain (see [`chain`] for the canonical bytes).
//!
//! Between the data path and the writer sits a bounded queue. When it is
//! full, [`Overflow::Block`] makes the sender wait (nothing is lost; the
//! data path slows to the disk's pace) and [`Overflow::Drop`] drops the
//! event, counts it, and has the writer record a `gap` event with the
//! number dropped. The writer polls the queue on a short interval: the data
//! path never wakes it per event.

pub mod chain;
pub mod json;
mod read;
mod verify;

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::Serialize;
use serde_json::{Map, Value};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::policy::{AuditSettings, FlushPolicy, MAX_QUEUE, Overflow};

pub use read::{ReadError, Record, Records, log_files, records, rotated_path};
pub use verify::{Failure, Problem, Summary, verify};

/// Audit files in chain order, for readers that take whatever they are
/// given: [`log_files`] (base paths bring their rotated siblings), or, when
/// that fails (a path missing), the paths that exist sorted by their first
/// record's `seq`.
#[must_use]
pub fn chain_order(paths: &[PathBuf]) -> Vec<PathBuf> {
    if let Ok(files) = log_files(paths) {
        return files;
    }
    let existing: Vec<&PathBuf> = paths.iter().filter(|p| p.is_file()).collect();
    log_files(&existing).unwrap_or_else(|_| existing.into_iter().cloned().collect())
}

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

/// Sees every record the writer writes, with its final line (`seq`, `prev`
/// and `hash` included). Called on the writer thread, in log order: keep it
/// quick (hand the line to a channel) and never block.
pub trait Tap: Send + Sync {
    fn event(&self, ev: &AuditEvent, line: &str);
}

/// What [`AuditWriter::start`] needs.
#[derive(Clone)]
pub struct AuditConfig {
    /// The live file; rotated files are `PATH.1` (newest) ... `PATH.N`.
    pub path: PathBuf,
    pub settings: AuditSettings,
    pub taps: Vec<Arc<dyn Tap>>,
    /// Kept up to date by the writer; shared with whoever needs the
    /// connections open now (the live tail).
    pub live: Arc<LiveConnections>,
}

impl AuditConfig {
    /// Default settings, no taps.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            settings: AuditSettings::default(),
            taps: Vec::new(),
            live: Arc::default(),
        }
    }
}

/// The connections the writer saw connect and not yet disconnect: when,
/// and their `connect` record's members (the whole identity). The writer
/// begins each file after a rotation with a `connection` record of each;
/// a follower that joins late learns them here.
#[derive(Debug, Default)]
pub struct LiveConnections(
    std::sync::Mutex<std::collections::BTreeMap<u64, (OffsetDateTime, Arc<str>)>>,
);

impl LiveConnections {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, (OffsetDateTime, Arc<str>)>>
    {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The members of each live connection, with `then` run under the same
    /// lock. The writer hands a `connect` record to its taps after the
    /// connection joins the set and a `disconnect` record before it
    /// leaves, so a tap subscribed by `then` sees every change the
    /// snapshot does not.
    pub fn snapshot_with<R>(&self, then: impl FnOnce() -> R) -> (Vec<(u64, Arc<str>)>, R) {
        let live = self.lock();
        let members = live
            .iter()
            .map(|(id, (_, m))| (*id, Arc::clone(m)))
            .collect();
        (members, then())
    }
}

impl std::fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditConfig")
            .field("path", &self.path)
            .field("settings", &self.settings)
            .field("taps", &self.taps.len())
            .finish()
    }
}

/// Counters for metrics: plain atomics, read without locks.
#[derive(Debug, Default)]
pub struct AuditStats {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
    /// Pushed minus taken; may briefly count a blocked sender's event.
    queued: AtomicU64,
    /// Senders waiting for room (block mode).
    waiting: AtomicUsize,
    capacity: AtomicUsize,
}

impl AuditStats {
    /// Records written to the file (gaps and agent events included).
    #[must_use]
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Events dropped because the queue was full (drop mode).
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Failed writes, flushes, fsyncs and rotations.
    #[must_use]
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Events waiting in the queue now.
    #[must_use]
    pub fn queue_depth(&self) -> u64 {
        let cap = u64::try_from(self.capacity.load(Ordering::Relaxed)).unwrap_or(u64::MAX);
        self.queued.load(Ordering::Relaxed).min(cap)
    }

    /// The queue's capacity.
    #[must_use]
    pub fn queue_capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }
}

/// Typed event fields, rendered to JSON by the writer thread (off the data
/// path).
pub trait EventBody: Send + Sync {
    /// Appends the body as a JSON object.
    fn write_json(&self, out: &mut Vec<u8>);
}

impl<T: Serialize + Send + Sync> EventBody for T {
    fn write_json(&self, out: &mut Vec<u8>) {
        let start = out.len();
        if serde_json::to_writer(&mut *out, self).is_err() {
            out.truncate(start);
            out.extend_from_slice(b"{}");
        }
    }
}

/// What metrics count of a decided statement, carried typed so that the
/// metrics tap does not parse the rendered line.
#[derive(Clone, Debug)]
pub struct DecisionFacts {
    pub target: Arc<str>,
    /// The policy identity names, comma-separated.
    pub identities: Arc<str>,
    pub decision: crate::policy::Decision,
    pub eval_us: u64,
}

/// What metrics count of an `execute` or `executions` record: executions
/// of statements decided earlier, carried typed like [`DecisionFacts`].
#[derive(Clone, Debug)]
pub struct ExecutionFacts {
    pub target: Arc<str>,
    /// The policy identity names, comma-separated.
    pub identities: Arc<str>,
    /// The decision of the statement executed.
    pub decision: crate::policy::Decision,
    pub count: u64,
}

/// One event on its way to the log.
pub struct AuditEvent {
    pub ts: OffsetDateTime,
    pub event: &'static str,
    /// JSON members shared by every event of one connection (connection id,
    /// target, identity...), rendered once per connection, without braces.
    pub conn: Option<Arc<str>>,
    /// The connection's id, for events of a connection: the writer keeps
    /// the members of each `connect` until its `disconnect`, to begin each
    /// file after a rotation with the connections still live.
    pub conn_id: Option<u64>,
    /// Typed fields, for events on the per-query path.
    pub body: Option<Box<dyn EventBody>>,
    /// Ad-hoc fields, for rare events.
    pub fields: Map<String, Value>,
    /// For `query` events: what metrics count (also in the rendered line).
    pub decision: Option<DecisionFacts>,
    /// For `execute` and `executions` events: what metrics count.
    pub executions: Option<ExecutionFacts>,
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
            conn_id: None,
            body: None,
            fields: Map::new(),
            decision: None,
            executions: None,
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

    /// Adds the pre-rendered members of connection `id`.
    #[must_use]
    pub fn with_conn(mut self, id: u64, members: Arc<str>) -> Self {
        self.conn = Some(members);
        self.conn_id = Some(id);
        self
    }

    /// Adds typed fields, serialised later by the writer.
    #[must_use]
    pub fn with_body(mut self, body: impl EventBody + 'static) -> Self {
        self.body = Some(Box::new(body));
        self
    }

    /// Adds what metrics count of a decided statement.
    #[must_use]
    pub fn with_decision(mut self, facts: DecisionFacts) -> Self {
        self.decision = Some(facts);
        self
    }

    /// Adds what metrics count of executions.
    #[must_use]
    pub fn with_executions(mut self, facts: ExecutionFacts) -> Self {
        self.executions = Some(facts);
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
    let mut out = Vec::with_capacity(27);
    write_ts(&mut out, ts);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends [`format_ts`]'s text; digits written by hand, as this runs once
/// per record.
fn write_ts(out: &mut Vec<u8>, ts: OffsetDateTime) {
    fn digits(out: &mut Vec<u8>, v: u32, width: u32) {
        for i in (0..width).rev() {
            // `% 10` keeps the value a single digit, so the cast is exact.
            #[allow(clippy::cast_possible_truncation)]
            out.push(b'0' + (v / 10u32.pow(i) % 10) as u8);
        }
    }
    let ts = ts.to_offset(time::UtcOffset::UTC);
    match u32::try_from(ts.year()) {
        Ok(y) if y <= 9999 => digits(out, y, 4),
        // RFC 3339 has four-digit years; fall back to the library.
        _ => {
            let text = ts
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| t.format(&Rfc3339).ok())
                .unwrap_or_else(|| String::from("1970-01-01T00:00:00Z"));
            out.extend_from_slice(text.trim_end_matches('Z').as_bytes());
            out.push(b'.');
            digits(out, ts.microsecond(), 6);
            out.push(b'Z');
            return;
        }
    }
    let two = |out: &mut Vec<u8>, sep: u8, v: u8| {
        out.push(sep);
        digits(out, u32::from(v), 2);
    };
    two(out, b'-', u8::from(ts.month()));
    two(out, b'-', ts.day());
    two(out, b'T', ts.hour());
    two(out, b':', ts.minute());
    two(out, b':', ts.second());
    out.push(b'.');
    digits(out, ts.microsecond(), 6);
    out.push(b'Z');
}

/// Appends the JSON object that `write` produces as further members of the
/// object being built in `line` (its braces dropped, a comma before); `{}`
/// adds nothing.
fn splice_object(line: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = line.len();
    write(line);
    let written = &line[start..];
    if written.len() <= 2 || written[0] != b'{' || written[written.len() - 1] != b'}' {
        line.truncate(start);
        return;
    }
    line[start] = b',';
    line.pop();
}

/// Renders one event as its JSON line (without the newline), chained to
/// `prev`; returns the line and its hash.
#[must_use]
pub fn render(seq: u64, prev: &str, ev: &AuditEvent) -> (String, String) {
    let mut line = Vec::with_capacity(1024);
    line.extend_from_slice(b"{\"ts\":\"");
    write_ts(&mut line, ev.ts);
    line.extend_from_slice(b"\",\"seq\":");
    let _ = write!(line, "{seq}");
    line.extend_from_slice(b",\"event\":");
    if ev
        .event
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        line.push(b'"');
        line.extend_from_slice(ev.event.as_bytes());
        line.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut line, ev.event);
    }
    if let Some(c) = &ev.conn
        && !c.is_empty()
    {
        line.push(b',');
        line.extend_from_slice(c.as_bytes());
    }
    if let Some(b) = &ev.body {
        splice_object(&mut line, |out| b.write_json(out));
    }
    if !ev.fields.is_empty() {
        splice_object(&mut line, |out| {
            let _ = serde_json::to_writer(out, &ev.fields);
        });
    }
    // Every piece above is UTF-8 (JSON from serde_json, `&str`s); the lossy
    // path is never taken but keeps a bug from losing the record.
    let line = String::from_utf8(line)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    chain::seal(line, prev)
}

/// Sending side of the audit log; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: SyncSender<AuditEvent>,
    overflow: Overflow,
    stats: Arc<AuditStats>,
}

impl AuditLog {
    /// Queues an event. With a full queue, blocks until there is room
    /// ([`Overflow::Block`]) or drops and counts the event
    /// ([`Overflow::Drop`]). The writer only stops after every sender is
    /// gone, so nothing queued is lost.
    pub fn record(&self, ev: AuditEvent) {
        let stats = &self.stats;
        // Counted before the push so the writer's decrement never comes first.
        stats.queued.fetch_add(1, Ordering::Relaxed);
        let ev = match self.tx.try_send(ev) {
            Ok(()) => return,
            Err(TrySendError::Full(ev)) => ev,
            Err(TrySendError::Disconnected(_)) => {
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                tracing::error!("audit writer is gone; event dropped");
                return;
            }
        };
        match self.overflow {
            Overflow::Drop => {
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Overflow::Block => {
                // The writer sees `waiting` and drains again at once instead
                // of sleeping its interval; taking from the queue releases us.
                stats.waiting.fetch_add(1, Ordering::SeqCst);
                let sent = self.tx.send(ev);
                stats.waiting.fetch_sub(1, Ordering::SeqCst);
                if sent.is_err() {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    tracing::error!("audit writer is gone; event dropped");
                }
            }
        }
    }

    /// Counters for metrics.
    #[must_use]
    pub fn stats(&self) -> &Arc<AuditStats> {
        &self.stats
    }
}

/// Owns the writer thread; dropping every [`AuditLog`] and then calling
/// [`AuditWriter::finish`] writes everything queued, flushes, fsyncs and
/// closes the file.
pub struct AuditWriter {
    handle: Option<JoinHandle<()>>,
    stats: Arc<AuditStats>,
}

impl AuditWriter {
    /// Opens (appending) the live log file, creating its directory, picks up
    /// `seq` and the hash chain where the existing log ends (the live file,
    /// else its newest rotated file), and starts the writer. A partial last
    /// line left by a crash is cut off first and recorded in a
    /// `log_repaired` event.
    ///
    /// # Errors
    /// When the file cannot be opened or the thread cannot start.
    pub fn start(config: AuditConfig) -> Result<(AuditLog, Self), AuditError> {
        let capacity = config.settings.queue.clamp(1, MAX_QUEUE);
        let overflow = config.settings.overflow;
        let stats = Arc::new(AuditStats::default());
        stats.capacity.store(capacity, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(capacity);
        let (mut writer, repaired) = Writer::open(config, Arc::clone(&stats))?;
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.start(repaired, &rx))
            .map_err(AuditError::Spawn)?;
        Ok((
            AuditLog {
                tx,
                overflow,
                stats: Arc::clone(&stats),
            },
            Self {
                handle: Some(handle),
                stats,
            },
        ))
    }

    /// Like [`AuditWriter::start`], but the log is opened (and its chain
    /// picked up) only once `wait` returns: records queue until then. For a
    /// handover, where the previous agent is still writing the same log.
    /// A failure to open is reported on stderr and counted as write errors.
    ///
    /// # Errors
    /// When the thread cannot start.
    pub fn start_after(
        config: AuditConfig,
        wait: impl FnOnce() + Send + 'static,
    ) -> Result<(AuditLog, Self), AuditError> {
        let capacity = config.settings.queue.clamp(1, MAX_QUEUE);
        let overflow = config.settings.overflow;
        let stats = Arc::new(AuditStats::default());
        stats.capacity.store(capacity, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(capacity);
        let thread_stats = Arc::clone(&stats);
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                wait();
                match Writer::open(config, Arc::clone(&thread_stats)) {
                    Ok((mut writer, repaired)) => writer.start(repaired, &rx),
                    Err(e) => {
                        tracing::error!("audit log: {e}; records are lost");
                        while rx.recv().is_ok() {
                            thread_stats.queued.fetch_sub(1, Ordering::Relaxed);
                            thread_stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .map_err(AuditError::Spawn)?;
        Ok((
            AuditLog {
                tx,
                overflow,
                stats: Arc::clone(&stats),
            },
            Self {
                handle: Some(handle),
                stats,
            },
        ))
    }

    /// Counters for metrics.
    #[must_use]
    pub fn stats(&self) -> Arc<AuditStats> {
        Arc::clone(&self.stats)
    }

    /// Waits until every queued event is on disk.
    pub fn finish(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Writer {
    /// Opens (appending) the live log file, creating its directory, and
    /// picks up `seq` and the hash chain where the existing log ends. A
    /// partial last line is cut off; its size comes back for a
    /// `log_repaired` event.
    fn open(
        config: AuditConfig,
        stats: Arc<AuditStats>,
    ) -> Result<(Self, Option<u64>), AuditError> {
        let AuditConfig {
            path,
            settings,
            taps,
            live,
        } = config;
        let open_err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let tail = read::tail(&path).map_err(open_err)?;
        let (out, size) = open_live(&path).map_err(open_err)?;
        let prev = match (&tail.seq, tail.hash) {
            (_, Some(h)) => h,
            (None, None) => chain::GENESIS.to_owned(),
            (Some(_), None) => {
                tracing::warn!(
                    "audit log {} ends with a record without a hash; the chain starts afresh",
                    path.display()
                );
                chain::GENESIS.to_owned()
            }
        };
        Ok((
            Self {
                path,
                settings,
                taps,
                stats,
                out,
                size,
                head_bytes: 0,
                seq: tail.seq.map_or(1, |s| s.saturating_add(1)),
                prev,
                reported_dropped: 0,
                live,
            },
            tail.repaired,
        ))
    }

    /// The writer thread's body.
    fn start(&mut self, repaired: Option<u64>, rx: &Receiver<AuditEvent>) {
        lower_priority();
        if let Some(bytes) = repaired {
            tracing::warn!(
                "audit log {}: cut {bytes} bytes of a partial last line",
                self.path.display()
            );
            let ev = AuditEvent::new("log_repaired")
                .with("file", self.path.display().to_string())
                .with("truncated_bytes", bytes);
            self.write_event(&ev);
        }
        self.run(rx);
    }
}

/// Nice value of the writer thread: its wake-ups then do not preempt the
/// data path (a worker woken by traffic preempts the writer instead), and
/// it still gets a share of a contended CPU well above what writing costs.
const WRITER_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`WRITER_NICE`]
/// (Linux nice values are per thread). Best effort: on failure the writer
/// runs at the agent's priority.
fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let Ok(tid) = libc::id_t::try_from(unsafe { libc::gettid() }) else {
        return;
    };
    // SAFETY: setpriority only reads its arguments; `tid` is this thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, WRITER_NICE) };
    if rc != 0 {
        tracing::debug!(
            "audit writer: setpriority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn open_live(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok((BufWriter::with_capacity(256 * 1024, file), size))
}

/// How often the writer wakes to drain the queue. The data path never
/// wakes the writer (a wake-up per statement costs a context switch, which
/// on a busy CPU is most of a query's budget); it only pushes. Each wake
/// costs a context switch and evicts some of the cache that the statements'
/// processes share, so the writer wakes seldom and writes what came in
/// one batch: 5 ms against 1 ms cut the added latency at 1 client by about
/// 6 µs per statement (README, "Benchmarks").
const DRAIN_INTERVAL: Duration = Duration::from_millis(5);

/// Records the writer writes before it lets other runnable threads go
/// first: a long batch is spread over several slices, so a statement that
/// shares the CPU with the writer does not wait behind all of it.
const WRITER_SLICE: u64 = 32;

/// How soon the writer drains again while senders wait for room.
const BUSY_INTERVAL: Duration = Duration::from_micros(50);

struct Writer {
    path: PathBuf,
    settings: AuditSettings,
    taps: Vec<Arc<dyn Tap>>,
    stats: Arc<AuditStats>,
    out: BufWriter<File>,
    /// Bytes in the live file.
    size: u64,
    /// Bytes of the live file's head (`connection` records after a
    /// rotation).
    head_bytes: u64,
    /// `seq` of the next record.
    seq: u64,
    /// `hash` of the last record written.
    prev: String,
    /// Drops already recorded in `gap` events.
    reported_dropped: u64,
    /// After a rotation, the new file begins with a `connection` record of
    /// each, so that every file reads on its own.
    live: Arc<LiveConnections>,
}

impl Writer {
    fn run(&mut self, rx: &Receiver<AuditEvent>) {
        let mut written = 0u64;
        loop {
            let before = written;
            let closed = loop {
                match rx.try_recv() {
                    Ok(ev) => {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        self.write_event(&ev);
                        written += 1;
                        if written.is_multiple_of(WRITER_SLICE) {
                            std::thread::yield_now();
                        }
                    }
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            let gap = self.record_gap();
            if (gap || written != before) && self.settings.flush == FlushPolicy::Batch {
                self.flush();
            }
            if closed {
                break;
            }
            if self.stats.waiting.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(BUSY_INTERVAL);
            } else {
                std::thread::sleep(DRAIN_INTERVAL);
            }
        }
        self.record_gap();
        self.flush();
        if let Err(e) = self.out.get_ref().sync_all() {
            self.error("fsync", &e);
        }
    }

    /// Writes a `gap` event when events were dropped since the last one.
    fn record_gap(&mut self) -> bool {
        let dropped = self.stats.dropped.load(Ordering::Relaxed);
        if dropped <= self.reported_dropped {
            return false;
        }
        let n = dropped - self.reported_dropped;
        self.reported_dropped = dropped;
        tracing::warn!("audit queue full: {n} events dropped");
        self.write_event(&AuditEvent::new("gap").with("dropped", n));
        true
    }

    fn write_event(&mut self, ev: &AuditEvent) {
        let (mut line, mut hash) = render(self.seq, &self.prev, ev);
        let len = line.len() as u64 + 1;
        if self.settings.rotate_bytes > 0
            && self.size > self.head_bytes
            && self.size.saturating_add(len) > self.settings.rotate_bytes
            && self.rotate()
        {
            self.write_live_connections();
            // A file holding only its head is not rotated again, however
            // small `rotate_bytes` is.
            self.head_bytes = self.size;
            (line, hash) = render(self.seq, &self.prev, ev);
        }
        // Taps see a `connect` after the connection joins the live set and
        // a `disconnect` before it leaves (see `LiveConnections`).
        if let (Some(id), "connect", Some(members)) = (ev.conn_id, ev.event, &ev.conn) {
            self.live.lock().insert(id, (ev.ts, Arc::clone(members)));
        }
        self.write_line(ev, &line, hash);
        if let (Some(id), "disconnect") = (ev.conn_id, ev.event) {
            self.live.lock().remove(&id);
        }
    }

    /// The head of a file begun by a rotation: a `connection` record (the
    /// `connect` record's members and when it was) per live connection.
    fn write_live_connections(&mut self) {
        let live: Vec<(u64, OffsetDateTime, Arc<str>)> = self
            .live
            .lock()
            .iter()
            .map(|(id, (ts, members))| (*id, *ts, Arc::clone(members)))
            .collect();
        for (id, connected, members) in live {
            let ev = AuditEvent::new("connection")
                .with_conn(id, members)
                .with("connected_at", format_ts(connected));
            let (line, hash) = render(self.seq, &self.prev, &ev);
            self.write_line(&ev, &line, hash);
        }
    }

    fn write_line(&mut self, ev: &AuditEvent, line: &str, hash: String) {
        match self
            .out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
        {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
                self.size += line.len() as u64 + 1;
            }
            Err(e) => self.error("write", &e),
        }
        // The chain moves on even after a failed write: the next record then
        // names the missing one's hash, so the loss shows in `verify`.
        self.seq += 1;
        self.prev = hash;
        if self.settings.flush == FlushPolicy::Every {
            self.flush();
        }
        for tap in &self.taps {
            // A tap that panics must not take the log down with it.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                tap.event(ev, line);
            }));
            if r.is_err() {
                tracing::error!("audit tap panicked");
            }
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            self.error("flush", &e);
            return;
        }
        if self.settings.fsync
            && let Err(e) = self.out.get_ref().sync_data()
        {
            self.error("fsync", &e);
        }
    }

    fn error(&self, what: &str, e: &std::io::Error) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!("audit {what} failed ({}): {e}", self.path.display());
    }

    /// `audit.jsonl` becomes `audit.jsonl.1`, `.1` becomes `.2`, ...; files
    /// numbered `retain` and beyond are deleted; a new live file is opened.
    /// Returns whether writing goes on in a new file.
    fn rotate(&mut self) -> bool {
        self.flush();
        if let Err(e) = self.shift_files() {
            self.error("rotation", &e);
            // Try again only after another `rotate_bytes`.
            self.size = 0;
            return false;
        }
        let reopened = match open_live(&self.path) {
            Ok((out, size)) => {
                self.out = out;
                self.size = size;
                true
            }
            Err(e) => {
                // Keep writing to the renamed file rather than lose records.
                self.error("reopen after rotation", &e);
                self.size = 0;
                false
            }
        };
        if self.settings.fsync
            && let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(e) = File::open(dir).and_then(|d| d.sync_all())
        {
            self.error("directory fsync", &e);
        }
        reopened
    }

    fn shift_files(&self) -> std::io::Result<()> {
        let retain = self.settings.retain;
        for (n, p) in read::rotated_siblings(&self.path)? {
            if n >= retain {
                std::fs::remove_file(p)?;
            }
        }
        for n in (1..retain).rev() {
            let from = rotated_path(&self.path, n);
            if from.exists() {
                std::fs::rename(from, rotated_path(&self.path, n + 1))?;
            }
        }
        if retain > 0 {
            std::fs::rename(&self.path, rotated_path(&self.path, 1))
        } else {
            std::fs::remove_file(&self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_microseconds() {
        let ts = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(format_ts(ts), "2023-11-14T22:13:20.123456Z");
        let early = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(format_ts(early), "1970-01-01T00:00:00.000000Z");
        let offset = ts.to_offset(time::UtcOffset::from_hms(5, 30, 0).unwrap());
        assert_eq!(format_ts(offset), "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn render_splices_conn_body_and_fields() {
        #[derive(Serialize)]
        struct Body {
            a: u8,
            s: &'static str,
        }
        #[derive(Serialize)]
        struct Empty {}
        let ev = AuditEvent::new("query")
            .with_conn(7, Arc::from(r#""conn":7"#))
            .with_body(Body { a: 1, s: "x\"y" })
            .with("z", true);
        let (line, hash) = render(3, chain::GENESIS, &ev);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["event"], "query");
        assert_eq!(v["conn"], 7);
        assert_eq!(v["a"], 1);
        assert_eq!(v["s"], "x\"y");
        assert_eq!(v["z"], true);
        assert_eq!(v["hash"], hash.as_str());
        assert_eq!(
            chain::check(&line),
            chain::Sealed::Intact {
                prev: chain::GENESIS,
                hash: &hash
            }
        );
        // An empty body and no fields add nothing, not a stray comma.
        let (line, _) = render(
            1,
            chain::GENESIS,
            &AuditEvent::new("gap").with_body(Empty {}),
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 5, "{line}");
    }

    fn settings(f: impl FnOnce(&mut AuditSettings)) -> AuditSettings {
        let mut s = AuditSettings::default();
        f(&mut s);
        s
    }

    fn start(path: &Path, settings: AuditSettings) -> (AuditLog, AuditWriter) {
        AuditWriter::start(AuditConfig {
            settings,
            ..AuditConfig::new(path)
        })
        .unwrap()
    }

    /// Writes `n` events numbered from `from` in one agent run.
    fn run(path: &Path, settings: AuditSettings, from: u64, n: u64) {
        let (log, writer) = start(path, settings);
        for i in from..from + n {
            log.record(AuditEvent::new("connect").with("conn", i));
        }
        drop(log);
        writer.finish();
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn value(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    fn check(base: &Path) -> Result<Summary, Failure> {
        verify(log_files(&[base]).unwrap())
    }

    #[test]
    fn writes_lines_in_order_and_continues_seq_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        run(&path, AuditSettings::default(), 0, 3);
        let first_run = lines(&path);
        run(&path, AuditSettings::default(), 3, 3);
        let all = lines(&path);
        let seqs: Vec<u64> = all
            .iter()
            .map(|l| value(l)["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(value(&all[0])["prev"], chain::GENESIS);
        // The second run chains to the first run's last record.
        assert_eq!(value(&all[3])["prev"], value(&first_run[2])["hash"]);
        // `hash` is the last member, `prev` right before it.
        assert!(all[0].contains(&format!(",\"prev\":\"{}\",\"hash\":\"", chain::GENESIS)));
        let sum = check(&path).unwrap();
        assert_eq!(
            (sum.records, sum.files, sum.first_seq, sum.last_seq),
            (6, 1, Some(1), Some(6))
        );
        assert_eq!(sum.anchor.as_deref(), Some(chain::GENESIS));
        assert_eq!(sum.last_hash.as_deref(), value(&all[5])["hash"].as_str());
    }

    /// A log of 40 records over several rotated files.
    fn rotated_log(dir: &Path) -> PathBuf {
        let base = dir.join("audit.jsonl");
        let s = settings(|s| {
            s.rotate_bytes = 1000;
            s.retain = 100;
        });
        run(&base, s.clone(), 0, 20);
        run(&base, s, 20, 20);
        base
    }

    /// Members of a connection's `connect` record, and the brief ones of
    /// its `query` records.
    fn conn_members(id: u64) -> (Arc<str>, Arc<str>) {
        (
            Arc::from(format!(
                r#""conn":{id},"identities":[],"identity":{{"pid":{id},"comm":"c{id}","cgroup_id":{id},"unit":"u{id}.service"}}"#
            )),
            Arc::from(format!(
                r#""conn":{id},"identities":[],"identity":{{"pid":{id},"comm":"c{id}"}}"#
            )),
        )
    }

    #[test]
    fn rotation_begins_each_file_with_the_live_connections() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let (log, writer) = start(
            &base,
            settings(|s| {
                s.rotate_bytes = 4000;
                s.retain = 100;
            }),
        );
        for id in 1..=5 {
            log.record(AuditEvent::new("connect").with_conn(id, conn_members(id).0));
        }
        for id in [2, 4] {
            log.record(AuditEvent::new("disconnect").with_conn(id, conn_members(id).0));
        }
        for i in 0..60 {
            let id = [1, 3, 5][i % 3];
            log.record(
                AuditEvent::new("query")
                    .with_conn(id, conn_members(id).1)
                    .with("query", "SELECT 1"),
            );
        }
        log.record(AuditEvent::new("disconnect").with_conn(3, conn_members(3).0));
        for _ in 0..30 {
            log.record(AuditEvent::new("query").with_conn(1, conn_members(1).1));
        }
        drop(log);
        writer.finish();
        let files = log_files(&[&base]).unwrap();
        assert!(files.len() >= 4, "{files:?}");
        let mut saw_after_disconnect = false;
        for file in &files[1..] {
            let records: Vec<Value> = lines(file).iter().map(|l| value(l)).collect();
            let head: Vec<u64> = records
                .iter()
                .take_while(|r| r["event"] == "connection")
                .map(|r| r["conn"].as_u64().unwrap())
                .collect();
            // Each file names who its records come from, before them.
            let conns: std::collections::BTreeSet<u64> = records
                .iter()
                .filter(|r| r["event"] == "query")
                .map(|r| r["conn"].as_u64().unwrap())
                .collect();
            assert!(conns.iter().all(|c| head.contains(c)), "{head:?} {conns:?}");
            assert!(head == [1, 3, 5] || head == [1, 5], "{head:?}");
            saw_after_disconnect |= head == [1, 5];
            let first = &records[0];
            assert_eq!(first["identity"]["unit"], "u1.service");
            assert!(first["connected_at"].as_str().unwrap().ends_with('Z'));
        }
        assert!(saw_after_disconnect);
        // One chain through every record, head records included.
        let sum = check(&base).unwrap();
        let total: usize = files.iter().map(|f| lines(f).len()).sum();
        assert_eq!(usize::try_from(sum.records).unwrap(), total);
        assert_eq!(sum.first_seq, Some(1));
    }

    #[test]
    fn a_head_larger_than_rotate_bytes_does_not_rotate_again() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let (log, writer) = start(
            &base,
            settings(|s| {
                s.rotate_bytes = 10;
                s.retain = 100;
            }),
        );
        for id in 1..=3 {
            log.record(AuditEvent::new("connect").with_conn(id, conn_members(id).0));
        }
        for _ in 0..4 {
            log.record(AuditEvent::new("query").with_conn(2, conn_members(2).1));
        }
        drop(log);
        writer.finish();
        let files = log_files(&[&base]).unwrap();
        // Each rotated-to file: its head, then one record.
        for file in &files[3..] {
            let events: Vec<String> = lines(file)
                .iter()
                .map(|l| value(l)["event"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(events, ["connection", "connection", "connection", "query"]);
        }
        assert!(check(&base).is_ok());
    }

    fn copy_log(from: &Path, to: &Path) -> PathBuf {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from.parent().unwrap()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to.join(from.file_name().unwrap())
    }

    fn edit_lines(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let mut l = lines(path);
        f(&mut l);
        let mut text = l.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    fn failure(base: &Path) -> Failure {
        match check(base) {
            Ok(s) => panic!("tampering not caught: {s}"),
            Err(f) => f,
        }
    }

    #[test]
    fn rotation_keeps_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let base = rotated_log(dir.path());
        let files = log_files(&[&base]).unwrap();
        assert!(files.len() >= 4, "{files:?}");
        // Oldest first, live file last.
        assert_eq!(files.last().unwrap(), &base);
        assert_eq!(files[0], rotated_path(&base, files.len() - 1));
        for f in &files {
            assert!(
                std::fs::metadata(f).unwrap().len() <= 1000,
                "{}",
                f.display()
            );
        }
        let sum = check(&base).unwrap();
        assert_eq!(
            (sum.records, sum.first_seq, sum.last_seq),
            (40, Some(1), Some(40))
        );
        // Any order of the same files gives the same chain.
        let mut shuffled = files.clone();
        shuffled.reverse();
        assert_eq!(log_files(&shuffled).unwrap(), files);
        // The first record of each file chains to the last of the one before.
        let last_of_first = lines(&files[0]).last().map(|l| value(l)["hash"].clone());
        assert_eq!(
            Some(value(&lines(&files[1])[0])["prev"].clone()),
            last_of_first
        );
        // Records read back in chain order, nothing skipped.
        let seqs: Vec<u64> = records(files)
            .map(|r| r.unwrap().value["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn verify_catches_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let base = rotated_log(&dir.path().join("orig"));
        let files = log_files(&[&base]).unwrap();
        let (older, newer) = (
            files[files.len() - 3].clone(),
            files[files.len() - 2].clone(),
        );
        let name = |p: &Path| p.file_name().unwrap().to_owned();
        let seq_at = |p: &Path, i: usize| value(&lines(p)[i])["seq"].as_u64();
        let mut case = 0;
        let mut copy = || {
            case += 1;
            copy_log(&base, &dir.path().join(format!("case{case}")))
        };

        // Edited (hash left as it was).
        let b = copy();
        let f = b.with_file_name(name(&older));
        edit_lines(&f, |l| l[1] = l[1].replace("\"conn\":", "\"conn\":1"));
        let e = failure(&b);
        assert_eq!(
            (e.file.clone(), e.line, e.problem),
            (f.clone(), 2, Problem::Edited)
        );
        assert_eq!(e.seq, seq_at(&older, 1));

        // Edited and re-sealed: the next record's link breaks.
        let b = copy();
        let f = b.with_file_name(name(&older));
        edit_lines(&f, |l| {
            let v = value(&l[1]);
            let open = l[1]
                .split(",\"prev\":")
                .next()
                .unwrap()
                .replace("\"conn\":", "\"conn\":1");
            l[1] = chain::seal(open, v["prev"].as_str().unwrap()).0;
        });
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (f.clone(), 3));
        assert!(matches!(e.problem, Problem::BrokenLink { .. }), "{e}");

        // Deleted.
        let b = copy();
        let f = b.with_file_name(name(&older));
        edit_lines(&f, |l| {
            l.remove(1);
        });
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (f.clone(), 2));
        assert!(
            matches!(e.problem, Problem::SeqGap { expected, found } if found == expected + 1),
            "{e}"
        );

        // Inserted (a copy of another record).
        let b = copy();
        let f = b.with_file_name(name(&older));
        edit_lines(&f, |l| {
            let dup = l[0].clone();
            l.insert(2, dup);
        });
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (f.clone(), 3));
        assert!(
            matches!(e.problem, Problem::SeqGap { expected, found } if found < expected),
            "{e}"
        );

        // Reordered.
        let b = copy();
        let f = b.with_file_name(name(&older));
        edit_lines(&f, |l| l.swap(0, 1));
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (f.clone(), 1));
        assert!(matches!(e.problem, Problem::SeqGap { .. }), "{e}");

        // Reordered across the rotation boundary.
        let b = copy();
        let (fo, fn_) = (
            b.with_file_name(name(&older)),
            b.with_file_name(name(&newer)),
        );
        let mut lo = lines(&fo);
        let mut ln = lines(&fn_);
        let last = lo.len() - 1;
        std::mem::swap(&mut lo[last], &mut ln[0]);
        std::fs::write(&fo, lo.join("\n") + "\n").unwrap();
        std::fs::write(&fn_, ln.join("\n") + "\n").unwrap();
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (fo.clone(), last + 1));

        // Deleted across the boundary: the first record of the newer file.
        let b = copy();
        let f = b.with_file_name(name(&newer));
        edit_lines(&f, |l| {
            l.remove(0);
        });
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (f.clone(), 1));
        assert!(matches!(e.problem, Problem::SeqGap { .. }), "{e}");

        // A whole rotated file in the middle removed.
        let b = copy();
        std::fs::remove_file(b.with_file_name(name(&older))).unwrap();
        let e = failure(&b);
        assert_eq!(e.file, b.with_file_name(name(&newer)));

        // Unparsable line.
        let b = copy();
        let f = b.with_file_name(name(&older));
        edit_lines(&f, |l| l[2] = "{not json".to_owned());
        let e = failure(&b);
        assert_eq!((e.file.clone(), e.line), (f.clone(), 3));
        assert!(matches!(e.problem, Problem::Unparsable(_)), "{e}");

        // Truncated final line of the live file: reported as such.
        let b = copy();
        let text = std::fs::read_to_string(&b).unwrap();
        std::fs::write(&b, &text[..text.len() - 20]).unwrap();
        let e = failure(&b);
        assert_eq!(e.problem, Problem::Truncated, "{e}");
        assert_eq!(e.line, text.lines().count());
        assert!(e.to_string().contains("truncated"), "{e}");

        // The untouched original still verifies.
        check(&base).unwrap();
    }

    #[test]
    fn retention_deletes_the_oldest_and_verify_anchors_later() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let s = settings(|s| {
            s.rotate_bytes = 800;
            s.retain = 2;
        });
        run(&base, s, 0, 40);
        let files = log_files(&[&base]).unwrap();
        assert_eq!(
            files,
            vec![rotated_path(&base, 2), rotated_path(&base, 1), base.clone()]
        );
        let sum = check(&base).unwrap();
        assert_eq!(sum.last_seq, Some(40));
        assert!(sum.first_seq.unwrap() > 1);
        assert_ne!(sum.anchor.as_deref(), Some(chain::GENESIS));
        assert!(sum.to_string().contains("rotated away"), "{sum}");
        // retain 0: rotated files are not kept at all.
        let base0 = dir.path().join("zero.jsonl");
        run(
            &base0,
            settings(|s| {
                s.rotate_bytes = 800;
                s.retain = 0;
            }),
            0,
            40,
        );
        assert_eq!(log_files(&[&base0]).unwrap(), vec![base0.clone()]);
        check(&base0).unwrap();
    }

    #[test]
    fn restart_after_crash_mid_write_repairs_and_chains_on() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        run(&base, AuditSettings::default(), 0, 3);
        let mut text = std::fs::read_to_string(&base).unwrap();
        text.push_str("{\"ts\":\"2026-01-01T00:00:00.000000Z\",\"seq\":4,\"ev");
        std::fs::write(&base, &text).unwrap();
        assert_eq!(failure(&base).problem, Problem::Truncated);
        run(&base, AuditSettings::default(), 3, 2);
        let all = lines(&base);
        assert_eq!(value(&all[3])["event"], "log_repaired");
        assert_eq!(value(&all[3])["seq"], 4);
        let sum = check(&base).unwrap();
        assert_eq!(sum.last_seq, Some(6));
    }

    #[test]
    fn restart_right_after_rotation_chains_to_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        run(&base, AuditSettings::default(), 0, 3);
        std::fs::rename(&base, rotated_path(&base, 1)).unwrap();
        run(&base, AuditSettings::default(), 3, 1);
        assert_eq!(value(&lines(&base)[0])["seq"], 4);
        assert_eq!(check(&base).unwrap().records, 4);
    }

    #[test]
    fn drop_mode_records_a_gap_with_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let (log, writer) = start(
            &base,
            settings(|s| {
                s.overflow = Overflow::Drop;
                s.queue = 2;
            }),
        );
        let stats = Arc::clone(log.stats());
        for i in 0..2000 {
            log.record(AuditEvent::new("connect").with("conn", i));
        }
        drop(log);
        writer.finish();
        let all: Vec<Value> = lines(&base).iter().map(|l| value(l)).collect();
        let kept = all.iter().filter(|v| v["event"] == "connect").count() as u64;
        let gaps: u64 = all
            .iter()
            .filter(|v| v["event"] == "gap")
            .map(|v| v["dropped"].as_u64().unwrap())
            .sum();
        assert!(gaps > 0, "nothing dropped with a queue of 2");
        assert_eq!(kept + gaps, 2000);
        assert_eq!(stats.dropped(), gaps);
        assert_eq!(stats.written(), all.len() as u64);
        assert_eq!(stats.queue_depth(), 0);
        check(&base).unwrap();
    }

    #[test]
    fn block_mode_loses_nothing_with_a_tiny_queue() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let (log, writer) = start(
            &base,
            settings(|s| {
                s.queue = 2;
                s.flush = FlushPolicy::Every;
            }),
        );
        let stats = Arc::clone(log.stats());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        log.record(AuditEvent::new("connect").with("conn", t * 1000 + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        writer.finish();
        let mut conns: Vec<u64> = lines(&base)
            .iter()
            .map(|l| value(l)["conn"].as_u64().unwrap())
            .collect();
        conns.sort_unstable();
        let want: Vec<u64> = (0..8u64)
            .flat_map(|t| (0..250).map(move |i| t * 1000 + i))
            .collect();
        assert_eq!(conns, want);
        assert_eq!(
            (stats.written(), stats.dropped(), stats.write_errors()),
            (2000, 0, 0)
        );
        check(&base).unwrap();
    }

    #[test]
    fn taps_see_every_final_line() {
        struct Collect(std::sync::Mutex<Vec<(String, String)>>);
        impl Tap for Collect {
            fn event(&self, ev: &AuditEvent, line: &str) {
                self.0
                    .lock()
                    .unwrap()
                    .push((ev.event.to_owned(), line.to_owned()));
            }
        }
        struct Panics;
        impl Tap for Panics {
            fn event(&self, _: &AuditEvent, _: &str) {
                panic!("tap bug");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        let tap = Arc::new(Collect(std::sync::Mutex::default()));
        let (log, writer) = AuditWriter::start(AuditConfig {
            taps: vec![Arc::new(Panics), tap.clone()],
            ..AuditConfig::new(&base)
        })
        .unwrap();
        for i in 0..5 {
            log.record(AuditEvent::new("connect").with("conn", i));
        }
        drop(log);
        writer.finish();
        let seen = tap.0.lock().unwrap();
        let lines_seen: Vec<String> = seen.iter().map(|(_, l)| l.clone()).collect();
        assert_eq!(lines_seen, lines(&base));
        assert!(seen.iter().all(|(e, _)| e == "connect"));
    }

    #[test]
    fn log_files_errors_and_single_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = rotated_log(dir.path());
        let one = rotated_path(&base, 1);
        // A rotated file named alone is taken alone, and verifies alone.
        assert_eq!(log_files(&[&one]).unwrap(), vec![one.clone()]);
        let sum = verify(vec![one]).unwrap();
        assert!(sum.first_seq.unwrap() > 1);
        assert!(log_files(&[dir.path().join("missing.jsonl")]).is_err());
        // Named twice: counted once.
        assert_eq!(
            log_files(&[&base, &base]).unwrap(),
            log_files(&[&base]).unwrap()
        );
    }

    #[test]
    fn restart_needed_names_writer_settings_only() {
        let a = AuditSettings::default();
        let b = settings(|s| {
            s.queue = 4;
            s.redact_literals = true;
        });
        assert_eq!(a.restart_needed(&b), vec!["queue"]);
        assert!(a.restart_needed(&a).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(
            content in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            line in "[ -~]{0,300}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("x.jsonl");
            std::fs::write(&p, &content).unwrap();
            let _ = verify(vec![p.clone()]);
            let _ = chain::check(&line);
            let mut sealed = chain::seal(format!("{{\"seq\":1,\"x\":{line:?}"), chain::GENESIS).0;
            sealed.push('\n');
            std::fs::write(&p, &sealed).unwrap();
            proptest::prop_assert!(verify(vec![p]).is_ok());
        }
    }
}
