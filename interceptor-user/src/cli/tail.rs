//! `interceptor tail`: recent and live decisions, shaped like `tail` and
//! `hubble observe`. From the running agent over the control socket, or
//! from audit log files with `--file` (no agent needed).

use std::{
    io::{IsTerminal as _, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::control::{
    self, Request,
    tail::{Connections, Filter, last_matching, resolve_since},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One readable line per event.
    Compact,
    /// The audit record as it is, one JSON object per line.
    Json,
    /// Aligned columns under a header.
    Table,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Keep printing new events as they happen (until Ctrl-C).
    #[arg(short = 'f', long)]
    follow: bool,
    /// How many of the most recent matching events to print first.
    #[arg(short = 'n', long = "last", default_value_t = 10)]
    last: usize,
    /// Only events since a duration ago (`90s`, `10m`, `2h`) or an RFC 3339 timestamp.
    #[arg(long)]
    since: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Compact)]
    output: Output,
    /// Same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
    /// Colour decisions.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
    /// Only statements with this decision (allow, deny, approve); repeatable.
    #[arg(long)]
    decision: Vec<String>,
    /// Only this workload: a policy identity name, `key=value` over identity
    /// fields (uid=1000, unit=batch.service), or a comm/exe/user/unit/container; repeatable.
    #[arg(long)]
    identity: Vec<String>,
    /// Only this target (name from the policy); repeatable.
    #[arg(long)]
    target: Vec<String>,
    /// Only this event type (query, execute, executions, connect, disconnect, block, policy, ...); repeatable.
    #[arg(long)]
    event: Vec<String>,
    /// Only decisions by this rule; repeatable.
    #[arg(long)]
    rule: Vec<String>,
    /// Read these audit log files instead of asking the agent (rotated files
    /// included, in any order).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    file: Vec<PathBuf>,
}

