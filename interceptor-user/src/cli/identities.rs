//! `interceptor identities`: the workloads with live connections, what the
//! policy calls them, and what they have been told.

use std::{io::Write as _, path::Path};

use clap::Args;
use serde_json::Value;

use crate::control::{self, Request};

#[derive(Debug, Args)]
pub struct IdentitiesArgs {
    /// Print the JSON array the agent answers.
    #[arg(long)]
    json: bool,
}

pub fn identities(args: &IdentitiesArgs, socket: &Path) -> i32 {
    let data = match control::request(socket, &Request::Identities) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("interceptor identities: {e}");
            return 1;
        }
    };
    let text = if args.json {
        format!("{data}\n")
    } else {
        render(data.as_array().map_or(&[][..], Vec::as_slice))
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    0
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn join(v: &Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

fn render(workloads: &[Value]) -> String {
    if workloads.is_empty() {
        return "no workload has a live connection\n".to_owned();
    }
    let mut out = format!(
        "{:<16} {:<10} {:<8} {:<16} {:<5} {:<14} {:<20} {:>6} {:>6} {:>7} {:>9} {:>6}  {}\n",
        "IDENTITIES",
        "USER",
        "PIDS",
        "COMM",
        "CONNS",
        "TARGETS",
        "DB USERS",
        "ALLOW",
        "DENY",
        "APPROVE",
        "EXECUTED",
        "SINCE",
        "EXE / UNIT / CGROUP"
    );
    for w in workloads {
        let st = &w["statements"];
        let user = w["user"]
            .as_str()
            .map_or_else(|| format!("uid={}", s(&w["uid"])), str::to_owned);
        let place = [&w["exe"], &w["unit"], &w["container"], &w["cgroup"]]
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| s(v))
            .collect::<Vec<_>>()
            .join("  ");
        let since = s(&w["since"]);
        // `etl_rw (brokered)`: the agent logs in as that user for it.
        let logins: Vec<String> = w["logins"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|l| match l["login"].as_str() {
                        Some("brokered") => format!("{} (brokered)", s(&l["db_user"])),
                        _ => s(&l["db_user"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let logins = if logins.is_empty() {
            "-".to_owned()
        } else {
            logins.join(",")
        };
        out.push_str(&format!(
            "{:<16} {:<10} {:<8} {:<16} {:<5} {:<14} {:<20} {:>6} {:>6} {:>7} {:>9} {:>6}  {}\n",
            join(&w["identities"]),
            user,
            join(&w["pids"]),
            s(&w["comm"]),
            s(&w["connections"]),
            join(&w["targets"]),
            logins,
            s(&st["allow"]),
            s(&st["deny"]),
            s(&st["approve"]),
            s(&w["executions"]),
            since.get(11..19).unwrap_or(&since),
            place
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_row_per_workload() {
        let w = serde_json::json!([{"identities": ["batch"], "user": "app", "uid": 1000, "pids": [7, 9],
            "comm": "pgbench", "connections": 2, "targets": ["pg"], "exe": "/usr/bin/pgbench",
            "statements": {"allow": 5, "deny": 1, "approve": 0}, "executions": 4321, "since": "2026-11-28T00:01:02.000000Z",
            "logins": [{"db_user": "etl_rw", "login": "brokered"}, {"db_user": "app", "login": "passthrough"}]}]);
        let text = render(w.as_array().unwrap());
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("batch"), "{text}");
        for part in [
            "app",
            "7,9",
            "pgbench",
            "/usr/bin/pgbench",
            "00:01:02",
            "4321",
            "etl_rw (brokered),app",
        ] {
            assert!(row.contains(part), "{part}: {text}");
        }
        assert!(render(&[]).contains("no workload"));
    }
}
