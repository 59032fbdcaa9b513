//! Webhooks for approvals: an HTTP POST with a JSON body (or a
//! Slack-compatible one) when an approval is requested, decided, expires or
//! is withdrawn.
//!
//! Sending happens on one background thread fed by a bounded queue, so the
//! data path never waits for a webhook: a full queue drops the notification
//! (audited as `notify_failed`). Plain `http://` only, written by hand over
//! `std::net::TcpStream`: a request line, a few headers and a body is all a
//! webhook needs, and no HTTP client crate in reach fits without pulling a
//! TLS stack and a large dependency tree into the agent. Use a local relay
//! for `https://` endpoints.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc::{SyncSender, TrySendError},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    audit::AuditEvent,
    audit::AuditLog,
    policy::{HttpUrl, NotifySpec},
};

/// Notifications waiting to be sent; beyond this they are dropped.
const QUEUE: usize = 256;
/// Delays before the retries of a failed send.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// One notification for one webhook.
struct Job {
    url: String,
    headers: BTreeMap<String, String>,
    body: String,
    event: &'static str,
    approval_id: String,
}

/// Queues webhook notifications for the sending thread (started on first use).
pub struct Notifier {
    audit: AuditLog,
    tx: OnceLock<Option<SyncSender<Job>>>,
    /// Set when the agent stops: queued notifications are dropped and
    /// retries end, so a dead endpoint cannot hold up the shutdown.
    closing: Arc<AtomicBool>,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
    }
}

impl Notifier {
    #[must_use]
    pub fn new(audit: AuditLog) -> Self {
        Self {
            audit,
            tx: OnceLock::new(),
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues `message` for every webhook in `specs`; never blocks.
    pub fn send(&self, specs: &[NotifySpec], message: &Message) {
        for spec in specs {
            let slack = spec.format.as_deref() == Some("slack");
            let body = if slack {
                slack_body(message)
            } else {
                json_body(message)
            };
            let job = Job {
                url: spec.url.clone(),
                headers: spec.headers.clone().unwrap_or_default(),
                body: body.to_string(),
                event: message.event,
                approval_id: message.approval_id().to_owned(),
            };
            let Some(tx) = self.sender() else {
                self.failed(&job, "the notification thread could not start", 0);
                continue;
            };
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                    self.failed(&job, "notification queue full", 0);
                }
            }
        }
    }

    fn sender(&self) -> Option<&SyncSender<Job>> {
        self.tx
            .get_or_init(|| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
                let audit = self.audit.clone();
                let closing = Arc::clone(&self.closing);
                std::thread::Builder::new()
                    .name("notify".into())
                    .spawn(move || {
                        for job in rx {
                            if closing.load(Ordering::Acquire) {
                                tracing::warn!(url = %job.url, "agent stopping: notification dropped");
                                continue;
                            }
                            deliver(&audit, &job, &closing);
                        }
                    })
                    .map_err(|e| tracing::error!("notification thread: {e}"))
                    .ok()
                    .map(|_| tx)
            })
            .as_ref()
    }

    fn failed(&self, job: &Job, error: &str, attempts: usize) {
        failed(&self.audit, job, error, attempts);
    }
}

fn failed(audit: &AuditLog, job: &Job, error: &str, attempts: usize) {
    tracing::warn!(url = %job.url, event = job.event, "webhook failed: {error}");
    audit.record(
        AuditEvent::new("notify_failed")
            .with("url", &job.url)
            .with("notification", job.event)
            .with("approval_id", &job.approval_id)
            .with("attempts", attempts)
            .with("error", error),
    );
}

/// Sends one job, retrying with backoff; audits the final failure.
fn deliver(audit: &AuditLog, job: &Job, closing: &AtomicBool) {
    let mut last = String::new();
    for attempt in 0..=BACKOFF.len() {
        if attempt > 0 {
            if closing.load(Ordering::Acquire) {
                failed(
                    audit,
                    job,
                    &format!("{last} (agent stopping, no more retries)"),
                    attempt,
                );
                return;
            }
            std::thread::sleep(BACKOFF[attempt - 1]);
        }
        match post(job) {
            Ok(()) => return,
            Err(e) => last = e,
        }
    }
    failed(audit, job, &last, BACKOFF.len() + 1);
}

fn post(job: &Job) -> Result<(), String> {
    let url = HttpUrl::parse(&job.url)?;
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, url.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {}: {e}", url.host))?
        .collect();
    let mut stream = None;
    let mut err = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => err = format!("connect {a}: {e}"),
        }
    }
    let mut s = stream.ok_or(err)?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: interceptor\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.host,
        url.port,
        job.body.len()
    );
    for (k, v) in &job.headers {
        // Validated with the policy; never let a value add a header line.
        if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
            continue;
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&job.body);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("no HTTP status in the answer {line:?}"))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

/// What a notification says.
#[derive(Clone, Debug)]
pub struct Message {
    /// `approval_requested`, `approval_granted`, `approval_denied`,
    /// `approval_expired`, `approval_escalated`, `approval_withdrawn`.
    pub event: &'static str,
    /// The approval as `approvals list --json` shows it.
    pub approval: Value,
    /// Who decided, when someone did.
    pub actor: Option<Value>,
    pub reason: Option<String>,
}

impl Message {
    fn approval_id(&self) -> &str {
        self.approval["id"].as_str().unwrap_or_default()
    }
}

