//! Prometheus metrics (`--metrics ADDR`, text exposition format 0.0.4 on
//! `GET /metrics`).
//!
//! Decision counts and decision times are taken from the audit records as
//! the writer thread renders them (a [`Tap`]), so the data path pays
//! nothing for them; connection counts, audit queue figures and kernel map
//! occupancy are read when scraped.
//!
//! The HTTP side is a few lines over a tokio listener: one GET endpoint
//! needs no HTTP library.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{
    audit::{AuditEvent, Tap},
    policy::Decision,
};

/// The process's memory: (resident bytes, as the kernel counts them; bytes
/// the allocator holds committed, by its own account). The second is 0
/// where mimalloc is not the allocator in use (unit tests).
#[must_use]
pub fn memory() -> (u64, u64) {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    let resident = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    let (mut ignored, mut commit) = (0usize, 0usize);
    let ignored: *mut usize = &raw mut ignored;
    // SAFETY: mi_process_info writes one usize through each pointer; all
    // point at live locals (the figures not wanted share one, written in
    // turn); it has no other preconditions.
    unsafe {
        libmimalloc_sys::mi_process_info(
            ignored,
            ignored,
            ignored,
            ignored,
            ignored,
            &raw mut commit,
            ignored,
            ignored,
        );
    }
    (resident, commit as u64)
}

/// Upper bounds of the decision-time histogram, in microseconds.
const BUCKETS_US: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

#[derive(Default)]
struct Counters {
    /// (target, identity, decision) -> statements.
    decisions: BTreeMap<(Arc<str>, Arc<str>, Decision), u64>,
    /// (target, identity, decision of the statement) -> executions.
    executions: BTreeMap<(Arc<str>, Arc<str>, Decision), u64>,
    /// Per bucket (cumulative at render), plus the +Inf count and the sum.
    eval_buckets: [u64; BUCKETS_US.len()],
    eval_count: u64,
    eval_sum_us: u64,
    /// Policy loads that took effect (the start counts as the first).
    generation: u64,
    reloads_ok: u64,
    reloads_rejected: u64,
    last_reload_ok: bool,
    events: BTreeMap<&'static str, u64>,
}

/// What a `policy` record tells the metrics (query records carry their
/// facts typed, see [`crate::audit::DecisionFacts`]).
#[derive(Deserialize)]
struct PolicyFields<'a> {
    #[serde(borrow, default)]
    status: Option<&'a str>,
}