pub fn tail(args: &TailArgs, socket: &Path) -> i32 {
    let mut filter = Filter {
        decision: args.decision.clone(),
        identity: args.identity.clone(),
        target: args.target.clone(),
        event: args.event.clone(),
        rule: args.rule.clone(),
        since: None,
    };
    if let Some(since) = &args.since {
        match resolve_since(since, time::OffsetDateTime::now_utc()) {
            Ok(s) => filter.since = Some(s),
            Err(e) => {
                eprintln!("interceptor tail: {e}");
                return 2;
            }
        }
    }
    let output = if args.json { Output::Json } else { args.output };
    let color = match args.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let mut printer = Printer {
        out: std::io::stdout().lock(),
        output,
        color,
        header_done: false,
    };
    let result = if args.file.is_empty() {
        from_agent(args, filter, socket, &mut printer)
    } else {
        from_files(args, &filter, &mut printer)
    };
    match result {
        Ok(()) => 0,
        // `| head` closed the pipe: that is how a reader says "enough".
        Err(TailError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("interceptor tail: {e}");
            1
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TailError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Control(#[from] control::ControlError),
}

fn from_agent(
    args: &TailArgs,
    filter: Filter,
    socket: &Path,
    p: &mut Printer<'_>,
) -> Result<(), TailError> {
    let req = Request::Tail {
        filter,
        last: args.last,
        follow: args.follow,
    };
    let (_, items) = control::request_stream(socket, &req)?;
    for item in items {
        p.print(&item?)?;
    }
    Ok(())
}

fn from_files(args: &TailArgs, filter: &Filter, p: &mut Printer<'_>) -> Result<(), TailError> {
    let files = crate::audit::chain_order(&args.file);
    let mut seen = 0u64;
    for ev in last_matching(&files, filter, args.last) {
        seen = seen.max(ev["seq"].as_u64().unwrap_or(0));
        p.print(&ev)?;
    }
    if !args.follow {
        return Ok(());
    }
    // Follow the newest file as it grows (and a rotation, by re-reading
    // the set).
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let files = crate::audit::chain_order(&args.file);
        let Some(newest) = files.last() else { continue };
        let text = std::fs::read_to_string(newest).unwrap_or_default();
        // A file reads on its own: connections are learnt from its start.
        let mut conns = Connections::default();
        for line in text.lines() {
            let Ok(ev) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            conns.learn(&ev);
            let seq = ev["seq"].as_u64().unwrap_or(0);
            if seq > seen {
                seen = seq;
                if filter.matches_as(&ev, conns.who(&ev)) {
                    p.print(&ev)?;
                }
            }
        }
    }
}

struct Printer<'a> {
    out: std::io::StdoutLock<'a>,
    output: Output,
    color: bool,
    header_done: bool,
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `comm[pid] user (names)`: who, in a few words.
fn who(ev: &Value) -> String {
    let id = &ev["identity"];
    if id.is_null() {
        return ev["actor"]["user"]
            .as_str()
            .map_or_else(String::new, |u| format!("by {u}"));
    }
    let mut w = format!("{}[{}]", s(&id["comm"]), s(&id["tgid"]));
    match id["user"].as_str() {
        Some(u) => w.push_str(&format!(" {u}")),
        None => w.push_str(&format!(" uid={}", s(&id["uid"]))),
    }
    let names: Vec<String> = ev["identities"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    if !names.is_empty() {
        w.push_str(&format!(" ({})", names.join(",")));
    }
    w
}

/// The event's label: the decision for statements, else the event name.
fn label(ev: &Value) -> String {
    match (ev["event"].as_str(), ev["decision"].as_str()) {
        (Some("query"), Some(d)) => {
            let mut l = d.to_uppercase();
            if ev["enforced"] == Value::Bool(false) && d != "allow" {
                l.push_str("(shadow)");
            }
            l
        }
        (Some(e), _) => e.to_owned(),
        _ => String::from("?"),
    }
}

/// What the server said of a statement or execution: `rows=N`, or the
/// error; empty when the record carries no result.
fn result(ev: &Value) -> String {
    match ev["outcome"].as_str() {
        Some("ok") if ev["rows"].is_null() => "ok".to_owned(),
        Some("ok") => format!("rows={}", s(&ev["rows"])),
        Some("error") => match ev["error_code"].as_u64() {
            Some(code) => format!("error={} ({code})", s(&ev["error"])),
            None => format!("error={}", s(&ev["error"])),
        },
        Some(other) => other.to_owned(),
        None => String::new(),
    }
}

/// What the event is about: the statement, or a short detail.
fn detail(ev: &Value) -> String {
    match ev["event"].as_str() {
        Some("execute") => {
            return format!(
                "{} {} {}us",
                s(&ev["decision_id"]),
                result(ev),
                s(&ev["duration_us"])
            );
        }
        Some("executions") => {
            let mut d = format!(
                "{} count={} rows={} errors={}",
                s(&ev["decision_id"]),
                s(&ev["count"]),
                s(&ev["rows"]),
                s(&ev["errors"])
            );
            if ev["unfinished"].as_u64().unwrap_or(0) > 0 {
                d.push_str(&format!(" unfinished={}", s(&ev["unfinished"])));
            }
            if let Some(e) = ev["last_error"].as_str() {
                d.push_str(&format!(" last_error={e}"));
            }
            d.push_str(&format!(
                " {}..{}",
                short_time(&s(&ev["first"])),
                short_time(&s(&ev["last"]))
            ));
            return d;
        }
        _ => {}
    }
    for key in ["query", "selector", "error", "reason", "status", "dst"] {
        if !ev[key].is_null() {
            let text = s(&ev[key]);
            let mut text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let result = result(ev);
            if key == "query" && !result.is_empty() {
                text.push_str(&format!(" [{result}]"));
            }
            return text;
        }
    }
    String::new()
}

fn paint(color: bool, label: &str, text: &str) -> String {
    if !color {
        return text.to_owned();
    }
    let code = match label.split('(').next().unwrap_or("") {
        "ALLOW" => "32",
        "DENY" | "protocol_error" | "reject" | "block" => "31",
        "APPROVE" | "approval_requested" => "33",
        _ => "36",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// Time without the date when it is today's, to the millisecond.
fn short_time(ts: &str) -> String {
    let today = crate::audit::format_ts(time::OffsetDateTime::now_utc());
    let ms = ts.get(..23).unwrap_or(ts);
    match (ts.get(..10), today.get(..10)) {
        (Some(d), Some(t)) if d == t => ms.get(11..).unwrap_or(ms).to_owned(),
        _ => ms.replacen('T', " ", 1),
    }
}

impl Printer<'_> {
    fn print(&mut self, ev: &Value) -> std::io::Result<()> {
        if ev["event"] == "tail_lagged" {
            eprintln!(
                "interceptor tail: too slow to keep up, {} events skipped (see the audit log)",
                s(&ev["missed"])
            );
            return Ok(());
        }
        let label = label(ev);
        match self.output {
            Output::Json => writeln!(self.out, "{ev}")?,
            Output::Compact => {
                let rule = ev["rule"]
                    .as_str()
                    .map_or_else(String::new, |r| format!(" rule={r}"));
                let target = ev["target"]
                    .as_str()
                    .map_or_else(String::new, |t| format!(" -> {t}"));
                writeln!(
                    self.out,
                    "{} {} {}{}{} {}",
                    short_time(&s(&ev["ts"])),
                    paint(self.color, &label, &format!("{label:<8}")),
                    who(ev),
                    target,
                    rule,
                    detail(ev)
                )?;
            }
            Output::Table => {
                if !self.header_done {
                    writeln!(
                        self.out,
                        "{:<12} {:<18} {:<28} {:<10} {:<20} QUERY/DETAIL",
                        "TIME", "EVENT", "IDENTITY", "TARGET", "RULE"
                    )?;
                    self.header_done = true;
                }
                let mut who = who(ev);
                who.truncate(28);
                writeln!(
                    self.out,
                    "{:<12} {} {:<28} {:<10} {:<20} {}",
                    short_time(&s(&ev["ts"])),
                    paint(self.color, &label, &format!("{label:<18}")),
                    who,
                    s(&ev["target"]),
                    s(&ev["rule"]),
                    detail(ev)
                )?;
            }
        }
        // Followers read line by line; a pipe must not sit on a buffer.
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compact_pieces() {
        let ev = json!({"ts": "2020-01-02T03:04:05.678901Z", "event": "query", "decision": "deny",
            "enforced": true, "rule": "no-drops", "target": "pg", "identities": ["batch"],
            "identity": {"comm": "psql", "tgid": 42, "uid": 0, "user": "root"},
            "query": "DROP   TABLE\n x"});
        assert_eq!(label(&ev), "DENY");
        assert_eq!(who(&ev), "psql[42] root (batch)");
        assert_eq!(detail(&ev), "DROP TABLE x");
        assert_eq!(
            short_time("2020-01-02T03:04:05.678901Z"),
            "2020-01-02 03:04:05.678"
        );
        let shadow = json!({"event": "query", "decision": "deny", "enforced": false});
        assert_eq!(label(&shadow), "DENY(shadow)");
        assert_eq!(label(&json!({"event": "connect"})), "connect");
        let answered = json!({"event": "query", "query": "SELECT 1", "outcome": "ok", "rows": 1});
        assert_eq!(detail(&answered), "SELECT 1 [rows=1]");
        let failed = json!({"event": "query", "query": "INSERT", "outcome": "error",
            "error": "23000", "error_code": 1062});
        assert_eq!(detail(&failed), "INSERT [error=23000 (1062)]");
        let exec = json!({"event": "execute", "decision_id": "b-1-2", "outcome": "ok",
            "rows": 3, "duration_us": 41});
        assert_eq!(label(&exec), "execute");
        assert_eq!(detail(&exec), "b-1-2 rows=3 41us");
        let summary = json!({"event": "executions", "decision_id": "b-1-2", "count": 100,
            "rows": 100, "errors": 1, "unfinished": 0, "last_error": "23505",
            "first": "2020-01-02T03:04:05.000000Z", "last": "2020-01-02T03:04:05.900000Z"});
        let d = detail(&summary);
        assert!(
            d.starts_with("b-1-2 count=100 rows=100 errors=1 last_error=23505 "),
            "{d}"
        );
        assert!(!d.contains('\n'), "{d}");
        assert!(paint(true, "DENY", "x").starts_with("\x1b[31m"));
        assert_eq!(paint(false, "DENY", "x"), "x");
    }
}