/// The JSON body: every value serialized by serde_json, so statement text
/// can never change the document's structure.
#[must_use]
pub fn json_body(m: &Message) -> Value {
    json!({
        "source": "interceptor",
        "event": m.event,
        "approval": m.approval,
        "actor": m.actor,
        "reason": m.reason,
    })
}

/// A Slack-compatible body (`{"text": …}`, mrkdwn). Every interpolated
/// value has `&`, `<`, `>` escaped (so no text can make a link or a
/// mention), and the statement goes in a code block whose backticks are
/// replaced, so statement text cannot close it.
#[must_use]
pub fn slack_body(m: &Message) -> Value {
    let a = &m.approval;
    let s = |v: &Value| slack_escape(&v.as_str().map_or_else(|| v.to_string(), str::to_owned));
    let id = s(&a["id"]);
    let title = match m.event {
        "approval_requested" => "Approval needed",
        "approval_granted" => "Approved",
        "approval_denied" => "Denied",
        "approval_expired" => "Expired (denied)",
        "approval_escalated" => "Escalated",
        "approval_withdrawn" => "Withdrawn (the client left)",
        other => other,
    };
    let ident = &a["identity"];
    let mut text = format!(
        "*Interceptor: {title}* ({id})\nRule: {}\nWorkload: {} (uid {}, {})\nTarget: {} database {} as {}\n",
        s(&a["rule"]),
        s(&ident["user"]),
        s(&ident["uid"]),
        s(&ident["exe"]),
        s(&a["target"]),
        s(&a["database"]),
        s(&a["db_user"]),
    );
    text.push_str("```\n");
    text.push_str(&code_block_text(a["query"].as_str().unwrap_or_default()));
    text.push_str("\n```\n");
    if let Some(actor) = &m.actor {
        let who = actor["user"]
            .as_str()
            .map_or_else(|| format!("uid {}", actor["uid"]), str::to_owned);
        text.push_str(&format!("By: {}\n", slack_escape(&who)));
    }
    if let Some(r) = &m.reason {
        text.push_str(&format!("Reason: {}\n", slack_escape(r)));
    }
    if m.event == "approval_requested" || m.event == "approval_escalated" {
        text.push_str(&format!(
            "Expires: {}\nDecide: `interceptor approvals approve {id}` or `interceptor approvals deny {id}`",
            s(&a["expires_at"])
        ));
    }
    json!({ "text": text })
}

/// Slack's three control characters in text.
#[must_use]
pub fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Statement text for inside a ``` block: escaped, and every backtick
/// replaced by a look-alike (U+02CB) so the block cannot be closed early.
#[must_use]
pub fn code_block_text(s: &str) -> String {
    slack_escape(s).replace('`', "\u{2cb}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(query: &str) -> Message {
        Message {
            event: "approval_requested",
            approval: json!({
                "id": "a-1", "rule": "ddl <b>", "target": "pg", "database": "app",
                "db_user": "u", "query": query, "expires_at": "2026-01-01T00:00:00Z",
                "identity": {"user": "svc", "uid": 1001, "exe": "/bin/x"},
            }),
            actor: None,
            reason: Some("ok & <!channel>".into()),
        }
    }

    #[test]
    fn json_body_keeps_its_structure() {
        let q = "select '\"}, \"event\": \"approval_granted\"' -- \n\u{0}";
        let body = json_body(&message(q)).to_string();
        let back: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(back["event"], "approval_requested");
        assert_eq!(back["approval"]["query"], q);
    }

    #[test]
    fn slack_body_cannot_be_forged_by_the_statement() {
        let q = "select 1 ```\n*Approved* <https://evil|click> & <!here> `x`";
        let body = slack_body(&message(q));
        let text = body["text"].as_str().unwrap();
        // One code block, opened and closed by the agent only.
        assert_eq!(text.matches("```").count(), 2, "{text}");
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
        assert!(
            text.contains("&lt;!here&gt;") && text.contains("&amp;"),
            "{text}"
        );
        assert!(text.contains("ddl &lt;b&gt;"), "{text}");
        assert!(text.contains("ok &amp; &lt;!channel&gt;"), "{text}");
        // The statement sits between the agent's fences.
        let inner = text.split("```").nth(1).unwrap();
        assert!(inner.contains("select 1 \u{2cb}\u{2cb}\u{2cb}"), "{inner}");
        assert!(!inner.contains('`'));
        // And the whole body is valid JSON with a single text field.
        let back: Value = serde_json::from_str(&body.to_string()).unwrap();
        assert_eq!(back.as_object().unwrap().len(), 1);
    }

    #[test]
    fn posts_and_retries() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            for status in ["500 Oops", "200 OK"] {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .unwrap();
            }
            got
        });
        let job = Job {
            url: format!("http://127.0.0.1:{port}/hook"),
            headers: BTreeMap::from([("X-Token".to_owned(), "t".to_owned())]),
            body: "{}".into(),
            event: "approval_requested",
            approval_id: "a".into(),
        };
        assert!(post(&job).is_err());
        assert!(post(&job).is_ok());
        let got = server.join().unwrap();
        assert!(got[1].starts_with("POST /hook HTTP/1.1\r\n"), "{}", got[1]);
        assert!(got[1].contains("X-Token: t\r\n") && got[1].ends_with("\r\n\r\n{}"));
    }
}