/// Live figures read at scrape time.
pub trait Gauges: Send + Sync {
    /// `(name, help, value)` triples, names without the `interceptor_` prefix.
    fn gauges(&self) -> Vec<(&'static str, &'static str, f64)>;
    /// `(map, entries, capacity)` of the kernel maps.
    fn maps(&self) -> Vec<(&'static str, usize, u32)>;
}

/// The metrics registry; one per agent.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

impl Metrics {
    #[must_use]
    pub fn new() -> Arc<Self> {
        let m = Self::default();
        {
            let mut c = m.lock();
            c.generation = 1;
            c.last_reload_ok = true;
        }
        Arc::new(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exposition text.
    #[must_use]
    pub fn render(&self, gauges: &dyn Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let c = self.lock();
        out.push_str("# HELP interceptor_decisions_total Statements decided, by target, policy identity and decision.\n# TYPE interceptor_decisions_total counter\n");
        for ((target, identity, decision), n) in &c.decisions {
            let _ = writeln!(
                out,
                "interceptor_decisions_total{{target=\"{}\",identity=\"{}\",decision=\"{}\"}} {n}",
                escape(target),
                escape(identity),
                decision.as_str()
            );
        }
        out.push_str("# HELP interceptor_executions_total Executions of prepared statements and portals (counted in execute and executions records, and in the query record of a Parse that carries its first execution), by target, policy identity and the statement's decision.\n# TYPE interceptor_executions_total counter\n");
        for ((target, identity, decision), n) in &c.executions {
            let _ = writeln!(
                out,
                "interceptor_executions_total{{target=\"{}\",identity=\"{}\",decision=\"{}\"}} {n}",
                escape(target),
                escape(identity),
                decision.as_str()
            );
        }
        out.push_str("# HELP interceptor_decision_seconds Time to decide one statement.\n# TYPE interceptor_decision_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS_US.iter().zip(c.eval_buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "interceptor_decision_seconds_bucket{{le=\"{}\"}} {cumulative}",
                seconds(*bound)
            );
        }
        let _ = writeln!(
            out,
            "interceptor_decision_seconds_bucket{{le=\"+Inf\"}} {}\ninterceptor_decision_seconds_sum {}\ninterceptor_decision_seconds_count {}",
            c.eval_count,
            seconds(c.eval_sum_us),
            c.eval_count
        );
        out.push_str("# HELP interceptor_audit_events_total Audit records written, by event.\n# TYPE interceptor_audit_events_total counter\n");
        for (event, n) in &c.events {
            let _ = writeln!(
                out,
                "interceptor_audit_events_total{{event=\"{}\"}} {n}",
                escape(event)
            );
        }
        let _ = writeln!(
            out,
            "# HELP interceptor_policy_generation Policies loaded since start (1 = the one started with).\n# TYPE interceptor_policy_generation gauge\ninterceptor_policy_generation {}",
            c.generation
        );
        let _ = writeln!(
            out,
            "# HELP interceptor_policy_last_reload_success Whether the last policy reload took effect.\n# TYPE interceptor_policy_last_reload_success gauge\ninterceptor_policy_last_reload_success {}",
            u8::from(c.last_reload_ok)
        );
        let _ = writeln!(
            out,
            "# HELP interceptor_policy_reloads_total Policy reloads, by result.\n# TYPE interceptor_policy_reloads_total counter\ninterceptor_policy_reloads_total{{result=\"loaded\"}} {}\ninterceptor_policy_reloads_total{{result=\"rejected\"}} {}",
            c.reloads_ok, c.reloads_rejected
        );
        drop(c);
        for (name, help, value) in gauges.gauges() {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP interceptor_{name} {help}\n# TYPE interceptor_{name} {kind}\ninterceptor_{name} {value}"
            );
        }
        out.push_str("# HELP interceptor_kernel_map_entries Entries in a kernel map.\n# TYPE interceptor_kernel_map_entries gauge\n");
        let maps = gauges.maps();
        for (map, n, _) in &maps {
            let _ = writeln!(out, "interceptor_kernel_map_entries{{map=\"{map}\"}} {n}");
        }
        out.push_str("# HELP interceptor_kernel_map_capacity Maximum entries of a kernel map.\n# TYPE interceptor_kernel_map_capacity gauge\n");
        for (map, _, cap) in &maps {
            let _ = writeln!(
                out,
                "interceptor_kernel_map_capacity{{map=\"{map}\"}} {cap}"
            );
        }
        out
    }
}

fn seconds(us: u64) -> String {
    // Exact decimal: microseconds as seconds without float noise.
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        format!("{whole}")
    } else {
        format!("{whole}.{frac:06}")
            .trim_end_matches('0')
            .to_owned()
    }
}

/// Label values: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Tap for Metrics {
    fn event(&self, ev: &AuditEvent, line: &str) {
        let policy = (ev.event == "policy")
            .then(|| serde_json::from_str::<PolicyFields<'_>>(line).ok())
            .flatten();
        let mut c = self.lock();
        *c.events.entry(ev.event).or_default() += 1;
        if let Some(d) = &ev.decision {
            let key = (Arc::clone(&d.target), Arc::clone(&d.identities), d.decision);
            *c.decisions.entry(key).or_default() += 1;
            c.observe_eval(d.eval_us);
        }
        if let Some(x) = &ev.executions {
            let key = (Arc::clone(&x.target), Arc::clone(&x.identities), x.decision);
            *c.executions.entry(key).or_default() += x.count;
        }
        match policy.and_then(|p| p.status) {
            Some("loaded") => {
                c.generation += 1;
                c.reloads_ok += 1;
                c.last_reload_ok = true;
            }
            Some("rejected") => {
                c.reloads_rejected += 1;
                c.last_reload_ok = false;
            }
            _ => {}
        }
    }
}

impl Counters {
    fn observe_eval(&mut self, us: u64) {
        if let Some(i) = BUCKETS_US.iter().position(|b| us <= *b) {
            self.eval_buckets[i] += 1;
        }
        self.eval_count += 1;
        self.eval_sum_us += us;
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, gauges: Arc<dyn Gauges>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let gauges = Arc::clone(&gauges);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                answer(stream, &metrics, gauges.as_ref()),
            )
            .await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    gauges: &dyn Gauges,
) -> std::io::Result<()> {
    // Read the request head (bounded); only its first line matters.
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(gauges),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found; metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Gauges for Fixed {
        fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
            vec![("connections_live", "Live connections.", 3.0)]
        }
        fn maps(&self) -> Vec<(&'static str, usize, u32)> {
            vec![("CONN_BY_COOKIE", 2, 65536)]
        }
    }

