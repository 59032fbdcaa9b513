use std::path::Path;

use clap::Args;
use serde_json::Value;

use crate::control::{self, Request};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the raw JSON status.
    #[arg(long)]
    json: bool,
}

pub fn status(args: &StatusArgs, socket: &Path) -> i32 {
    let data = match control::request(socket, &Request::Status) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("interceptor: not ready: {e}");
            return 1;
        }
    };
    if args.json {
        println!("{data}");
        return 0;
    }
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!("agent:       ready (pid {})", data["pid"]);
    println!("cgroup:      {}", s(&data["cgroup"]));
    println!("mode:        {}", s(&data["mode"]));
    println!("policy:      {}", s(&data["policy"]));
    println!("audit log:   {}", s(&data["audit_log"]));
    let listen: Vec<String> = data["listen"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    println!("listening:   {}", listen.join(", "));
    println!("bypass:      {}", s(&data["local_bypass"]));
    println!("targets:");
    for t in data["targets"].as_array().into_iter().flatten() {
        println!(
            "  - {} {} {}",
            s(&t["name"]),
            s(&t["protocol"]),
            s(&t["address"])
        );
        if let Some(r) = t.get("resolved") {
            let addrs: Vec<String> = r["addresses"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            println!(
                "      resolved to {} at {}{}",
                if addrs.is_empty() {
                    "nothing".to_owned()
                } else {
                    addrs.join(", ")
                },
                r["resolved_at"].as_str().unwrap_or("never"),
                r["last_error"]
                    .as_str()
                    .map(|e| format!(" (last attempt failed: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    let namespaces = data["namespaces"].as_array().cloned().unwrap_or_default();
    println!(
        "namespaces:  {} served ({} besides the agent's own)",
        namespaces.len(),
        namespaces.iter().filter(|n| n["host"] != true).count()
    );
    let c = &data["connections"];
    println!(
        "connections: {} live, {} total, {} rejected",
        c["live"], c["total"], c["rejected"]
    );
    0
}