    #[test]
    fn counts_decisions_and_times_from_records() {
        let m = Metrics::new();
        let query = |identities: &str, decision, eval_us| {
            AuditEvent::new("query").with_decision(crate::audit::DecisionFacts {
                target: Arc::from("pg"),
                identities: Arc::from(identities),
                decision,
                eval_us,
            })
        };
        m.event(&query("batch", Decision::Deny, 7), "{}");
        m.event(&query("batch", Decision::Deny, 70), "{}");
        m.event(&query("", Decision::Allow, 20000), "{}");
        let executions = |event, count| {
            AuditEvent::new(event).with_executions(crate::audit::ExecutionFacts {
                target: Arc::from("pg"),
                identities: Arc::from("batch"),
                decision: Decision::Allow,
                count,
            })
        };
        m.event(&executions("execute", 1), "{}");
        m.event(&executions("executions", 41), "{}");
        m.event(
            &AuditEvent::new("policy"),
            r#"{"event":"policy","status":"rejected"}"#,
        );
        m.event(
            &AuditEvent::new("connect"),
            r#"{"event":"connect","target":"a\"b"}"#,
        );
        let text = m.render(&Fixed);
        for want in [
            "interceptor_decisions_total{target=\"pg\",identity=\"batch\",decision=\"deny\"} 2",
            "interceptor_decisions_total{target=\"pg\",identity=\"\",decision=\"allow\"} 1",
            "interceptor_executions_total{target=\"pg\",identity=\"batch\",decision=\"allow\"} 42",
            "interceptor_decision_seconds_bucket{le=\"0.00001\"} 1",
            "interceptor_decision_seconds_bucket{le=\"0.0001\"} 2",
            "interceptor_decision_seconds_bucket{le=\"0.01\"} 2",
            "interceptor_decision_seconds_bucket{le=\"+Inf\"} 3",
            "interceptor_decision_seconds_sum 0.020077",
            "interceptor_policy_last_reload_success 0",
            "interceptor_policy_generation 1",
            "interceptor_audit_events_total{event=\"connect\"} 1",
            "interceptor_connections_live 3",
            "interceptor_kernel_map_entries{map=\"CONN_BY_COOKIE\"} 2",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        assert_eq!(escape("a\"b\\\n"), "a\\\"b\\\\\\n");
    }

    #[tokio::test]
    async fn serves_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Metrics::new(), Arc::new(Fixed)));
        for (req, want) in [
            ("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK"),
            ("GET / HTTP/1.1\r\n\r\n", "404"),
            ("POST /metrics HTTP/1.1\r\n\r\n", "405"),
            ("garbage\r\n\r\n", "405"),
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            assert!(text.contains(want), "{req:?}: {text}");
        }
        task.abort();
    }
}
